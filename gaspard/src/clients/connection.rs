//! One client connection: read one request, wait for its reply, write the
//! reply in full, close; or, if the client opens with the extension's
//! preamble, a persistent pipelined session ([`super::session`]). Each step
//! returns what should happen next; the connection knows nothing about
//! workers or their links.

use super::budget::{Account, Budget};
use super::io::{read_in_place, read_step, Next, ReadStep};
use super::session::Session;
use crate::metrics::Outcome;
use crate::protocol::{Decoded, RequestDecoder};
use crate::workers::{AreaBody, RequestBody, RequestId};
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Extra bytes a client may send after its request before it is cut off.
/// gaspar ignored them; a trailing newline from a shell pipeline is common.
const MAX_TRAILING: usize = 64 * 1024;

/// Where a connection is in its life.
pub(crate) enum State<R> {
    Reading(RequestDecoder),
    /// The request is with the workers.
    Waiting(RequestId),
    Writing {
        reply: R,
        written: usize,
    },
    /// The persistent extension: many requests, replies in order.
    Pipelined(Box<Session<R>>),
}

/// Why a connection ends: the one place that says which [`Outcome`] it
/// counts, whether the client sees a clean close or a reset, and what the
/// log says.
#[derive(Debug)]
pub(crate) enum End {
    /// The connection asked to close: reply written, empty request, a
    /// session done, or a client that left without a word.
    Done,
    /// The client broke the protocol or a limit.
    BadRequest(String),
    /// The client went away.
    Gone(io::Error),
    /// Its request failed (handler error, worker lost, timeout).
    Failed(Outcome, String),
    /// Its request was refused at once (queue full, no worker can run it).
    Refused(String),
    /// Its --read-timeout deadline passed.
    Overdue,
    /// The daemon stops now.
    Stopping,
    /// The loop cannot watch its socket.
    Unwatchable(io::Error),
}

pub(crate) struct Connection<R> {
    stream: TcpStream,
    state: State<R>,
    /// When the client must have sent its request, or taken its reply, by;
    /// `None` while its requests are with the workers.
    deadline: Option<Instant>,
    /// --read-timeout.
    timeout: Option<Duration>,
    /// When the whole request had arrived, for the latency histogram.
    received: Option<Instant>,
    /// In the loop's poll (only once it has to wait; see `Clients::watch`).
    pub(super) registered: bool,
    /// Bytes charged to the budget (--max-buffered).
    held: usize,
    /// Bytes admitted for the request body being read, if one is.
    admitted: usize,
    /// A large body being read straight into a worker's request area
    /// (the decoder has handed it over).
    into_area: Option<AreaBody>,
    /// The length of its request while the workers have it.
    request_len: usize,
    /// Waiting for the budget to read a body (in the clients part's queue).
    parked: bool,
    trailing: usize,
    /// The last read found the socket empty, so there is nothing to drain
    /// (saves a read per request, and one at close).
    input_drained: bool,
}

impl<R: AsRef<[u8]>> Connection<R> {
    pub(crate) fn new(
        stream: TcpStream,
        max_request: u32,
        timeout: Option<Duration>,
        now: Instant,
    ) -> Connection<R> {
        Connection {
            stream,
            state: State::Reading(RequestDecoder::first_on_connection(max_request)),
            deadline: timeout.map(|t| now + t),
            timeout,
            received: None,
            registered: false,
            held: 0,
            admitted: 0,
            into_area: None,
            request_len: 0,
            parked: false,
            trailing: 0,
            input_drained: false,
        }
    }

    /// Reads what the socket has into the request, or the session.
    /// A body that needs more than the read at hand is read only once the
    /// budget admits it ([`Next::Parked`] until then); a large one is read
    /// into the place `place` finds for its length, if it finds one.
    pub(crate) fn on_readable(
        &mut self,
        scratch: &mut [u8],
        budget: &mut Budget,
        place: &mut dyn FnMut(usize) -> Option<AreaBody>,
    ) -> Next {
        if self.parked {
            // Only the clients part unparks it (`Clients::end_turn`), oldest
            // first, with its deadline restored: a read event must not
            // admit its body around that.
            return Next::Wait;
        }
        loop {
            let mut account = Account {
                budget: &mut *budget,
                held: &mut self.held,
            };
            let decoder = match &mut self.state {
                State::Reading(decoder) => decoder,
                State::Pipelined(session) => {
                    let next = session.on_readable(&mut self.stream, scratch, &mut account);
                    return match next {
                        Next::Parked => self.park(),
                        next => next,
                    };
                }
                _ => return self.discard_trailing(scratch),
            };
            if let Some(missing) = decoder.body_missing() {
                if self.admitted == 0 {
                    if !account.admit(missing) {
                        return self.park();
                    }
                    self.admitted = missing;
                    // Large enough to be read without the scratch buffer:
                    // straight into a worker's area if there is room.
                    let placed = (missing >= scratch.len())
                        .then(|| decoder.body_len().and_then(&mut *place))
                        .flatten();
                    if let Some(mut body) = placed {
                        let so_far = decoder.hand_over_body().expect("the header is known");
                        body.unfilled()[..so_far.len()].copy_from_slice(&so_far);
                        body.filled(so_far.len());
                        self.into_area = Some(body);
                        continue;
                    }
                    if decoder.reserve_body().is_err() {
                        return Next::Reset(format!(
                            "cannot allocate {missing} bytes for its request"
                        ));
                    }
                }
            }
            self.input_drained = false;
            let step = match &mut self.into_area {
                Some(body) => read_in_place(&mut self.stream, body),
                None => read_step(&mut self.stream, decoder, scratch),
            };
            let n = match step {
                Ok(ReadStep::WouldBlock) => {
                    self.input_drained = true;
                    return Next::Wait;
                }
                Ok(ReadStep::Eof) if decoder.started() => {
                    return Next::Reset("closed its side before sending the whole request".into())
                }
                Ok(ReadStep::Eof) => return Next::Close,
                Ok(ReadStep::Direct(Some(payload))) => return Next::Request(payload.into()),
                Ok(ReadStep::Direct(None))
                    if self.into_area.as_ref().is_some_and(AreaBody::is_whole) =>
                {
                    let body = self.into_area.take().expect("whole");
                    return Next::Request(RequestBody::Area(body));
                }
                Ok(ReadStep::Direct(None)) => continue,
                Ok(ReadStep::Scratch(n)) => n,
                Err(e) => return Next::Gone(e),
            };
            match decoder.feed(&scratch[..n]) {
                Ok(Decoded::Incomplete) => continue,
                Ok(Decoded::Empty) => return Next::Close,
                Ok(Decoded::Request { payload, consumed }) => {
                    self.trailing = n - consumed;
                    // A short read emptied the socket.
                    self.input_drained = n < scratch.len();
                    return Next::Request(payload.into());
                }
                Ok(Decoded::Extension { consumed }) => {
                    let limit = decoder.limit();
                    match self.open_session(limit, &scratch[consumed..n]) {
                        Next::Wait => continue, // read on
                        other => return other,
                    }
                }
                Err(e) => return Next::Reset(e.to_string()),
            }
        }
    }

    /// The client opened with the extension's preamble: the connection is a
    /// persistent session from now on, fed what followed the preamble. The
    /// acknowledgement goes out at once.
    fn open_session(&mut self, limit: u32, after_preamble: &[u8]) -> Next {
        // Replies go out as they are ready, not when Nagle says.
        let _ = self.stream.set_nodelay(true);
        let mut session = Box::new(Session::new(limit));
        let fed = session.feed(after_preamble);
        self.state = State::Pipelined(session);
        if let Err(reason) = fed {
            return Next::Reset(reason);
        }
        self.on_writable()
    }

    /// After the request: bytes are read and dropped (so that closing does not
    /// turn into a reset), up to a limit.
    fn discard_trailing(&mut self, scratch: &mut [u8]) -> Next {
        loop {
            match self.stream.read(scratch) {
                // Half-closed by the client: it still wants its reply.
                Ok(0) => {
                    self.input_drained = true;
                    return Next::Wait;
                }
                Ok(n) => {
                    self.trailing += n;
                    if self.trailing > MAX_TRAILING {
                        return Next::Reset(format!(
                            "sent more than {MAX_TRAILING} bytes after its request"
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.input_drained = true;
                    return Next::Wait;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Next::Gone(e),
            }
        }
    }

    /// Whether bytes may still wait in the socket after the last read
    /// (readiness is edge-triggered, so the caller must read again now).
    pub(crate) fn may_have_input(&self) -> bool {
        !self.input_drained
    }

    /// Its request of `len` bytes went to the workers as `id`: no deadline
    /// of the client's runs while they have it.
    pub(crate) fn submitted(&mut self, id: RequestId, len: usize, now: Instant) {
        self.state = State::Waiting(id);
        self.deadline = None;
        self.received = Some(now);
        self.request_len = len;
        self.admitted = 0;
    }

    /// A body waits for the budget: [`Next::Parked`]; [`Self::on_readable`]
    /// reads nothing more until [`Self::unpark`]. Its --read-timeout waits
    /// too: the stall is the daemon's, not the client's.
    fn park(&mut self) -> Next {
        self.parked = true;
        self.deadline = None;
        Next::Parked
    }

    /// Whether request `id` may be this connection's: the one it waits for,
    /// or (a session matches ids itself) any. A connection's key is reused
    /// once it closes, so an answer checks it has the right one.
    pub(crate) fn awaits(&self, id: RequestId) -> bool {
        match self.state {
            State::Waiting(waiting) => waiting == id,
            State::Pipelined(_) => true,
            _ => false,
        }
    }

    /// Whether it waits for the budget (see [`Next::Parked`]).
    pub(crate) fn is_parked(&self) -> bool {
        self.parked
    }

    /// The budget may have room again after [`Next::Parked`]: the client's
    /// --read-timeout runs again, from now.
    pub(crate) fn unpark(&mut self, now: Instant) {
        self.parked = false;
        if !self.is_pipelined() {
            self.deadline = self.timeout.map(|t| now + t);
        }
    }

    /// Bytes it holds now: the body being read (as admitted), the request
    /// the workers have, the reply being written.
    fn holds(&self) -> usize {
        match &self.state {
            State::Reading(decoder)
                if decoder.body_missing().is_some() || self.into_area.is_some() =>
            {
                self.admitted
            }
            State::Reading(_) => 0,
            State::Waiting(_) => self.request_len,
            State::Writing { reply, .. } => reply.as_ref().len(),
            State::Pipelined(session) => session.holds(),
        }
    }

    /// Charges the budget with what it holds now.
    pub(crate) fn settle(&mut self, budget: &mut Budget) {
        let holds = self.holds();
        Account {
            budget,
            held: &mut self.held,
        }
        .settle(holds);
    }

    /// What it has charged to the budget, to release when it closes.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Where it is in its life.
    pub(crate) fn state(&self) -> &State<R> {
        &self.state
    }

    /// When its whole request had arrived, if it is a one-shot request.
    pub(crate) fn received(&self) -> Option<Instant> {
        self.received
    }

    /// Takes the reply and starts writing it; the client must take it all
    /// within --read-timeout.
    pub(crate) fn reply(&mut self, reply: R, now: Instant) -> Next {
        self.state = State::Writing { reply, written: 0 };
        self.deadline = self.timeout.map(|t| now + t);
        self.on_writable()
    }

    /// When the client must next have done something by.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets a session's deadline from what it waits for: replies the client
    /// does not take are held for --read-timeout, and so is an idle session;
    /// none runs while its requests are with the workers.
    pub(crate) fn refresh_session_deadline(&mut self, now: Instant) {
        let State::Pipelined(session) = &self.state else {
            return;
        };
        let idle = session.is_idle();
        self.deadline = match (session.output_waiting_since(), idle, self.deadline) {
            (Some(since), _, _) => self.timeout.map(|t| since + t),
            // Waiting for the budget: the stall is the daemon's.
            (None, _, _) if self.parked => None,
            (None, true, None) => self.timeout.map(|t| now + t),
            (None, true, deadline) => deadline,
            (None, false, _) => None,
        };
    }

    /// Writes as much of the reply as the socket takes.
    pub(crate) fn on_writable(&mut self) -> Next {
        let (reply, written) = match &mut self.state {
            State::Writing { reply, written } => (reply, written),
            State::Pipelined(session) => return session.on_writable(&mut self.stream),
            _ => return Next::Wait,
        };
        let bytes = reply.as_ref();
        while *written < bytes.len() {
            match self.stream.write(&bytes[*written..]) {
                Ok(0) => return Next::Gone(io::ErrorKind::WriteZero.into()),
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Next::Gone(e),
            }
        }
        Next::Close
    }

    /// Whether the client sent any byte of a request.
    pub(crate) fn sent_anything(&self) -> bool {
        match &self.state {
            State::Reading(decoder) => decoder.started(),
            _ => true,
        }
    }

    /// Whether the client opened a persistent session.
    pub(crate) fn is_pipelined(&self) -> bool {
        matches!(self.state, State::Pipelined(_))
    }

    /// The persistent session, if the client opened one.
    pub(crate) fn session(&mut self) -> Option<&mut Session<R>> {
        match &mut self.state {
            State::Pipelined(session) => Some(session),
            _ => None,
        }
    }

    /// Requests of this connection still with the dispatcher.
    pub(crate) fn outstanding(&self) -> Vec<RequestId> {
        match &self.state {
            State::Waiting(id) => vec![*id],
            State::Pipelined(session) => session.outstanding().collect(),
            _ => Vec::new(),
        }
    }

    /// What the connection was doing when its deadline passed, for the log.
    fn stalled_doing(&self) -> &'static str {
        match &self.state {
            State::Reading(decoder) if decoder.started() => "did not send its whole request",
            State::Reading(_) => "sent no request",
            State::Waiting(_) => "waited",
            State::Writing { .. } => "did not take its whole reply",
            State::Pipelined(session) if session.output_waiting_since().is_some() => {
                "did not take its replies"
            }
            State::Pipelined(session) if session.mid_request() => "did not send its whole request",
            State::Pipelined(_) => "stayed idle",
        }
    }

    /// What ending this way counts. `None`: nothing to count (a client
    /// that left without a word), or a session, which counts each of its
    /// requests as it ends.
    pub(crate) fn outcome(&self, end: &End) -> Option<Outcome> {
        let sent = self.sent_anything();
        match (&self.state, end) {
            (_, End::BadRequest(_)) => Some(Outcome::bad_request),
            (State::Pipelined(_), _) => None,
            (State::Writing { .. }, End::Done) => Some(Outcome::ok),
            (_, End::Done) => sent.then_some(Outcome::empty),
            (State::Waiting(_) | State::Writing { .. }, End::Gone(_)) => Some(Outcome::client_gone),
            (_, End::Gone(_)) => None,
            (_, End::Failed(outcome, _)) => Some(*outcome),
            (_, End::Refused(_)) => Some(Outcome::refused),
            (State::Writing { .. }, End::Overdue) => Some(Outcome::client_gone),
            // Silence before any byte is an idle connection, not a request.
            (_, End::Overdue) => sent.then_some(Outcome::bad_request),
            (State::Waiting(_), End::Stopping) => Some(Outcome::worker_lost),
            (_, End::Stopping) => None,
            (_, End::Unwatchable(_)) => sent.then_some(Outcome::client_gone),
        }
    }

    /// Whether ending this way is a clean close rather than a reset: a reset
    /// tells the client that a request of its failed.
    pub(crate) fn ends_cleanly(&self, end: &End) -> bool {
        match (&self.state, end) {
            (_, End::Done) => true,
            // An idle persistent connection: nothing is lost by closing it.
            (State::Pipelined(session), End::Overdue) => {
                !session.mid_request() && session.output_waiting_since().is_none()
            }
            _ => false,
        }
    }

    /// What the log says of a reset, if anything.
    pub(crate) fn reason(&self, end: &End) -> Option<String> {
        match end {
            End::BadRequest(reason) | End::Refused(reason) => Some(reason.clone()),
            End::Failed(Outcome::handler_error, reason) => {
                Some(format!("handler failed: {reason}"))
            }
            End::Failed(_, reason) => Some(reason.clone()),
            End::Overdue => Some(format!("{} within --read-timeout", self.stalled_doing())),
            End::Unwatchable(e) => Some(format!("cannot watch the connection: {e}")),
            End::Done | End::Gone(_) | End::Stopping => None,
        }
    }

    /// The client's address, for the log.
    pub(crate) fn peer(&self) -> String {
        self.stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string())
    }

    /// The socket, to register with the loop.
    pub(crate) fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Ends the connection cleanly: pending input is drained so the kernel
    /// sends FIN after the reply rather than a reset, and the close the
    /// socket was accepted with (a reset, see `listener::open`) becomes a
    /// normal one, then the socket closes.
    pub(crate) fn close(mut self, scratch: &mut [u8]) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(None);
        if self.input_drained {
            return;
        }
        for _ in 0..16 {
            if !matches!(self.stream.read(scratch), Ok(n) if n > 0) {
                break;
            }
        }
    }

    /// Ends the connection with a reset (RST), which tells the client its
    /// request failed.
    pub(crate) fn reset(self) {
        reset(self.stream);
    }
}

/// Closes `stream` with a reset (RST) rather than FIN.
pub(crate) fn reset(stream: TcpStream) {
    let socket = socket2::SockRef::from(&stream);
    // SO_LINGER with a zero timeout makes close() send RST.
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    /// A connection accepted from a client that has sent `bytes`.
    fn accepted(bytes: &[u8]) -> (Connection<Vec<u8>>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client.write_all(bytes).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let timeout = Some(Duration::from_secs(60));
        let conn = Connection::new(
            TcpStream::from_std(server),
            1 << 30,
            timeout,
            Instant::now(),
        );
        (conn, client)
    }

    #[test]
    fn a_parked_body_is_read_only_once_unparked_and_its_deadline_waits_meanwhile() {
        let metrics = Arc::new(Metrics::default());
        let mut budget = Budget::new(1 << 20, Arc::clone(&metrics));
        budget.charge(900 << 10); // others hold most of it
        let mut request = (2u32 << 20).to_be_bytes().to_vec();
        request.extend_from_slice(&[7; 1000]);
        let (mut conn, mut client) = accepted(&request);
        let mut scratch = vec![0; 64 * 1024];
        assert!(matches!(
            conn.on_readable(&mut scratch, &mut budget, &mut |_| None),
            Next::Parked
        ));
        assert!(conn.is_parked());
        assert_eq!(conn.deadline(), None, "the stall is the daemon's");
        // The budget frees up and more of the body arrives: a read event
        // alone must not admit it behind the queue's back.
        budget.release(900 << 10);
        client.write_all(&[7; 1000]).unwrap();
        assert!(matches!(
            conn.on_readable(&mut scratch, &mut budget, &mut |_| None),
            Next::Wait
        ));
        assert!(conn.is_parked());
        assert_eq!(budget.held(), 0, "nothing admitted");
        // Unparked (by the clients part, in order), it is admitted and read.
        conn.unpark(Instant::now());
        assert!(conn.deadline().is_some());
        assert!(matches!(
            conn.on_readable(&mut scratch, &mut budget, &mut |_| None),
            Next::Wait
        ));
        assert!(!conn.is_parked());
        assert!(
            budget.held() >= (2 << 20) - 2000,
            "admitted: {}",
            budget.held()
        );
    }

    #[test]
    fn a_parked_session_has_no_read_deadline_while_it_waits() {
        let metrics = Arc::new(Metrics::default());
        let mut budget = Budget::new(1 << 20, metrics);
        budget.charge(900 << 10);
        let mut stream = gaspar_protocol::PREAMBLE.to_vec();
        stream.extend_from_slice(&(2u32 << 20).to_be_bytes());
        stream.extend_from_slice(&[7; 1000]);
        let (mut conn, mut client) = accepted(&stream);
        let mut scratch = vec![0; 64 * 1024];
        assert!(matches!(
            conn.on_readable(&mut scratch, &mut budget, &mut |_| None),
            Next::Parked
        ));
        assert!(conn.is_pipelined() && conn.is_parked());
        // The acknowledgement went out; nothing more waits for the client.
        let mut ack = [0; 8];
        std::io::Read::read_exact(&mut client, &mut ack).unwrap();
        assert_eq!(&ack[..4], b"GSP2");
        assert!(matches!(conn.on_writable(), Next::Wait));
        conn.refresh_session_deadline(Instant::now());
        assert_eq!(conn.deadline(), None, "the stall is the daemon's");
    }

    #[test]
    fn a_large_body_is_read_into_the_place_found_for_it_with_what_came_first() {
        use crate::workers::areas::RequestArea;
        use crate::workers::claims::{area_len_for, Claims};
        let (claims, _fd) = Claims::create(area_len_for(1 << 20)).unwrap();
        let claims = std::rc::Rc::new(claims);
        let mut area = RequestArea::default();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut request = (body.len() as u32).to_be_bytes().to_vec();
        request.extend_from_slice(&body[..60_000]);
        let (mut conn, mut client) = accepted(&request);
        let mut budget = Budget::new(1 << 20, Arc::new(Metrics::default()));
        // The first read takes the header and part of the body through the
        // scratch buffer; the rest is large enough to read in place.
        let mut scratch = vec![0; 16 * 1024];
        let mut asked = Vec::new();
        let mut place = |len| {
            asked.push(len);
            area.place(&claims, 0, len)
        };
        assert!(matches!(
            conn.on_readable(&mut scratch, &mut budget, &mut place),
            Next::Wait
        ));
        assert_eq!(conn.holds(), 100_000 - (16 * 1024 - 4), "admitted");
        client.write_all(&body[60_000..]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let Next::Request(got) = conn.on_readable(&mut scratch, &mut budget, &mut place) else {
            panic!("the whole request");
        };
        assert_eq!(asked, [100_000], "asked once, for the whole body");
        assert_eq!(got.area_slot(), Some(0), "read in place");
        assert_eq!(&got[..], &body[..]);
    }

    #[test]
    fn a_client_that_stops_mid_body_read_in_place_is_reset() {
        use crate::workers::areas::RequestArea;
        use crate::workers::claims::{area_len_for, Claims};
        let (claims, _fd) = Claims::create(area_len_for(1 << 20)).unwrap();
        let claims = std::rc::Rc::new(claims);
        let mut area = RequestArea::default();
        let mut request = 100_000u32.to_be_bytes().to_vec();
        request.extend_from_slice(&[3; 50_000]);
        let (mut conn, client) = accepted(&request);
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut budget = Budget::new(1 << 20, Arc::new(Metrics::default()));
        let mut scratch = vec![0; 16 * 1024];
        let next = conn.on_readable(&mut scratch, &mut budget, &mut |len| {
            area.place(&claims, 0, len)
        });
        assert!(matches!(next, Next::Reset(_)), "{next:?}");
        assert!(conn.sent_anything());
        assert_eq!(area.read_in_place(), 1, "it was being read in place");
        drop(conn);
        assert_eq!(area.read_in_place(), 0, "its place is given back");
    }

    #[test]
    fn an_answer_is_for_the_request_the_connection_waits_for() {
        let (mut conn, _client) = accepted(&[]);
        assert!(!conn.awaits(1), "no request yet");
        conn.submitted(7, 5, Instant::now());
        assert!(conn.awaits(7));
        assert!(!conn.awaits(8), "another connection's, under a reused key");
    }
}
