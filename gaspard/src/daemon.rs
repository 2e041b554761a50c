//! The daemon: one mio loop on one thread drives three parts and the
//! signals. Nothing here blocks, and nothing here runs handler code.
//!
//! - [`Clients`]: the listener, connections and sessions, their deadlines
//!   and how each request ended.
//! - [`Workers`]: the worker processes, their endpoints, who holds which
//!   request, hot reload and scaling.
//!
//! The metrics endpoint has a thread of its own (`crate::scrape`); it reads
//! the [`Health`] the loop publishes at the end of every turn.
//!
//! The parts never call each other back: the clients part hands requests to
//! the workers through [`crate::workers::Requests`], and the loop carries
//! each request's [`crate::workers::Answer`] back to the clients part. The
//! life of a request (see `docs/architecture.md`): accepted and read by
//! `Clients` → submitted to `Workers`, which send it to a worker with
//! credit → the reply is an `Answer` → `Clients` writes it and closes.

use crate::clients::{ClientLimits, Clients, CONN_BASE, LISTENER};
use crate::config::Config;
use crate::health::{Health, Published};
use crate::metrics::Metrics;
use crate::notify::{self, Notifier};
use crate::pool::keys;
use crate::pool::server::PoolConfig;
use crate::workers::{
    Answer, Notice, Recycling, Workers, WorkersConfig, WorkersError, LINK_BASE, WORKERS_END,
};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook_mio::v1_0::Signals;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIGNALS: Token = Token(1);

/// How long stopped workers get to exit on SIGTERM before SIGKILL.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);
/// The same after a second SIGTERM/SIGINT: enough for idle workers to call
/// their handler's shutdown, not for busy ones to finish.
const URGENT_STOP_GRACE: Duration = Duration::from_millis(300);
/// File descriptors kept back from client connections for everything else
/// (worker links, logs, the metrics endpoint).
const RESERVED_FDS: usize = 64;

/// Why the daemon could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("handler {path}: cannot open: {source}")]
    Handler { path: PathBuf, source: io::Error },
    #[error("handler {path}: cannot copy it: {source}")]
    Snapshot { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Listen(#[from] crate::listener::ListenError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    #[error("cannot start the metrics thread: {source}")]
    MetricsThread { source: io::Error },
    #[error("{0}")]
    Privileges(#[from] crate::privileges::PrivilegeError),
    #[error("cannot create the runtime directory: {0}")]
    RuntimeDir(io::Error),
    #[error("cannot find gaspard's own executable: {0}")]
    Executable(io::Error),
    #[error("{0}")]
    Workers(#[from] WorkersError),
    #[error(transparent)]
    PoolKey(#[from] crate::pool::keys::KeyError),
    /// The handler could not be checked for the name hosts must match.
    #[error("{0}")]
    PoolHandler(#[source] crate::check::CheckError),
    #[error("handler {0}: workers did not finish loading the handler within --timeout")]
    LoadTimeout(PathBuf),
    #[error("the event loop failed: {0}")]
    Loop(#[from] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Workers are starting; the listener is not yet in the loop.
    Starting {
        deadline: Option<Instant>,
    },
    Serving,
    /// A graceful stop with --drain-delay: `/healthz` says draining, so that
    /// a load balancer stops sending, but connections are still accepted
    /// and served until `until`; then `Draining`.
    DrainDelay {
        until: Instant,
    },
    /// Stopping gracefully: no new connections, accepted ones finish.
    Draining {
        deadline: Instant,
    },
    /// Stopping now (a second signal, or one before serving).
    Stopping,
}

/// The worker pool's settings, its key files read.
fn pool_config(config: &Config) -> Result<Option<PoolConfig>, DaemonError> {
    let Some(flags) = &config.pool else {
        return Ok(None);
    };
    let curve = match &flags.curve {
        Some((key, authorized)) => Some((keys::read_pair(key)?, keys::read_public(authorized)?)),
        None => None,
    };
    // Hosts must run the handler this daemon runs: its name, checked the
    // way --check does (in a child).
    let handler = crate::check::check_handler(&config.handler, &config.handler_config)
        .map_err(DaemonError::PoolHandler)?
        .name;
    Ok(Some(PoolConfig {
        listen: flags.listen.clone(),
        curve,
        heartbeat_timeout: flags.heartbeat_timeout,
        request_timeout: config.timeout,
        handler,
        // Never less than a request: an echo must fit.
        max_message: flags.max_reply.max(u64::from(config.max_request_size)),
    }))
}

/// The private directory of the handler snapshots, removed when dropped.
pub(crate) fn runtime_dir(parent: Option<&Path>) -> io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let mut builder = tempfile::Builder::new();
    // Only gaspard's user may read or replace the handler code workers load.
    builder
        .prefix("gaspard-")
        .permissions(std::fs::Permissions::from_mode(0o700));
    match parent {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
}

pub struct Daemon {
    poll: Poll,
    signals: Signals,
    clients: Clients,
    workers: Workers,
    /// The workers' answers being carried to the clients (kept between
    /// turns for its capacity; see `answer_clients`).
    answers: Vec<Answer>,
    phase: Phase,
    local_addr: SocketAddr,
    /// --timeout: how long the first workers may take to load the handler.
    startup_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    /// --drain-delay.
    drain_delay: Duration,
    /// What `/healthz` says: set by the loop alone (`publish_health`), read
    /// by the metrics thread.
    health: Arc<Published>,
    notifier: Option<Notifier>,
    /// STOPPING=1 was sent: it is sent once.
    stop_told: bool,
    watchdog: Option<(Duration, Instant)>,
    // Last: removed after every socket in it is closed.
    _runtime_dir: tempfile::TempDir,
}

impl Daemon {
    /// Binds the port (or takes systemd's), drops privileges, creates the
    /// runtime directory. `log_filter` is passed on to the workers' logging.
    pub fn new(config: Config, log_filter: &str) -> Result<Daemon, DaemonError> {
        crate::buffers::keep_large_buffers();
        // Absolute but not resolved: a reload follows a symlink that was
        // re-pointed since (the usual way to deploy a new version).
        let handler = std::path::absolute(&config.handler)
            .and_then(|path| std::fs::metadata(&path).map(|_| path))
            .map_err(|source| DaemonError::Handler {
                path: config.handler.clone(),
                source,
            })?;
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
        let (listener, activated) = crate::listener::open(config.listen, config.backlog)?;
        let local_addr = listener.local_addr()?;
        if activated {
            log::info!("using the socket systemd passed ({local_addr})");
        }
        let metrics_listener = match config.metrics {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .map_err(|source| DaemonError::Metrics { addr, source })?,
            ),
            None => None,
        };
        // Ports are bound: root is no longer needed.
        crate::privileges::drop_to(config.user.as_deref(), config.group.as_deref())?;
        let runtime_dir =
            runtime_dir(config.runtime_dir.as_deref()).map_err(DaemonError::RuntimeDir)?;

        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Published::default());

        let program = std::env::current_exe().map_err(DaemonError::Executable)?;
        let workers = Workers::new(
            poll.registry().try_clone()?,
            WorkersConfig {
                program,
                handler: handler.clone(),
                handler_config: config.handler_config.clone(),
                runtime_dir: runtime_dir.path().to_path_buf(),
                log_filter: log_filter.to_string(),
                recycling: Recycling {
                    max_requests: config.max_requests,
                    jitter: config.max_requests_jitter,
                },
                credit: config.worker_credit,
                workers: config.workers,
                max_queue: config.max_queue,
                timeout: config.timeout,
                link: config.link,
                max_request_size: config.max_request_size as usize,
                max_buffered: config.max_buffered,
                pool: pool_config(&config)?,
            },
            Arc::clone(&metrics),
        )
        .map_err(|e| match e {
            WorkersError::Snapshot(source) => DaemonError::Snapshot {
                path: handler,
                source,
            },
            other => other.into(),
        })?;
        let limits = ClientLimits {
            max_connections,
            max_request_size: config.max_request_size,
            read_timeout: config.read_timeout,
            max_buffered: config.max_buffered,
        };
        let clients = Clients::new(
            listener,
            poll.registry().try_clone()?,
            limits,
            config.allow.clone(),
            Arc::clone(&metrics),
        );
        if let Some(listener) = metrics_listener {
            crate::scrape::serve(listener, metrics, Arc::clone(&health))
                .map_err(|source| DaemonError::MetricsThread { source })?;
        }
        Ok(Daemon {
            poll,
            signals,
            clients,
            workers,
            answers: Vec::new(),
            phase: Phase::Starting { deadline: None },
            local_addr,
            startup_timeout: config.timeout,
            shutdown_timeout: config.shutdown_timeout,
            drain_delay: config.drain_delay,
            health,
            notifier: Notifier::from_env(),
            stop_told: false,
            watchdog: notify::watchdog_interval().map(|every| (every, Instant::now())),
            _runtime_dir: runtime_dir,
        })
    }

    /// The address the listener is bound to (useful with `--port 0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs until stopped by a signal (Ok) or a fatal start-up error (Err).
    /// Every worker is stopped and the runtime directory removed either way.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let result = self.run_loop();
        // A graceful stop said so when it began (then phase is Draining, or
        // Stopping after a second signal); any other end says so now.
        if !self.stop_told {
            self.notify("STOPPING=1");
        }
        self.shut_down();
        result
    }

    fn run_loop(&mut self) -> Result<(), DaemonError> {
        self.workers.start()?;
        self.phase = Phase::Starting {
            deadline: self.startup_timeout.map(|t| Instant::now() + t),
        };
        self.publish_health();
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for event in events.iter() {
                self.on_event(event)?;
            }
            self.workers.on_pending()?;
            self.answer_clients();
            self.on_timers(Instant::now())?;
            self.workers.advance_reload();
            self.workers.dispatch_and_flush();
            self.notify_workers_news();
            let stopped = self.advance_phase()?;
            self.publish_health();
            if stopped {
                return Ok(());
            }
        }
    }

    /// Hands one readiness event to the part that owns its token.
    fn on_event(&mut self, event: &mio::event::Event) -> Result<(), DaemonError> {
        match event.token() {
            LISTENER => self.clients.accept(&mut self.workers),
            SIGNALS => {
                self.on_signals()?;
                // A dead worker's last replies and failures: delivered now,
                // before later events can close their clients.
                self.answer_clients();
            }
            // The freed workers' next requests at once, then the replies: a
            // worker must not idle while the replies of its batch are
            // written to their clients, nor while the rest of the events
            // (accepts, reads) are handled.
            token @ Token(LINK_BASE..WORKERS_END) => {
                self.workers.on_link_event(token, event)?;
                crate::workers::Requests::dispatch(&mut self.workers);
                self.answer_clients();
            }
            token @ Token(CONN_BASE..) => self.clients.on_event(token, event, &mut self.workers),
            Token(_) => {}
        }
        Ok(())
    }

    /// Carries what became of requests from the workers to their clients.
    fn answer_clients(&mut self) {
        loop {
            self.workers.take_answers(&mut self.answers);
            if self.answers.is_empty() {
                return;
            }
            self.clients
                .answer_all(&mut self.answers, &mut self.workers);
        }
    }

    /// Moves the daemon from starting to serving, and says when a stop is
    /// complete (returns true).
    fn advance_phase(&mut self) -> Result<bool, DaemonError> {
        match self.phase {
            Phase::Starting { .. } if self.workers.first_ready() => self.start_serving()?,
            Phase::Starting { .. } | Phase::Serving => {}
            Phase::DrainDelay { until } => {
                if Instant::now() >= until {
                    self.drain();
                    log::info!(
                        "--drain-delay over: port closed; {} requests to finish (a second signal stops now)",
                        self.workers.outstanding()
                    );
                    // Now, not at the next wake-up: with nothing left to
                    // finish, nothing would wake the loop before the
                    // --shutdown-timeout.
                    return self.advance_phase();
                }
            }
            Phase::Stopping => return Ok(true),
            Phase::Draining { deadline } => {
                if self.clients.is_empty() {
                    log::info!("stopped gracefully: every accepted request was answered");
                    return Ok(true);
                }
                if Instant::now() >= deadline {
                    log::warn!(
                        "--shutdown-timeout passed with {} connections still open; resetting them",
                        self.clients.len()
                    );
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// What `/healthz` should say now: from the phase, and while serving
    /// from the workers' readiness. The one place it is decided.
    fn current_health(&self) -> Health {
        match self.phase {
            Phase::Starting { .. } => Health::Starting,
            Phase::DrainDelay { .. } | Phase::Draining { .. } => Health::Draining,
            Phase::Stopping => Health::Stopping,
            Phase::Serving if self.workers.ready_count() > 0 => Health::Ok,
            Phase::Serving if self.workers.all_failing() => Health::Failing,
            Phase::Serving => Health::Restarting,
        }
    }

    /// Stores [`Self::current_health`] for the metrics thread; at the end
    /// of every turn, after anything that changes the phase or a worker's
    /// readiness.
    fn publish_health(&self) {
        self.health.set(self.current_health());
    }

    fn start_serving(&mut self) -> Result<(), DaemonError> {
        self.clients.start()?;
        self.phase = Phase::Serving;
        let workers = self.workers.target();
        log::info!(
            "listening on {} (handler {}, {workers} workers, pid {})",
            self.local_addr,
            self.workers.handler_source().display(),
            std::process::id()
        );
        self.notify(&format!(
            "READY=1\nSTATUS=serving on {} with {workers} workers\nMAINPID={}",
            self.local_addr,
            std::process::id()
        ));
        Ok(())
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.workers.has_pending() {
            return Some(Duration::ZERO);
        }
        let phase_deadline = match self.phase {
            Phase::Starting { deadline } => deadline,
            Phase::Draining { deadline } => Some(deadline),
            Phase::DrainDelay { until } => Some(until),
            Phase::Serving | Phase::Stopping => None,
        };
        let deadlines = [
            self.workers.next_deadline(now),
            self.clients.next_deadline(),
            self.watchdog.map(|(every, last)| last + every),
            phase_deadline,
        ];
        deadlines
            .into_iter()
            .flatten()
            .min()
            // Round up so the loop does not wake a moment early and spin.
            .map(|at| at.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn on_signals(&mut self) -> Result<(), DaemonError> {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            let serving = self.phase == Phase::Serving;
            match signal {
                SIGTERM | SIGINT => self.on_stop_signal(signal),
                other => self.workers.on_signal(other, serving)?,
            }
        }
        Ok(())
    }

    fn on_stop_signal(&mut self, signal: i32) {
        let name = nix::sys::signal::Signal::try_from(signal)
            .map_or("signal", nix::sys::signal::Signal::as_str);
        match self.phase {
            Phase::Draining { .. } | Phase::Stopping => {
                log::warn!("{name} again: stopping now");
                self.phase = Phase::Stopping;
            }
            Phase::Starting { .. } => {
                log::info!("{name}: stopping before serving");
                self.phase = Phase::Stopping;
            }
            Phase::DrainDelay { .. } => {
                self.drain();
                log::info!(
                    "{name} again: --drain-delay ended early, port closed; {} requests to finish (send it again to stop now)",
                    self.workers.outstanding()
                );
            }
            Phase::Serving => {
                self.notify("STOPPING=1");
                self.stop_told = true;
                if self.drain_delay.is_zero() {
                    log::info!(
                        "{name}: stopping gracefully; {} requests to finish (send it again to stop now)",
                        self.workers.outstanding()
                    );
                    self.drain();
                } else {
                    log::info!(
                        "{name}: stopping gracefully; still accepting for --drain-delay {:?} (send it again to close the port now)",
                        self.drain_delay
                    );
                    self.phase = Phase::DrainDelay {
                        until: Instant::now() + self.drain_delay,
                    };
                }
            }
        }
    }

    /// Stops accepting and finishes what is held, within --shutdown-timeout.
    fn drain(&mut self) {
        self.phase = Phase::Draining {
            deadline: Instant::now() + self.shutdown_timeout,
        };
        self.clients.drain(&mut self.workers);
    }

    fn on_timers(&mut self, now: Instant) -> Result<(), DaemonError> {
        if let Phase::Starting {
            deadline: Some(deadline),
        } = self.phase
        {
            if now >= deadline {
                let handler = self.workers.handler_source().to_path_buf();
                return Err(DaemonError::LoadTimeout(handler));
            }
        }
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                self.notify("WATCHDOG=1");
                self.watchdog = Some((every, now));
            }
        }
        self.clients.on_timers(now, &mut self.workers);
        self.clients.end_turn(&mut self.workers);
        self.workers.on_timers(now);
        self.answer_clients();
        Ok(())
    }

    /// Tells the service manager what the workers part has to say.
    fn notify_workers_news(&mut self) {
        for notice in self.workers.take_notices() {
            match (notice, &self.notifier) {
                (Notice::Reloading, Some(notifier)) => notifier.reloading(),
                (Notice::Reloaded, _) => self.notify("READY=1"),
                (Notice::Reloading, None) => {}
            }
        }
    }

    fn notify(&self, state: &str) {
        if let Some(notifier) = &self.notifier {
            notifier.send(state);
        }
    }

    /// Resets what is left, stops the workers, closes every socket.
    fn shut_down(&mut self) {
        self.clients.reset_all(&mut self.workers);
        // A second signal means now: workers busy in their handler are not
        // waited for.
        let grace = if self.phase == Phase::Stopping {
            URGENT_STOP_GRACE
        } else {
            WORKER_STOP_GRACE
        };
        self.workers.stop_all(grace);
    }
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
