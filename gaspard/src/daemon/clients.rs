//! Client connections: accepting, reading requests, writing replies, closing,
//! and the limits on clients (--max-connections, --read-timeout, --max-queue).

use super::{Daemon, Phase, Reply, CONN_BASE, LISTENER};
use crate::connection::{Connection, Next, State};
use crate::dispatcher::RequestId;
use crate::metrics::Outcome;
use crate::protocol::Status;
use crate::session::{Body, Session};
use mio::{Interest, Token};
use std::io;
use std::time::{Duration, Instant};

/// How long accept stays paused after running out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How a connection ends.
pub(super) enum End {
    /// A clean close: the reply is written, the request was empty, or the
    /// client left without sending anything (no outcome to count).
    Clean(Option<Outcome>),
    /// A reset, which tells the client its request failed. The reason is
    /// logged unless empty; the outcome is counted if there was a request.
    Reset(Option<Outcome>, String),
}

impl Daemon {
    pub(super) fn accept(&mut self) {
        if !self.accepting {
            return;
        }
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
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
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
            let deadline = self.config.read_timeout.map(|t| Instant::now() + t);
            let conn = Connection::new(stream, self.config.max_request_size, deadline);
            let key = self.conns.insert(conn);
            self.metrics.connections.inc();
            // Clients send their request as they connect: read it now, and
            // watch the socket only if it has to wait (see `watch_if_waiting`).
            self.drive(key, true, false);
            self.watch_if_waiting(key);
        }
    }

    /// Puts a connection in the poll once it has to wait for the client:
    /// for more of its request, for room to write its reply, or as a
    /// session. A v1 request that went straight to a worker needs nothing
    /// until its reply, so most connections are never registered (one
    /// `epoll_ctl` less per request). One left waiting in the queue is
    /// watched, so that a client that leaves meanwhile costs no worker time.
    pub(super) fn watch_if_waiting(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.registered {
            return;
        }
        if let State::Waiting(id) = conn.state {
            if !self.dispatcher.is_queued(id) {
                return;
            }
        }
        // Both directions at once: edge-triggered, so no re-registering later;
        // what is ready already is reported at once.
        let token = Token(CONN_BASE + key);
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self
            .poll
            .registry()
            .register(&mut conn.stream, token, interest)
        {
            Ok(()) => conn.registered = true,
            Err(e) => {
                let reason = format!("cannot watch the connection: {e}");
                let outcome = conn.sent_anything().then_some(Outcome::client_gone);
                self.close(key, End::Reset(outcome, reason));
            }
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

    pub(super) fn resume_accept(&mut self) {
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

    pub(super) fn on_connection_event(&mut self, key: usize, event: &mio::event::Event) {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        self.drive(key, readable, event.is_writable());
    }

    /// Reads and writes what a connection is ready for, and acts on it.
    fn drive(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return; // closed earlier in this batch
        };
        let mut next = Next::Wait;
        if readable {
            next = conn.on_readable(&mut self.scratch);
        }
        if matches!(next, Next::Wait) && writable {
            next = conn.on_writable();
        }
        loop {
            let was_request = matches!(next, Next::Request(_));
            self.advance(key, next);
            // Readiness is edge-triggered: whatever followed the request in
            // the socket must be read now, or no event would say so again.
            match self.conns.get_mut(key) {
                Some(conn) if was_request && conn.may_have_input() => {
                    next = conn.on_readable(&mut self.scratch)
                }
                Some(conn) if conn.is_pipelined() => return self.pump_session(key),
                _ => return,
            }
        }
    }

    /// Moves a persistent session along: submits the requests that arrived
    /// (or refuses them, in order), writes finished replies, and reads again
    /// when a full window has room.
    fn pump_session(&mut self, key: usize) {
        let draining = matches!(self.phase, Phase::Draining { .. });
        loop {
            let Some(session) = self.conns.get_mut(key).and_then(Connection::session) else {
                return;
            };
            if draining {
                // Opened after the stop began: what came with the preamble is
                // answered, nothing more is taken.
                session.stop_taking_requests();
            }
            let arrived = session.take_arrived();
            let now = Instant::now();
            for payload in arrived {
                match self.refusal() {
                    Some(reason) => {
                        self.metrics.request_ended(Outcome::refused);
                        self.session_of(key)
                            .refused(Status::Overloaded, reason, now);
                    }
                    None => {
                        let id = self.dispatcher.submit(key, payload);
                        self.session_of(key).submitted(id, now);
                    }
                }
            }
            self.dispatch();
            let conn = &mut self.conns[key];
            let next = conn.on_writable();
            if !matches!(next, Next::Wait) {
                return self.advance(key, next);
            }
            let session = conn.session().expect("checked above");
            if session.should_resume() {
                let next = conn.on_readable(&mut self.scratch);
                if matches!(next, Next::Wait) {
                    continue; // submit what that read brought
                }
                return self.advance(key, next);
            }
            // Idle sessions are held only for --read-timeout, and replies
            // the client does not take are held no longer either.
            let idle = session.is_idle();
            let timeout = self.config.read_timeout;
            conn.deadline = match (session.output_waiting_since(), idle, conn.deadline) {
                (Some(since), _, _) => timeout.map(|t| since + t),
                (None, true, None) => timeout.map(|t| now + t),
                (None, true, deadline) => deadline,
                (None, false, _) => None,
            };
            return;
        }
    }

    /// The session of a connection known to be pipelined.
    fn session_of(&mut self, key: usize) -> &mut Session<Reply> {
        self.conns[key]
            .session()
            .expect("a pipelined connection has a session")
    }

    /// Acts on what a connection asked for.
    fn advance(&mut self, key: usize, next: Next) {
        match next {
            Next::Wait => {}
            Next::Request(payload) => {
                if let Some(refusal) = self.refusal() {
                    self.close(key, End::Reset(Some(Outcome::refused), refusal));
                    return;
                }
                let id = self.dispatcher.submit(key, payload);
                let conn = &mut self.conns[key];
                conn.state = State::Waiting(id);
                conn.deadline = None;
                conn.received = Some(Instant::now());
                // An idle worker starts on it now, not after the whole batch.
                self.dispatch();
            }
            Next::Close => {
                let conn = &self.conns[key];
                let outcome = match conn.state {
                    State::Writing { .. } => Some(Outcome::ok),
                    // A session counted each of its requests as it ended.
                    State::Pipelined(_) => None,
                    // Connected and left without a word: no request to count.
                    _ if !conn.sent_anything() => None,
                    _ => Some(Outcome::empty),
                };
                self.close(key, End::Clean(outcome));
            }
            Next::Reset(reason) => self.close(key, End::Reset(Some(Outcome::bad_request), reason)),
            Next::Gone(e) => {
                log::debug!("client went away: {e}");
                // A session counts its outstanding requests in close().
                let had_request = matches!(
                    self.conns[key].state,
                    State::Waiting(_) | State::Writing { .. }
                );
                let outcome = had_request.then_some(Outcome::client_gone);
                self.close(key, End::Reset(outcome, String::new()));
            }
        }
    }

    /// Hands the reply to request `id` to its client, if still connected.
    pub(super) fn deliver(&mut self, key: usize, id: RequestId, reply: Reply) {
        let deadline = self.config.read_timeout.map(|t| Instant::now() + t);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(session) = conn.session() {
            // A session counts each request as it ends; v1 counts at close.
            if let Some(received) = session.complete(id, Status::Ok, Body::Reply(reply)) {
                observe_latency(&self.metrics, received);
                self.metrics.request_ended(Outcome::ok);
            }
            return self.pump_session(key);
        }
        if let Some(received) = conn.received {
            observe_latency(&self.metrics, received);
        }
        let next = conn.reply(reply, deadline);
        self.advance(key, next);
        // The socket did not take the whole reply at once.
        self.watch_if_waiting(key);
    }

    /// Request `id` of client `key` failed: a v1 client sees a reset (and
    /// the log says why); a persistent session gets `reason` as that
    /// request's status and payload.
    pub(super) fn fail(&mut self, key: usize, id: RequestId, outcome: Outcome, reason: String) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(session) = conn.session() else {
            let reason = match outcome {
                Outcome::handler_error => format!("handler failed: {reason}"),
                _ => reason,
            };
            return self.close(key, End::Reset(Some(outcome), reason));
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
        self.pump_session(key);
    }

    /// Why a new request cannot be taken, if it cannot: the queue is full,
    /// or no worker can run it. Refusing at once beats queueing without end.
    fn refusal(&self) -> Option<String> {
        if self.supervisor.all_failing() {
            return Some("no worker can take the request: the handler keeps failing".into());
        }
        // Requests that idle workers are about to take are not waiting.
        let idle_credit = self.dispatcher.idle_credit(Instant::now());
        let waiting = self.dispatcher.queued().saturating_sub(idle_credit);
        if self.dispatcher.queued() >= idle_credit && waiting >= self.config.max_queue {
            return Some(format!(
                "queue is full ({waiting} requests waiting, --max-queue)"
            ));
        }
        None
    }

    /// Removes a connection, counting how its request ended.
    pub(super) fn close(&mut self, key: usize, end: End) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        self.metrics.connections.dec();
        for id in conn.outstanding() {
            self.dispatcher.client_gone(id);
            if conn.session().is_some() {
                self.metrics.request_ended(Outcome::client_gone);
            }
        }
        // No deregister: closing the socket removes it from epoll (it is
        // never duplicated), and saves a syscall per request.
        match end {
            End::Clean(outcome) => {
                if let Some(outcome) = outcome {
                    self.metrics.request_ended(outcome);
                }
                conn.close(&mut self.scratch);
            }
            End::Reset(outcome, reason) => {
                if let Some(outcome) = outcome {
                    self.metrics.request_ended(outcome);
                }
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

    /// A graceful stop begins: persistent sessions take no new requests;
    /// idle ones close now, the others once their replies are out.
    pub(super) fn wind_down_sessions(&mut self) {
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.is_pipelined())
            .map(|(key, _)| key)
            .collect();
        // pump_session stops a session taking requests while draining.
        for key in keys {
            self.pump_session(key);
        }
    }

    /// Resets every connection (stopping now).
    pub(super) fn reset_all_clients(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            let outcome = match conn.session() {
                Some(_) => None, // counted per request in close()
                None => conn.waiting_for().map(|_| Outcome::worker_lost),
            };
            self.close(key, End::Reset(outcome, String::new()));
        }
    }

    /// When client deadlines should next be checked: a periodic sweep over
    /// the open connections is cheaper than a timer per connection.
    pub(super) fn next_sweep(&self) -> Option<Instant> {
        if self.conns.is_empty() && self.scrapes.is_empty() {
            return None;
        }
        let every = match self.config.read_timeout {
            Some(timeout) => (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            None if !self.scrapes.is_empty() => Duration::from_secs(1),
            None => return None,
        };
        Some(self.last_sweep + every)
    }

    /// Resets every client past its --read-timeout deadline.
    pub(super) fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        let overdue: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.deadline.is_some_and(|deadline| deadline <= now))
            .map(|(key, _)| key)
            .collect();
        for key in overdue {
            let conn = &mut self.conns[key];
            if conn
                .session()
                .is_some_and(|s| !s.mid_request() && s.output_waiting_since().is_none())
            {
                // An idle persistent connection: nothing is lost by closing it.
                self.close(key, End::Clean(None));
                continue;
            }
            let doing = conn.stalled_doing();
            let outcome = match conn.state {
                State::Writing { .. } => Some(Outcome::client_gone),
                State::Pipelined(_) => None,
                // Silence before any byte is an idle connection, not a request.
                _ if !conn.sent_anything() => None,
                _ => Some(Outcome::bad_request),
            };
            self.close(
                key,
                End::Reset(outcome, format!("{doing} within --read-timeout")),
            );
        }
        self.sweep_scrapes(now);
    }
}

/// Records how long a request took from arriving whole to its reply ready.
fn observe_latency(metrics: &crate::metrics::Metrics, received: Instant) {
    metrics.latency.observe(received.elapsed().as_secs_f64());
}

/// Errors after which retrying accept at once would spin.
pub(super) fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(errno) if [nix::libc::EMFILE, nix::libc::ENFILE, nix::libc::ENOBUFS, nix::libc::ENOMEM]
            .contains(&errno)
    )
}
