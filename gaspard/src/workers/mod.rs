//! The workers part: the worker processes ([`supervisor`]), the endpoint
//! each is reached through ([`Endpoint`]: a [`link`] and its [`claims`]),
//! which worker holds which request and with how much credit
//! ([`dispatcher`]), and changing the workers on purpose (hot reload on
//! SIGHUP, [`reload`]; one more or one fewer on SIGTTIN / SIGTTOU).
//!
//! The clients part reaches it only through [`Requests`] and gets back an
//! [`Answer`] for every request it submitted; the loop reads those with
//! [`Workers::take_answers`]. Nothing here knows about TCP clients beyond an
//! opaque [`ClientKey`].

pub(crate) mod areas;
pub(crate) mod args;
pub(crate) mod claims;
mod dispatcher;
mod endpoint;
mod lifecycle;
pub(crate) mod link;
mod reload;
mod supervisor;
pub(crate) mod zmq_link;

use crate::metrics::{Metrics, Outcome};
use crate::pool::server::{PoolConfig, PoolEvent, PoolServer};
pub(crate) use areas::{AreaBody, ReplyBody, RequestBody};
use claims::Claims;
use dispatcher::Dispatcher;
use endpoint::{Carrier, Endpoint, Linking};
use link::{Kind, Message};
use mio::{Registry, Token};
use reload::Reload;
use std::sync::Arc;
use std::time::{Duration, Instant};
use supervisor::Supervisor;

pub(crate) use dispatcher::RequestId;
pub(crate) use supervisor::{describe as describe_exit, Recycling};

/// A client connection, as the workers know it: an opaque key.
pub(crate) type ClientKey = usize;

/// Links to workers: `LINK_BASE + slot`.
pub(crate) const LINK_BASE: usize = 1 << 16;
/// The most worker slots a daemon may have (their tokens sit below `LINK_END`).
pub(crate) const MAX_WORKERS: usize = LINK_END - LINK_BASE - 2;
/// The first token above the links'.
pub(crate) const LINK_END: usize = 1 << 17;
// --workers is limited to half the slots: a reload needs the other half.
const _: () = assert!(2 * crate::config::MAX_WORKERS <= MAX_WORKERS);

/// The socket every `--link zmq` worker's replies arrive on: one of the two
/// tokens below `LINK_END` that no slot has.
pub(crate) const ZMQ_REPLIES: Token = Token(LINK_END - 1);
/// The worker pool's ROUTER socket and its ZAP handler (`pool/server.rs`).
pub(crate) const POOL_ROUTER: Token = Token(LINK_END);
pub(crate) const POOL_ZAP: Token = Token(LINK_END + 1);
/// The first token above the workers part's.
pub(crate) const WORKERS_END: usize = LINK_END + 2;

/// Messages taken from one worker per loop turn before other sources get a turn.
const REPLIES_PER_TURN: usize = 1024;

/// Why a worker part operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    #[error(transparent)]
    Start(#[from] supervisor::StartError),
    #[error("cannot set up the zmq link: {0}")]
    ZmqLink(#[from] zmq_link::ZmqLinkError),
    #[error(transparent)]
    Pool(#[from] crate::pool::server::PoolError),
    #[error("cannot watch the zmq link: {0}")]
    Watch(#[source] std::io::Error),
    /// The handler file could not be copied for the workers to load.
    #[error("cannot copy the handler: {0}")]
    Snapshot(#[source] std::io::Error),
    /// The first workers could not load the handler: the daemon cannot serve.
    #[error("{0}")]
    Load(String),
}

/// What the clients part asks of the workers.
pub(crate) trait Requests {
    /// Queues a request of `client`, or says why it cannot be taken now
    /// (the queue is full, or no worker can run it): refusing at once beats
    /// queueing without end.
    fn submit(&mut self, client: ClientKey, payload: RequestBody) -> Result<RequestId, String>;
    /// Room in some worker's request area for a body of `len` bytes, to be
    /// read there straight from its client; `None`: read it into memory of
    /// its own.
    fn place_body(&mut self, len: usize) -> Option<AreaBody>;
    /// Hands queued requests to workers with credit.
    fn dispatch(&mut self);
    /// The client of `id` went away: a queued request is dropped, a running
    /// one's reply will be discarded.
    fn cancel(&mut self, id: RequestId);
    /// Whether `id` still waits for a worker.
    fn is_queued(&self, id: RequestId) -> bool;
}

/// What became of a submitted request, for its client.
#[derive(Debug)]
pub(crate) enum Answer {
    Reply {
        client: ClientKey,
        id: RequestId,
        reply: ReplyBody,
    },
    Failure {
        client: ClientKey,
        id: RequestId,
        outcome: Outcome,
        reason: String,
    },
    /// It waits in the queue again: its worker died before starting it, or
    /// it was taken back from behind a slow call.
    Requeued { client: ClientKey },
}

/// What the loop should tell the service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// A reload (SIGHUP) began.
    Reloading,
    /// A reload ended, done or rejected: serving as before.
    Reloaded,
}

/// Settings of the workers part.
#[derive(Debug, Clone)]
pub(crate) struct WorkersConfig {
    /// gaspard's own executable, started in worker mode.
    pub program: std::path::PathBuf,
    /// The operator's handler file (absolute, not resolved).
    pub handler: std::path::PathBuf,
    /// --handler-config.
    pub handler_config: String,
    /// Where handler snapshots are kept (the private runtime directory).
    pub runtime_dir: std::path::PathBuf,
    /// The daemon's log filter, so workers log at the same level.
    pub log_filter: String,
    pub recycling: Recycling,
    /// --worker-credit.
    pub credit: crate::config::Credit,
    /// --workers.
    pub workers: usize,
    /// --max-queue.
    pub max_queue: usize,
    /// --timeout.
    pub timeout: Option<Duration>,
    /// --link.
    pub link: crate::config::LinkKind,
    /// --max-request-size and --max-buffered: how large a local worker's
    /// body areas are (`areas::area_len`).
    pub max_request_size: usize,
    pub max_buffered: usize,
    /// --pool-listen and its keys: worker hosts may join.
    pub pool: Option<PoolConfig>,
}

pub(crate) struct Workers {
    registry: Registry,
    /// Each running worker's endpoint, by slot.
    endpoints: Vec<Option<Endpoint>>,
    /// Slots whose links had more messages than one turn takes.
    pending: Vec<usize>,
    /// Slots with requests staged for the end of this turn.
    to_flush: Vec<usize>,
    /// How new workers are linked (--link).
    linking: Linking,
    /// The zmq replies socket had more messages than one turn takes.
    zmq_pending: bool,
    /// Worker hosts (--pool-listen).
    pool: Option<PoolServer>,
    supervisor: Supervisor,
    dispatcher: Dispatcher,
    reload: Reload,
    /// How many workers to run (--workers, changed by SIGTTIN / SIGTTOU).
    target: usize,
    /// The handler generation new workers load.
    generation: u64,
    /// --max-queue.
    max_queue: usize,
    /// --timeout.
    timeout: Option<Duration>,
    /// The first workers have all been ready: from then on a worker that
    /// cannot load the handler is restarted rather than fatal.
    started: bool,
    answers: Vec<Answer>,
    notices: Vec<Notice>,
    metrics: Arc<Metrics>,
    /// When to look next for request areas to trim (`areas.rs`); `None`
    /// while none holds pages to give back.
    trim_check: Option<Instant>,
    /// Where the search for a worker area to read a body into starts.
    place_cursor: usize,
    /// --max-request-size and --max-buffered, which size the body areas of
    /// the workers started from now on (`areas::area_len`).
    area_limits: (usize, usize),
}

impl Workers {
    /// Snapshots the handler; no worker starts before [`Self::start`].
    pub(crate) fn new(
        registry: Registry,
        config: WorkersConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Workers, WorkersError> {
        let linking = match config.link {
            crate::config::LinkKind::Local => Linking::Local {
                area_len: areas::area_len(
                    config.max_request_size,
                    config.max_buffered,
                    config.workers,
                ),
            },
            crate::config::LinkKind::Zmq => {
                let hub = zmq_link::ZmqHub::bind(&config.runtime_dir)?;
                hub.register(&registry, ZMQ_REPLIES)
                    .map_err(WorkersError::Watch)?;
                Linking::Zmq(hub)
            }
        };
        let pool = match &config.pool {
            Some(pool_config) => {
                let pool = PoolServer::bind(pool_config)?;
                pool.register(&registry, POOL_ROUTER, POOL_ZAP)
                    .map_err(WorkersError::Watch)?;
                let curve = if pool_config.curve.is_some() {
                    "CURVE"
                } else {
                    "no encryption"
                };
                log::info!(
                    "worker pool: hosts may join on {} ({curve})",
                    pool.endpoint()
                );
                Some(pool)
            }
            None => None,
        };
        let mut supervisor = Supervisor::new(
            config.program,
            args::WorkerArgs::template(config.handler, config.handler_config),
            config.runtime_dir,
            &config.log_filter,
            config.recycling,
        );
        let generation = supervisor
            .snapshot_handler()
            .map_err(WorkersError::Snapshot)?;
        let mut dispatcher = Dispatcher::new(config.credit, config.timeout);
        if let (Some(pool), Some(timeout)) = (&config.pool, config.timeout) {
            dispatcher.set_remote_timeout(Some(timeout + pool.heartbeat_timeout));
        }
        Ok(Workers {
            registry,
            endpoints: Vec::new(),
            pending: Vec::new(),
            to_flush: Vec::new(),
            linking,
            zmq_pending: false,
            pool,
            supervisor,
            dispatcher,
            reload: Reload::Idle,
            target: config.workers,
            generation,
            max_queue: config.max_queue,
            timeout: config.timeout,
            started: false,
            answers: Vec::new(),
            notices: Vec::new(),
            metrics,
            trim_check: None,
            place_cursor: 0,
            area_limits: (config.max_request_size, config.max_buffered),
        })
    }

    /// Starts the first workers.
    pub(crate) fn start(&mut self) -> Result<(), WorkersError> {
        for _ in 0..self.target {
            self.add_worker(self.generation)?;
        }
        Ok(())
    }

    /// Whether the first workers are all up (once true, it stays true).
    pub(crate) fn first_ready(&mut self) -> bool {
        if !self.started && self.supervisor.ready_count() >= self.target {
            self.started = true;
        }
        self.started
    }

    /// How many workers serve (ready, and not being stopped): local ones,
    /// and those of connected worker hosts.
    pub(crate) fn ready_count(&self) -> usize {
        self.supervisor.ready_count() + self.pool.as_ref().map_or(0, |pool| pool.hosts().1)
    }

    /// Whether every worker slot keeps failing and no worker host serves,
    /// so that requests are refused (see `Supervisor::all_failing`).
    pub(crate) fn all_failing(&self) -> bool {
        self.supervisor.all_failing() && !self.hosts_serve()
    }

    /// Whether some worker host can take requests.
    fn hosts_serve(&self) -> bool {
        self.pool.as_ref().is_some_and(PoolServer::any_serving)
    }

    /// Why no worker can take a request now, if none can: requests would
    /// wait in the queue for nobody.
    fn none_can_serve(&self) -> Option<&'static str> {
        if self.hosts_serve() {
            None
        } else if self.target == 0 {
            Some("no worker host is connected")
        } else if self.supervisor.all_failing() {
            Some("the handler keeps failing")
        } else {
            None
        }
    }

    /// Fails the queued requests if no worker can take them.
    pub(super) fn fail_queued_if_none_can_serve(&mut self) {
        let Some(why) = self.none_can_serve() else {
            return;
        };
        let queued = self.dispatcher.fail_queued();
        if !queued.is_empty() {
            log::error!(
                "no worker can serve ({why}); resetting {} queued requests",
                queued.len()
            );
        }
        for (id, client) in queued {
            self.answers.push(Answer::Failure {
                client,
                id,
                outcome: Outcome::refused,
                reason: format!("no worker can serve: {why}"),
            });
        }
    }

    /// The operator's handler file.
    pub(crate) fn handler_source(&self) -> &std::path::Path {
        self.supervisor.handler_source()
    }

    /// How many workers it runs.
    pub(crate) fn target(&self) -> usize {
        self.target
    }

    /// Requests accepted and not yet answered.
    pub(crate) fn outstanding(&self) -> usize {
        self.dispatcher.outstanding()
    }

    /// What became of requests since the last call, for the clients part.
    /// Swapped with `into`, which must be empty: the two vectors take turns,
    /// so that carrying answers allocates nothing once both have grown.
    pub(crate) fn take_answers(&mut self, into: &mut Vec<Answer>) {
        debug_assert!(into.is_empty(), "answers are carried before more are taken");
        std::mem::swap(&mut self.answers, into);
    }

    /// What the service manager should be told since the last call.
    pub(crate) fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Whether links have messages left over from the last turn.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
            || self.zmq_pending
            || self.pool.as_ref().is_some_and(PoolServer::has_pending)
    }

    /// The earliest moment [`Self::on_timers`] has something to do.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        [
            self.dispatcher.next_deadline(),
            self.dispatcher.next_stuck(now),
            self.supervisor.next_deadline(),
            self.reload.deadline(),
            self.pool.as_ref().and_then(PoolServer::next_deadline),
            self.trim_check,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Adds a worker of `generation` and starts it.
    fn add_worker(&mut self, generation: u64) -> Result<usize, WorkersError> {
        self.metrics.worker_starts.inc();
        let (slot, carrier, claims) = self.supervisor.add(generation, &self.linking)?;
        self.install(slot, carrier, claims)?;
        Ok(slot)
    }

    /// Puts a just-started worker's endpoint into the loop.
    fn install(
        &mut self,
        slot: usize,
        carrier: Carrier,
        claims: Claims,
    ) -> Result<(), WorkersError> {
        if self.endpoints.len() <= slot {
            self.endpoints.resize_with(slot + 1, || None);
        }
        self.close_endpoint(slot);
        let mut endpoint = Endpoint {
            carrier,
            claims: Some(std::rc::Rc::new(claims)),
        };
        endpoint
            .register(&self.registry, Token(LINK_BASE + slot))
            .map_err(WorkersError::Watch)?;
        self.endpoints[slot] = Some(endpoint);
        if let Some(pid) = self.supervisor.pid_of(slot) {
            never_preempt_on_wake_up(pid);
        }
        Ok(())
    }

    /// Closes a worker's endpoint: nothing more is sent to it or read from
    /// it (a live worker reads the end of its link and stops). Its areas'
    /// pages are given back now, as at a death, but for the replies still
    /// being written to clients: the worker holds no request (retired) or
    /// is being killed, so it writes no reply the daemon would read, and
    /// once the endpoint is gone its death finds nothing to give back.
    fn close_endpoint(&mut self, slot: usize) {
        if let Some(mut endpoint) = self.endpoints.get_mut(slot).and_then(Option::take) {
            endpoint.deregister(&self.registry);
            endpoint.worker_gone();
        }
    }

    /// Sets the gauges of the requests.
    fn update_gauges(&self) {
        self.metrics.queued.set(self.dispatcher.queued() as i64);
        self.metrics
            .in_flight
            .set((self.dispatcher.outstanding() - self.dispatcher.queued()) as i64);
    }

    /// Sets the gauges of the workers ready to serve.
    fn update_ready_gauge(&self) {
        let local = self.supervisor.ready_count();
        let (hosts, remote) = self.pool.as_ref().map_or((0, 0), PoolServer::hosts);
        self.metrics.workers_ready.set((local + remote) as i64);
        let (local, zmq) = match self.linking {
            Linking::Local { .. } => (local, 0),
            Linking::Zmq(_) => (0, local),
        };
        self.metrics.set_workers_ready("local", local);
        self.metrics.set_workers_ready("zmq", zmq);
        self.metrics.set_workers_ready("remote", remote);
        self.metrics.pool_hosts.set(hosts as i64);
    }

    /// The end of a loop turn: hands out what is queued, then sends what
    /// was staged during the turn.
    pub(crate) fn dispatch_and_flush(&mut self) {
        self.dispatch();
        self.flush();
    }

    /// Sends what [`Requests::dispatch`] staged during this turn.
    fn flush(&mut self) {
        for slot in std::mem::take(&mut self.to_flush) {
            self.flush_endpoint(slot);
        }
    }

    /// Writes what a worker's link has queued. A worker that cannot be
    /// written to is gone or broken: it gets no more requests and, unless it
    /// closed its end (it is dying already), is killed; its requests are
    /// settled when its death is (see `lose_worker`).
    fn flush_endpoint(&mut self, slot: usize) {
        let Some(endpoint) = self.endpoints.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let token = Token(LINK_BASE + slot);
        if let (Carrier::Remote(link), Some(pool)) = (&mut endpoint.carrier, &mut self.pool) {
            // A host that cannot be sent to is lost, by the pool: its
            // requests fail when that news is taken.
            for (id, payload) in std::mem::take(&mut link.outgoing) {
                if !pool.send_request(&link.host, id, &payload) {
                    break;
                }
            }
            return;
        }
        if let Err(e) = endpoint.flush(&self.registry, token) {
            endpoint.discard_output(&self.registry, token);
            self.dispatcher.close_worker(slot);
            if link::is_closed_by_peer(&e) {
                // It died: its death, with its cause, is logged when it is
                // reaped (this is only a consequence).
                log::debug!("worker slot {slot} closed its link: {e}");
                return;
            }
            log::error!("cannot send requests to worker slot {slot}: {e}; killing it");
            self.supervisor
                .kill(slot, "requests could not be sent to it");
        }
    }

    /// Readiness of a worker's link.
    pub(crate) fn on_link_event(
        &mut self,
        token: Token,
        event: &mio::event::Event,
    ) -> Result<(), WorkersError> {
        if token == ZMQ_REPLIES {
            return self.take_zmq_messages(REPLIES_PER_TURN);
        }
        if token == POOL_ROUTER || token == POOL_ZAP {
            self.take_pool_events();
            return Ok(());
        }
        let slot = token.0 - LINK_BASE;
        if event.is_writable() {
            self.flush_endpoint(slot);
        }
        if event.is_readable() || event.is_read_closed() {
            if let Some(endpoint) = self.endpoints.get_mut(slot).and_then(Option::as_mut) {
                endpoint.readable();
            }
            self.take_messages(slot, REPLIES_PER_TURN)?;
        }
        Ok(())
    }

    /// Takes what links had left over from the last turn, a fair share each.
    pub(crate) fn on_pending(&mut self) -> Result<(), WorkersError> {
        for slot in std::mem::take(&mut self.pending) {
            self.take_messages(slot, REPLIES_PER_TURN)?;
        }
        if std::mem::take(&mut self.zmq_pending) {
            self.take_zmq_messages(REPLIES_PER_TURN)?;
        }
        if self.pool.as_ref().is_some_and(PoolServer::has_pending) {
            self.take_pool_events();
        }
        Ok(())
    }

    /// What worker hosts sent.
    fn take_pool_events(&mut self) {
        if let Some(pool) = &mut self.pool {
            let now = Instant::now();
            let events = pool.take_events(now);
            self.on_pool_events(events, now);
        }
    }

    /// Acts on what happened in the worker pool (taken at `now`).
    pub(super) fn on_pool_events(&mut self, events: Vec<PoolEvent>, now: Instant) {
        // Only these change who can serve: a reply or a failure does not.
        let hosts_changed = events
            .iter()
            .any(|event| !matches!(event, PoolEvent::Reply { .. } | PoolEvent::Failed { .. }));
        for event in events {
            match event {
                PoolEvent::Joined { host, credit, .. } => {
                    let slot = self.supervisor.lend();
                    if self.endpoints.len() <= slot {
                        self.endpoints.resize_with(slot + 1, || None);
                    }
                    self.endpoints[slot] = Some(Endpoint {
                        carrier: Carrier::Remote(endpoint::RemoteLink {
                            host: host.clone(),
                            outgoing: Vec::new(),
                        }),
                        claims: None,
                    });
                    if let Some(pool) = &mut self.pool {
                        pool.set_slot(&host, slot);
                    }
                    self.dispatcher.open_remote(slot, credit as usize);
                }
                PoolEvent::Credit { slot, credit, .. } => {
                    self.dispatcher.set_remote_credit(slot, credit as usize);
                }
                PoolEvent::Reply {
                    slot,
                    id,
                    micros,
                    body,
                } => {
                    let reply = Message {
                        kind: Kind::Reply,
                        micros,
                        value: id,
                        body: body.into(),
                    };
                    self.on_reply(slot, reply, now);
                    self.forget_host_if_done(slot);
                }
                PoolEvent::Failed {
                    slot,
                    id,
                    lost,
                    reason,
                } => self.on_remote_failure(slot, id, lost, reason, now),
                PoolEvent::Leaving { slot } => {
                    self.dispatcher.close_worker(slot);
                    self.forget_host_if_done(slot);
                }
                PoolEvent::Lost { slot, cause, why } => {
                    self.close_endpoint(slot);
                    let (failed, _) = self.lose_worker(slot, &why);
                    self.supervisor.give_back(slot);
                    self.metrics.pool_host_lost(cause);
                    log::warn!("{why}; {failed} requests it held failed");
                }
            }
        }
        if hosts_changed {
            // The last host that could serve may have gone (or have no credit).
            self.fail_queued_if_none_can_serve();
            self.update_ready_gauge();
        }
    }

    /// A request failed on a worker host: its handler's error, or its
    /// worker was lost there (crashed, killed, past --timeout).
    fn on_remote_failure(
        &mut self,
        slot: usize,
        id: RequestId,
        lost: bool,
        reason: String,
        now: Instant,
    ) {
        if !lost {
            let message = Message {
                kind: Kind::Failed,
                micros: 0,
                value: id,
                body: reason.into_bytes().into(),
            };
            self.on_reply(slot, message, now);
            return self.forget_host_if_done(slot);
        }
        match self.dispatcher.complete(slot, id, 0, now) {
            Ok(Some(client)) => self.answers.push(Answer::Failure {
                client,
                id,
                outcome: Outcome::worker_lost,
                reason,
            }),
            Ok(None) | Err(dispatcher::NotHeld::Settled) => {}
            Err(dispatcher::NotHeld::ByOther) => {
                if let Some(pool) = &mut self.pool {
                    pool.drop_slot(slot, &format!("failed request {id}, not its own"));
                }
            }
        }
        self.forget_host_if_done(slot);
    }

    /// A worker host that is leaving is forgotten once it holds nothing.
    fn forget_host_if_done(&mut self, slot: usize) {
        let Some(Some(Endpoint {
            carrier: Carrier::Remote(link),
            ..
        })) = self.endpoints.get(slot)
        else {
            return;
        };
        let leaving = self
            .pool
            .as_ref()
            .is_some_and(|pool| pool.is_leaving(&link.host));
        if !leaving || self.dispatcher.held(slot) > 0 {
            return;
        }
        if let Some(pool) = &mut self.pool {
            pool.forget(&link.host);
        }
        self.close_endpoint(slot);
        self.lose_worker(slot, "its worker host left");
        self.supervisor.give_back(slot);
        // Also after its last reply, which recounts nothing by itself.
        self.update_ready_gauge();
    }

    /// Takes up to `limit` messages from the zmq replies socket, each to the
    /// worker it names; if more may be waiting, they wait for the next turn.
    /// A message from a worker that is gone is dropped: its requests were
    /// settled with its death.
    pub(super) fn take_zmq_messages(&mut self, limit: usize) -> Result<(), WorkersError> {
        // One clock read for the batch.
        let now = Instant::now();
        for _ in 0..limit {
            let Linking::Zmq(hub) = &self.linking else {
                return Ok(());
            };
            let received = match hub.try_recv() {
                Ok(Some(received)) => received,
                Ok(None) => return Ok(()),
                Err(e) => {
                    log::error!("cannot read the zmq replies socket: {e}");
                    return Ok(());
                }
            };
            let zmq_link::Received::Frame {
                slot,
                incarnation,
                frame,
            } = received
            else {
                log::warn!("dropped a message on the zmq replies socket that names no worker");
                continue;
            };
            if self.supervisor.incarnation_of(slot) != Some(incarnation) {
                log::debug!("dropped a message from worker {incarnation}, which is gone");
                continue;
            }
            match frame {
                Ok(message) => self.on_message(slot, message, now)?,
                Err(e) => self.abandon_worker(slot, &format!("sent garbage: {e}")),
            }
        }
        self.zmq_pending = true;
        Ok(())
    }

    /// Takes up to `limit` messages from a worker's link; if more may be
    /// waiting, the slot is marked for the next turn.
    fn take_messages(&mut self, slot: usize, limit: usize) -> Result<(), WorkersError> {
        // One clock read for the batch.
        let now = Instant::now();
        for _ in 0..limit {
            let Some(endpoint) = self.endpoints.get_mut(slot).and_then(Option::as_mut) else {
                return Ok(());
            };
            match endpoint.try_recv() {
                Ok(Some(message)) => self.on_message(slot, message, now)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    // Anything a worker sends is untrusted: a broken stream
                    // means its memory is corrupt, and what it ran is unknown.
                    self.abandon_worker(slot, &format!("sent garbage: {e}"));
                    return Ok(());
                }
            }
        }
        if !self.pending.contains(&slot) {
            self.pending.push(slot);
        }
        Ok(())
    }

    /// `now`: when the batch it came in was taken.
    fn on_message(
        &mut self,
        slot: usize,
        message: Message,
        now: Instant,
    ) -> Result<(), WorkersError> {
        let incarnation = self.supervisor.incarnation_of(slot).unwrap_or(0);
        let about_itself = matches!(message.kind, Kind::Ready | Kind::InitFailed);
        if about_itself && message.value != incarnation {
            let what = format!("said it is worker {}", message.value);
            self.abandon_worker(slot, &what);
            return Ok(());
        }
        match message.kind {
            Kind::Reply | Kind::Failed => self.on_reply(slot, message, now),
            Kind::Ready => self.on_worker_ready(slot, &message.body),
            Kind::InitFailed => {
                let reason = String::from_utf8_lossy(&message.body).into_owned();
                if !self.started {
                    return Err(WorkersError::Load(reason));
                }
                if self.reload.is_probe(incarnation) {
                    self.reject_reload(&reason);
                } else {
                    log::error!("worker {incarnation} could not start: {reason}");
                }
            }
            Kind::Request | Kind::RequestInArea => {
                self.abandon_worker(slot, "sent a request frame")
            }
            // A local link takes these itself (as replies); over any other
            // link, there is no area.
            Kind::ReplyInArea => self.abandon_worker(slot, "sent a reply in an area it has not"),
            // Its link takes these itself: over any other, it is garbage.
            Kind::Replies => self.abandon_worker(slot, "announced replies outside its link"),
        }
        Ok(())
    }

    fn on_reply(&mut self, slot: usize, message: Message, now: Instant) {
        let id = message.value;
        let client = match self.dispatcher.complete(slot, id, message.micros, now) {
            Ok(client) => client,
            // Its worker was already given up on (timed out): nobody waits.
            Err(dispatcher::NotHeld::Settled) => return,
            Err(dispatcher::NotHeld::ByOther) => {
                return self.abandon_worker(slot, &format!("answered request {id}, not its own"));
            }
        };
        if self.supervisor.note_served(slot) {
            self.retire(slot, false);
        } else if self.supervisor.is_retiring(slot) && self.dispatcher.held(slot) == 0 {
            self.stop_retired(slot);
        }
        let Some(client) = client else {
            return; // the client went away
        };
        self.answers.push(if message.kind == Kind::Failed {
            Answer::Failure {
                client,
                id,
                outcome: Outcome::handler_error,
                reason: String::from_utf8_lossy(&message.body).into_owned(),
            }
        } else {
            Answer::Reply {
                client,
                id,
                reply: message.body,
            }
        });
    }

    fn on_worker_ready(&mut self, slot: usize, body: &[u8]) {
        let incarnation = self.supervisor.incarnation_of(slot).unwrap_or(0);
        if self.supervisor.is_ready(slot) {
            log::warn!("worker {incarnation} (slot {slot}) said Ready twice; ignored");
            return;
        }
        if self.supervisor.is_retiring(slot) {
            // Told to stop while starting (SIGTTOU, a rejected reload): it
            // gets no work, and exits on the signal it already has.
            return;
        }
        let pid: u32 = std::str::from_utf8(body)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0);
        self.supervisor.mark_ready(slot);
        self.dispatcher.open_worker(slot);
        self.update_ready_gauge();
        log::debug!("worker {incarnation} (slot {slot}, pid {pid}) is ready");
        if let Some(generation) = self.reload.validated(incarnation) {
            log::info!(
                "reload: the new handler loaded; replacing {} workers one at a time",
                self.target
            );
            self.generation = generation;
        }
    }

    /// Takes back the requests staged behind calls that turned out slow,
    /// if their workers have not started them: they go to whichever worker
    /// is free first (see `claims.rs`).
    fn take_back_stuck(&mut self, now: Instant) {
        self.take_unannounced(now, false);
        let stuck = self.dispatcher.stuck(now);
        // In reverse: each goes back to the head of the queue.
        for &(slot, id, ticket) in stuck.iter().rev() {
            let Some(endpoint) = self.endpoints.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if !endpoint.withdraw(ticket, id) {
                // It has started it: the slow call is over.
                self.dispatcher.take_back_failed(slot);
                continue;
            }
            log::debug!("took back request {id} from slot {slot}: its worker runs a slow call");
            if let Some(client) = self.dispatcher.taken_back(id) {
                self.answers.push(Answer::Requeued { client });
            }
        }
    }
}

impl Workers {
    /// Takes the replies that workers running a long call finished before
    /// it but have not announced yet (`link.rs`): they must not wait for
    /// that call, nor be failed with it at its --timeout.
    pub(super) fn take_unannounced(&mut self, now: Instant, deadlines: bool) {
        let slots: Vec<usize> = self.dispatcher.in_long_calls(now, deadlines).collect();
        for slot in slots {
            let Some(endpoint) = self.endpoints.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if let Err(e) = endpoint.take_unannounced() {
                self.abandon_worker(slot, &format!("sent garbage: {e}"));
                continue;
            }
            // Only replies come through the ring: nothing here is fatal.
            if let Err(e) = self.take_messages(slot, REPLIES_PER_TURN) {
                log::error!("worker slot {slot}: {e}");
            }
        }
    }
}

/// Runs a new worker as `SCHED_BATCH`, which differs from the normal policy
/// (nice included) in one thing only: a worker woken by a request does not
/// preempt the task running on the CPU it is woken on, usually the loop that
/// just wrote to it; it runs on an idle CPU if there is one, else when that
/// task sleeps or its slice ends. When every CPU is busy (256 echo clients on
/// two cores), a worker preempted the loop after each `writev` to it, about
/// once per request, and each switch between the two processes cost more
/// than the request: the loop now finishes its turn first. Measured: 0.67x
/// of the baseline became 0.81x at 256 clients; 1 ms calls at 8 clients and
/// 64 clients unchanged. The loop itself keeps the normal policy: as
/// `SCHED_BATCH` it waited for ticks while workers ran out of staged work.
/// A policy other than the normal one (set for the daemon by the operator,
/// as systemd's `CPUSchedulingPolicy=`, and inherited) is left as it is.
fn never_preempt_on_wake_up(pid: u32) {
    use nix::libc;
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on a child not reaped yet (its pid cannot be
    // another process's); `param` outlives the call.
    let changed = unsafe {
        libc::sched_getscheduler(pid) == libc::SCHED_OTHER
            && libc::sched_setscheduler(pid, libc::SCHED_BATCH, &param) == 0
    };
    if !changed {
        log::debug!("worker pid {pid} keeps its scheduling policy");
    }
}

/// A request area has come to hold pages to give back once empty: the loop
/// looks again in a while (`Workers::trim_areas`), unless a look is due.
fn watch_trim(check: &mut Option<Instant>, holds_pages: impl FnOnce() -> bool) {
    if check.is_none() && holds_pages() {
        *check = Some(Instant::now() + areas::TRIM_AFTER);
    }
}

impl Requests for Workers {
    fn submit(&mut self, client: ClientKey, payload: RequestBody) -> Result<RequestId, String> {
        // Never the case with --max-request-size's limit; checked so that
        // no length is ever cut short on the link.
        if payload.len() > link::MAX_BODY {
            return Err(format!(
                "a request of {} bytes does not fit the worker link",
                payload.len()
            ));
        }
        if let Some(why) = self.none_can_serve() {
            return Err(format!("no worker can take the request: {why}"));
        }
        // Requests that idle workers are about to take are not waiting
        // (asked only when the queue alone could be full: a clock read).
        let queued = self.dispatcher.queued();
        if queued < self.max_queue {
            return Ok(self.dispatcher.submit(client, payload));
        }
        let idle_credit = self.dispatcher.idle_credit(Instant::now());
        let waiting = queued.saturating_sub(idle_credit);
        if queued >= idle_credit && waiting >= self.max_queue {
            return Err(format!(
                "queue is full ({waiting} requests waiting, --max-queue)"
            ));
        }
        Ok(self.dispatcher.submit(client, payload))
    }

    /// A worker that was idle gets its requests at once, in one write; what
    /// is staged behind a busy worker's request waits for [`Workers::flush`]
    /// at the end of the loop turn, so that a turn's requests for it leave
    /// in one write.
    fn dispatch(&mut self) {
        let now = Instant::now();
        // First: room a reply has just freed goes to requests stuck behind
        // a slow call (they go back to the head of the queue) rather than
        // to newer ones, or under steady load they would never move.
        self.take_back_stuck(now);
        let mut idle = Vec::new();
        while let Some(assignment) = self.dispatcher.next_assignment(now) {
            let slot = assignment.slot;
            let Some(endpoint) = self.endpoints.get_mut(slot).and_then(Option::as_mut) else {
                self.dispatcher.unassign(assignment);
                break;
            };
            let id = assignment.id;
            if let Some(moved) = endpoint.send(assignment) {
                self.dispatcher.body_moved(id, moved);
            }
            watch_trim(&mut self.trim_check, || endpoint.area_holds_pages());
            if self.dispatcher.held(slot) == 1 {
                idle.push(slot);
            } else if !idle.contains(&slot) && !self.to_flush.contains(&slot) {
                self.to_flush.push(slot);
            }
        }
        for slot in idle {
            self.flush_endpoint(slot);
        }
        self.update_gauges();
    }

    /// In the area of the open local worker likeliest to run it: the one
    /// with the fewest requests held and bodies read in place, and of
    /// those the one whose call began first, which is likely to finish
    /// first (the next worker if its area has no room). The dispatcher then
    /// prefers that worker when it is as free as any
    /// (`Dispatcher::next_assignment`); when another runs it, the body is
    /// copied as any other.
    fn place_body(&mut self, len: usize) -> Option<AreaBody> {
        let n = self.endpoints.len();
        let mut candidates: Vec<(usize, (usize, Option<Instant>))> = (0..n)
            .map(|i| (self.place_cursor + i) % n)
            .filter(|&slot| self.dispatcher.is_open(slot))
            .filter_map(|slot| match &self.endpoints[slot] {
                Some(Endpoint {
                    carrier: Carrier::Local(link),
                    claims: Some(_),
                }) => {
                    let load = self.dispatcher.held(slot) + link.bodies_read_in_place();
                    Some((slot, (load, self.dispatcher.busy_since(slot))))
                }
                _ => None,
            })
            .collect();
        // Stable: what is equal keeps the round's order (an idle worker's
        // `None` comes first).
        candidates.sort_by_key(|&(_, key)| key);
        for (slot, _) in candidates {
            let Some(Endpoint {
                carrier: Carrier::Local(link),
                claims: Some(claims),
            }) = &mut self.endpoints[slot]
            else {
                continue;
            };
            let Some(body) = link.place_body(claims, slot, len) else {
                continue;
            };
            self.place_cursor = (slot + 1) % n;
            watch_trim(&mut self.trim_check, || link.area_holds_pages());
            return Some(body);
        }
        None
    }

    fn cancel(&mut self, id: RequestId) {
        self.dispatcher.client_gone(id);
    }

    fn is_queued(&self, id: RequestId) -> bool {
        self.dispatcher.is_queued(id)
    }
}
