//! The daemon: one mio loop on one thread owns the listener, every client
//! connection, the zmq sockets, signals and timers. Nothing here blocks, and
//! nothing here runs handler code.
//!
//! The life of a request (see `docs/architecture.md`): `accept` →
//! [`Connection::on_readable`] until a whole request → [`Dispatcher::submit`] →
//! [`Daemon::dispatch`] sends it to a worker with credit → the worker's reply
//! arrives in [`Daemon::on_replies`] → [`Connection::reply`] writes it → close.

use crate::channel::{self, Kind};
use crate::config::Config;
use crate::connection::{Connection, Next, State};
use crate::dispatcher::{Assignment, Dispatcher};
use crate::logging::Throttle;
use crate::supervisor::{self, Death, Recycling, SlotState, Supervisor};
use crate::worker::WorkerArgs;
use anyhow::{bail, Context as _};
use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const REPLIES: Token = Token(2);
/// Worker PUSH sockets: `PUSH_BASE + slot`.
const PUSH_BASE: usize = 16;
/// Client connections: `CONN_BASE + slab key`.
const CONN_BASE: usize = 1 << 24;
/// The most workers a daemon may run (their tokens sit below `CONN_BASE`).
pub const MAX_WORKERS: usize = CONN_BASE - PUSH_BASE;

/// Requests a worker may hold at once. One keeps the queue in the daemon, so
/// no request waits behind a long one.
const WORKER_CREDIT: usize = 1;
/// Replies handled per loop turn before other sources get a turn.
const REPLIES_PER_TURN: usize = 1024;
/// How long accept stays paused after running out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long stopped workers get to exit on SIGTERM before SIGKILL.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);
/// The loop-wide read buffer.
const SCRATCH_LEN: usize = 64 * 1024;
/// File descriptors kept back from client connections for everything else
/// (zmq sockets, worker pipes, logs).
const RESERVED_FDS: usize = 64;

/// A reply as it came from the worker, written to the client without a copy.
pub struct Reply(zmq::Message);

impl AsRef<[u8]> for Reply {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Workers are starting; the listener is not yet registered.
    Starting,
    Serving,
    /// Stopping gracefully: no new connections, accepted ones finish.
    Draining {
        deadline: Instant,
    },
}

/// The private directory of the ipc endpoints, removed when dropped.
fn runtime_dir(parent: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("gaspard-");
    // tempfile creates the directory with mode 0700.
    let dir = match parent {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
    .context("cannot create the runtime directory")?;
    // A socket path must fit in sun_path (108 bytes, with the NUL).
    let longest = format!("{}/w{}.ipc", dir.path().display(), u64::MAX);
    if longest.len() > 107 {
        bail!(
            "runtime directory {} is too long for ipc socket paths; choose a shorter --runtime-dir",
            dir.path().display()
        );
    }
    Ok(dir)
}

pub struct Daemon {
    config: Config,
    handler: PathBuf,
    poll: Poll,
    listener: Option<TcpListener>,
    accepting: bool,
    accept_paused_until: Option<Instant>,
    local_addr: std::net::SocketAddr,
    signals: Signals,
    zmq: zmq::Context,
    replies: zmq::Socket,
    replies_pending: bool,
    runtime_dir: PathBuf,
    /// One PUSH socket per ready worker, by slot.
    pushes: Vec<Option<zmq::Socket>>,
    conns: Slab<Connection<Reply>>,
    dispatcher: Dispatcher,
    supervisor: Supervisor,
    phase: Phase,
    scratch: Vec<u8>,
    /// Deadline for the first workers to become ready.
    startup_deadline: Option<Instant>,
    stop_now: bool,
    /// Client connections allowed at once (--max-connections, within the fd limit).
    max_connections: usize,
    /// Accept is paused because `max_connections` are open.
    at_capacity: bool,
    /// When client deadlines (--read-timeout) were last checked.
    last_sweep: Instant,
    /// Warnings about clients, kept from flooding the log.
    client_warnings: Throttle,
    // Last: removed after every socket in it is closed.
    _runtime_dir_guard: tempfile::TempDir,
}

impl Daemon {
    /// Binds the port, creates the runtime directory and starts the workers.
    /// `log_filter` is passed on to the workers' logging.
    pub fn new(config: Config, log_filter: &str) -> anyhow::Result<Daemon> {
        if config.workers > MAX_WORKERS {
            bail!(
                "--workers {} is more than the {MAX_WORKERS} supported",
                config.workers
            );
        }
        let fd_limit = raise_fd_limit();
        let reserved = RESERVED_FDS + 4 * config.workers;
        let max_connections = config
            .max_connections
            .min(fd_limit.saturating_sub(reserved).max(1));
        if max_connections < config.max_connections {
            log::warn!(
                "--max-connections {} lowered to {max_connections}: the open file limit is {fd_limit}",
                config.max_connections
            );
        }
        let handler = std::fs::canonicalize(&config.handler)
            .with_context(|| format!("handler {}: cannot open", config.handler.display()))?;
        let listener = bind(config.listen, config.backlog)?;
        let local_addr = listener.local_addr()?;

        let dir_guard = runtime_dir(config.runtime_dir.as_deref())?;
        let runtime_dir = dir_guard.path().to_path_buf();
        let zmq = zmq::Context::new();
        let replies = channel::socket(&zmq, zmq::PULL)?;
        replies
            .bind(&channel::replies_endpoint(&runtime_dir))
            .context("cannot bind the workers' reply socket")?;

        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGCHLD, SIGTERM, SIGINT])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        poll.registry().register(
            &mut SourceFd(&replies.as_raw_fd()),
            REPLIES,
            Interest::READABLE,
        )?;

        let program = std::env::current_exe().context("cannot find gaspard's own executable")?;
        let template = WorkerArgs {
            runtime_dir: runtime_dir.clone(),
            incarnation: 0,
            daemon_pid: std::process::id() as i32,
            handler: handler.clone(),
            handler_config: config.handler_config.clone(),
        };
        let recycling = Recycling {
            max_requests: config.max_requests,
            jitter: config.max_requests_jitter,
        };
        let supervisor = Supervisor::new(program, template, config.workers, log_filter, recycling);
        let dispatcher = Dispatcher::new(config.workers, WORKER_CREDIT, config.timeout);
        Ok(Daemon {
            handler,
            poll,
            listener: Some(listener),
            accepting: false,
            accept_paused_until: None,
            local_addr,
            signals,
            zmq,
            replies,
            replies_pending: false,
            runtime_dir,
            pushes: (0..config.workers).map(|_| None).collect(),
            conns: Slab::new(),
            dispatcher,
            supervisor,
            phase: Phase::Starting,
            scratch: vec![0; SCRATCH_LEN],
            startup_deadline: config.timeout.map(|t| Instant::now() + t),
            stop_now: false,
            max_connections,
            at_capacity: false,
            last_sweep: Instant::now(),
            client_warnings: Throttle::default(),
            config,
            _runtime_dir_guard: dir_guard,
        })
    }

    /// The address the listener is bound to (useful with `--port 0`).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// Runs until stopped by a signal (Ok) or a fatal start-up error (Err).
    /// Every worker is stopped and the runtime directory removed either way.
    pub fn run(mut self) -> anyhow::Result<()> {
        let result = self.run_loop();
        self.shut_down();
        result
    }

    fn run_loop(&mut self) -> anyhow::Result<()> {
        for slot in 0..self.config.workers {
            self.supervisor
                .start(slot)
                .context("cannot start a worker process")?;
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll failed");
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    SIGNALS => self.on_signals()?,
                    REPLIES => self.replies_pending = true,
                    Token(t) if (PUSH_BASE..CONN_BASE).contains(&t) => {
                        // Let libzmq process the socket's pending commands.
                        if let Some(Some(push)) = self.pushes.get(t - PUSH_BASE) {
                            let _ = push.get_events();
                        }
                    }
                    Token(t) => self.on_connection_event(t - CONN_BASE, event),
                }
            }
            if self.replies_pending {
                self.on_replies()?;
            }
            self.on_timers(Instant::now())?;
            self.dispatch();
            if self.phase == Phase::Starting && self.all_ready() {
                self.start_serving()?;
            }
            if self.stop_now {
                return Ok(());
            }
            if let Phase::Draining { deadline } = self.phase {
                if self.conns.is_empty() {
                    log::info!("stopped gracefully: every accepted request was answered");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    log::warn!(
                        "--shutdown-timeout passed with {} connections still open; resetting them",
                        self.conns.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    fn all_ready(&self) -> bool {
        self.supervisor
            .slots
            .iter()
            .all(|slot| matches!(slot.state, SlotState::Ready { .. }))
    }

    fn start_serving(&mut self) -> anyhow::Result<()> {
        let listener = self.listener.as_mut().expect("bound in new()");
        self.poll
            .registry()
            .register(listener, LISTENER, Interest::READABLE)?;
        self.accepting = true;
        self.phase = Phase::Serving;
        self.startup_deadline = None;
        log::info!(
            "listening on {} (handler {}, {} workers, pid {})",
            self.local_addr,
            self.handler.display(),
            self.config.workers,
            std::process::id()
        );
        // Connections that queued in the backlog while workers started.
        self.accept();
        Ok(())
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.replies_pending {
            return Some(Duration::ZERO);
        }
        let deadlines = [
            self.dispatcher.next_deadline(),
            self.supervisor.next_deadline(),
            self.accept_paused_until,
            self.startup_deadline,
            self.next_sweep(),
            match self.phase {
                Phase::Draining { deadline } => Some(deadline),
                _ => None,
            },
        ];
        deadlines
            .into_iter()
            .flatten()
            .min()
            // Round up so the loop does not wake a moment early and spin.
            .map(|at| at.saturating_duration_since(now) + Duration::from_millis(1))
    }

    // ---- clients ----

    /// When client deadlines should next be checked: a periodic sweep over
    /// the open connections is cheaper than a timer per connection.
    fn next_sweep(&self) -> Option<Instant> {
        let timeout = self.config.read_timeout?;
        if self.conns.is_empty() {
            return None;
        }
        let every = (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        Some(self.last_sweep + every)
    }

    /// Resets every client past its --read-timeout deadline.
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        let overdue: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.deadline.is_some_and(|deadline| deadline <= now))
            .map(|(key, _)| key)
            .collect();
        for key in overdue {
            let doing = self.conns[key].stalled_doing();
            self.close(key, Some(format!("{doing} within --read-timeout")));
        }
    }

    fn accept(&mut self) {
        if !self.accepting {
            return;
        }
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        loop {
            if self.conns.len() >= self.max_connections {
                log::warn!(
                    "{} connections open (--max-connections); accept paused until one closes",
                    self.conns.len()
                );
                self.at_capacity = true;
                self.pause_accept(None);
                return;
            }
            let (stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_exhaustion(&e) => {
                    // Retrying now would spin: the connection stays in the
                    // backlog until a descriptor frees up.
                    log::warn!(
                        "cannot accept: {e}; pausing accept for {} ms ({} connections open)",
                        ACCEPT_PAUSE.as_millis(),
                        self.conns.len()
                    );
                    self.pause_accept(Some(Instant::now() + ACCEPT_PAUSE));
                    return;
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            let entry = self.conns.vacant_entry();
            let token = Token(CONN_BASE + entry.key());
            let deadline = self.config.read_timeout.map(|t| Instant::now() + t);
            let mut conn = Connection::new(stream, self.config.max_request_size, deadline);
            // Both directions at once: edge-triggered, so no re-registering later.
            if let Err(e) = self.poll.registry().register(
                &mut conn.stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("cannot watch a new connection: {e}");
                continue;
            }
            entry.insert(conn);
        }
    }

    /// Stops accepting, until `until` or (if `None`) until a connection closes.
    fn pause_accept(&mut self, until: Option<Instant>) {
        if let Some(listener) = self.listener.as_mut() {
            let _ = self.poll.registry().deregister(listener);
        }
        self.accepting = false;
        self.accept_paused_until = until;
    }

    fn resume_accept(&mut self) {
        self.accept_paused_until = None;
        self.at_capacity = false;
        if self.phase != Phase::Serving || self.accepting {
            return;
        }
        if let Some(listener) = self.listener.as_mut() {
            if self
                .poll
                .registry()
                .register(listener, LISTENER, Interest::READABLE)
                .is_ok()
            {
                self.accepting = true;
                self.accept();
            }
        }
    }

    fn on_connection_event(&mut self, key: usize, event: &mio::event::Event) {
        let Some(conn) = self.conns.get_mut(key) else {
            return; // closed earlier in this batch
        };
        let mut next = Next::Wait;
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            next = conn.on_readable(&mut self.scratch);
        }
        if matches!(next, Next::Wait) && event.is_writable() {
            next = conn.on_writable();
        }
        self.advance(key, next);
    }

    /// Acts on what a connection asked for.
    fn advance(&mut self, key: usize, next: Next) {
        match next {
            Next::Wait => {}
            Next::Request(payload) => {
                if let Some(refusal) = self.refusal() {
                    self.close(key, Some(refusal));
                    return;
                }
                let id = self.dispatcher.submit(key, payload);
                let conn = &mut self.conns[key];
                conn.state = State::Waiting(id);
                conn.deadline = None;
            }
            Next::Close => self.close(key, None),
            Next::Reset(reason) => self.close(key, Some(reason)),
            Next::Gone(e) => {
                log::debug!("client went away: {e}");
                self.close(key, Some(String::new()));
            }
        }
    }

    /// Why a new request cannot be taken, if it cannot: the queue is full,
    /// or no worker can run it. Refusing at once beats queueing without end.
    fn refusal(&self) -> Option<String> {
        if self.supervisor.all_failing() {
            return Some("no worker can take the request: the handler keeps failing".into());
        }
        if self.dispatcher.queued() >= self.config.max_queue && !self.dispatcher.has_idle_worker() {
            return Some(format!(
                "queue is full ({} requests waiting, --max-queue)",
                self.dispatcher.queued()
            ));
        }
        None
    }

    /// Removes a connection: cleanly when `reset` is `None`, else with a
    /// reset, logging the reason if there is one.
    fn close(&mut self, key: usize, reset: Option<String>) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if let Some(id) = conn.waiting_for() {
            self.dispatcher.client_gone(id);
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        match reset {
            None => conn.close(&mut self.scratch),
            Some(reason) => {
                if !reason.is_empty() {
                    let peer = conn
                        .stream
                        .peer_addr()
                        .map_or_else(|_| "?".to_string(), |a| a.to_string());
                    self.client_warnings.warn(
                        Instant::now(),
                        format_args!("client {peer}: {reason}; connection reset"),
                    );
                }
                conn.reset();
            }
        }
        if self.at_capacity && self.conns.len() < self.max_connections {
            self.resume_accept();
        }
    }

    // ---- workers ----

    /// Hands queued requests to workers with credit.
    fn dispatch(&mut self) {
        let now = Instant::now();
        while let Some(assignment) = self.dispatcher.next_assignment(now) {
            let Some(push) = self.pushes[assignment.slot].as_ref() else {
                self.dispatcher.unassign(assignment);
                return;
            };
            let Assignment { slot, id, payload } = assignment;
            // Sending moves the payload into zmq without a copy.
            match channel::try_send(push, &id.to_le_bytes(), payload.into()) {
                Ok(()) => {
                    // Let libzmq process pending commands (libzmq issue 3641).
                    let _ = push.get_events();
                }
                Err(e) => {
                    // The payload went with the failed send and cannot be
                    // retried, so the request fails like a lost worker's.
                    log::error!("cannot send a request to worker slot {slot}: {e}; killing it");
                    self.kill_worker(slot, Signal::SIGKILL);
                    return;
                }
            }
        }
    }

    /// Takes every message the workers sent, up to a fair share per turn.
    fn on_replies(&mut self) -> anyhow::Result<()> {
        self.replies_pending = false;
        for _ in 0..REPLIES_PER_TURN {
            let message = match channel::try_recv(&self.replies) {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e).context("the workers' reply socket failed"),
            };
            match message.kind {
                Kind::Reply | Kind::Failed => {
                    let Some((slot, client)) = self.dispatcher.complete(message.value) else {
                        continue; // its worker was already given up on
                    };
                    if self.supervisor.note_served(slot) {
                        self.retire(slot);
                    }
                    let Some(key) = client else {
                        continue; // the client went away
                    };
                    if message.kind == Kind::Failed {
                        let reason = String::from_utf8_lossy(&message.body).into_owned();
                        self.close(key, Some(format!("handler failed: {reason}")));
                    } else if let Some(conn) = self.conns.get_mut(key) {
                        let deadline = self.config.read_timeout.map(|t| Instant::now() + t);
                        let next = conn.reply(Reply(message.body), deadline);
                        self.advance(key, next);
                    }
                }
                Kind::Ready => self.on_worker_ready(message.value, &message.body)?,
                Kind::InitFailed => {
                    let reason = String::from_utf8_lossy(&message.body).into_owned();
                    if self.phase == Phase::Starting {
                        bail!("{reason}");
                    }
                    log::error!("worker {} could not start: {reason}", message.value);
                }
            }
        }
        self.replies_pending = true;
        Ok(())
    }

    fn on_worker_ready(&mut self, incarnation: u64, body: &[u8]) -> anyhow::Result<()> {
        let Some(slot) = self.supervisor.slot_of(incarnation) else {
            return Ok(()); // an incarnation already replaced
        };
        let pid: u32 = std::str::from_utf8(body)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0);
        let push = channel::socket(&self.zmq, zmq::PUSH)?;
        push.connect(&channel::worker_endpoint(&self.runtime_dir, incarnation))?;
        self.poll.registry().register(
            &mut SourceFd(&push.as_raw_fd()),
            Token(PUSH_BASE + slot),
            Interest::READABLE,
        )?;
        self.drop_push(slot);
        self.pushes[slot] = Some(push);
        self.supervisor.mark_ready(slot, pid);
        self.dispatcher.worker_ready(slot);
        log::debug!("worker {incarnation} (slot {slot}, pid {pid}) is ready");
        Ok(())
    }

    fn drop_push(&mut self, slot: usize) {
        if let Some(push) = self.pushes[slot].take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&push.as_raw_fd()));
        }
    }

    /// Fails the requests a worker holds and stops sending it more; the
    /// process itself is reaped on SIGCHLD.
    fn lose_worker(&mut self, slot: usize, why: &str) {
        self.drop_push(slot);
        for key in self.dispatcher.worker_lost(slot) {
            self.close(key, Some(why.to_string()));
        }
    }

    /// Replaces a worker that reached --max-requests without failing anything:
    /// it gets no new requests, and is stopped once it holds none.
    fn retire(&mut self, slot: usize) {
        self.supervisor.slots[slot].retiring = true;
        self.dispatcher.worker_draining(slot);
        if self.dispatcher.held(slot) == 0 {
            self.drop_push(slot);
            self.supervisor.signal(slot, Signal::SIGTERM);
        }
    }

    fn kill_worker(&mut self, slot: usize, signal: Signal) {
        self.lose_worker(slot, "its worker was stopped");
        self.supervisor.signal(slot, signal);
    }

    fn on_signals(&mut self) -> anyhow::Result<()> {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGCHLD => self.on_worker_exits()?,
                SIGTERM | SIGINT => self.on_stop_signal(signal),
                _ => {}
            }
        }
        Ok(())
    }

    fn on_worker_exits(&mut self) -> anyhow::Result<()> {
        for death in self.supervisor.reap() {
            let Death {
                slot,
                incarnation,
                status,
                before_ready,
                retired,
                restart_in: delay,
            } = death;
            let how = supervisor::describe(&status);
            if retired {
                log::info!(
                    "worker {incarnation} (slot {slot}) recycled after reaching --max-requests"
                );
                self.lose_worker(slot, "its worker was recycled");
                continue;
            }
            if self.phase == Phase::Starting {
                bail!(
                    "handler {}: worker {how} while loading the handler",
                    self.handler.display()
                );
            }
            let held = self.dispatcher.outstanding();
            self.lose_worker(slot, &format!("its worker {how}"));
            let failed = held - self.dispatcher.outstanding();
            if matches!(self.phase, Phase::Draining { .. }) {
                continue;
            }
            let stage = if before_ready {
                " before it was ready"
            } else {
                ""
            };
            if delay.is_zero() {
                log::warn!(
                    "worker {incarnation} (slot {slot}) {how}{stage}; {failed} requests failed; restarting it"
                );
            } else {
                log::warn!(
                    "worker {incarnation} (slot {slot}) {how}{stage}; {failed} requests failed; \
                     restarting it in {} ms (back-off after repeated failures)",
                    delay.as_millis()
                );
            }
        }
        if self.supervisor.all_failing() {
            let queued = self.dispatcher.fail_queued();
            if !queued.is_empty() {
                log::error!(
                    "no worker can serve (the handler keeps failing); resetting {} queued requests",
                    queued.len()
                );
            }
            for key in queued {
                self.close(key, Some(String::new()));
            }
        }
        Ok(())
    }

    fn on_stop_signal(&mut self, signal: i32) {
        let name = Signal::try_from(signal).map_or("signal", Signal::as_str);
        match self.phase {
            Phase::Draining { .. } => {
                log::warn!("{name} again: stopping now");
                self.stop_now = true;
            }
            Phase::Starting => {
                log::info!("{name}: stopping before serving");
                self.stop_now = true;
            }
            Phase::Serving => {
                log::info!(
                    "{name}: stopping gracefully; {} requests to finish (send it again to stop now)",
                    self.dispatcher.outstanding()
                );
                if let Some(mut listener) = self.listener.take() {
                    let _ = self.poll.registry().deregister(&mut listener);
                }
                self.accepting = false;
                self.accept_paused_until = None;
                self.phase = Phase::Draining {
                    deadline: Instant::now() + self.config.shutdown_timeout,
                };
            }
        }
    }

    fn on_timers(&mut self, now: Instant) -> anyhow::Result<()> {
        if let Some(deadline) = self.startup_deadline {
            if now >= deadline {
                bail!(
                    "handler {}: workers did not finish loading the handler within --timeout",
                    self.handler.display()
                );
            }
        }
        if self.accept_paused_until.is_some_and(|at| now >= at) {
            self.resume_accept();
        }
        if self.next_sweep().is_some_and(|at| now >= at) {
            self.sweep(now);
        }
        for slot in self.dispatcher.overdue(now) {
            log::error!(
                "a request ran past --timeout ({:?}) in worker slot {slot}; killing the worker",
                self.config.timeout.unwrap_or_default()
            );
            self.lose_worker(slot, "request ran past --timeout");
            self.supervisor.signal(slot, Signal::SIGKILL);
        }
        if !matches!(self.phase, Phase::Draining { .. }) {
            for slot in self.supervisor.due(now) {
                if let Err(e) = self.supervisor.start(slot) {
                    log::error!("cannot start a worker process: {e}");
                }
            }
        }
        Ok(())
    }

    /// Stops the workers, resets what is left, closes every socket.
    fn shut_down(&mut self) {
        for key in self.conns.iter().map(|(key, _)| key).collect::<Vec<_>>() {
            self.close(key, Some(String::new()));
        }
        self.supervisor.stop_all(WORKER_STOP_GRACE);
        for slot in 0..self.pushes.len() {
            self.drop_push(slot);
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&self.replies.as_raw_fd()));
    }
}

/// A listening socket with our backlog (mio's default of 1024 is too small
/// for bursts; gaspar's 50 made clients wait for SYN retries).
fn bind(addr: std::net::SocketAddr, backlog: i32) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket
        .listen(backlog)
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Raises the soft limit on open files to the hard limit, as busy servers
/// need; returns the limit in force.
fn raise_fd_limit() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return usize::try_from(hard).unwrap_or(usize::MAX);
    }
    usize::try_from(soft).unwrap_or(usize::MAX)
}

/// Errors after which retrying accept at once would spin.
fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc_errno) if [nix::libc::EMFILE, nix::libc::ENFILE, nix::libc::ENOBUFS, nix::libc::ENOMEM]
            .contains(&libc_errno)
    )
}
