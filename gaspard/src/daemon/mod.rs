//! The daemon: one mio loop on one thread owns the listener, every client
//! connection, the links to the workers, signals and timers. Nothing here blocks, and
//! nothing here runs handler code.
//!
//! The life of a request (see `docs/architecture.md`): `accept` →
//! [`Connection::on_readable`] until a whole request → [`Dispatcher::submit`] →
//! `Daemon::dispatch` sends it to a worker with credit → the worker's reply
//! arrives in `Daemon::on_replies` → [`Connection::reply`] writes it → close.
//!
//! - `clients.rs`: accepting, reading, answering and closing connections.
//! - `workers.rs`: dispatching, replies, worker deaths, reload and scaling.
//! - `scrape.rs`: the metrics endpoint.

mod clients;
mod scrape;
mod workers;

use crate::claims::Claims;
use crate::config::Config;
use crate::connection::Connection;
use crate::dispatcher::Dispatcher;
use crate::link::Link;
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::notify::{self, Notifier};
use crate::supervisor::{Recycling, Supervisor};
use crate::worker::WorkerArgs;
use anyhow::{bail, Context as _};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const METRICS_LISTENER: Token = Token(3);
/// Links to workers: `LINK_BASE + slot`.
const LINK_BASE: usize = 1 << 16;
/// Metrics scrapes: `SCRAPE_BASE + slab key`.
const SCRAPE_BASE: usize = 1 << 17;
/// Client connections: `CONN_BASE + slab key`.
const CONN_BASE: usize = 1 << 18;
/// The most worker slots a daemon may have (their tokens sit below `SCRAPE_BASE`).
pub const MAX_WORKERS: usize = SCRAPE_BASE - LINK_BASE - 2;

/// Messages taken from one worker per loop turn before other sources get a turn.
const REPLIES_PER_TURN: usize = 1024;
/// How long stopped workers get to exit on SIGTERM before SIGKILL.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);
/// The same after a second SIGTERM/SIGINT: enough for idle workers to call
/// their handler's shutdown, not for busy ones to finish.
const URGENT_STOP_GRACE: Duration = Duration::from_millis(300);
/// The loop-wide read buffer.
const SCRATCH_LEN: usize = 64 * 1024;
/// File descriptors kept back from client connections for everything else
/// (worker links, logs, the metrics endpoint).
const RESERVED_FDS: usize = 64;

/// A reply as it came from the worker, written to the client without a copy.
pub struct Reply(Vec<u8>);

impl AsRef<[u8]> for Reply {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A worker's link, its claims, and what the daemon knows of it.
struct WorkerLink {
    link: Link,
    claims: Claims,
    incarnation: u64,
    /// It said Ready and counts in the workers_ready metric.
    ready: bool,
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

/// A hot reload of the handler (SIGHUP), in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reload {
    Idle,
    /// The first worker of the new generation is loading it; nothing old has
    /// been touched yet.
    Validating {
        generation: u64,
        slot: usize,
        incarnation: u64,
        /// When to give up (--timeout).
        deadline: Option<Instant>,
    },
    /// Validated: old workers are being replaced one at a time.
    Rolling {
        generation: u64,
    },
}

/// The private directory of the handler snapshots, removed when dropped.
fn runtime_dir(parent: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let mut builder = tempfile::Builder::new();
    // Only gaspard's user may read or replace the handler code workers load.
    builder
        .prefix("gaspard-")
        .permissions(std::fs::Permissions::from_mode(0o700));
    let dir = match parent {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
    .context("cannot create the runtime directory")?;
    Ok(dir)
}

pub struct Daemon {
    config: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    accepting: bool,
    accept_paused_until: Option<Instant>,
    local_addr: std::net::SocketAddr,
    signals: Signals,
    /// The link to each running worker, by slot.
    links: Vec<Option<WorkerLink>>,
    /// Slots whose links had more messages than one turn takes.
    links_pending: Vec<usize>,
    /// Slots with requests staged for the end of this turn.
    links_to_flush: Vec<usize>,
    conns: Slab<Connection<Reply>>,
    dispatcher: Dispatcher,
    supervisor: Supervisor,
    /// How many workers to run (--workers, changed by SIGTTIN / SIGTTOU).
    target_workers: usize,
    /// The handler generation new workers load.
    generation: u64,
    reload: Reload,
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
    metrics: Metrics,
    metrics_listener: Option<TcpListener>,
    scrapes: Slab<scrape::Scrape>,
    notifier: Option<Notifier>,
    watchdog: Option<(Duration, Instant)>,
    // Last: removed after every socket in it is closed.
    _runtime_dir_guard: tempfile::TempDir,
}

impl Daemon {
    /// Binds the port (or takes systemd's), drops privileges, creates the
    /// runtime directory. `log_filter` is passed on to the workers' logging.
    pub fn new(config: Config, log_filter: &str) -> anyhow::Result<Daemon> {
        if config.workers > MAX_WORKERS / 2 {
            bail!(
                "--workers {} is more than the {} supported",
                config.workers,
                MAX_WORKERS / 2
            );
        }
        // Absolute but not resolved: a reload follows a symlink that was
        // re-pointed since (the usual way to deploy a new version).
        let handler = std::path::absolute(&config.handler)
            .and_then(|path| std::fs::metadata(&path).map(|_| path))
            .with_context(|| format!("handler {}: cannot open", config.handler.display()))?;
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
                TcpListener::bind(addr)
                    .with_context(|| format!("cannot serve metrics on {addr}"))?,
            ),
            None => None,
        };
        // Ports are bound: root is no longer needed.
        crate::privileges::drop_to(config.user.as_deref(), config.group.as_deref())?;

        let dir_guard = runtime_dir(config.runtime_dir.as_deref())?;
        let runtime_dir = dir_guard.path().to_path_buf();

        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;

        let program = std::env::current_exe().context("cannot find gaspard's own executable")?;
        let template = WorkerArgs {
            requests_fd: -1,
            replies_fd: -1,
            claims_fd: -1,
            incarnation: 0,
            daemon_pid: std::process::id() as i32,
            handler: handler.clone(),
            load_from: PathBuf::new(),
            handler_config: config.handler_config.clone(),
        };
        let recycling = Recycling {
            max_requests: config.max_requests,
            jitter: config.max_requests_jitter,
        };
        let mut supervisor = Supervisor::new(program, template, runtime_dir, log_filter, recycling);
        let generation = supervisor
            .snapshot_handler()
            .with_context(|| format!("handler {}: cannot copy it", handler.display()))?;
        let dispatcher = Dispatcher::new(config.worker_credit, config.timeout);
        let notifier = Notifier::from_env();
        let watchdog = notify::watchdog_interval().map(|every| (every, Instant::now()));
        Ok(Daemon {
            poll,
            listener: Some(listener),
            accepting: false,
            accept_paused_until: None,
            local_addr,
            signals,
            links: Vec::new(),
            links_pending: Vec::new(),
            links_to_flush: Vec::new(),
            conns: Slab::new(),
            dispatcher,
            supervisor,
            target_workers: config.workers,
            generation,
            reload: Reload::Idle,
            phase: Phase::Starting,
            scratch: vec![0; SCRATCH_LEN],
            startup_deadline: config.timeout.map(|t| Instant::now() + t),
            stop_now: false,
            max_connections,
            at_capacity: false,
            last_sweep: Instant::now(),
            client_warnings: Throttle::default(),
            metrics: Metrics::default(),
            metrics_listener,
            scrapes: Slab::new(),
            notifier,
            watchdog,
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
        if !matches!(self.phase, Phase::Draining { .. }) {
            self.notify("STOPPING=1"); // a graceful stop said so when it began
        }
        self.shut_down();
        result
    }

    fn notify(&self, state: &str) {
        if let Some(notifier) = &self.notifier {
            notifier.send(state);
        }
    }

    fn run_loop(&mut self) -> anyhow::Result<()> {
        for _ in 0..self.target_workers {
            self.add_worker(self.generation)
                .context("cannot start a worker process")?;
        }
        if let Some(listener) = self.metrics_listener.as_mut() {
            self.poll
                .registry()
                .register(listener, METRICS_LISTENER, Interest::READABLE)?;
            log::info!(
                "serving metrics on http://{}/metrics",
                listener.local_addr()?
            );
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
                    METRICS_LISTENER => self.accept_scrapes(),
                    // Replies first, and the freed workers' next requests at
                    // once: a worker must not idle while the rest of the
                    // batch (accepts, reads) is handled.
                    Token(t) if (LINK_BASE..SCRAPE_BASE).contains(&t) => {
                        self.on_link_event(t - LINK_BASE, event)?;
                        self.dispatch();
                    }
                    Token(t) if (SCRAPE_BASE..CONN_BASE).contains(&t) => {
                        self.on_scrape_event(t - SCRAPE_BASE)
                    }
                    Token(t) => self.on_connection_event(t - CONN_BASE, event),
                }
            }
            for slot in std::mem::take(&mut self.links_pending) {
                self.on_messages(slot)?;
            }
            self.on_timers(Instant::now())?;
            self.advance_reload();
            self.dispatch();
            self.flush_links();
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
            self.supervisor.handler_source().display(),
            self.target_workers,
            std::process::id()
        );
        self.notify(&format!(
            "READY=1\nSTATUS=serving on {} with {} workers\nMAINPID={}",
            self.local_addr,
            self.target_workers,
            std::process::id()
        ));
        // Connections that queued in the backlog while workers started.
        self.accept();
        Ok(())
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.links_pending.is_empty() {
            return Some(Duration::ZERO);
        }
        let reload_deadline = match &self.reload {
            Reload::Validating { deadline, .. } => *deadline,
            _ => None,
        };
        let deadlines = [
            self.dispatcher.next_deadline(),
            self.dispatcher.next_stuck(now),
            self.supervisor.next_deadline(),
            self.accept_paused_until,
            self.startup_deadline,
            self.next_sweep(),
            reload_deadline,
            self.watchdog.map(|(every, last)| last + every),
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

    fn on_signals(&mut self) -> anyhow::Result<()> {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGCHLD => self.on_worker_exits()?,
                SIGTERM | SIGINT => self.on_stop_signal(signal),
                SIGHUP => self.start_reload(),
                SIGTTIN => self.scale(1),
                SIGTTOU => self.scale(-1),
                _ => {}
            }
        }
        Ok(())
    }

    fn on_stop_signal(&mut self, signal: i32) {
        let name = nix::sys::signal::Signal::try_from(signal)
            .map_or("signal", nix::sys::signal::Signal::as_str);
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
                self.notify("STOPPING=1");
                // Connections the kernel completed before the signal are
                // accepted requests too: take them before closing the port.
                self.accept();
                if let Some(mut listener) = self.listener.take() {
                    let _ = self.poll.registry().deregister(&mut listener);
                }
                self.accepting = false;
                self.accept_paused_until = None;
                self.phase = Phase::Draining {
                    deadline: Instant::now() + self.config.shutdown_timeout,
                };
                // After the phase changes: sessions see it and stop taking requests.
                self.wind_down_sessions();
            }
        }
    }

    fn on_timers(&mut self, now: Instant) -> anyhow::Result<()> {
        if let Some(deadline) = self.startup_deadline {
            if now >= deadline {
                bail!(
                    "handler {}: workers did not finish loading the handler within --timeout",
                    self.supervisor.handler_source().display()
                );
            }
        }
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                self.notify("WATCHDOG=1");
                self.watchdog = Some((every, now));
            }
        }
        if self.accept_paused_until.is_some_and(|at| now >= at) {
            self.resume_accept();
        }
        if self.next_sweep().is_some_and(|at| now >= at) {
            self.sweep(now);
        }
        self.kill_overdue(now);
        self.reload_timeout(now);
        // Also while draining: queued requests still need workers.
        for slot in self.supervisor.due(now) {
            self.metrics.worker_starts.inc();
            match self.supervisor.start(slot) {
                Ok((incarnation, link, claims)) => {
                    self.install_link(slot, incarnation, link, claims)?
                }
                Err(e) => log::error!("cannot start a worker process: {e}"),
            }
        }
        Ok(())
    }

    /// Stops the workers, resets what is left, closes every socket.
    fn shut_down(&mut self) {
        self.reset_all_clients();
        // A second signal means now: workers busy in their handler are not
        // waited for.
        let grace = if self.stop_now {
            URGENT_STOP_GRACE
        } else {
            WORKER_STOP_GRACE
        };
        // Links first: a worker still in its handler cannot write its reply
        // into a link nobody reads any more (it would block there until
        // killed, and never call the handler's shutdown); with the link
        // closed, the write fails and the worker stops on its own.
        for slot in 0..self.links.len() {
            self.drop_link(slot);
        }
        self.supervisor.stop_all(grace);
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
