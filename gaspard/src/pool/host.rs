//! `gaspard worker --connect tcp://HOST:PORT`: a worker host. It runs
//! worker processes of its own, supervised by the same workers part as a
//! daemon's local workers, and relays requests from a daemon to them and
//! their answers back, over one zmq DEALER socket (see the module above).
//!
//! A session starts with `Hello` (the handler's name, its ABI, the credit
//! of the ready workers) and is open once the daemon says `Welcome`. The
//! host hears from the daemon at least every heartbeat; when it hears
//! nothing for [`MISSED_HEARTBEATS`] heartbeats, or the daemon says it does
//! not know the host (`Unknown`: it restarted), the session is over: the
//! daemon has failed every request the host held, so their answers must
//! never reach it, and the host drops them and starts a new session on a
//! new socket (a new routing id), with back-off while the daemon cannot be
//! reached.
//!
//! The socket's `ZMQ_FD` is edge-triggered and also signals libzmq's own
//! commands: every loop turn ends by reading the socket until `EAGAIN`,
//! after the turn's sends.

use super::keys::{self, Key, KeyError, KeyPair};
use super::protocol::{Frames, ToDaemon, ToHost, PROTOCOL};
use crate::check::{self, CheckError};
use crate::config::{
    default_size, Credit, LinkKind, DEFAULT_MAX_BUFFERED, DEFAULT_MAX_REQUEST_SIZE,
};
use crate::logging;
use crate::metrics::{Metrics, Outcome};
use crate::workers::{
    Answer, ClientKey, Recycling, RequestId, Requests, Workers, WorkersConfig, WorkersError,
    LINK_BASE, LINK_END,
};
use clap::Parser;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook_mio::v1_0::Signals;
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The argument that selects the worker host.
pub const HOST_ARG: &str = "worker";

const SIGNALS: Token = Token(1);
const DAEMON: Token = Token(2);

/// The heartbeat until the daemon says its own (in `Welcome`).
const FIRST_HEARTBEAT: Duration = Duration::from_secs(1);
/// The shortest heartbeat taken from a daemon, so that a bad `Welcome`
/// cannot make the host spin.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// Heartbeats without a word from the daemon after which the session is lost.
const MISSED_HEARTBEATS: u32 = 3;
/// The first wait before a new session, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How soon libzmq tries the TCP connection again (it backs off to the max).
const RECONNECT_MS: i32 = 100;
const RECONNECT_MAX_MS: i32 = 5000;
/// How long what is left in the socket may take to leave when the host
/// stops (the daemon must get the last answers); otherwise nothing waits.
const CLOSE_LINGER_MS: i32 = 2000;
const URGENT_LINGER_MS: i32 = 300;
/// How long stopped workers get to exit before SIGKILL, as the daemon's.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);
const URGENT_STOP_GRACE: Duration = Duration::from_millis(300);
/// Messages read from the daemon per loop turn before the workers get a turn.
const MESSAGES_PER_TURN: usize = 1024;
/// How often sends that libzmq refused are tried again, besides when its
/// fd says so.
const BLOCKED_RETRY: Duration = Duration::from_millis(50);
/// How long a host that has answered everything after Leaving waits for
/// the daemon's Bye (requests the daemon sent before it read Leaving may
/// still be on their way) before it stops anyway.
const BYE_GRACE: Duration = Duration::from_secs(2);

/// Run worker processes for a gaspard daemon on another machine.
///
/// Connects out to a daemon's --pool-listen address (the host needs no open
/// port), starts N worker processes that load the handler here, and runs
/// the requests the daemon sends. It reconnects by itself when the daemon
/// goes away. SIGTERM: leave the daemon, finish the requests held, stop (a
/// second SIGTERM stops now). SIGHUP: reload the handler, as the daemon
/// does. SIGTTIN / SIGTTOU: one more / one fewer worker. The daemon's
/// --timeout is enforced here: a request past it fails and its worker is
/// killed and restarted.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "gaspard worker",
    version,
    after_help = "Example:\n  \
                  gaspard keygen host          # host.key, host.pub: add host.pub to the daemon's --pool-authorized\n  \
                  gaspard worker --connect tcp://daemon.example:10124 \\\n    \
                  --handler /usr/lib/gaspard/handlers/libsha256.so --workers 8 \\\n    \
                  --key host.key --server-key daemon.pub"
)]
pub struct HostCli {
    /// The daemon's --pool-listen address.
    #[arg(long, env = "GASPARD_CONNECT", value_name = "tcp://HOST:PORT")]
    pub connect: String,

    /// The handler plugin, loaded by every worker on this host: the same
    /// handler (by name and ABI) as the daemon's.
    #[arg(long, env = "GASPARD_HANDLER", value_name = "PATH")]
    pub handler: PathBuf,

    /// Number of worker processes [default: the CPUs available here].
    #[arg(long, env = "GASPARD_WORKERS", value_name = "N")]
    pub workers: Option<NonZeroUsize>,

    /// A string passed to the handler's init in every worker.
    #[arg(
        long,
        env = "GASPARD_HANDLER_CONFIG",
        default_value = "",
        value_name = "STRING"
    )]
    pub handler_config: String,

    /// This host's CURVE secret key file (from `gaspard keygen`); with
    /// --server-key. Without both, the connection is not encrypted.
    #[arg(long, env = "GASPARD_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// The daemon's public key file (its `.pub`): the host talks only to
    /// the daemon that holds the matching secret key. With --key.
    #[arg(long, env = "GASPARD_SERVER_KEY", value_name = "FILE")]
    pub server_key: Option<PathBuf>,

    /// Requests each ready worker may hold: the host offers the daemon
    /// ready workers × this.
    #[arg(
        long,
        env = "GASPARD_CREDIT_PER_WORKER",
        default_value_t = 2,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=64)
    )]
    pub credit_per_worker: u32,

    /// Recycle a worker after it served this many requests (0: never).
    #[arg(
        long,
        env = "GASPARD_MAX_REQUESTS",
        default_value_t = 0,
        value_name = "N"
    )]
    pub max_requests: u64,

    /// Directory for the workers' private copies of the handler [default:
    /// $RUNTIME_DIRECTORY, else a new temporary one].
    #[arg(long, env = "GASPARD_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// Log level: error, warn, info, debug, trace [default: RUST_LOG, else info].
    #[arg(long, env = "GASPARD_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

/// Why the worker host cannot run, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Flags that make no sense together (exit status 2).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Check(#[from] CheckError),
    #[error("cannot create the runtime directory: {0}")]
    RuntimeDir(#[source] io::Error),
    #[error("cannot find gaspard's own executable: {0}")]
    Executable(#[source] io::Error),
    #[error("{0}")]
    Workers(#[from] WorkersError),
    #[error("zmq: {what}: {source}")]
    Zmq {
        what: &'static str,
        #[source]
        source: zmq::Error,
    },
    /// The daemon refuses this host for good (another protocol or ABI).
    #[error("the daemon at {endpoint} refused this host: {reason}")]
    Refused { endpoint: String, reason: String },
    #[error("the event loop failed: {0}")]
    Loop(#[from] io::Error),
}

fn zmq_err(what: &'static str) -> impl FnOnce(zmq::Error) -> HostError {
    move |source| HostError::Zmq { what, source }
}

/// The flags, checked.
struct Settings {
    endpoint: String,
    handler: PathBuf,
    handler_config: String,
    workers: usize,
    /// This host's pair and the daemon's public key.
    keys: Option<(KeyPair, Key)>,
    credit_per_worker: u32,
    max_requests: Option<u64>,
    runtime_dir: Option<PathBuf>,
}

impl Settings {
    fn from_cli(cli: HostCli) -> Result<Settings, HostError> {
        let endpoint = checked_endpoint(&cli.connect)?;
        let workers = cli
            .workers
            .map_or_else(crate::config::default_workers, NonZeroUsize::get);
        if workers > crate::config::MAX_WORKERS {
            return Err(HostError::Usage(format!(
                "--workers {workers} is more than the {} supported",
                crate::config::MAX_WORKERS
            )));
        }
        let keys = match (&cli.key, &cli.server_key) {
            (None, None) => None,
            (Some(key), Some(server_key)) => {
                if zmq::has("curve") != Some(true) {
                    return Err(KeyError::NoCurve.into());
                }
                Some((keys::read_pair(key)?, keys::read_one_public(server_key)?))
            }
            _ => {
                return Err(HostError::Usage(
                    "--key and --server-key go together: give both (CURVE) or neither".into(),
                ))
            }
        };
        Ok(Settings {
            endpoint,
            handler: cli.handler,
            handler_config: cli.handler_config,
            workers,
            keys,
            credit_per_worker: cli.credit_per_worker,
            max_requests: (cli.max_requests > 0).then_some(cli.max_requests),
            runtime_dir: cli.runtime_dir.or_else(runtime_directory_from_systemd),
        })
    }
}

/// `tcp://HOST:PORT`, as libzmq takes it.
fn checked_endpoint(text: &str) -> Result<String, HostError> {
    let bad = || {
        HostError::Usage(format!(
            "--connect {text:?}: expected tcp://HOST:PORT (the daemon's --pool-listen)"
        ))
    };
    let address = text.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |port| port == 0) {
        return Err(bad());
    }
    Ok(text.to_string())
}

/// systemd's `$RUNTIME_DIRECTORY` (the first, if RuntimeDirectory= names several).
fn runtime_directory_from_systemd() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = dirs.to_str()?.split(':').next()?;
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// `gaspard worker ...`, for the arguments after [`HOST_ARG`].
pub fn run(args: impl Iterator<Item = OsString>) -> ExitCode {
    let argv = std::iter::once(OsString::from("gaspard worker")).chain(args);
    let cli = match HostCli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let log_filter = logging::init(cli.log_level);
    let result = Settings::from_cli(cli).and_then(|settings| {
        let host = Host::new(settings, &log_filter)?;
        host.run()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(HostError::Usage(line)) => {
            eprintln!("gaspard worker: {line}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("gaspard worker: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first workers are starting; no session yet.
    Starting,
    /// In a session, or between two.
    Serving,
    /// SIGTERM: `Leaving` was said; the requests held are finished.
    Draining,
    /// Done: stop (now, if `urgent`).
    Stopped { urgent: bool },
}

/// A request the daemon sent, as the host's workers know it.
struct Held {
    /// The daemon's id for it.
    id: u64,
    request: RequestId,
    since: Instant,
}

/// One session with the daemon: its socket and what waits to be sent.
struct Session {
    socket: zmq::Socket,
    fd: RawFd,
    /// The last message from the daemon (or the session's start).
    last_heard: Instant,
    heartbeat: Duration,
    next_heartbeat: Instant,
    welcomed: bool,
    /// Messages libzmq has not taken yet, in order.
    outgoing: VecDeque<Frames>,
    /// libzmq refused the last send (no connection yet, or a full queue).
    blocked: bool,
    /// How many ready workers the daemon was last told of.
    ready_told: usize,
    /// The daemon said Bye (after Leaving): it sends nothing more.
    bye: bool,
}

impl Session {
    fn queue(&mut self, message: ToDaemon) {
        self.outgoing.push_back(message.encode());
    }

    /// When the session is lost if the daemon stays silent.
    fn lost_at(&self) -> Instant {
        self.last_heard + self.heartbeat * MISSED_HEARTBEATS
    }

    /// Hands libzmq what is queued, until it refuses.
    fn send_queued(&mut self) -> Result<(), zmq::Error> {
        self.blocked = false;
        while let Some((head, body)) = self.outgoing.front() {
            let flags = if body.is_some() {
                zmq::DONTWAIT | zmq::SNDMORE
            } else {
                zmq::DONTWAIT
            };
            match self.socket.send(&head[..], flags) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => {
                    self.blocked = true;
                    return Ok(());
                }
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(e),
            }
            // Once the first part is taken, the others are too. The body is
            // handed to libzmq as it is, not copied again.
            if let Some((_, Some(body))) = self.outgoing.pop_front() {
                self.socket.send(body, 0)?;
            }
        }
        Ok(())
    }

    /// The next message from the daemon, if one is there.
    fn try_recv(&self) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
        loop {
            match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => return Ok(Some(frames)),
                Err(zmq::Error::EAGAIN) => return Ok(None),
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where the link to the daemon stands.
enum Link {
    /// No session yet (workers starting) or none any more (stopping).
    Idle,
    Connected(Session),
    /// Between sessions: the next starts at `until`.
    Waiting {
        until: Instant,
    },
}

struct Host {
    poll: Poll,
    signals: Signals,
    workers: Workers,
    endpoint: String,
    keys: Option<(KeyPair, Key)>,
    handler_name: String,
    credit_per_worker: u32,
    link: Link,
    /// The wait before the next session, should this one be lost.
    backoff: Duration,
    phase: Phase,
    /// The requests held, by the client key the workers know them by.
    held: HashMap<ClientKey, Held>,
    /// Client keys are never used twice: an answer for a request dropped
    /// with a lost session finds nobody.
    next_client: ClientKey,
    answers: Vec<Answer>,
    /// The daemon's socket had more messages than one turn takes.
    socket_pending: bool,
    /// A request came in after this turn's dispatch (the turn's last read
    /// of the socket): the loop must not sleep before a worker has it, as
    /// nothing else would wake it.
    undispatched: bool,
    /// Since when a graceful stop has held nothing (waiting for Bye).
    drained_since: Option<Instant>,
    // The sockets' context: dropped after them (it waits for their linger).
    context: zmq::Context,
    // Last: removed after the workers are stopped.
    _runtime_dir: tempfile::TempDir,
}

impl Host {
    fn new(settings: Settings, log_filter: &str) -> Result<Host, HostError> {
        let checked = check::check_handler(&settings.handler, &settings.handler_config)?;
        log::info!(
            "handler {}: {:?} loads (handler ABI version {})",
            checked.path.display(),
            checked.name,
            gaspard_handler_abi::ABI_VERSION
        );
        let loopback = super::endpoint_host(&settings.endpoint).is_some_and(super::is_loopback);
        if settings.keys.is_none() && !loopback {
            log::warn!(
                "no --key and --server-key: requests and replies cross the network to {} unencrypted, and this host cannot tell the daemon from an impostor",
                settings.endpoint
            );
        }
        let runtime_dir = crate::daemon::runtime_dir(settings.runtime_dir.as_deref())
            .map_err(HostError::RuntimeDir)?;
        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let program = std::env::current_exe().map_err(HostError::Executable)?;
        let credit = settings.credit_per_worker as usize;
        let workers = Workers::new(
            poll.registry().try_clone()?,
            WorkersConfig {
                program,
                handler: checked.path,
                handler_config: settings.handler_config,
                runtime_dir: runtime_dir.path().to_path_buf(),
                log_filter: log_filter.to_string(),
                recycling: Recycling {
                    max_requests: settings.max_requests,
                    jitter: 0,
                },
                credit: Credit::Fixed(credit),
                workers: settings.workers,
                // The daemon sends no more than the credit offered; this
                // only bounds one that does (a credit change in flight is
                // queued, not refused).
                max_queue: 4 * settings.workers * credit + 64,
                // Until the daemon says its --timeout (Welcome).
                timeout: None,
                link: LinkKind::Local,
                // The daemon's defaults for --max-request-size and
                // --max-buffered: larger requests still reach the workers,
                // through their link's sockets.
                max_request_size: default_size(DEFAULT_MAX_REQUEST_SIZE),
                max_buffered: default_size(DEFAULT_MAX_BUFFERED),
                pool: None,
            },
            Arc::new(Metrics::default()),
        )?;
        Ok(Host {
            poll,
            signals,
            workers,
            endpoint: settings.endpoint,
            keys: settings.keys,
            handler_name: checked.name,
            credit_per_worker: settings.credit_per_worker,
            link: Link::Idle,
            backoff: FIRST_BACKOFF,
            phase: Phase::Starting,
            held: HashMap::new(),
            next_client: 0,
            answers: Vec::new(),
            socket_pending: false,
            undispatched: false,
            drained_since: None,
            context: zmq::Context::new(),
            _runtime_dir: runtime_dir,
        })
    }

    /// Runs until stopped (Ok) or refused or broken (Err); the workers are
    /// stopped and the runtime directory removed either way.
    fn run(mut self) -> Result<(), HostError> {
        let result = self.run_loop();
        if let Err(e) = &result {
            // Refused: the daemon never took it. Otherwise it is told that
            // the host leaves, and what it held is lost.
            if !matches!(e, HostError::Refused { .. }) {
                self.fail_held(&format!("its worker host failed: {e}"));
                if let Link::Connected(session) = &mut self.link {
                    session.queue(ToDaemon::Leaving);
                    let _ = session.send_queued();
                }
            }
        }
        let urgent = result.is_err() || self.phase == Phase::Stopped { urgent: true };
        self.close_session(if urgent {
            URGENT_LINGER_MS
        } else {
            CLOSE_LINGER_MS
        });
        self.workers.stop_all(if urgent {
            URGENT_STOP_GRACE
        } else {
            WORKER_STOP_GRACE
        });
        result
    }

    fn run_loop(&mut self) -> Result<(), HostError> {
        self.workers.start()?;
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.on_signals()?,
                    token @ Token(LINK_BASE..LINK_END) => {
                        self.workers.on_link_event(token, event)?;
                        self.carry_answers();
                        self.workers.dispatch();
                    }
                    // Read at the end of the turn, whatever woke the loop.
                    _ => {}
                }
            }
            self.workers.on_pending()?;
            self.carry_answers();
            self.workers.on_timers(Instant::now());
            self.carry_answers();
            self.workers.advance_reload();
            // Nobody to tell: the host has no service manager protocol.
            let _ = self.workers.take_notices();
            if self.phase == Phase::Starting && self.workers.first_ready() {
                self.phase = Phase::Serving;
                log::info!(
                    "{} workers ready (handler {:?}, pid {}); connecting to the daemon at {}",
                    self.workers.ready_count(),
                    self.handler_name,
                    std::process::id(),
                    self.endpoint
                );
                self.open_session(Instant::now())?;
            }
            self.on_session_timers(Instant::now())?;
            self.pump()?;
            self.undispatched = false;
            self.workers.dispatch_and_flush();
            self.carry_answers();
            self.tell_credit();
            self.pump()?;
            if self.phase == Phase::Draining && self.drained(Instant::now()) {
                log::info!("every request held was answered; stopping");
                self.phase = Phase::Stopped { urgent: false };
            }
            if let Phase::Stopped { .. } = self.phase {
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.workers.has_pending() || self.socket_pending || self.undispatched {
            return Some(Duration::ZERO);
        }
        let session = match &self.link {
            Link::Connected(session) => {
                let retry = session.blocked.then(|| now + BLOCKED_RETRY);
                [Some(session.lost_at()), Some(session.next_heartbeat), retry]
                    .into_iter()
                    .flatten()
                    .min()
            }
            Link::Waiting { until } => Some(*until),
            Link::Idle => None,
        };
        let bye_grace = self.drained_since.map(|since| since + BYE_GRACE);
        [self.workers.next_deadline(now), session, bye_grace]
            .into_iter()
            .flatten()
            .min()
            // Round up so the loop does not wake a moment early and spin.
            .map(|at| at.saturating_duration_since(now) + Duration::from_millis(1))
    }

    /// Whether a graceful stop has nothing left to do: no request held,
    /// every answer handed to libzmq (or nobody to hand it to), and the
    /// daemon has said Bye, so that no request it sent before it read
    /// Leaving is still on its way. A daemon that never says it (or a test
    /// standing in for one) is waited for [`BYE_GRACE`] at most.
    fn drained(&mut self, now: Instant) -> bool {
        let done = self.held.is_empty()
            && match &self.link {
                Link::Connected(session) => session.outgoing.is_empty(),
                Link::Idle | Link::Waiting { .. } => true,
            };
        if !done {
            self.drained_since = None;
            return false;
        }
        let bye = match &self.link {
            Link::Connected(session) => session.bye,
            Link::Idle | Link::Waiting { .. } => true,
        };
        let since = *self.drained_since.get_or_insert(now);
        bye || now.saturating_duration_since(since) >= BYE_GRACE
    }

    fn on_signals(&mut self) -> Result<(), HostError> {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            let serving = self.phase == Phase::Serving;
            match signal {
                SIGTERM | SIGINT => self.on_stop_signal(signal),
                other => self.workers.on_signal(other, serving)?,
            }
        }
        // A dead worker's last answers, and what its death cost.
        self.carry_answers();
        Ok(())
    }

    fn on_stop_signal(&mut self, signal: i32) {
        let name = nix::sys::signal::Signal::try_from(signal)
            .map_or("signal", nix::sys::signal::Signal::as_str);
        match self.phase {
            Phase::Starting => {
                log::info!("{name}: stopping before serving");
                self.phase = Phase::Stopped { urgent: true };
            }
            Phase::Serving => {
                log::info!(
                    "{name}: leaving the daemon; {} requests to finish (send it again to stop now)",
                    self.held.len()
                );
                if let Link::Connected(session) = &mut self.link {
                    session.queue(ToDaemon::Leaving);
                }
                self.phase = Phase::Draining;
            }
            Phase::Draining | Phase::Stopped { .. } => {
                log::warn!(
                    "{name} again: stopping now; {} requests held fail",
                    self.held.len()
                );
                self.fail_held("its worker host was stopped");
                self.phase = Phase::Stopped { urgent: true };
            }
        }
    }

    /// Fails every request held, as lost: the daemon hears of them now
    /// rather than at its heartbeat timeout (their workers are about to be
    /// stopped).
    fn fail_held(&mut self, reason: &str) {
        let held: Vec<Held> = self.held.drain().map(|(_, held)| held).collect();
        for held in held {
            self.workers.cancel(held.request);
            if let Link::Connected(session) = &mut self.link {
                session.queue(ToDaemon::Failed {
                    id: held.id,
                    lost: true,
                    reason: reason.to_string(),
                });
            }
        }
    }

    /// Starts a session: a new DEALER socket (so a new routing id at the
    /// daemon), and Hello.
    fn open_session(&mut self, now: Instant) -> Result<(), HostError> {
        let socket = self
            .context
            .socket(zmq::DEALER)
            .map_err(zmq_err("a DEALER socket"))?;
        socket.set_linger(0).map_err(zmq_err("linger"))?;
        // Nothing waits in a queue for a daemon that is not connected: a
        // message either leaves on a live connection or stays here.
        socket.set_immediate(true).map_err(zmq_err("immediate"))?;
        socket.set_ipv6(true).map_err(zmq_err("IPv6"))?;
        socket
            .set_reconnect_ivl(RECONNECT_MS)
            .map_err(zmq_err("reconnect interval"))?;
        socket
            .set_reconnect_ivl_max(RECONNECT_MAX_MS)
            .map_err(zmq_err("reconnect interval"))?;
        if let Some((pair, server)) = &self.keys {
            socket
                .set_curve_serverkey(server)
                .map_err(zmq_err("the daemon's public key"))?;
            socket
                .set_curve_publickey(&pair.public)
                .map_err(zmq_err("this host's public key"))?;
            socket
                .set_curve_secretkey(&pair.secret)
                .map_err(zmq_err("this host's secret key"))?;
        }
        socket
            .connect(&self.endpoint)
            .map_err(zmq_err("connecting to the daemon"))?;
        let fd = socket.get_fd().map_err(zmq_err("its file descriptor"))?;
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), DAEMON, Interest::READABLE)?;
        let ready = self.workers.ready_count();
        let mut session = Session {
            socket,
            fd,
            last_heard: now,
            heartbeat: FIRST_HEARTBEAT,
            next_heartbeat: now + FIRST_HEARTBEAT,
            welcomed: false,
            outgoing: VecDeque::new(),
            blocked: false,
            // Not told yet: a Credit with the ready count follows Hello.
            ready_told: usize::MAX,
            bye: false,
        };
        session.queue(ToDaemon::Hello {
            protocol: PROTOCOL,
            abi: gaspard_handler_abi::ABI_VERSION,
            credit: self.credit_of(ready),
            handler: self.handler_name.clone(),
        });
        log::debug!(
            "saying Hello to the daemon at {} ({ready} workers ready)",
            self.endpoint
        );
        self.link = Link::Connected(session);
        Ok(())
    }

    fn credit_of(&self, ready: usize) -> u32 {
        u32::try_from(ready)
            .unwrap_or(u32::MAX)
            .saturating_mul(self.credit_per_worker)
    }

    /// Closes the session's socket, letting what libzmq holds leave for up
    /// to `linger_ms`.
    fn close_session(&mut self, linger_ms: i32) {
        if let Link::Connected(session) = std::mem::replace(&mut self.link, Link::Idle) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&session.fd));
            let _ = session.socket.set_linger(linger_ms);
        }
        self.socket_pending = false;
    }

    /// The session is over (`why`): the daemon has failed (or will fail)
    /// every request held, so they are dropped here, their answers never
    /// sent; a new session starts after `delay`, unless the host is
    /// stopping (then nothing is left to finish).
    fn lose_session(&mut self, why: &str, delay: Duration) {
        let dropped = self.held.len();
        for (_, held) in self.held.drain() {
            self.workers.cancel(held.request);
        }
        let welcomed = matches!(&self.link, Link::Connected(session) if session.welcomed);
        self.close_session(0);
        let dropped = if dropped > 0 {
            format!("; dropped the {dropped} requests it had sent (the daemon fails them)")
        } else {
            String::new()
        };
        if self.phase == Phase::Draining {
            log::warn!("{why}{dropped}; stopping");
            self.phase = Phase::Stopped { urgent: false };
            return;
        }
        let next = if delay.is_zero() {
            "joining it again now".to_string()
        } else {
            format!("joining it again in {delay:?}")
        };
        if welcomed {
            log::warn!("{why}{dropped}; {next}");
        } else {
            log::info!("{why}{dropped}; {next}");
        }
        self.link = Link::Waiting {
            until: Instant::now() + delay,
        };
    }

    /// The wait before the next session after a failed one: doubled each
    /// time, reset by a Welcome.
    fn next_backoff(&mut self) -> Duration {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        delay
    }

    /// Heartbeats, a silent daemon, a session due to start.
    fn on_session_timers(&mut self, now: Instant) -> Result<(), HostError> {
        let lost = match &mut self.link {
            Link::Idle => None,
            Link::Waiting { until } => {
                if now >= *until && self.phase == Phase::Serving {
                    self.open_session(now)?;
                }
                None
            }
            Link::Connected(session) if now >= session.lost_at() => {
                let silent = now.saturating_duration_since(session.last_heard);
                Some(if session.welcomed {
                    format!(
                        "heard nothing from the daemon at {} for {silent:.1?}: the session is lost",
                        self.endpoint
                    )
                } else {
                    let hint = if self.keys.is_some() {
                        "is it running, and is --server-key its public key?"
                    } else {
                        "is it running? a daemon with CURVE keys needs --key and --server-key"
                    };
                    format!(
                        "no answer from the daemon at {} within {:?} ({hint})",
                        self.endpoint,
                        session.heartbeat * MISSED_HEARTBEATS
                    )
                })
            }
            Link::Connected(session) => {
                if now >= session.next_heartbeat {
                    // Anything queued says as much, once it can leave.
                    if session.outgoing.is_empty() {
                        session.queue(ToDaemon::Heartbeat);
                    }
                    session.next_heartbeat = now + session.heartbeat;
                }
                None
            }
        };
        if let Some(why) = lost {
            let delay = self.next_backoff();
            self.lose_session(&why, delay);
        }
        Ok(())
    }

    /// Sends what is queued and reads what the daemon sent, until libzmq
    /// has nothing more to give (its fd is edge-triggered) or a turn's
    /// worth was read.
    fn pump(&mut self) -> Result<(), HostError> {
        self.socket_pending = false;
        for _ in 0..MESSAGES_PER_TURN {
            let Link::Connected(session) = &mut self.link else {
                return Ok(());
            };
            let received = match session.send_queued() {
                Ok(()) => session.try_recv().map_err(|e| ("read from", e)),
                Err(e) => Err(("send to", e)),
            };
            match received {
                Ok(Some(frames)) => self.on_frames(frames)?,
                Ok(None) => {
                    if session.outgoing.is_empty() || session.blocked {
                        return Ok(());
                    }
                }
                Err((what, e)) => {
                    let why = format!("cannot {what} the daemon at {}: {e}", self.endpoint);
                    let delay = self.next_backoff();
                    self.lose_session(&why, delay);
                    return Ok(());
                }
            }
        }
        self.socket_pending = true;
        Ok(())
    }

    fn on_frames(&mut self, frames: Vec<Vec<u8>>) -> Result<(), HostError> {
        let message = match ToHost::decode(frames) {
            Ok(message) => message,
            Err(e) => {
                log::error!(
                    "the daemon at {} sent a message that does not parse: {e}",
                    self.endpoint
                );
                let delay = self.next_backoff();
                self.lose_session("that session is over", delay);
                return Ok(());
            }
        };
        let Link::Connected(session) = &mut self.link else {
            return Ok(());
        };
        session.last_heard = Instant::now();
        let welcomed = session.welcomed;
        match message {
            ToHost::Welcome { heartbeat, timeout } => {
                session.heartbeat = heartbeat.max(MIN_HEARTBEAT);
                session.next_heartbeat = session.last_heard + session.heartbeat;
                session.welcomed = true;
                if !welcomed {
                    log::info!(
                        "joined the daemon at {} (heartbeat {:?}, timeout {})",
                        self.endpoint,
                        session.heartbeat,
                        timeout.map_or_else(|| "none".to_string(), |t| format!("{t:?}"))
                    );
                }
                self.workers.set_timeout(timeout);
                self.backoff = FIRST_BACKOFF;
            }
            ToHost::Refused { reason } => {
                return Err(HostError::Refused {
                    endpoint: self.endpoint.clone(),
                    reason,
                })
            }
            ToHost::Request { id, payload } => self.on_request(id, payload),
            ToHost::Heartbeat => {}
            ToHost::Bye => session.bye = true,
            ToHost::Unknown => {
                // It restarted (or gave up on this host): join it again at
                // once; with back-off if it says so to a new session.
                let delay = if welcomed {
                    Duration::ZERO
                } else {
                    self.next_backoff()
                };
                let why = format!("the daemon at {} does not know this host", self.endpoint);
                self.lose_session(&why, delay);
            }
        }
        Ok(())
    }

    fn on_request(&mut self, id: u64, payload: Vec<u8>) {
        // While draining too: the daemon may have sent it before it read
        // Leaving; it says Bye once nothing more can come.
        let refused = if matches!(self.phase, Phase::Serving | Phase::Draining) {
            let client = self.next_client;
            self.next_client += 1;
            match self.workers.submit(client, payload.into()) {
                Ok(request) => {
                    let since = Instant::now();
                    self.held.insert(client, Held { id, request, since });
                    self.undispatched = true;
                    None
                }
                Err(reason) => Some(reason),
            }
        } else {
            Some("the worker host is stopping (it said Leaving)".to_string())
        };
        if let (Some(reason), Link::Connected(session)) = (refused, &mut self.link) {
            log::debug!("refused request {id} of the daemon: {reason}");
            session.queue(ToDaemon::Failed {
                id,
                lost: false,
                reason,
            });
        }
    }

    /// Turns the workers' answers into messages to the daemon. An answer
    /// for a request not held (dropped with a lost session) goes nowhere.
    fn carry_answers(&mut self) {
        loop {
            self.workers.take_answers(&mut self.answers);
            if self.answers.is_empty() {
                return;
            }
            for answer in self.answers.drain(..) {
                let (client, message) = match answer {
                    Answer::Reply { client, reply, .. } => (client, Ok(reply)),
                    Answer::Failure {
                        client,
                        outcome,
                        reason,
                        ..
                    } => (client, Err((outcome, reason))),
                    // The host's own dispatcher gives it to another worker.
                    Answer::Requeued { .. } => continue,
                };
                let Some(held) = self.held.remove(&client) else {
                    continue;
                };
                let Link::Connected(session) = &mut self.link else {
                    continue;
                };
                session.queue(match message {
                    Ok(body) => ToDaemon::Reply {
                        id: held.id,
                        micros: u32::try_from(held.since.elapsed().as_micros()).unwrap_or(u32::MAX),
                        // Copied out of the worker's reply area, if there
                        // (else moved): the message is sent from it.
                        body: body.into_vec(),
                    },
                    Err((outcome, reason)) => ToDaemon::Failed {
                        id: held.id,
                        // A handler's error is the request's; anything else
                        // (a worker that died, --timeout) is the worker's.
                        lost: outcome != Outcome::handler_error,
                        reason,
                    },
                });
            }
        }
    }

    /// Tells the daemon when the number of ready workers changed.
    fn tell_credit(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        let ready = self.workers.ready_count();
        let credit = self.credit_of(ready);
        let Link::Connected(session) = &mut self.link else {
            return;
        };
        if session.ready_told != ready {
            session.ready_told = ready;
            log::debug!("{ready} workers ready: credit {credit}");
            session.queue(ToDaemon::Credit {
                credit,
                ready: u32::try_from(ready).unwrap_or(u32::MAX),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Settings, HostError> {
        let argv = ["gaspard worker", "--handler", "x.so"]
            .iter()
            .chain(args)
            .copied();
        Settings::from_cli(HostCli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn connect_must_be_a_tcp_endpoint() {
        for good in [
            "tcp://127.0.0.1:5555",
            "tcp://daemon.example:1",
            "tcp://[::1]:9",
        ] {
            assert!(cli(&["--connect", good]).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:5555",
            "ipc:///tmp/x",
            "tcp://:5555",
            "tcp://host",
            "tcp://host:0",
            "tcp://host:http",
        ] {
            assert!(
                matches!(cli(&["--connect", bad]), Err(HostError::Usage(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn one_key_without_the_other_is_a_usage_error() {
        for half in [["--key", "a.key"], ["--server-key", "d.pub"]] {
            let args = ["--connect", "tcp://127.0.0.1:1", half[0], half[1]];
            let Err(HostError::Usage(line)) = cli(&args) else {
                panic!("{half:?} accepted");
            };
            assert!(line.contains("--key and --server-key"), "{line}");
        }
    }
}
