//! Load generation: a few threads, each with its own mio `Poll` driving many
//! virtual clients without blocking, and what they measure.
//!
//! A virtual client does one request after another until the run is over:
//! with a new connection each time ([`oneshot`]), or over one persistent
//! GSP2 connection with requests pipelined ([`persistent`]). Each request
//! takes a ticket first ([`Ctx::ticket`]): that is how `-n` is shared between
//! threads, how `-d` ends, and how warm-up requests are told apart.

mod oneshot;
mod persistent;

use crate::cpu::{self, CpuTime};
use crate::frame;
use crate::limits;
use hdrhistogram::Histogram;
use mio::event::Event;
use mio::{Events, Poll, Registry, Token};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

/// How often each thread looks for timeouts and clients to restart, and how
/// soon after its last client finishes it notices.
const SWEEP: Duration = Duration::from_millis(10);

/// How often the caller hears how the run is going.
const TICK: Duration = Duration::from_millis(250);

/// Bytes read per `read` call; one buffer per thread.
const SCRATCH: usize = 256 * 1024;

/// The slowest latency the histogram tells apart from the next: one hour
/// (longer ones are recorded as one hour), in nanoseconds.
const LATENCY_CEILING_NS: u64 = 3_600_000_000_000;

/// How much load to apply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// This many requests in all, shared by every client.
    Requests(u64),
    /// For this long.
    Duration(Duration),
}

/// How each client talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new connection per request, as gaspar clients do.
    OneShot,
    /// One GSP2 connection per client with up to `pipeline` requests in
    /// flight (fewer if the server's window is smaller).
    Persistent { pipeline: usize },
}

/// What a reply must be for the request to count as a success.
#[derive(Debug, Clone)]
pub enum Expectation {
    /// Any reply.
    None,
    /// The request's own payload (an echo handler).
    Echo,
    /// These bytes.
    Fixed(Arc<[u8]>),
}

/// A run, validated.
#[derive(Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    /// ADDR as given, for the report.
    pub addr_text: String,
    pub connections: usize,
    pub threads: usize,
    pub amount: Amount,
    pub mode: Mode,
    pub expectation: Expectation,
    pub timeout: Duration,
    pub warmup: Duration,
    /// The request as sent: header and payload, shared by every client.
    frame: Arc<[u8]>,
    /// What every reply must be, if anything.
    expected: Option<Arc<[u8]>>,
}

impl Plan {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        addr: SocketAddr,
        addr_text: String,
        connections: usize,
        threads: usize,
        amount: Amount,
        payload: Vec<u8>,
        expectation: Expectation,
        mode: Mode,
        timeout: Duration,
        warmup: Duration,
    ) -> Plan {
        let frame = Arc::from(frame::request(&payload));
        let expected = match &expectation {
            Expectation::None => None,
            Expectation::Echo => Some(Arc::from(payload)),
            Expectation::Fixed(bytes) => Some(bytes.clone()),
        };
        Plan {
            addr,
            addr_text,
            connections,
            threads,
            amount,
            mode,
            expectation,
            timeout,
            warmup,
            frame,
            expected,
        }
    }

    pub fn payload_len(&self) -> usize {
        self.frame.len() - frame::HEADER_LEN
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Refused,
    Reset,
    Timeout,
    WrongReply,
    HandlerError,
    ServerTimeout,
    Overloaded,
    WorkerLost,
    BadStatus,
    Protocol,
    Other,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Refused,
        ErrorKind::Reset,
        ErrorKind::Timeout,
        ErrorKind::WrongReply,
        ErrorKind::HandlerError,
        ErrorKind::ServerTimeout,
        ErrorKind::Overloaded,
        ErrorKind::WorkerLost,
        ErrorKind::BadStatus,
        ErrorKind::Protocol,
        ErrorKind::Other,
    ];

    /// The name in reports and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::WrongReply => "wrong_reply",
            ErrorKind::HandlerError => "handler_error",
            ErrorKind::ServerTimeout => "server_timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::WorkerLost => "worker_lost",
            ErrorKind::BadStatus => "bad_status",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// A network error as the protocol reads it: a reset (however it shows
    /// up while sending or receiving) means the request failed.
    fn of_io(error: &io::Error) -> ErrorKind {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected => ErrorKind::Reset,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        }
    }

    /// The error a GSP2 status stands for; `None` for ok.
    fn of_status(status: frame::Status) -> Option<ErrorKind> {
        match status {
            frame::Status::Ok => None,
            frame::Status::HandlerError => Some(ErrorKind::HandlerError),
            frame::Status::Timeout => Some(ErrorKind::ServerTimeout),
            frame::Status::Overloaded => Some(ErrorKind::Overloaded),
            frame::Status::WorkerLost => Some(ErrorKind::WorkerLost),
            frame::Status::Unknown(_) => Some(ErrorKind::BadStatus),
        }
    }
}

/// What one thread (then the whole run) measured, over the measured phase.
#[derive(Debug)]
pub struct Stats {
    /// Latency of each successful request, in nanoseconds.
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: [u64; ErrorKind::ALL.len()],
    /// The first message seen for each kind of error, to say what it was.
    pub samples: [Option<String>; ErrorKind::ALL.len()],
    /// Request and reply payload bytes of successful requests.
    pub bytes: u64,
    /// When the last counted request finished.
    pub last_done: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency: Histogram::new_with_bounds(1, LATENCY_CEILING_NS, 3)
                .expect("constant histogram bounds are valid"),
            ok: 0,
            errors: [0; ErrorKind::ALL.len()],
            samples: Default::default(),
            bytes: 0,
            last_done: None,
        }
    }

    pub fn error_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()]
    }

    pub fn sample_of(&self, kind: ErrorKind) -> Option<&str> {
        self.samples[kind.index()].as_deref()
    }

    fn merge(&mut self, other: Stats) {
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds merge");
        self.ok += other.ok;
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        for (mine, theirs) in self.samples.iter_mut().zip(other.samples) {
            if mine.is_none() {
                *mine = theirs;
            }
        }
        self.bytes += other.bytes;
        self.last_done = self.last_done.max(other.last_done);
    }
}

/// A run's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub stats: Stats,
    /// The measured phase: `-d`, or until the last of `-n` requests finished.
    pub elapsed: Duration,
    /// The whole run, warm-up included.
    pub wall: Duration,
    /// The generator's own CPU time over `wall`.
    pub cpu: CpuTime,
    /// The window the server announced, with --persistent.
    pub window: Option<u32>,
}

/// How the run is going, for a progress line.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub since_start: Duration,
    pub warming_up: bool,
    pub ok: u64,
    pub errors: u64,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("{addr} does not support the persistent extension (GSP2): {detail}")]
    NotSupported { addr: String, detail: String },
    #[error("{addr} announced a window of 0 requests: nothing can be sent")]
    ZeroWindow { addr: String },
    #[error("cannot start the load: {0}")]
    Io(#[from] io::Error),
}

/// Runs the load `plan` describes, calling `tick` now and then from this
/// thread with how it is going.
pub fn run(plan: &Plan, mut tick: impl FnMut(&Snapshot)) -> Result<Outcome, LoadError> {
    let window = preflight(plan)?;
    let open_files = limits::raise_open_files(plan.connections as u64);
    if open_files < plan.connections as u64 {
        eprintln!(
            "gaspar-bench: warning: the open-file limit ({open_files}) is below -c {}; \
             connections past it will fail",
            plan.connections
        );
    }
    let pipeline = match plan.mode {
        Mode::OneShot => 0,
        Mode::Persistent { pipeline } => pipeline.min(window.unwrap_or(1) as usize),
    };
    let shared = Shared {
        plan,
        pipeline,
        tickets: AtomicU64::new(0),
        start: OnceLock::new(),
        progress: (0..plan.threads).map(|_| Progress::default()).collect(),
    };
    let barrier = Barrier::new(plan.threads + 1);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..plan.threads)
            .map(|index| {
                let clients = share(plan.connections, plan.threads, index);
                let (shared, barrier) = (&shared, &barrier);
                scope.spawn(move || match plan.mode {
                    Mode::OneShot => drive::<oneshot::OneShot>(shared, index, clients, barrier),
                    Mode::Persistent { .. } => {
                        drive::<persistent::Persistent>(shared, index, clients, barrier)
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = shared.start();
        let cpu_before = cpu::used();
        let mut next_tick = start + TICK;
        while !threads.iter().all(|thread| thread.is_finished()) {
            std::thread::sleep(SWEEP);
            let now = Instant::now();
            if now >= next_tick {
                tick(&shared.snapshot(now));
                next_tick = now + TICK;
            }
        }
        let wall = start.elapsed();
        let cpu = cpu::used().since(cpu_before);
        let mut stats = Stats::new();
        for thread in threads {
            stats.merge(thread.join().expect("load threads do not panic")?);
        }
        let measure_from = start + plan.warmup;
        let elapsed = match plan.amount {
            Amount::Duration(duration) => duration,
            Amount::Requests(_) => stats
                .last_done
                .map_or(wall.saturating_sub(plan.warmup), |last| {
                    last.saturating_duration_since(measure_from)
                }),
        };
        Ok(Outcome {
            stats,
            elapsed,
            wall,
            cpu,
            window,
        })
    })
}

/// Checks that the server is there (and speaks GSP2, with --persistent)
/// before starting, so that a wrong address fails at once with one clear
/// message instead of as a stream of errors. Returns the GSP2 window.
fn preflight(plan: &Plan) -> Result<Option<u32>, LoadError> {
    let addr = || plan.addr_text.clone();
    let wait = plan.timeout.min(Duration::from_secs(10));
    let mut stream =
        TcpStream::connect_timeout(&plan.addr, wait).map_err(|source| LoadError::Connect {
            addr: addr(),
            source,
        })?;
    if plan.mode == Mode::OneShot {
        // Closed without a byte: gaspard ignores such a connection.
        return Ok(None);
    }
    let not_supported = |detail: String| LoadError::NotSupported {
        addr: addr(),
        detail,
    };
    stream.set_read_timeout(Some(wait))?;
    let mut answer = [0; frame::HANDSHAKE_LEN];
    stream
        .write_all(&frame::PREAMBLE)
        .and_then(|()| stream.read_exact(&mut answer))
        .map_err(|error| match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                not_supported(format!("no answer to the preamble within {wait:?}"))
            }
            io::ErrorKind::ConnectionReset => {
                not_supported("it reset the connection after the preamble".into())
            }
            io::ErrorKind::UnexpectedEof => {
                not_supported("it closed the connection after the preamble".into())
            }
            _ => not_supported(format!("it answered the preamble with an error ({error})")),
        })?;
    let window = frame::parse_handshake(&answer).ok_or_else(|| {
        not_supported(format!(
            "it answered the preamble with {:?}, not GSP2",
            String::from_utf8_lossy(&answer)
        ))
    })?;
    if window == 0 {
        return Err(LoadError::ZeroWindow { addr: addr() });
    }
    // "No more requests": the server closes cleanly.
    let _ = stream
        .write_all(&frame::END_OF_REQUESTS)
        .and_then(|()| stream.read_to_end(&mut Vec::new()));
    Ok(Some(window))
}

/// How many of `connections` clients thread `index` of `threads` drives.
fn share(connections: usize, threads: usize, index: usize) -> usize {
    connections / threads + usize::from(index < connections % threads)
}

/// What every thread reads, and the few counters they share.
struct Shared<'a> {
    plan: &'a Plan,
    /// Requests in flight per persistent connection, before each server's
    /// window caps it further.
    pipeline: usize,
    /// Tickets handed out in the measured phase of a `-n` run.
    tickets: AtomicU64,
    /// When the threads started: the first to ask sets it.
    start: OnceLock<Instant>,
    progress: Vec<Progress>,
}

impl Shared<'_> {
    fn start(&self) -> Instant {
        *self.start.get_or_init(Instant::now)
    }

    fn snapshot(&self, now: Instant) -> Snapshot {
        let start = self.start();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Snapshot {
            since_start: now - start,
            warming_up: now < start + self.plan.warmup,
            ok: self.progress.iter().map(|p| load(&p.ok)).sum(),
            errors: self.progress.iter().map(|p| load(&p.errors)).sum(),
        }
    }
}

/// One thread's counts so far, written by that thread only.
#[derive(Default)]
struct Progress {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// The phases of the run, fixed once the threads start.
#[derive(Clone, Copy)]
struct Clock {
    measure_from: Instant,
    /// With `-d`: when requests stop counting and the threads stop.
    end: Option<Instant>,
}

/// What a client needs from its thread: the plan, tickets, and where to
/// record what happened.
pub(crate) struct Ctx<'a> {
    registry: &'a Registry,
    plan: &'a Plan,
    pipeline: usize,
    tickets: &'a AtomicU64,
    clock: Clock,
    stats: &'a mut Stats,
    progress: &'a Progress,
}

impl Ctx<'_> {
    /// Whether a request may start now, and if so whether it is measured
    /// (`false`: a warm-up request). `None`: the run is over for new requests.
    fn ticket(&self, now: Instant) -> Option<bool> {
        if self.clock.end.is_some_and(|end| now >= end) {
            return None;
        }
        if now < self.clock.measure_from {
            return Some(false);
        }
        match self.plan.amount {
            Amount::Requests(n) => {
                (self.tickets.fetch_add(1, Ordering::Relaxed) < n).then_some(true)
            }
            Amount::Duration(_) => Some(true),
        }
    }

    /// Whether a request that finishes at `now` counts: warm-up requests do
    /// not, nor (with `-d`) those still in flight when the time was up.
    fn counts(&self, measured: bool, now: Instant) -> bool {
        measured && self.clock.end.map_or(true, |end| now <= end)
    }

    fn succeed(&mut self, started: Instant, measured: bool, now: Instant, reply_len: usize) {
        if !self.counts(measured, now) {
            return;
        }
        let nanos = u64::try_from((now - started).as_nanos()).unwrap_or(u64::MAX);
        self.stats.latency.saturating_record(nanos.max(1));
        self.stats.ok += 1;
        self.stats.bytes += (self.plan.payload_len() + reply_len) as u64;
        self.stats.last_done = Some(now);
        self.progress.ok.store(self.stats.ok, Ordering::Relaxed);
    }

    fn fail(&mut self, measured: bool, now: Instant, kind: ErrorKind, detail: &dyn fmt::Display) {
        if !self.counts(measured, now) {
            return;
        }
        self.stats.errors[kind.index()] += 1;
        let sample = &mut self.stats.samples[kind.index()];
        if sample.is_none() {
            *sample = Some(detail.to_string());
        }
        self.stats.last_done = Some(now);
        self.progress
            .errors
            .store(self.stats.error_total(), Ordering::Relaxed);
    }
}

/// A virtual client, as a state machine its thread drives.
trait Client {
    fn new(token: Token, plan: &Plan) -> Self;
    /// Starts work, or restarts it when it had to wait for a sweep.
    fn start(&mut self, ctx: &mut Ctx);
    /// Makes what progress `event` allows.
    fn ready(&mut self, ctx: &mut Ctx, event: &Event, scratch: &mut [u8]);
    /// Called every [`SWEEP`]: times out what has run too long, restarts
    /// what waited.
    fn sweep(&mut self, ctx: &mut Ctx, now: Instant);
    /// Whether it has nothing more to do in this run.
    fn finished(&self) -> bool;
}

/// Whether `event` may let a read make progress (data, a close, an error).
fn readable(event: &Event) -> bool {
    event.is_readable() || event.is_read_closed() || event.is_error()
}

/// Whether a read that returned `n` bytes into a buffer of `len` left the
/// socket empty, so that reading again would only say "would block": a short
/// read from a TCP socket on Linux takes all that was queued, and with
/// edge-triggered polling any later arrival is a new event. Not once the peer
/// has closed (the event says so): no event follows that, so reading goes on
/// to the end of the stream.
fn drained(n: usize, len: usize, event: &Event) -> bool {
    n < len && !event.is_read_closed()
}

/// Whether `event` may let a write make progress.
fn writable(event: &Event) -> bool {
    event.is_writable() || event.is_write_closed() || event.is_error()
}

/// One thread's loop: its clients, its `Poll`, until the run is over.
fn drive<C: Client>(
    shared: &Shared,
    index: usize,
    clients: usize,
    barrier: &Barrier,
) -> Result<Stats, LoadError> {
    // Set up before the barrier so that every thread starts at once; wait at
    // the barrier even on failure, or the others would wait forever.
    let setup = Poll::new().and_then(|poll| {
        let registry = poll.registry().try_clone()?;
        Ok((poll, registry))
    });
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0; SCRATCH];
    let mut stats = Stats::new();
    let mut clients: Vec<C> = (0..clients)
        .map(|i| C::new(Token(i), shared.plan))
        .collect();
    barrier.wait();
    let (mut poll, registry) = setup?;
    let start = shared.start();
    let measure_from = start + shared.plan.warmup;
    let clock = Clock {
        measure_from,
        end: match shared.plan.amount {
            Amount::Duration(duration) => Some(measure_from + duration),
            Amount::Requests(_) => None,
        },
    };
    let mut ctx = Ctx {
        registry: &registry,
        plan: shared.plan,
        pipeline: shared.pipeline,
        tickets: &shared.tickets,
        clock,
        stats: &mut stats,
        progress: &shared.progress[index],
    };
    for client in &mut clients {
        client.start(&mut ctx);
    }
    let mut next_sweep = Instant::now() + SWEEP;
    loop {
        let now = Instant::now();
        if clock.end.is_some_and(|end| now >= end) {
            break;
        }
        if now >= next_sweep {
            for client in &mut clients {
                client.sweep(&mut ctx, now);
            }
            if clients.iter().all(C::finished) {
                break;
            }
            next_sweep = now + SWEEP;
        }
        let wake = clock.end.map_or(next_sweep, |end| end.min(next_sweep));
        match poll.poll(&mut events, Some(wake.saturating_duration_since(now))) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        }
        for event in &events {
            clients[event.token().0].ready(&mut ctx, event, &mut scratch);
        }
    }
    // Dropping the clients closes whatever is still open (with -d, requests
    // still in flight when the time is up).
    drop(clients);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_shared_evenly_between_threads() {
        let shares: Vec<_> = (0..3).map(|i| share(8, 3, i)).collect();
        assert_eq!(shares, [3, 3, 2]);
        assert_eq!(share(1, 1, 0), 1);
    }

    #[test]
    fn resets_however_they_show_up_are_resets() {
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::NotConnected,
        ] {
            assert_eq!(ErrorKind::of_io(&kind.into()), ErrorKind::Reset);
        }
        assert_eq!(
            ErrorKind::of_io(&io::ErrorKind::ConnectionRefused.into()),
            ErrorKind::Refused
        );
        assert_eq!(
            ErrorKind::of_io(&io::ErrorKind::AddrNotAvailable.into()),
            ErrorKind::Other
        );
    }

    #[test]
    fn error_kinds_index_their_own_slot() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
    }

    #[test]
    fn merged_stats_add_up() {
        let mut a = Stats::new();
        a.ok = 2;
        a.latency.record(1000).unwrap();
        a.errors[ErrorKind::Reset.index()] = 1;
        let mut b = Stats::new();
        b.ok = 3;
        b.latency.record(3000).unwrap();
        b.errors[ErrorKind::Reset.index()] = 2;
        b.samples[ErrorKind::Reset.index()] = Some("reset by peer".into());
        a.merge(b);
        assert_eq!(a.ok, 5);
        assert_eq!(a.errors_of(ErrorKind::Reset), 3);
        assert_eq!(a.error_total(), 3);
        assert_eq!(a.sample_of(ErrorKind::Reset), Some("reset by peer"));
        assert_eq!(a.latency.len(), 2);
    }
}
