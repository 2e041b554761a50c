//! A virtual client on one persistent GSP2 connection: it negotiates, then
//! keeps up to `pipeline` requests in flight (capped at the server's window),
//! reads the status-prefixed replies in order, and ends with a zero-length
//! request. If the connection fails it counts what was in flight as failed
//! and opens another. Latency runs from the send to the reply's last byte.

use super::{drained, readable, writable, Client, Ctx, ErrorKind, Plan};
use crate::frame::{self, Piece, ReplyDecoder, Status};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::collections::VecDeque;
use std::fmt::Display;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::time::Instant;

/// Frames handed to one `writev`.
const SLICES: usize = 64;

/// Bytes of an error reply's message kept to say what went wrong.
const MESSAGE_KEPT: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// About to open a connection.
    Idle,
    /// Waiting for the next sweep before opening one: the last attempt
    /// failed at once.
    Backoff,
    /// Connecting, or sending the preamble.
    Connecting,
    /// Waiting for the server's answer to the preamble.
    Handshake,
    /// Sending requests and reading replies.
    Running,
    /// No more requests in this run.
    Done,
}

/// A request sent (or queued to be) and not answered yet.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    started: Instant,
    measured: bool,
}

/// The reply being read.
#[derive(Debug)]
struct Reply {
    status: Status,
    received: usize,
    matches: bool,
    /// The start of an error reply's message.
    message: Vec<u8>,
}

pub(super) struct Persistent {
    token: Token,
    frame: Arc<[u8]>,
    expected: Option<Arc<[u8]>>,
    phase: Phase,
    stream: Option<TcpStream>,
    /// When the current connection was opened: the handshake's timeout runs
    /// from it.
    opened: Instant,
    preamble_sent: usize,
    handshake: [u8; frame::HANDSHAKE_LEN],
    handshake_len: usize,
    /// Requests this connection may have in flight: the pipeline depth,
    /// capped at the window the server announced.
    depth: usize,
    /// Oldest first; the last `unsent` of them are not wholly written yet.
    in_flight: VecDeque<InFlight>,
    unsent: usize,
    /// Bytes of the first unsent request already written.
    offset: usize,
    /// No more tickets: the zero-length request goes out after the rest.
    ending: Option<Instant>,
    end_sent: usize,
    decoder: ReplyDecoder,
    reply: Option<Reply>,
}

impl Client for Persistent {
    fn new(token: Token, plan: &Plan) -> Persistent {
        Persistent {
            token,
            frame: plan.frame.clone(),
            expected: plan.expected.clone(),
            phase: Phase::Idle,
            stream: None,
            opened: Instant::now(),
            preamble_sent: 0,
            handshake: [0; frame::HANDSHAKE_LEN],
            handshake_len: 0,
            depth: 1,
            in_flight: VecDeque::new(),
            unsent: 0,
            offset: 0,
            ending: None,
            end_sent: 0,
            decoder: ReplyDecoder::default(),
            reply: None,
        }
    }

    fn start(&mut self, ctx: &mut Ctx) {
        if self.phase == Phase::Backoff {
            self.phase = Phase::Idle;
        }
        if self.phase == Phase::Idle {
            self.connect(ctx);
        }
    }

    fn ready(&mut self, ctx: &mut Ctx, event: &Event, scratch: &mut [u8]) {
        if writable(event) {
            self.write(ctx);
        }
        if readable(event) && matches!(self.phase, Phase::Handshake | Phase::Running) {
            self.read(ctx, event, scratch);
        }
        if self.phase == Phase::Idle {
            self.connect(ctx);
        }
    }

    fn sweep(&mut self, ctx: &mut Ctx, now: Instant) {
        let timeout = ctx.plan.timeout;
        match self.phase {
            Phase::Backoff => self.start(ctx),
            Phase::Connecting | Phase::Handshake if now - self.opened >= timeout => {
                self.fail(
                    ctx,
                    ErrorKind::Timeout,
                    &"no answer to the preamble within --timeout",
                );
                self.start(ctx);
            }
            Phase::Running => {
                if let Some(oldest) = self.in_flight.front() {
                    if now - oldest.started >= timeout {
                        // Replies come in order: the rest are stuck behind it.
                        self.fail(ctx, ErrorKind::Timeout, &"no reply within --timeout");
                        self.start(ctx);
                    }
                } else if self.ending.is_some_and(|since| now - since >= timeout) {
                    // Everything answered; the server never closed. Not a
                    // request's failure.
                    self.close(Phase::Done);
                }
            }
            _ => {}
        }
    }

    fn finished(&self) -> bool {
        self.phase == Phase::Done
    }
}

impl Persistent {
    fn connect(&mut self, ctx: &mut Ctx) {
        self.opened = Instant::now();
        self.preamble_sent = 0;
        self.handshake_len = 0;
        self.unsent = 0;
        self.offset = 0;
        self.end_sent = 0;
        self.decoder = ReplyDecoder::default();
        self.reply = None;
        debug_assert!(self.in_flight.is_empty());
        let connected = TcpStream::connect(ctx.plan.addr).and_then(|mut stream| {
            // Small pipelined requests must not wait for an ACK (Nagle).
            stream.set_nodelay(true)?;
            ctx.registry.register(
                &mut stream,
                self.token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match connected {
            Ok(stream) => {
                self.stream = Some(stream);
                self.phase = Phase::Connecting;
                self.write(ctx);
            }
            Err(error) => {
                self.fail(ctx, ErrorKind::of_io(&error), &error);
                // Failing at once again would only spin: wait for a sweep.
                if self.phase == Phase::Idle {
                    self.phase = Phase::Backoff;
                }
            }
        }
    }

    /// Writes what is due: the preamble, then queued requests, then (when
    /// the run is over for this client) the zero-length request.
    fn write(&mut self, ctx: &mut Ctx) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let result = match self.phase {
            Phase::Connecting => {
                write_some(stream, &frame::PREAMBLE[self.preamble_sent..]).map(|n| {
                    self.preamble_sent += n;
                    if self.preamble_sent == frame::PREAMBLE.len() {
                        self.phase = Phase::Handshake;
                    }
                })
            }
            Phase::Running => self.flush(),
            _ => Ok(()),
        };
        if let Err(error) = result {
            self.fail(ctx, ErrorKind::of_io(&error), &error);
        }
    }

    /// Writes queued requests, several per system call.
    fn flush(&mut self) -> io::Result<()> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(());
            };
            let end_due = self.ending.is_some() && self.end_sent < frame::END_OF_REQUESTS.len();
            if self.unsent == 0 && !end_due {
                return Ok(());
            }
            let mut slices = [IoSlice::new(&[]); SLICES];
            let mut count = 0;
            if self.unsent > 0 {
                slices[0] = IoSlice::new(&self.frame[self.offset..]);
                count = 1;
                while count < self.unsent.min(SLICES - 1) {
                    slices[count] = IoSlice::new(&self.frame);
                    count += 1;
                }
            }
            if end_due && count == self.unsent {
                slices[count] = IoSlice::new(&frame::END_OF_REQUESTS[self.end_sent..]);
                count += 1;
            }
            let written = match stream.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            self.advance(written);
        }
    }

    /// Accounts for `n` bytes written, in the order `flush` queued them.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.unsent > 0 {
            let left = self.frame.len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.unsent -= 1;
            self.offset = 0;
        }
        self.end_sent += n;
    }

    /// Queues requests until the pipeline is full or the run is over.
    fn fill(&mut self, ctx: &mut Ctx) {
        if self.phase != Phase::Running || self.ending.is_some() {
            return;
        }
        let mut clock = None;
        while self.in_flight.len() < self.depth {
            // One clock reading for the requests queued together.
            let now = *clock.get_or_insert_with(Instant::now);
            match ctx.ticket(now) {
                Some(measured) => {
                    self.in_flight.push_back(InFlight {
                        started: now,
                        measured,
                    });
                    self.unsent += 1;
                }
                None => {
                    self.ending = Some(now);
                    break;
                }
            }
        }
    }

    fn read(&mut self, ctx: &mut Ctx, event: &Event, scratch: &mut [u8]) {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.read(scratch) {
                Ok(0) => return self.closed_by_server(ctx),
                Ok(n) => {
                    if !self.take(ctx, &scratch[..n]) {
                        return;
                    }
                    if drained(n, scratch.len(), event) {
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return self.fail(ctx, ErrorKind::of_io(&error), &error),
            }
        }
        // Replies made room in the pipeline: top it up.
        self.fill(ctx);
        if let Err(error) = self.flush() {
            self.fail(ctx, ErrorKind::of_io(&error), &error);
        }
    }

    /// Takes bytes the server sent. Returns `false` if they broke the
    /// protocol and the connection was dropped.
    fn take(&mut self, ctx: &mut Ctx, mut input: &[u8]) -> bool {
        if self.phase == Phase::Handshake {
            let take = (frame::HANDSHAKE_LEN - self.handshake_len).min(input.len());
            self.handshake[self.handshake_len..self.handshake_len + take]
                .copy_from_slice(&input[..take]);
            self.handshake_len += take;
            input = &input[take..];
            if self.handshake_len < frame::HANDSHAKE_LEN {
                return true;
            }
            match frame::parse_handshake(&self.handshake) {
                Some(window) if window > 0 => {
                    self.depth = ctx.pipeline.min(window as usize).max(1);
                    self.phase = Phase::Running;
                    self.fill(ctx);
                }
                _ => {
                    let detail = format!(
                        "the server answered the preamble with {:?}",
                        String::from_utf8_lossy(&self.handshake)
                    );
                    self.fail(ctx, ErrorKind::Protocol, &detail);
                    return false;
                }
            }
        }
        while let Some(piece) = self.decoder.next(&mut input) {
            match piece {
                Piece::Head { status, len } => {
                    if self.in_flight.len() == self.unsent {
                        let detail = format!("a reply ({status}, {len} bytes) to no request");
                        self.fail(ctx, ErrorKind::Protocol, &detail);
                        return false;
                    }
                    self.reply = Some(Reply {
                        status,
                        received: 0,
                        matches: true,
                        message: Vec::new(),
                    });
                }
                Piece::Body(bytes) => {
                    let reply = self.reply.as_mut().expect("a body follows a head");
                    if reply.status == Status::Ok {
                        if let (Some(expected), true) = (&self.expected, reply.matches) {
                            reply.matches = expected
                                .get(reply.received..reply.received + bytes.len())
                                .is_some_and(|want| want == bytes);
                        }
                    } else if reply.message.len() < MESSAGE_KEPT {
                        let keep = (MESSAGE_KEPT - reply.message.len()).min(bytes.len());
                        reply.message.extend_from_slice(&bytes[..keep]);
                    }
                    reply.received += bytes.len();
                }
                Piece::End => {
                    let reply = self.reply.take().expect("an end follows a head");
                    let request = self.in_flight.pop_front().expect("checked at the head");
                    self.answered(ctx, request, reply);
                }
            }
        }
        true
    }

    fn answered(&self, ctx: &mut Ctx, request: InFlight, reply: Reply) {
        let now = Instant::now();
        match ErrorKind::of_status(reply.status) {
            Some(kind) => {
                let detail = format!(
                    "{}: {}",
                    reply.status,
                    String::from_utf8_lossy(&reply.message)
                );
                ctx.fail(request.measured, now, kind, &detail);
            }
            None => match &self.expected {
                Some(expected) if !reply.matches || reply.received != expected.len() => {
                    let detail = format!(
                        "the reply ({} bytes) differs from the one expected ({} bytes)",
                        reply.received,
                        expected.len()
                    );
                    ctx.fail(request.measured, now, ErrorKind::WrongReply, &detail);
                }
                _ => ctx.succeed(request.started, request.measured, now, reply.received),
            },
        }
    }

    /// The server closed its side: the expected end after the zero-length
    /// request, or else a broken promise.
    fn closed_by_server(&mut self, ctx: &mut Ctx) {
        if self.ending.is_some() && self.in_flight.is_empty() && !self.decoder.in_reply() {
            return self.close(Phase::Done);
        }
        let detail = match self.phase {
            Phase::Handshake => "the server closed the connection after the preamble".to_string(),
            _ => format!(
                "the server closed the connection with {} requests unanswered",
                self.in_flight.len()
            ),
        };
        self.fail(ctx, ErrorKind::Protocol, &detail);
    }

    /// The connection failed: every request in flight on it failed. One that
    /// failed before carrying any request counts as one failed request, so
    /// that a server refusing every connection still ends a `-n` run.
    fn fail(&mut self, ctx: &mut Ctx, kind: ErrorKind, detail: &dyn Display) {
        let now = Instant::now();
        if self.in_flight.is_empty() {
            if self.ending.is_none()
                && matches!(
                    self.phase,
                    Phase::Connecting | Phase::Handshake | Phase::Idle
                )
            {
                match ctx.ticket(now) {
                    Some(measured) => ctx.fail(measured, now, kind, detail),
                    None => self.ending = Some(now),
                }
            }
        } else {
            for request in self.in_flight.drain(..) {
                ctx.fail(request.measured, now, kind, detail);
            }
        }
        let next = if self.ending.is_some() {
            Phase::Done
        } else {
            Phase::Idle
        };
        self.close(next);
    }

    fn close(&mut self, next: Phase) {
        // Dropping the stream closes it (and takes it out of the poll).
        self.stream = None;
        self.in_flight.clear();
        self.phase = next;
    }
}

/// One `write`: how much went out (0 if the socket would block).
fn write_some(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(bytes) {
            Ok(n) => return Ok(n),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}
