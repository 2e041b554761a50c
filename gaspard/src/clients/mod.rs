//! The clients part: the listener, every client connection and persistent
//! session, their deadlines (--read-timeout), the connection limit, and how
//! each request ended (the outcome metrics). It hands whole requests to the
//! workers through [`Requests`] and takes back each one's [`Answer`]; it
//! knows nothing of how workers are reached.

mod budget;
mod connection;
mod io;
mod session;

use crate::config::Cidr;
use crate::logging::Throttle;
use crate::metrics::{Metrics, Outcome, Refusal};
use crate::protocol::Status;
use crate::workers::{Answer, ReplyBody, RequestId, Requests};
use budget::Budget;
use connection::{Connection, End, State};
use io::Next;
use mio::net::TcpListener;
use mio::{Interest, Registry, Token};
use session::Body;
use slab::Slab;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The listener's token.
pub(crate) const LISTENER: Token = Token(0);
/// Client connections: `CONN_BASE + slab key`.
pub(crate) const CONN_BASE: usize = 1 << 18;

/// How long accept stays paused after running out of file descriptors, or
/// after failing the same way over and over.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Accept errors in a row, of a kind not known to be harmless, before accept
/// pauses rather than spin on an error that keeps coming back.
const MAX_ACCEPT_ERRORS: u32 = 16;
/// The loop-wide read buffer.
const SCRATCH_LEN: usize = 64 * 1024;
/// A connection whose request waits in the queue is watched (so that a
/// client that leaves costs no worker time) once it has waited this long:
/// most waits are shorter (at 256 echo clients, a few milliseconds), and
/// registering each connection that waits at all cost an `epoll_ctl`, an
/// event and a removal at close for half the requests.
const WATCH_QUEUED_AFTER: Duration = Duration::from_millis(20);

/// The limits a client is held to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientLimits {
    /// --max-connections, lowered to fit the file-descriptor limit.
    pub max_connections: usize,
    /// --max-request-size.
    pub max_request_size: u32,
    /// --read-timeout.
    pub read_timeout: Option<Duration>,
    /// --max-buffered.
    pub max_buffered: usize,
}

/// What to do after accept failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptError {
    /// Nothing more to accept now.
    Done,
    /// Take the next connection.
    Retry,
    /// Stop accepting for [`ACCEPT_PAUSE`]: retrying now would spin.
    Pause,
}

/// What to do after accept failed with `error`, the `in_a_row`th time in
/// a row. Out of descriptors or memory, the connection stays in the backlog
/// until some free up. Most other errors are one connection's own trouble
/// (reset while in the backlog): the next is taken, but an error that keeps
/// coming back must not spin the loop.
fn on_accept_error(error: &std::io::Error, in_a_row: u32) -> AcceptError {
    match error.kind() {
        std::io::ErrorKind::WouldBlock => AcceptError::Done,
        std::io::ErrorKind::Interrupted => AcceptError::Retry,
        _ if crate::listener::is_resource_exhaustion(error) => AcceptError::Pause,
        _ if in_a_row >= MAX_ACCEPT_ERRORS => AcceptError::Pause,
        _ => AcceptError::Retry,
    }
}

/// The warning for a listener that anyone who can reach it may use: bound
/// beyond loopback with no --allow (as Redis's protected mode warns).
fn exposure_warning(local: SocketAddr, allow: &[Cidr]) -> Option<String> {
    if !allow.is_empty() || local.ip().to_canonical().is_loopback() {
        return None;
    }
    Some(format!(
        "the client port {local} is open to anyone who can reach it (the protocol has no \
         authentication); say who may connect with --allow CIDR[,CIDR...], or firewall it"
    ))
}

/// The warnings about clients that can repeat under load, one [`Throttle`]
/// each (a Throttle counts lines of one kind).
#[derive(Debug, Default)]
struct Warnings {
    /// Resets of misbehaving clients.
    reset: Throttle,
    /// Accept pausing at the connection limit, which repeats under a flood.
    capacity: Throttle,
    /// Accept failing with other errors.
    accept: Throttle,
    /// Accept pausing over --max-buffered.
    budget: Throttle,
    /// Connections from addresses not in --allow (a scan would flood it).
    refusal: Throttle,
}

impl Warnings {
    /// When one of them has a count of held-back lines to log.
    fn next_flush(&self) -> Option<Instant> {
        [
            &self.reset,
            &self.capacity,
            &self.accept,
            &self.budget,
            &self.refusal,
        ]
        .into_iter()
        .filter_map(Throttle::next_flush)
        .min()
    }

    /// Logs the counts whose window is over.
    fn flush(&mut self, now: Instant) {
        for throttle in [
            &mut self.reset,
            &mut self.capacity,
            &mut self.accept,
            &mut self.budget,
            &mut self.refusal,
        ] {
            throttle.flush(now);
        }
    }
}

/// Whether new connections are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepting {
    /// Not yet serving, or draining: the listener is out of the loop.
    No,
    Yes,
    /// Out of the loop until `Some(instant)`, or (`None`) until a connection
    /// closes: --max-connections are open.
    Paused(Option<Instant>),
}

pub(crate) struct Clients {
    registry: Registry,
    listener: Option<TcpListener>,
    accepting: Accepting,
    conns: Slab<Connection<ReplyBody>>,
    limits: ClientLimits,
    /// The bytes held for clients, against --max-buffered.
    budget: Budget,
    /// Connections waiting for the budget to read a body, oldest first.
    parked: VecDeque<usize>,
    /// --allow: the clients' addresses that may connect; empty: any.
    allow: Vec<Cidr>,
    /// A graceful stop is under way: sessions take no new requests.
    draining: bool,
    /// Connections whose requests wait in the queue and are not watched
    /// yet, with their request and since when, oldest first (see
    /// [`WATCH_QUEUED_AFTER`]).
    queued_unwatched: VecDeque<(usize, RequestId, Instant)>,
    /// Sessions that got answers in the batch at hand: each is moved along
    /// once at the end of the batch ([`Self::answer_all`]), so that its
    /// replies leave in one write, not one write each.
    answered_sessions: Vec<usize>,
    scratch: Vec<u8>,
    /// When client deadlines were last checked.
    last_sweep: Instant,
    warnings: Warnings,
    metrics: Arc<Metrics>,
}

impl Clients {
    pub(crate) fn new(
        listener: TcpListener,
        registry: Registry,
        limits: ClientLimits,
        allow: Vec<Cidr>,
        metrics: Arc<Metrics>,
    ) -> Clients {
        // The listener may be systemd's, so its own address is checked,
        // not --bind.
        if let Ok(local) = listener.local_addr() {
            if let Some(warning) = exposure_warning(local, &allow) {
                log::warn!("{warning}");
            }
        }
        if !allow.is_empty() {
            let list: Vec<String> = allow.iter().map(Cidr::to_string).collect();
            log::info!("clients accepted only from {} (--allow)", list.join(", "));
        }
        Clients {
            registry,
            listener: Some(listener),
            accepting: Accepting::No,
            conns: Slab::new(),
            budget: Budget::new(limits.max_buffered, Arc::clone(&metrics)),
            parked: VecDeque::new(),
            limits,
            allow,
            draining: false,
            queued_unwatched: VecDeque::new(),
            answered_sessions: Vec::new(),
            scratch: vec![0; SCRATCH_LEN],
            last_sweep: Instant::now(),
            warnings: Warnings::default(),
            metrics,
        }
    }

    /// Starts taking connections (those that queued in the backlog while
    /// workers started are reported at once).
    pub(crate) fn start(&mut self) -> std::io::Result<()> {
        if let Some(listener) = self.listener.as_mut() {
            self.registry
                .register(listener, LISTENER, Interest::READABLE)?;
        }
        self.accepting = Accepting::Yes;
        Ok(())
    }

    /// Connections open.
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Takes the connections waiting in the backlog.
    pub(crate) fn accept(&mut self, work: &mut impl Requests) {
        let mut errors = 0;
        while self.accepting == Accepting::Yes && !self.held_back() {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) => match on_accept_error(&e, errors + 1) {
                    AcceptError::Done => return,
                    AcceptError::Retry => {
                        errors += 1;
                        log::debug!("accept failed: {e}");
                        continue;
                    }
                    AcceptError::Pause => {
                        self.warnings.accept.warn(
                            Instant::now(),
                            format_args!(
                                "cannot accept: {e}; pausing accept for {} ms ({} connections open)",
                                ACCEPT_PAUSE.as_millis(),
                                self.conns.len()
                            ),
                        );
                        self.pause_accept(Some(Instant::now() + ACCEPT_PAUSE));
                        return;
                    }
                },
            };
            errors = 0;
            if !self.admits(peer.ip()) {
                self.refuse(stream, peer);
                continue;
            }
            let conn = Connection::new(
                stream,
                self.limits.max_request_size,
                self.limits.read_timeout,
                Instant::now(),
            );
            let key = self.conns.insert(conn);
            self.metrics.connections.inc();
            // Clients send their request as they connect: read it now, and
            // watch the socket only if it has to wait (see `watch`).
            self.drive(key, true, false, work);
            self.watch(key, work);
        }
    }

    /// Whether the budget or the connection limit holds accept back now:
    /// if so, it pauses until a connection closes (throttled warning).
    fn held_back(&mut self) -> bool {
        let now = Instant::now();
        if self.budget.is_over() {
            self.warnings.budget.warn(
                now,
                format_args!(
                    "{} bytes held for clients (--max-buffered {}); accept paused until they fall back",
                    self.budget.held(),
                    self.budget.limit()
                ),
            );
        } else if self.conns.len() >= self.limits.max_connections {
            self.warnings.capacity.warn(
                now,
                format_args!(
                    "{} connections open (--max-connections); accept paused until one closes",
                    self.conns.len()
                ),
            );
        } else {
            return false;
        }
        self.pause_accept(None);
        true
    }

    /// Whether --allow lets a client at `addr` in.
    fn admits(&self, addr: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|cidr| cidr.contains(addr))
    }

    /// Resets a connection from an address --allow does not list, before any
    /// byte of it is read. The kernel completed the handshake already; only
    /// a firewall can refuse the SYN itself.
    fn refuse(&mut self, stream: mio::net::TcpStream, peer: SocketAddr) {
        // Counted before the client can see the reset: a scrape (on its own
        // thread) right after it must find it.
        self.metrics.connection_refused(Refusal::not_allowed);
        connection::reset(stream);
        // As IPv4 if it came as IPv4-mapped, which is how it was matched.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        self.warnings.refusal.warn(
            Instant::now(),
            format_args!("client {peer}: address not in --allow; connection reset"),
        );
    }

    /// Stops accepting, until `until` or (if `None`) until a connection closes.
    fn pause_accept(&mut self, until: Option<Instant>) {
        if let Some(listener) = self.listener.as_mut() {
            let _ = self.registry.deregister(listener);
        }
        self.accepting = Accepting::Paused(until);
    }

    /// Accepts again after a pause. The listener goes back into the loop,
    /// which reports at once any connection that waited meanwhile.
    fn resume_accept(&mut self) {
        if !matches!(self.accepting, Accepting::Paused(_)) {
            return;
        }
        let Some(listener) = self.listener.as_mut() else {
            return;
        };
        match self
            .registry
            .register(listener, LISTENER, Interest::READABLE)
        {
            Ok(()) => self.accepting = Accepting::Yes,
            Err(e) => {
                log::error!("cannot watch the listener again: {e}; retrying");
                self.accepting = Accepting::Paused(Some(Instant::now() + ACCEPT_PAUSE));
            }
        }
    }

    /// A graceful stop begins: the connections the kernel completed before
    /// it are accepted requests too, so they are taken; then the port
    /// closes, and persistent sessions take no new requests (idle ones close
    /// now, the others once their replies are out).
    pub(crate) fn drain(&mut self, work: &mut impl Requests) {
        self.accept(work);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.registry.deregister(&mut listener);
        }
        self.accepting = Accepting::No;
        self.draining = true;
        let sessions: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.is_pipelined())
            .map(|(key, _)| key)
            .collect();
        for key in sessions {
            self.pump_session(key, work);
        }
    }

    /// Resets every connection (stopping now).
    pub(crate) fn reset_all(&mut self, work: &mut impl Requests) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, End::Stopping, work);
        }
    }

    /// Readiness of a client connection.
    pub(crate) fn on_event(
        &mut self,
        token: Token,
        event: &mio::event::Event,
        work: &mut impl Requests,
    ) {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        self.drive(token.0 - CONN_BASE, readable, event.is_writable(), work);
    }

    /// The workers are done with these requests (taken, in order): each
    /// one's reply, or why it failed, or that it waits in the queue again.
    /// Sessions are moved along once at the end, so that the replies a
    /// session got in one batch leave in one write.
    pub(crate) fn answer_all(&mut self, answers: &mut Vec<Answer>, work: &mut impl Requests) {
        // One clock read for the batch: they arrived together.
        let now = Instant::now();
        for answer in answers.drain(..) {
            self.answer(answer, now, work);
        }
        let mut sessions = std::mem::take(&mut self.answered_sessions);
        sessions.sort_unstable();
        sessions.dedup();
        for &key in &sessions {
            self.pump_session(key, work);
        }
        sessions.clear();
        // Kept, so that carrying answers allocates nothing once it has grown.
        self.answered_sessions = sessions;
    }

    /// The workers are done with a request: its reply, or why it failed, or
    /// that it waits in the queue again. A session's answer only completes
    /// its request: [`Self::answer_all`] then moves the session along.
    fn answer(&mut self, answer: Answer, now: Instant, work: &mut impl Requests) {
        match answer {
            Answer::Reply { client, id, reply } => self.deliver(client, id, reply, now, work),
            Answer::Failure {
                client,
                id,
                outcome,
                reason,
            } => self.fail(client, id, outcome, reason, work),
            // Waiting in the queue again: a client that leaves must be seen.
            Answer::Requeued { client } => self.watch(client, work),
        }
    }

    /// When [`Self::on_timers`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let paused_until = match self.accepting {
            Accepting::Paused(until) => until,
            _ => None,
        };
        let watch_queued = self
            .queued_unwatched
            .front()
            .map(|&(_, _, since)| since + WATCH_QUEUED_AFTER);
        [
            paused_until,
            self.next_sweep(),
            self.warnings.next_flush(),
            watch_queued,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Resumes a paused accept, resets clients past their deadline, and
    /// says how many log lines were held back.
    pub(crate) fn on_timers(&mut self, now: Instant, work: &mut impl Requests) {
        if matches!(self.accepting, Accepting::Paused(Some(at)) if now >= at) {
            self.resume_accept();
        }
        if self.next_sweep().is_some_and(|at| now >= at) {
            self.sweep(now, work);
        }
        self.watch_long_queued(now, work);
        self.warnings.flush(now);
    }

    /// Watches the connections whose requests have waited in the queue for
    /// [`WATCH_QUEUED_AFTER`] and still do.
    fn watch_long_queued(&mut self, now: Instant, work: &mut impl Requests) {
        while let Some(&(key, id, since)) = self.queued_unwatched.front() {
            if now < since + WATCH_QUEUED_AFTER {
                return;
            }
            self.queued_unwatched.pop_front();
            let waiting = self.conns.get(key).is_some_and(|conn| {
                !conn.registered
                    && matches!(conn.state(), State::Waiting(waiting) if *waiting == id)
            });
            if waiting && work.is_queued(id) {
                self.register(key, work);
            }
        }
    }

    /// The end of a loop turn: bodies that waited for the budget are read
    /// if it has room again, oldest first, and accept resumes once neither
    /// the connection limit nor the budget holds it back.
    pub(crate) fn end_turn(&mut self, work: &mut impl Requests) {
        // Each at most once a turn: one the budget still cannot take goes
        // to the back.
        for _ in 0..self.parked.len() {
            if !self.budget.has_room() {
                break;
            }
            let Some(key) = self.parked.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(key).filter(|conn| conn.is_parked()) else {
                continue;
            };
            conn.unpark(Instant::now());
            self.drive(key, true, false, work);
        }
        self.resume_if_room();
    }

    /// Resumes accept paused by the connection limit or the budget, once
    /// neither holds it back.
    fn resume_if_room(&mut self) {
        if self.accepting == Accepting::Paused(None)
            && self.conns.len() < self.limits.max_connections
            && !self.budget.is_over()
        {
            self.resume_accept();
        }
    }

    /// Puts a connection in the poll once it has to wait for the client:
    /// for more of its request, for room to write its reply, or as a
    /// session. A one-shot request that went straight to a worker needs
    /// nothing until its reply, so most connections are never registered
    /// (one `epoll_ctl` less per request). One left waiting in the queue is
    /// watched once it has waited [`WATCH_QUEUED_AFTER`], so that a client
    /// that leaves meanwhile costs no worker time.
    fn watch(&mut self, key: usize, work: &mut impl Requests) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.registered {
            return;
        }
        if let State::Waiting(id) = conn.state() {
            if work.is_queued(*id) {
                self.queued_unwatched.push_back((key, *id, Instant::now()));
            }
            return;
        }
        self.register(key, work);
    }

    /// Registers a connection in the poll.
    fn register(&mut self, key: usize, work: &mut impl Requests) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // Both directions at once: edge-triggered, so no re-registering later;
        // what is ready already is reported at once.
        let token = Token(CONN_BASE + key);
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self.registry.register(conn.stream_mut(), token, interest) {
            Ok(()) => conn.registered = true,
            Err(e) => self.close(key, End::Unwatchable(e), work),
        }
    }

    /// Reads and writes what a connection is ready for, and acts on it.
    fn drive(&mut self, key: usize, readable: bool, writable: bool, work: &mut impl Requests) {
        let Some(conn) = self.conns.get_mut(key) else {
            return; // closed earlier in this batch
        };
        let mut next = Next::Wait;
        if readable {
            next = conn.on_readable(&mut self.scratch, &mut self.budget, &mut |len| {
                work.place_body(len)
            });
        }
        if matches!(next, Next::Wait) && writable {
            next = conn.on_writable();
        }
        loop {
            let was_request = matches!(next, Next::Request(_));
            self.advance(key, next, work);
            // Readiness is edge-triggered: whatever followed the request in
            // the socket must be read now, or no event would say so again.
            match self.conns.get_mut(key) {
                Some(conn) if was_request && conn.may_have_input() => {
                    next = conn.on_readable(&mut self.scratch, &mut self.budget, &mut |len| {
                        work.place_body(len)
                    })
                }
                Some(conn) if conn.is_pipelined() => return self.pump_session(key, work),
                Some(conn) => return conn.settle(&mut self.budget),
                None => return,
            }
        }
    }

    /// Acts on what a connection asked for.
    fn advance(&mut self, key: usize, next: Next, work: &mut impl Requests) {
        match next {
            Next::Wait => {}
            Next::Parked => self.parked.push_back(key),
            Next::Request(payload) => {
                let len = payload.len();
                match work.submit(key, payload) {
                    Ok(id) => {
                        // Charged to the budget when `drive` (the only
                        // caller for a request) is done with the connection.
                        self.conns[key].submitted(id, len, Instant::now());
                        // An idle worker starts on it now, not after the whole batch.
                        work.dispatch();
                    }
                    Err(refusal) => self.close(key, End::Refused(refusal), work),
                }
            }
            Next::Close => self.close(key, End::Done, work),
            Next::Reset(reason) => self.close(key, End::BadRequest(reason), work),
            Next::Gone(e) => self.close(key, End::Gone(e), work),
        }
    }

    /// Moves a persistent session along: submits the requests that arrived
    /// (or refuses them, in order), writes finished replies, and reads again
    /// when a full window has room.
    fn pump_session(&mut self, key: usize, work: &mut impl Requests) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let Some(session) = conn.session() else {
                return;
            };
            if self.draining {
                // Opened after the stop began: what came with the preamble is
                // answered, nothing more is taken.
                session.stop_taking_requests();
            }
            let now = Instant::now();
            for payload in session.take_arrived() {
                let len = payload.len();
                match work.submit(key, payload.into()) {
                    Ok(id) => session.submitted(id, len, now),
                    Err(refusal) => {
                        self.metrics.request_ended(Outcome::refused);
                        session.refused(Status::Overloaded, refusal, now);
                    }
                }
            }
            work.dispatch();
            let next = conn.on_writable();
            if !matches!(next, Next::Wait) {
                return self.advance(key, next, work);
            }
            if conn.session().is_some_and(|s| s.should_resume()) {
                let next = conn.on_readable(&mut self.scratch, &mut self.budget, &mut |len| {
                    work.place_body(len)
                });
                match next {
                    Next::Wait => continue, // submit what that read brought
                    // The requests that came before the body still go.
                    Next::Parked => {
                        self.parked.push_back(key);
                        continue;
                    }
                    next => return self.advance(key, next, work),
                }
            }
            conn.refresh_session_deadline(now);
            conn.settle(&mut self.budget);
            return;
        }
    }

    /// Hands the reply to request `id` to its client, if still connected.
    fn deliver(
        &mut self,
        key: usize,
        id: RequestId,
        reply: ReplyBody,
        now: Instant,
        work: &mut impl Requests,
    ) {
        // By id too: the key may be another connection's by now.
        let Some(conn) = self.conns.get_mut(key).filter(|conn| conn.awaits(id)) else {
            return;
        };
        if let Some(session) = conn.session() {
            // A session counts each request as it ends; one-shot connections
            // count at close.
            if let Some(received) = session.complete(id, Status::Ok, Body::Reply(reply)) {
                self.metrics.observe_latency(received, now);
                self.metrics.request_ended(Outcome::ok);
            }
            self.answered_sessions.push(key);
            return;
        }
        if let Some(received) = conn.received() {
            self.metrics.observe_latency(received, now);
        }
        let next = conn.reply(reply, now);
        conn.settle(&mut self.budget);
        self.advance(key, next, work);
        // The socket did not take the whole reply at once.
        self.watch(key, work);
    }

    /// Request `id` of client `key` failed: a one-shot client sees a reset
    /// (and the log says why); a persistent session gets `reason` as that
    /// request's status and payload.
    fn fail(
        &mut self,
        key: usize,
        id: RequestId,
        outcome: Outcome,
        reason: String,
        work: &mut impl Requests,
    ) {
        let Some(conn) = self.conns.get_mut(key).filter(|conn| conn.awaits(id)) else {
            return;
        };
        let Some(session) = conn.session() else {
            return self.close(key, End::Failed(outcome, reason), work);
        };
        let status = match outcome {
            Outcome::handler_error => Status::HandlerError,
            Outcome::timeout => Status::Timeout,
            Outcome::refused => Status::Overloaded,
            _ => Status::WorkerLost,
        };
        if session.complete(id, status, Body::Text(reason)).is_some() {
            self.metrics.request_ended(outcome);
        }
        self.answered_sessions.push(key);
    }

    /// Removes a connection: counts how its request ended, withdraws what
    /// the workers still have of it, and closes cleanly or with a reset.
    fn close(&mut self, key: usize, end: End, work: &mut impl Requests) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        self.metrics.connections.dec();
        self.budget.release(conn.held());
        if conn.is_parked() {
            // Its key may go to the next connection accepted.
            self.parked.retain(|&parked| parked != key);
        }
        if let Some(outcome) = conn.outcome(&end) {
            self.metrics.request_ended(outcome);
        }
        let in_session = conn.session().is_some();
        for id in conn.outstanding() {
            work.cancel(id);
            if in_session {
                self.metrics.request_ended(Outcome::client_gone);
            }
        }
        if let End::Gone(e) = &end {
            log::debug!("client went away: {e}");
        }
        // No deregister: closing the socket removes it from epoll (it is
        // never duplicated), and saves a syscall per request.
        if conn.ends_cleanly(&end) {
            conn.close(&mut self.scratch);
        } else {
            if let Some(reason) = conn.reason(&end) {
                let peer = conn.peer();
                self.warnings.reset.warn(
                    Instant::now(),
                    format_args!("client {peer}: {reason}; connection reset"),
                );
            }
            conn.reset();
        }
        self.resume_if_room();
    }

    /// When client deadlines should next be checked: a periodic sweep over
    /// the open connections is cheaper than a timer per connection.
    fn next_sweep(&self) -> Option<Instant> {
        let timeout = self.limits.read_timeout?;
        if self.conns.is_empty() {
            return None;
        }
        let every = (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        Some(self.last_sweep + every)
    }

    /// Resets (or, if idle, closes) every client past its deadline.
    fn sweep(&mut self, now: Instant, work: &mut impl Requests) {
        self.last_sweep = now;
        let overdue: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.deadline().is_some_and(|deadline| deadline <= now))
            .map(|(key, _)| key)
            .collect();
        for key in overdue {
            self.close(key, End::Overdue, work);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn an_accept_error_that_keeps_coming_back_pauses_accept() {
        let aborted = Error::from_raw_os_error(nix::libc::ECONNABORTED);
        assert_eq!(on_accept_error(&aborted, 1), AcceptError::Retry);
        assert_eq!(
            on_accept_error(&aborted, MAX_ACCEPT_ERRORS - 1),
            AcceptError::Retry
        );
        assert_eq!(
            on_accept_error(&aborted, MAX_ACCEPT_ERRORS),
            AcceptError::Pause,
            "not a spin"
        );
        let no_fds = Error::from_raw_os_error(nix::libc::EMFILE);
        assert_eq!(on_accept_error(&no_fds, 1), AcceptError::Pause);
        let empty = Error::from(ErrorKind::WouldBlock);
        assert_eq!(on_accept_error(&empty, 1), AcceptError::Done);
    }

    #[test]
    fn a_port_beyond_loopback_without_allow_is_warned_about() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        let allow = ["10.0.0.0/8".parse::<Cidr>().unwrap()];
        for open in [
            "0.0.0.0:10123",
            "[::]:10123",
            "192.0.2.1:10123",
            "[2001:db8::1]:1",
        ] {
            let warning = exposure_warning(addr(open), &[]).expect(open);
            assert!(
                warning.contains("open to anyone who can reach it"),
                "{warning}"
            );
            assert!(warning.contains("--allow"), "{warning}");
            assert_eq!(exposure_warning(addr(open), &allow), None, "{open}");
        }
        for local in [
            "127.0.0.1:10123",
            "127.0.0.2:1",
            "[::1]:10123",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(exposure_warning(addr(local), &[]), None, "{local}");
        }
    }
}
