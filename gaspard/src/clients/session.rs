//! A persistent, pipelined connection: the opt-in protocol extension
//! (docs/protocol.md, "Extensions"). The client sends v1 frames back to back;
//! replies go out in request order, each as status, length, payload. Like
//! [`super::connection`], it knows nothing about workers or their links: the
//! clients part takes the requests that arrived and hands back each one's
//! outcome.

use super::budget::Account;
use super::io::{read_step, Next, ReadStep};
use crate::buffers::gather;
use crate::protocol::{handshake, reply_header, Status, REPLY_HEADER_LEN};
use crate::protocol::{Decoded, RequestDecoder};
use crate::workers::RequestId;
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::time::Instant;

/// The most requests a client may have outstanding on one connection; past
/// it, gaspard stops reading until replies go out (told in the handshake).
pub(crate) const WINDOW: u32 = 128;

/// Slices per vectored write: many small replies leave in one syscall.
const MAX_IOVECS: usize = 64;

/// One piece of output.
enum Segment<R> {
    Head([u8; 8], u8),
    Reply(R),
    Text(Vec<u8>),
}

impl<R: AsRef<[u8]>> Segment<R> {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Head(bytes, len) => &bytes[..usize::from(*len)],
            Segment::Reply(reply) => reply.as_ref(),
            Segment::Text(text) => text,
        }
    }
}

/// A reply body: the worker's bytes, or a message from gaspard.
pub(crate) enum Body<R> {
    Reply(R),
    Text(String),
}

struct Pending<R> {
    id: Option<RequestId>,
    /// The request's length, held until its reply replaces it.
    len: usize,
    received: Instant,
    done: Option<(Status, Body<R>)>,
}

pub(crate) struct Session<R> {
    decoder: RequestDecoder,
    /// Requests read and not yet taken by the daemon.
    arrived: Vec<Vec<u8>>,
    /// Requests taken, in arrival order, until their replies go out.
    pending: VecDeque<Pending<R>>,
    out: VecDeque<Segment<R>>,
    /// Replies in `out` not yet written in full. They count against the
    /// window too, so a client that never reads cannot make gaspard hold
    /// more than a window of replies.
    replies_out: usize,
    /// Bytes of the first output segment already written.
    written: usize,
    /// The client said it is done (zero-length frame, or end of stream).
    ending: bool,
    /// Reading stopped because the window is full; resume once replies leave.
    paused: bool,
    /// Bytes read but not decoded yet, because the window was full.
    leftover: Vec<u8>,
    /// Since when output has waited with no byte written: the client must
    /// take its replies within --read-timeout, as a v1 client must.
    output_waiting_since: Option<Instant>,
    /// The client closed its sending side.
    input_closed: bool,
    /// Bytes admitted by the budget for the request body being read.
    admitted: usize,
}

impl<R: AsRef<[u8]>> Session<R> {
    /// A session that has just accepted the preamble; the acknowledgement is
    /// the first thing it writes.
    pub(crate) fn new(limit: u32) -> Session<R> {
        let mut out = VecDeque::new();
        out.push_back(Segment::Head(handshake(WINDOW), 8));
        Session {
            decoder: RequestDecoder::new(limit),
            arrived: Vec::new(),
            pending: VecDeque::new(),
            out,
            replies_out: 0,
            written: 0,
            ending: false,
            paused: false,
            leftover: Vec::new(),
            input_closed: false,
            output_waiting_since: Some(Instant::now()),
            admitted: 0,
        }
    }

    /// Decodes requests from bytes read (or that followed the preamble).
    /// Past a full window the rest waits in `leftover`: one read can carry
    /// many small requests, and the window must hold all the same.
    pub(crate) fn feed(&mut self, mut input: &[u8]) -> Result<(), String> {
        while !input.is_empty() && !self.ending {
            if self.window_full() {
                self.leftover.extend_from_slice(input);
                return Ok(());
            }
            match self.decoder.feed(input).map_err(|e| e.to_string())? {
                Decoded::Incomplete => return Ok(()),
                Decoded::Empty => self.ending = true,
                Decoded::Request { payload, consumed } => {
                    self.arrived.push(payload);
                    self.admitted = 0;
                    input = &input[consumed..];
                }
                Decoded::Extension { .. } => unreachable!("a session decoder has no preamble"),
            }
        }
        Ok(())
    }

    fn window_full(&self) -> bool {
        self.pending.len() + self.arrived.len() + self.replies_out >= WINDOW as usize
    }

    fn wants_to_read(&self) -> bool {
        !self.ending && !self.window_full()
    }

    fn leftover_or_read(
        &mut self,
        stream: &mut TcpStream,
        scratch: &mut [u8],
        account: &mut Account<'_>,
    ) -> Result<(), Next> {
        if !self.leftover.is_empty() {
            let bytes = std::mem::take(&mut self.leftover);
            return self.feed(&bytes).map_err(Next::Reset);
        }
        if self.input_closed {
            if self.decoder.started() {
                return Err(Next::Reset(
                    "closed its side in the middle of a request".into(),
                ));
            }
            // Half-closed: answer what is pending, then close.
            self.ending = true;
            return Ok(());
        }
        if let Some(missing) = self.decoder.body_missing() {
            if self.admitted == 0 {
                if !account.admit(missing) {
                    return Err(Next::Parked);
                }
                self.admitted = missing;
                if self.decoder.reserve_body().is_err() {
                    let reason = format!("cannot allocate {missing} bytes for its request");
                    return Err(Next::Reset(reason));
                }
            }
        }
        match read_step(stream, &mut self.decoder, scratch) {
            Ok(ReadStep::WouldBlock) => Err(Next::Wait),
            Ok(ReadStep::Eof) => {
                self.input_closed = true;
                Ok(())
            }
            Ok(ReadStep::Direct(Some(payload))) => {
                self.arrived.push(payload);
                self.admitted = 0;
                Ok(())
            }
            Ok(ReadStep::Direct(None)) => Ok(()),
            Ok(ReadStep::Scratch(n)) => self.feed(&scratch[..n]).map_err(Next::Reset),
            Err(e) => Err(Next::Gone(e)),
        }
    }

    /// Reading stopped at a full window and there is room again: readiness
    /// is edge-triggered, so the loop must read without waiting for an event.
    pub(crate) fn should_resume(&self) -> bool {
        self.paused && self.wants_to_read()
    }

    /// Reads requests until the socket is empty or the window is full.
    pub(crate) fn on_readable(
        &mut self,
        stream: &mut TcpStream,
        scratch: &mut [u8],
        account: &mut Account<'_>,
    ) -> Next {
        self.paused = false;
        while self.wants_to_read() {
            if let Err(step) = self.leftover_or_read(stream, scratch, account) {
                return step;
            }
        }
        self.paused = !self.ending;
        self.progress_after_write()
    }

    /// Requests that arrived, for the daemon to submit in this order, each
    /// followed by [`Self::submitted`] or [`Self::refused`].
    pub(crate) fn take_arrived(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.arrived)
    }

    /// The next arrived request, of `len` bytes, went to the workers as `id`.
    pub(crate) fn submitted(&mut self, id: RequestId, len: usize, now: Instant) {
        self.pending.push_back(Pending {
            id: Some(id),
            len,
            received: now,
            done: None,
        });
    }

    /// The next arrived request was refused at once.
    pub(crate) fn refused(&mut self, status: Status, message: String, now: Instant) {
        self.pending.push_back(Pending {
            id: None,
            len: 0,
            received: now,
            done: Some((status, Body::Text(message))),
        });
        self.promote();
    }

    /// The outcome of request `id`. Returns when the request arrived, for
    /// the latency histogram, or `None` if `id` is not this session's.
    pub(crate) fn complete(
        &mut self,
        id: RequestId,
        status: Status,
        body: Body<R>,
    ) -> Option<Instant> {
        let pending = self.pending.iter_mut().find(|p| p.id == Some(id))?;
        pending.done = Some((status, body));
        let received = pending.received;
        self.promote();
        Some(received)
    }

    /// Moves finished replies at the head of the line to the output.
    fn promote(&mut self) {
        while self.pending.front().is_some_and(|p| p.done.is_some()) {
            let Some(Pending {
                done: Some((status, body)),
                ..
            }) = self.pending.pop_front()
            else {
                unreachable!("checked above");
            };
            let mut segment = match body {
                Body::Reply(reply) => Segment::Reply(reply),
                Body::Text(text) => Segment::Text(text.into_bytes()),
            };
            let mut status = status;
            // A worker's reply is at most u32::MAX bytes (its link says so),
            // but a length that does not fit must never go out cut short.
            let len32 = match u32::try_from(segment.bytes().len()) {
                Ok(len) => len,
                Err(_) => {
                    status = Status::HandlerError;
                    segment = Segment::Text(b"reply too large for the extension".to_vec());
                    segment.bytes().len() as u32
                }
            };
            let len = len32 as usize;
            let mut head = [0; 8];
            head[..REPLY_HEADER_LEN].copy_from_slice(&reply_header(status, len32));
            self.out
                .push_back(Segment::Head(head, REPLY_HEADER_LEN as u8));
            if len > 0 {
                self.out.push_back(segment);
            }
            self.replies_out += 1;
            self.output_waiting_since.get_or_insert_with(Instant::now);
        }
    }

    /// Writes what is ready, many replies per syscall.
    pub(crate) fn on_writable(&mut self, stream: &mut TcpStream) -> Next {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let parts = self.out.iter().map(Segment::bytes);
            let n = gather(parts, self.written, &mut slices);
            match stream.write_vectored(&slices[..n]) {
                Ok(0) => return Next::Gone(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Next::Gone(e),
            }
        }
        self.progress_after_write()
    }

    fn advance(&mut self, mut n: usize) {
        if n > 0 {
            self.output_waiting_since = Some(Instant::now());
        }
        while n > 0 {
            let Some(front) = self.out.front() else {
                return;
            };
            let left = front.bytes().len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            // A reply is out once its body is; a reply without a body (or
            // the acknowledgement, 8 bytes) once its head is.
            let done = match self.out.pop_front() {
                Some(Segment::Reply(_) | Segment::Text(_)) => true,
                Some(Segment::Head(_, len)) => {
                    usize::from(len) == REPLY_HEADER_LEN
                        && !matches!(self.out.front(), Some(Segment::Reply(_) | Segment::Text(_)))
                }
                None => false,
            };
            if done {
                self.replies_out -= 1;
            }
        }
    }

    fn progress_after_write(&mut self) -> Next {
        if self.out.is_empty() {
            self.output_waiting_since = None;
        }
        if self.ending && self.pending.is_empty() && self.arrived.is_empty() && self.out.is_empty()
        {
            Next::Close
        } else {
            Next::Wait
        }
    }

    /// Bytes it holds: requests read and not yet answered, replies not yet
    /// written, and the body being read (as admitted).
    pub(crate) fn holds(&self) -> usize {
        let arrived: usize = self.arrived.iter().map(Vec::len).sum();
        let pending: usize = self
            .pending
            .iter()
            .map(|p| match &p.done {
                None => p.len,
                Some((_, Body::Reply(reply))) => reply.as_ref().len(),
                Some((_, Body::Text(text))) => text.len(),
            })
            .sum();
        let out: usize = self.out.iter().map(|s| s.bytes().len()).sum();
        let reading = match self.decoder.body_missing() {
            Some(_) => self.admitted,
            None => 0,
        };
        arrived + pending + out.saturating_sub(self.written) + reading + self.leftover.len()
    }

    /// Nothing in flight or waiting to be written: the connection is idle.
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.arrived.is_empty()
            && self.out.is_empty()
            && self.leftover.is_empty()
    }

    /// Since when replies have waited for the client to take them, if any do.
    pub(crate) fn output_waiting_since(&self) -> Option<Instant> {
        self.output_waiting_since
    }

    /// Takes no more requests (a graceful stop): what is outstanding is
    /// answered, then the session closes cleanly.
    pub(crate) fn stop_taking_requests(&mut self) {
        self.ending = true;
        self.leftover.clear();
    }

    /// Whether part of a request has arrived.
    pub(crate) fn mid_request(&self) -> bool {
        self.decoder.started() || !self.leftover.is_empty()
    }

    /// The requests still with the dispatcher, to cancel if the client goes.
    pub(crate) fn outstanding(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.pending
            .iter()
            .filter(|p| p.done.is_none())
            .filter_map(|p| p.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pack;

    struct Bytes(Vec<u8>);

    impl AsRef<[u8]> for Bytes {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    #[test]
    fn one_read_of_many_requests_stops_at_the_window() {
        let mut session: Session<Bytes> = Session::new(1024);
        let stream: Vec<u8> = (0..300).flat_map(|i: u32| pack(&i.to_be_bytes())).collect();
        session.feed(&stream).unwrap();
        let arrived = session.take_arrived();
        assert_eq!(arrived.len(), WINDOW as usize);
        assert_eq!(arrived[127], 127u32.to_be_bytes());
        assert!(session.mid_request(), "the rest waits undecoded");
        let now = Instant::now();
        for id in 0..WINDOW as u64 {
            session.submitted(id, 0, now);
        }
        assert!(!session.should_resume(), "no room until replies leave");
        // Finished replies still count while they wait to be written.
        for id in 0..WINDOW as u64 {
            session.complete(id, Status::Ok, Body::Reply(Bytes(vec![1])));
        }
        assert!(session.window_full());
        assert_eq!(session.outstanding().count(), 0);
    }

    #[test]
    fn replies_leave_in_request_order_whatever_order_they_finish_in() {
        let mut session: Session<Bytes> = Session::new(1024);
        let now = Instant::now();
        session.submitted(1, 0, now);
        session.submitted(2, 0, now);
        session.refused(Status::Overloaded, "full".into(), now);
        session.complete(2, Status::Ok, Body::Reply(Bytes(b"two".to_vec())));
        // Only the acknowledgement can go: request 1 holds the line.
        let waiting: Vec<u8> = session
            .out
            .iter()
            .flat_map(|s| s.bytes().to_vec())
            .collect();
        assert_eq!(waiting, b"GSP2\0\0\0\x80");
        session.complete(1, Status::HandlerError, Body::Text("bad".into()));
        let all: Vec<u8> = session
            .out
            .iter()
            .flat_map(|s| s.bytes().to_vec())
            .collect();
        let mut expected = b"GSP2\0\0\0\x80".to_vec();
        expected.extend_from_slice(b"\x01\0\0\0\x03bad");
        expected.extend_from_slice(b"\x00\0\0\0\x03two");
        expected.extend_from_slice(b"\x03\0\0\0\x04full");
        assert_eq!(all, expected);
        assert_eq!(session.replies_out, 3);
    }
}
