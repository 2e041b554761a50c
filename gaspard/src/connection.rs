//! One client connection: read one request, wait for its reply, write the
//! reply in full, close; or, if the client opens with the extension's
//! preamble, a persistent pipelined session ([`crate::session`]). Each step
//! returns what should happen next; the connection knows nothing about
//! workers or their links.

use crate::dispatcher::RequestId;
use crate::protocol::{Decoded, RequestDecoder};
use crate::session::{Session, Step};
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::time::Instant;

/// Extra bytes a client may send after its request before it is cut off.
/// gaspar ignored them; a trailing newline from a shell pipeline is common.
const MAX_TRAILING: usize = 64 * 1024;

/// Where a connection is in its life.
pub enum State<R> {
    Reading(RequestDecoder),
    /// The request is with the dispatcher.
    Waiting(RequestId),
    Writing {
        reply: R,
        written: usize,
    },
    /// The persistent extension: many requests, replies in order.
    Pipelined(Box<Session<R>>),
}

/// What one read did for a decoder.
pub enum ReadStep {
    /// Nothing to read now.
    WouldBlock,
    /// The client closed its sending side.
    Eof,
    /// Bytes went straight into a large body; the request, if now complete.
    Direct(Option<Vec<u8>>),
    /// This many bytes are in the scratch buffer, to be fed to the decoder.
    Scratch(usize),
}

/// One read for `decoder`: a large body is read straight into place without
/// the scratch copy (nor zeroing it first); anything else goes to `scratch`,
/// which saves a syscall per small request (header and body in one read).
pub fn read_step(
    stream: &mut TcpStream,
    decoder: &mut RequestDecoder,
    scratch: &mut [u8],
) -> io::Result<ReadStep> {
    let direct = decoder
        .body_missing()
        .is_some_and(|missing| missing >= scratch.len());
    if direct {
        let (body, step) = decoder.body_to_fill();
        let before = body.len();
        // Appends what is there, even when it then hits WouldBlock.
        let result = (&mut *stream).take(step as u64).read_to_end(body);
        let read = body.len() - before;
        return match result {
            Ok(_) if read == 0 => Ok(ReadStep::Eof),
            Err(e) if read == 0 && e.kind() == io::ErrorKind::WouldBlock => {
                Ok(ReadStep::WouldBlock)
            }
            Ok(_) => Ok(ReadStep::Direct(decoder.take_body())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Ok(ReadStep::Direct(decoder.take_body()))
            }
            Err(e) => Err(e),
        };
    }
    loop {
        return match stream.read(scratch) {
            Ok(0) => Ok(ReadStep::Eof),
            Ok(n) => Ok(ReadStep::Scratch(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(ReadStep::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// What the event loop should do after a connection made progress.
#[derive(Debug)]
pub enum Next {
    /// Nothing yet: wait for the next readiness event.
    Wait,
    /// A whole request arrived.
    Request(Vec<u8>),
    /// Close cleanly: the reply is written, or the request was empty.
    Close,
    /// Close with a reset, logging `reason`.
    Reset(String),
    /// The client went away; there is nobody to tell.
    Gone(io::Error),
}

pub struct Connection<R> {
    pub stream: TcpStream,
    pub state: State<R>,
    /// When the client must have sent its request, or taken its reply, by
    /// (--read-timeout); `None` while a worker has the request.
    pub deadline: Option<Instant>,
    /// When the whole request had arrived, for the latency histogram.
    pub received: Option<Instant>,
    /// In the loop's poll (only once it has to wait; see the daemon).
    pub registered: bool,
    trailing: usize,
    /// The last read found the socket empty, so there is nothing to drain
    /// (saves a read per request, and one at close).
    input_drained: bool,
}

impl<R: AsRef<[u8]>> Connection<R> {
    pub fn new(stream: TcpStream, max_request: u32, deadline: Option<Instant>) -> Connection<R> {
        Connection {
            stream,
            state: State::Reading(RequestDecoder::first_on_connection(max_request)),
            deadline,
            received: None,
            registered: false,
            trailing: 0,
            input_drained: false,
        }
    }

    /// Reads what the socket has into the request, or the session.
    pub fn on_readable(&mut self, scratch: &mut [u8]) -> Next {
        loop {
            let decoder = match &mut self.state {
                State::Reading(decoder) => decoder,
                State::Pipelined(session) => {
                    return step(session.on_readable(&mut self.stream, scratch))
                }
                _ => return self.discard_trailing(scratch),
            };
            self.input_drained = false;
            let n = match read_step(&mut self.stream, decoder, scratch) {
                Ok(ReadStep::WouldBlock) => {
                    self.input_drained = true;
                    return Next::Wait;
                }
                Ok(ReadStep::Eof) if decoder.started() => {
                    return Next::Reset("closed its side before sending the whole request".into())
                }
                Ok(ReadStep::Eof) => return Next::Close,
                Ok(ReadStep::Direct(Some(payload))) => return Next::Request(payload),
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
                    return Next::Request(payload);
                }
                Ok(Decoded::Extension { consumed }) => {
                    // Replies go out as they are ready, not when Nagle says.
                    let _ = self.stream.set_nodelay(true);
                    let mut session = Box::new(Session::new(decoder.limit()));
                    let fed = session.feed(&scratch[consumed..n]);
                    self.state = State::Pipelined(session);
                    if let Err(reason) = fed {
                        return Next::Reset(reason);
                    }
                    // The acknowledgement goes out now; then read on.
                    match self.on_writable() {
                        Next::Wait => continue,
                        other => return other,
                    }
                }
                Err(e) => return Next::Reset(e.to_string()),
            }
        }
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
    pub fn may_have_input(&self) -> bool {
        !self.input_drained
    }

    /// Takes the reply and starts writing it; the client must take it all by
    /// `deadline`.
    pub fn reply(&mut self, reply: R, deadline: Option<Instant>) -> Next {
        self.state = State::Writing { reply, written: 0 };
        self.deadline = deadline;
        self.on_writable()
    }

    /// Writes as much of the reply as the socket takes.
    pub fn on_writable(&mut self) -> Next {
        let (reply, written) = match &mut self.state {
            State::Writing { reply, written } => (reply, written),
            State::Pipelined(session) => return step(session.on_writable(&mut self.stream)),
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
    pub fn sent_anything(&self) -> bool {
        match &self.state {
            State::Reading(decoder) => decoder.started(),
            _ => true,
        }
    }

    /// Whether the client opened a persistent session.
    pub fn is_pipelined(&self) -> bool {
        matches!(self.state, State::Pipelined(_))
    }

    /// The persistent session, if the client opened one.
    pub fn session(&mut self) -> Option<&mut Session<R>> {
        match &mut self.state {
            State::Pipelined(session) => Some(session),
            _ => None,
        }
    }

    /// Requests of this connection still with the dispatcher.
    pub fn outstanding(&self) -> Vec<RequestId> {
        match &self.state {
            State::Waiting(id) => vec![*id],
            State::Pipelined(session) => session.outstanding().collect(),
            _ => Vec::new(),
        }
    }

    /// What the connection was doing when its deadline passed, for the log.
    pub fn stalled_doing(&self) -> &'static str {
        match &self.state {
            State::Reading(decoder) if decoder.started() => "sent part of a request",
            State::Reading(_) => "sent no request",
            State::Waiting(_) => "waited",
            State::Writing { .. } => "did not take its whole reply",
            State::Pipelined(session) if session.output_waiting_since().is_some() => {
                "did not take its replies"
            }
            State::Pipelined(session) if session.mid_request() => "sent part of a request",
            State::Pipelined(_) => "stayed idle",
        }
    }

    /// The request this connection waits for, if any.
    pub fn waiting_for(&self) -> Option<RequestId> {
        match self.state {
            State::Waiting(id) => Some(id),
            _ => None,
        }
    }

    /// Ends the connection cleanly: pending input is drained so the kernel
    /// sends FIN after the reply rather than a reset, then the socket closes.
    pub fn close(mut self, scratch: &mut [u8]) {
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
    pub fn reset(self) {
        let socket = socket2::SockRef::from(&self.stream);
        // SO_LINGER with a zero timeout makes close() send RST.
        let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    }
}

fn step(step: Step) -> Next {
    match step {
        Step::Wait => Next::Wait,
        Step::Close => Next::Close,
        Step::Reset(reason) => Next::Reset(reason),
        Step::Gone(e) => Next::Gone(e),
    }
}
