//! The persistent, pipelined extension (`GSP2`, docs/protocol.md,
//! "Extensions"): [`Connection`].
//!
//! On the wire: the client sends the preamble `FF FF FF FF "GSP2"`, the
//! server answers `"GSP2"` and its window (u32 big-endian); then requests are
//! v1 frames back to back, and each reply is a status byte, a u32 big-endian
//! length and the payload, in request order. A zero-length frame says
//! goodbye: the server answers what is outstanding and closes cleanly.

use crate::{connect, deadline_after, header, time_left, Deadline, Error, Options, Stage};
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

// The wire format is gaspar-protocol's, shared with gaspard.
use gaspar_protocol::{
    parse_handshake, parse_reply_header, END_OF_REQUESTS, HANDSHAKE_LEN, PREAMBLE, REPLY_HEADER_LEN,
};

/// Request bytes gathered into one write: many small pipelined requests
/// leave in one syscall, and the payload of a large one is written from the
/// caller's buffer, without a copy.
const BATCH: usize = 64 * 1024;

/// How a request on a [`Connection`] failed: the status byte of its reply,
/// when not 0 (ok). Carried by [`Error::Failed`]; defined with the wire
/// format in gaspar-protocol.
///
/// ```
/// use gaspar_client::Status;
///
/// assert_eq!(Status::WorkerLost.code(), 4);
/// assert_eq!(Status::from_code(9), Status::Unknown(9));
/// assert_eq!(Status::HandlerError.to_string(), "handler error");
/// ```
pub use gaspar_protocol::Status;

/// One persistent connection to gaspard, carrying many requests: the opt-in
/// `GSP2` extension (docs/protocol.md, "Extensions"). It saves a TCP
/// connection per request, and lets many requests be in flight at once
/// (pipelining), their replies coming back in request order.
///
/// ```
/// use gaspar_client::{Connection, Error, Options, Status};
///
/// # fn main() -> Result<(), Error> {
/// # let addr = doc_server::gaspard();
/// # /*
/// let addr = "127.0.0.1:10123";
/// # */
/// let mut connection = Connection::open(addr, &Options::default())?;
///
/// // One request, one reply.
/// assert_eq!(connection.request("hello")?, b"hello");
///
/// // A failed request is an error for that request alone.
/// match connection.request("error:bad input") {
///     Err(Error::Failed { status: Status::HandlerError, message, .. }) => {
///         assert_eq!(message, "bad input")
///     }
///     other => panic!("{other:?}"),
/// }
///
/// // Many requests in flight, the replies in order.
/// let replies = connection.pipeline(["one", "two", "three"]);
/// assert_eq!(replies[2].as_deref().ok(), Some(&b"three"[..]));
///
/// // Say goodbye; the daemon closes once everything is answered.
/// connection.close()?;
/// # Ok(())
/// # }
/// # include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/doc_server.rs"));
/// ```
///
/// # Pipelining
///
/// [`send`](Connection::send) puts a request on the wire and returns at once;
/// [`recv`](Connection::recv) waits for the reply to the oldest request not
/// yet received. Between them, up to [`window`](Connection::window) requests
/// (the daemon's limit, 128 for gaspard) may be outstanding: a `send` past it
/// returns [`Error::WindowFull`], sending nothing, so a caller that forgets
/// to receive gets an error rather than a connection stuck in flow control.
/// [`pipeline`](Connection::pipeline) does the bookkeeping: it keeps the
/// window full and returns every reply, in order.
///
/// # Failures
///
/// - [`Error::Failed`]: the daemon answered the request with a failure
///   status (see [`Status`]). Only that request failed; the connection stays
///   usable.
/// - [`Error::TooLarge`], [`Error::WindowFull`], [`Error::NothingOutstanding`]:
///   the call was refused before anything was sent or received; the
///   connection is unchanged.
/// - Anything else ([`Error::Timeout`], [`Error::Reset`], [`Error::Closed`],
///   [`Error::Io`], [`Error::Protocol`]) ends the connection: no more
///   requests can be sent on it (they get [`Error::Closed`]), and open a new
///   one. A failure to send still leaves the replies the daemon had already
///   sent to be received; once reading fails, the socket is shut down and
///   the requests still outstanding get [`Error::Closed`]. The daemon resets
///   the whole session on a request over its `--max-request-size`, as in v1.
///
/// An idle connection may be closed by the daemon (gaspard closes a session
/// with nothing outstanding after `--read-timeout` of silence, 60 s by
/// default). The next `send` or `request` notices before sending and returns
/// [`Error::Closed`]: that request was not sent, and can go on a new
/// connection.
///
/// # Timeouts
///
/// [`Options::connect_timeout`] bounds the TCP connection and, separately,
/// the daemon's answer to the preamble. [`Options::read_timeout`] bounds
/// each call: sending one request, waiting for one reply (from the moment
/// [`recv`](Connection::recv) starts waiting for it, queueing in the daemon
/// and the handler's run included), one whole [`request`](Connection::request),
/// and [`close`](Connection::close). A timeout ends the connection, since the
/// late reply would otherwise be taken for the next one.
///
/// # Empty messages
///
/// A zero-length frame means goodbye in the extension, so an empty message
/// is never sent: the connection answers it itself with an empty reply, in
/// its place in the order, as a v1 daemon closes an empty request without
/// calling the handler. It does not count against the window.
///
/// # Dropping
///
/// Dropping a connection closes its socket at once, without waiting or
/// saying goodbye; [`close`](Connection::close) is the orderly way. gaspard
/// throws away the replies to the requests still outstanding, as for a v1
/// client that gives up.
pub struct Connection {
    /// The socket, read through a buffer so that many small replies cost one
    /// read.
    reader: BufReader<Socket>,
    addr: SocketAddr,
    window: usize,
    read_timeout: Option<Duration>,
    /// Every request sent whose reply the caller has not taken, oldest first.
    slots: VecDeque<Slot>,
    /// How many of `slots` are [`Slot::Wire`]: sent, reply not yet read.
    in_flight: usize,
    /// Request bytes gathered for one write.
    out: Vec<u8>,
    state: State,
}

/// A request whose reply the caller has not taken yet.
enum Slot {
    /// On the wire: its reply is the next one to read, after those of the
    /// `Wire` slots before it.
    Wire,
    /// Its outcome is known: an empty message, a reply read ahead of its
    /// turn (by [`Connection::request`] or [`Connection::pipeline`]), or an
    /// error from [`Connection::pipeline`].
    Ready(Result<Vec<u8>, Error>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Sending failed: no more requests go out, but the replies to those
    /// on the wire are still read, as far as the daemon sent them.
    Draining,
    /// Reading failed too: the socket is shut down.
    Ended,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("window", &self.window)
            .field("outstanding", &self.slots.len())
            .field("in_flight", &self.in_flight)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `addr` and opens the persistent extension: sends the
    /// preamble and reads the daemon's answer, with its window.
    ///
    /// `addr` is anything [`ToSocketAddrs`] takes; each address a name
    /// resolves to is tried until one accepts the TCP connection.
    ///
    /// A server that does not speak the extension (gaspar, a gaspard from
    /// before it) resets or closes the connection instead: that is
    /// [`Error::NotSupported`], and the caller can fall back to one request
    /// per connection:
    ///
    /// ```
    /// use gaspar_client::{request_with, Connection, Error, Options};
    ///
    /// # fn main() -> Result<(), Error> {
    /// # let addr = doc_server::gaspar();
    /// # /*
    /// let addr = "127.0.0.1:10123";
    /// # */
    /// let options = Options::default();
    /// let reply = match Connection::open(addr, &options) {
    ///     Ok(mut connection) => connection.request("hello")?,
    ///     Err(Error::NotSupported { .. }) => request_with(addr, "hello", &options)?,
    ///     Err(other) => return Err(other),
    /// };
    /// # assert_eq!(reply, b"hello");
    /// # Ok(())
    /// # }
    /// # include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/doc_server.rs"));
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NotSupported`] as above; [`Error::Refused`], [`Error::Resolve`]
    /// and [`Error::Timeout`] with [`Stage::Connect`] as for
    /// [`request_with`](crate::request_with); [`Error::Timeout`] with
    /// [`Stage::Handshake`] if the server accepted the TCP connection but
    /// did not answer the preamble within [`Options::connect_timeout`]
    /// (gaspar reads the preamble as the start of a 4 GiB request and waits
    /// for the rest); [`Error::Protocol`] for a window of 0.
    pub fn open(addr: impl ToSocketAddrs, options: &Options) -> Result<Connection, Error> {
        let (stream, addr) = connect(addr, options.connect_timeout)?;
        let mut socket = Socket {
            stream,
            deadline: deadline_after(options.connect_timeout),
            read_armed: false,
            write_armed: false,
        };
        let not_supported = |error: io::Error| match error.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout {
                addr,
                stage: Stage::Handshake,
            },
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::ConnectionAborted => Error::NotSupported { addr },
            _ => Error::Io { addr, error },
        };
        socket
            .stream
            .set_nodelay(true)
            .map_err(|error| Error::Io { addr, error })?;
        socket.write_all(&PREAMBLE).map_err(not_supported)?;
        let mut reader = BufReader::with_capacity(BATCH, socket);
        let mut answer = [0; HANDSHAKE_LEN];
        reader.read_exact(&mut answer).map_err(not_supported)?;
        let Some(window) = parse_handshake(&answer) else {
            return Err(Error::NotSupported { addr });
        };
        if window == 0 {
            return Err(Error::Protocol {
                addr,
                reason: "it announced a window of 0 requests".into(),
            });
        }
        Ok(Connection {
            reader,
            addr,
            window: usize::try_from(window).unwrap_or(usize::MAX),
            read_timeout: options.read_timeout,
            slots: VecDeque::new(),
            in_flight: 0,
            out: Vec::new(),
            state: State::Open,
        })
    }

    /// The daemon's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The most requests the daemon takes at a time on this connection, as
    /// it announced when the connection opened (128 for gaspard).
    pub fn window(&self) -> usize {
        self.window
    }

    /// How many requests have been sent whose replies the caller has not
    /// received yet: how many times [`recv`](Connection::recv) will return
    /// something other than [`Error::NothingOutstanding`].
    pub fn outstanding(&self) -> usize {
        self.slots.len()
    }

    /// Whether an error has ended this connection: no more requests can be
    /// sent on it ([`Error::Closed`]), though replies the daemon had already
    /// sent can still be received. (The daemon closing an idle connection is
    /// noticed only by the next call.)
    pub fn is_closed(&self) -> bool {
        self.state != State::Open
    }

    /// Sends `message` and waits for its reply: one round trip, within
    /// [`Options::read_timeout`] for the whole of it.
    ///
    /// Replies to requests sent earlier with [`send`](Connection::send) and
    /// not received yet come first on the wire: they are read and kept, in
    /// order, for `recv`. If the window is full of them, the oldest is read
    /// first to make room, so `request` never returns [`Error::WindowFull`].
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] if the daemon answered with a failure status: the
    /// connection stays usable. The others are under "Failures" in
    /// [`Connection`]'s documentation.
    pub fn request(&mut self, message: impl AsRef<[u8]>) -> Result<Vec<u8>, Error> {
        let deadline = deadline_after(self.read_timeout);
        while self.in_flight >= self.window && self.state == State::Open {
            self.settle_next(deadline);
        }
        self.send_by(message.as_ref(), deadline)?;
        self.take(self.slots.len() - 1, Some(deadline))
    }

    /// Sends `message` without waiting for its reply: the reply comes from
    /// a later [`recv`](Connection::recv), in the order the requests were
    /// sent. Sending the request may block until the daemon reads it, within
    /// [`Options::read_timeout`].
    ///
    /// ```
    /// use gaspar_client::{Connection, Error, Options};
    ///
    /// # fn main() -> Result<(), Error> {
    /// # let addr = doc_server::gaspard();
    /// # /*
    /// let addr = "127.0.0.1:10123";
    /// # */
    /// let mut connection = Connection::open(addr, &Options::default())?;
    /// for job in ["a", "b", "c"] {
    ///     connection.send(job)?;
    /// }
    /// assert_eq!(connection.outstanding(), 3);
    /// assert_eq!(connection.recv()?, b"a");
    /// assert_eq!(connection.recv()?, b"b");
    /// assert_eq!(connection.recv()?, b"c");
    /// assert!(matches!(connection.recv(), Err(Error::NothingOutstanding { .. })));
    /// # Ok(())
    /// # }
    /// # include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/doc_server.rs"));
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::WindowFull`] if [`window`](Connection::window) requests are
    /// already on the wire: nothing is sent, receive a reply first.
    /// [`Error::TooLarge`] for a message over [`MAX_MESSAGE_LEN`](crate::MAX_MESSAGE_LEN)
    /// (nothing is sent either). The others end the connection (see
    /// [`Connection`]).
    pub fn send(&mut self, message: impl AsRef<[u8]>) -> Result<(), Error> {
        self.send_by(message.as_ref(), deadline_after(self.read_timeout))
    }

    /// Waits for the reply to the oldest request sent and not yet received,
    /// within [`Options::read_timeout`] from now.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] if the daemon answered that request with a failure
    /// status: the connection stays usable. [`Error::NothingOutstanding`] if
    /// no request is outstanding. The others end the connection (see
    /// [`Connection`]).
    pub fn recv(&mut self) -> Result<Vec<u8>, Error> {
        if self.slots.is_empty() {
            let addr = self.addr;
            return Err(match self.state {
                State::Open => Error::NothingOutstanding { addr },
                State::Draining | State::Ended => Error::Closed { addr },
            });
        }
        self.take(0, None)
    }

    /// Sends every message, keeping up to [`window`](Connection::window)
    /// requests in flight, and returns their outcomes in the same order:
    /// one result for each message.
    ///
    /// ```
    /// use gaspar_client::{Connection, Error, Options};
    ///
    /// # fn main() -> Result<(), Error> {
    /// # let addr = doc_server::gaspard();
    /// # /*
    /// let addr = "127.0.0.1:10123";
    /// # */
    /// let mut connection = Connection::open(addr, &Options::default())?;
    /// let jobs: Vec<String> = (0..1000).map(|i| format!("job {i}")).collect();
    /// let replies = connection.pipeline(&jobs);
    /// assert_eq!(replies.len(), 1000);
    /// for (job, reply) in jobs.iter().zip(replies) {
    ///     assert_eq!(reply?, job.as_bytes());
    /// }
    /// # Ok(())
    /// # }
    /// # include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/doc_server.rs"));
    /// ```
    ///
    /// Each result is what [`recv`](Connection::recv) would have returned
    /// for that request: [`Error::Failed`] for a failure status (the others
    /// go on), [`Error::TooLarge`] for a message too long to send. If an
    /// error ends the connection part way, the messages after it are not
    /// sent and their results are [`Error::Closed`]; the requests already
    /// sent get their replies as far as the daemon sent them, then the error
    /// (the first one) and [`Error::Closed`]. Each reply is waited for
    /// within [`Options::read_timeout`].
    ///
    /// Replies to requests sent earlier with [`send`](Connection::send) and
    /// not received yet are read along the way and kept, in order, for
    /// [`recv`](Connection::recv).
    pub fn pipeline<I>(&mut self, messages: I) -> Vec<Result<Vec<u8>, Error>>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let earlier = self.slots.len();
        let mut messages = messages.into_iter();
        let mut results = Vec::with_capacity(messages.size_hint().0);
        let mut more = true;
        loop {
            // Top up the window before waiting on the socket, many requests
            // to a write, but not while replies already read can be taken.
            let waiting = self.reader.buffer().is_empty() || self.in_flight == 0;
            if more && self.in_flight < self.window && waiting {
                while more && self.in_flight < self.window {
                    match messages.next() {
                        Some(message) => self.enqueue(message.as_ref()),
                        None => more = false,
                    }
                }
                self.flush();
            }
            if self.slots.len() > earlier {
                results.push(self.take(earlier, None));
            } else if more {
                // The window is full of requests sent before: read the
                // oldest reply, keep it, and make room.
                self.settle_next(deadline_after(self.read_timeout));
            } else {
                return results;
            }
        }
    }

    /// Says goodbye (the zero-length frame) and waits for the daemon to
    /// answer what is outstanding and close the connection cleanly, all
    /// within [`Options::read_timeout`].
    ///
    /// Replies not yet received are read and thrown away, failures
    /// included: receive them first to have them. A connection the daemon
    /// already closed while it was idle closes with `Ok`: nothing was lost.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if an earlier error had ended the connection;
    /// [`Error::Timeout`] if the daemon did not close within the read
    /// timeout; [`Error::Reset`] if it reset the connection;
    /// [`Error::Protocol`] if it sent more than the replies due.
    pub fn close(mut self) -> Result<(), Error> {
        if self.state != State::Open {
            return Err(Error::Closed { addr: self.addr });
        }
        match self.check_idle() {
            Err(Error::Closed { .. }) => return Ok(()),
            Err(other) => return Err(other),
            Ok(()) => {}
        }
        let deadline = deadline_after(self.read_timeout);
        self.reader.get_mut().deadline = deadline;
        let addr = self.addr;
        let error = |error: io::Error, stage| session_error(addr, error, stage);
        self.reader
            .get_mut()
            .write_all(&END_OF_REQUESTS)
            .map_err(|e| error(e, Stage::Send))?;
        while self.in_flight > 0 {
            match self.read_reply(deadline) {
                Ok(_) | Err(Error::Failed { .. }) => self.in_flight -= 1,
                Err(other) => return Err(other),
            }
        }
        match self.reader.read(&mut [0]) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Error::Protocol {
                addr,
                reason: "it sent bytes after the last reply".into(),
            }),
            Err(e) => Err(error(e, Stage::Reply)),
        }
    }

    /// Ends the connection: no more sending or reading.
    fn end(&mut self) {
        if self.state != State::Ended {
            let _ = self.reader.get_ref().stream.shutdown(Shutdown::Both);
            self.state = State::Ended;
        }
    }

    /// Ends the connection because of `error`, and returns it for the caller.
    fn fail(&mut self, error: Error) -> Error {
        self.end();
        error
    }

    /// Sending failed: the stream of requests may be cut mid-frame, so no
    /// more go out; the replies to those on the wire are still read.
    fn stop_sending(&mut self, error: Error) -> Error {
        if self.state == State::Open {
            self.state = State::Draining;
        }
        error
    }

    fn send_by(&mut self, message: &[u8], deadline: Deadline) -> Result<(), Error> {
        if self.state != State::Open {
            return Err(Error::Closed { addr: self.addr });
        }
        let header = header(message.len())?;
        if message.is_empty() {
            self.slots.push_back(Slot::Ready(Ok(Vec::new())));
            return Ok(());
        }
        if self.in_flight >= self.window {
            return Err(Error::WindowFull {
                addr: self.addr,
                window: self.window,
            });
        }
        self.check_idle()?;
        self.out.extend_from_slice(&header);
        self.write_frame(message, deadline)
            .map_err(|error| self.stop_sending(error))?;
        self.slots.push_back(Slot::Wire);
        self.in_flight += 1;
        Ok(())
    }

    /// [`Connection::pipeline`]'s send: gathers the request into `out`, or
    /// queues its outcome when it cannot be sent.
    fn enqueue(&mut self, message: &[u8]) {
        let ready = if self.state != State::Open {
            Err(Error::Closed { addr: self.addr })
        } else {
            match header(message.len()) {
                Err(too_large) => Err(too_large),
                Ok(_) if message.is_empty() => Ok(Vec::new()),
                Ok(header) => {
                    let sent = self.check_idle().and_then(|()| {
                        self.out.extend_from_slice(&header);
                        if message.len() <= BATCH {
                            self.out.extend_from_slice(message);
                            Ok(())
                        } else {
                            self.write_frame(message, deadline_after(self.read_timeout))
                                .map_err(|error| self.stop_sending(error))
                        }
                    });
                    match sent {
                        Ok(()) => {
                            self.slots.push_back(Slot::Wire);
                            self.in_flight += 1;
                            if self.out.len() >= BATCH {
                                self.flush();
                            }
                            return;
                        }
                        Err(error) => Err(error),
                    }
                }
            }
        };
        self.slots.push_back(Slot::Ready(ready));
    }

    /// Writes the requests gathered by [`Connection::pipeline`]. If that
    /// fails, no more are sent; whether the daemon answers those gathered
    /// shows when their replies are read.
    fn flush(&mut self) {
        if self.out.is_empty() || self.state != State::Open {
            self.out.clear();
            return;
        }
        let socket = self.reader.get_mut();
        socket.deadline = deadline_after(self.read_timeout);
        let written = socket.write_all(&self.out);
        self.out.clear();
        if written.is_err() {
            self.state = State::Draining;
        }
    }

    /// Writes the bytes gathered in `out` (which end with this message's
    /// header), then `message`: a small request leaves in one write, the
    /// rest of a large one from the caller's buffer.
    fn write_frame(&mut self, message: &[u8], deadline: Deadline) -> Result<(), Error> {
        let split = message.len().min(BATCH);
        self.out.extend_from_slice(&message[..split]);
        let socket = self.reader.get_mut();
        socket.deadline = deadline;
        let written = socket
            .write_all(&self.out)
            .and_then(|()| socket.write_all(&message[split..]));
        self.out.clear();
        written.map_err(|error| session_error(self.addr, error, Stage::Send))
    }

    /// Before sending on a connection with nothing in flight: has the
    /// daemon closed it meanwhile (an idle session, after its
    /// `--read-timeout`)? Then the request is not sent.
    fn check_idle(&mut self) -> Result<(), Error> {
        if self.in_flight > 0 || !self.out.is_empty() {
            return Ok(());
        }
        if !self.reader.buffer().is_empty() {
            return Err(self.fail(Error::Protocol {
                addr: self.addr,
                reason: "it sent bytes when no reply was due".into(),
            }));
        }
        let stream = &self.reader.get_ref().stream;
        let peeked = stream
            .set_nonblocking(true)
            .and_then(|()| stream.peek(&mut [0]));
        let restored = stream.set_nonblocking(false);
        let error = match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match restored {
                Ok(()) => return Ok(()),
                Err(error) => Error::Io {
                    addr: self.addr,
                    error,
                },
            },
            Ok(0) => Error::Closed { addr: self.addr },
            Ok(_) => Error::Protocol {
                addr: self.addr,
                reason: "it sent bytes when no reply was due".into(),
            },
            Err(e) => match session_error(self.addr, e, Stage::Send) {
                Error::Reset { addr } => Error::Closed { addr },
                other => other,
            },
        };
        Err(self.fail(error))
    }

    /// Reads the replies of every request on the wire up to the slot at
    /// `index`, in order, then takes that slot's outcome. `deadline`: one
    /// for them all, or `None` for [`Options::read_timeout`] each.
    fn take(&mut self, index: usize, deadline: Option<Deadline>) -> Result<Vec<u8>, Error> {
        while self
            .slots
            .iter()
            .take(index + 1)
            .any(|slot| matches!(slot, Slot::Wire))
        {
            self.settle_next(deadline.unwrap_or_else(|| deadline_after(self.read_timeout)));
        }
        match self.slots.remove(index) {
            Some(Slot::Ready(result)) => result,
            Some(Slot::Wire) | None => unreachable!("settled above"),
        }
    }

    /// Reads the reply to the oldest request on the wire into its slot.
    fn settle_next(&mut self, deadline: Deadline) {
        let Some(next) = self
            .slots
            .iter()
            .position(|slot| matches!(slot, Slot::Wire))
        else {
            return;
        };
        let result = if self.state == State::Ended {
            Err(Error::Closed { addr: self.addr })
        } else {
            self.read_reply(deadline).map_err(|error| match error {
                Error::Failed { .. } => error,
                other => self.fail(other),
            })
        };
        self.slots[next] = Slot::Ready(result);
        self.in_flight -= 1;
    }

    /// Reads one reply: `Ok` with the payload for status 0,
    /// [`Error::Failed`] for any other status.
    fn read_reply(&mut self, deadline: Deadline) -> Result<Vec<u8>, Error> {
        let addr = self.addr;
        let error = |error: io::Error| session_error(addr, error, Stage::Reply);
        self.reader.get_mut().deadline = deadline;
        let mut head = [0; REPLY_HEADER_LEN];
        self.reader.read_exact(&mut head).map_err(error)?;
        // Not gaspar-protocol's ReplyDecoder, which hands out the payload
        // from the input buffer: a large payload is read straight into its
        // Vec here, without going through the BufReader's buffer.
        let (status, len) = parse_reply_header(&head);
        // Grown as the bytes arrive, rather than trusting the length at once.
        let mut payload = Vec::with_capacity((len as usize).min(BATCH));
        (&mut self.reader)
            .take(u64::from(len))
            .read_to_end(&mut payload)
            .map_err(error)?;
        if payload.len() as u64 != u64::from(len) {
            return Err(Error::Closed { addr });
        }
        match status {
            Status::Ok => Ok(payload),
            status => Err(Error::Failed {
                addr,
                status,
                message: String::from_utf8(payload)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            }),
        }
    }
}

/// The error an I/O failure on an open session stands for.
fn session_error(addr: SocketAddr, error: io::Error, stage: Stage) -> Error {
    match error.kind() {
        io::ErrorKind::ConnectionReset => Error::Reset { addr },
        // The daemon closed the connection (and reset what came after).
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected
        | io::ErrorKind::ConnectionAborted => Error::Closed { addr },
        // A socket timeout is EAGAIN on Unix, WSAETIMEDOUT on Windows.
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout { addr, stage },
        _ => Error::Io { addr, error },
    }
}

/// The socket, with the deadline of the current call re-armed as its
/// timeout before each read and write.
struct Socket {
    stream: TcpStream,
    deadline: Deadline,
    /// Whether a read (write) timeout is set on the socket, to clear when a
    /// call has no deadline.
    read_armed: bool,
    write_armed: bool,
}

impl Socket {
    /// `write_all` within the deadline. (`write` is `send(MSG_NOSIGNAL)`, so
    /// a reset connection cannot raise SIGPIPE.)
    fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            arm(
                &self.stream,
                self.deadline,
                &mut self.write_armed,
                TcpStream::set_write_timeout,
            )?;
            match (&self.stream).write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        arm(
            &self.stream,
            self.deadline,
            &mut self.read_armed,
            TcpStream::set_read_timeout,
        )?;
        (&self.stream).read(buf)
    }
}

/// Sets the socket timeout `set` to what is left of `deadline`.
fn arm(
    stream: &TcpStream,
    deadline: Deadline,
    armed: &mut bool,
    set: fn(&TcpStream, Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    match deadline {
        None if !*armed => Ok(()),
        None => {
            set(stream, None)?;
            *armed = false;
            Ok(())
        }
        Some(_) => {
            set(stream, time_left(deadline)?)?;
            *armed = true;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    //! The extension's edges, against in-process servers that misbehave on
    //! purpose. tests/daemon.rs does the rest against the real daemon.

    use super::*;
    use std::net::TcpListener;
    use std::thread::JoinHandle;
    use std::time::Instant;

    /// The server's side of one connection.
    struct Peer {
        stream: TcpStream,
    }

    impl Peer {
        /// Reads the preamble and answers with `window`.
        fn accept(stream: TcpStream, window: u32) -> Peer {
            // Replies leave at once, not held back until the last is acked.
            stream.set_nodelay(true).unwrap();
            let mut peer = Peer { stream };
            let mut preamble = [0; 8];
            peer.stream.read_exact(&mut preamble).unwrap();
            assert_eq!(preamble, PREAMBLE);
            peer.stream
                .write_all(&gaspar_protocol::handshake(window))
                .unwrap();
            peer
        }

        /// The next request; `None` for the goodbye frame or end of stream.
        fn request(&mut self) -> Option<Vec<u8>> {
            let mut header = [0; 4];
            self.stream.read_exact(&mut header).ok()?;
            let mut body = vec![0; u32::from_be_bytes(header) as usize];
            if body.is_empty() {
                return None;
            }
            self.stream.read_exact(&mut body).unwrap();
            Some(body)
        }

        fn reply(&mut self, status: u8, payload: &[u8]) {
            let len = u32::try_from(payload.len()).unwrap();
            let mut reply = gaspar_protocol::reply_header(Status::from_code(status), len).to_vec();
            reply.extend_from_slice(payload);
            self.stream.write_all(&reply).unwrap();
        }

        /// Echoes every request until the goodbye; returns how many.
        fn echo_all(&mut self) -> usize {
            let mut count = 0;
            while let Some(request) = self.request() {
                self.reply(0, &request);
                count += 1;
            }
            count
        }
    }

    /// A server for one connection, running `serve` on it.
    fn server<T: Send + 'static>(
        serve: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (SocketAddr, JoinHandle<T>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || serve(listener.accept().unwrap().0));
        (addr, thread)
    }

    /// A GSP2 server for one connection with `window`, running `serve`.
    fn gsp2<T: Send + 'static>(
        window: u32,
        serve: impl FnOnce(Peer) -> T + Send + 'static,
    ) -> (SocketAddr, JoinHandle<T>) {
        server(move |stream| serve(Peer::accept(stream, window)))
    }

    fn millis(ms: u64) -> Options {
        Options {
            read_timeout: Some(Duration::from_millis(ms)),
            connect_timeout: Some(Duration::from_millis(ms)),
        }
    }

    fn open(addr: SocketAddr) -> Connection {
        Connection::open(addr, &Options::default()).unwrap()
    }

    #[test]
    fn the_preamble_and_the_window() {
        let (addr, thread) = gsp2(7, |mut peer| peer.echo_all());
        let mut connection = open(addr);
        assert_eq!(connection.window(), 7);
        assert_eq!(connection.addr(), addr);
        assert_eq!(connection.request("hi").unwrap(), b"hi");
        assert_eq!(connection.outstanding(), 0);
        connection.close().unwrap();
        assert_eq!(thread.join().unwrap(), 1);
    }

    #[test]
    fn a_server_that_resets_or_closes_on_the_preamble_does_not_support_it() {
        // Closed with the preamble unread: the kernel sends a reset.
        let (addr, thread) = server(|stream| {
            let mut preamble = [0; 8];
            while stream.peek(&mut preamble).unwrap() < 8 {}
        });
        let error = Connection::open(addr, &Options::default()).unwrap_err();
        assert!(
            matches!(error, Error::NotSupported { addr: a } if a == addr),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{addr} does not support the persistent extension (GSP2): send one request per connection")
        );
        assert_eq!(io::Error::from(error).kind(), io::ErrorKind::Unsupported);
        thread.join().unwrap();

        // Read, then closed cleanly.
        let (addr, thread) = server(|mut stream| {
            stream.read_exact(&mut [0; 8]).unwrap();
        });
        let error = Connection::open(addr, &Options::default()).unwrap_err();
        assert!(matches!(error, Error::NotSupported { .. }), "{error:?}");
        thread.join().unwrap();

        // Something else entirely.
        let (addr, thread) = server(|mut stream| {
            stream.read_exact(&mut [0; 8]).unwrap();
            stream.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
        });
        let error = Connection::open(addr, &Options::default()).unwrap_err();
        assert!(matches!(error, Error::NotSupported { .. }), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn a_server_that_never_answers_the_preamble_times_out_in_the_handshake() {
        // gaspar reads the preamble as the start of a 4 GiB request.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let error = Connection::open(silent.local_addr().unwrap(), &millis(200)).unwrap_err();
        assert!(
            matches!(
                error,
                Error::Timeout {
                    stage: Stage::Handshake,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(error.to_string().starts_with("timed out waiting for"));
    }

    #[test]
    fn a_window_of_zero_is_a_protocol_error() {
        let (addr, thread) = gsp2(0, |_| ());
        let error = Connection::open(addr, &Options::default()).unwrap_err();
        assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn send_past_the_window_is_refused_without_sending() {
        let (addr, thread) = gsp2(2, |mut peer| peer.echo_all());
        let mut connection = open(addr);
        connection.send("1").unwrap();
        connection.send("2").unwrap();
        let error = connection.send("3").unwrap_err();
        assert!(
            matches!(error, Error::WindowFull { window: 2, .. }),
            "{error:?}"
        );
        assert!(!connection.is_closed());
        assert_eq!(connection.recv().unwrap(), b"1");
        connection.send("3").unwrap();
        assert_eq!(connection.recv().unwrap(), b"2");
        assert_eq!(connection.recv().unwrap(), b"3");
        let error = connection.recv().unwrap_err();
        assert!(
            matches!(error, Error::NothingOutstanding { .. }),
            "{error:?}"
        );
        connection.close().unwrap();
        assert_eq!(thread.join().unwrap(), 3);
    }

    #[test]
    fn empty_messages_are_answered_in_place_and_never_sent() {
        let (addr, thread) = gsp2(1, |mut peer| {
            let mut seen = Vec::new();
            while let Some(request) = peer.request() {
                peer.reply(0, &request);
                seen.push(request);
            }
            seen
        });
        let mut connection = open(addr);
        assert_eq!(connection.request("").unwrap(), b"");
        connection.send("a").unwrap();
        // Not on the wire: the window of 1 does not refuse them.
        connection.send("").unwrap();
        connection.send(b"").unwrap();
        assert_eq!(connection.outstanding(), 3);
        assert_eq!(connection.recv().unwrap(), b"a");
        assert_eq!(connection.recv().unwrap(), b"");
        assert_eq!(connection.recv().unwrap(), b"");
        let replies = connection.pipeline(["x", "", "y"]);
        let replies: Vec<_> = replies.into_iter().map(Result::unwrap).collect();
        assert_eq!(replies, [&b"x"[..], b"", b"y"]);
        connection.close().unwrap();
        assert_eq!(thread.join().unwrap(), [&b"a"[..], b"x", b"y"]);
    }

    #[test]
    fn request_and_pipeline_keep_earlier_replies_for_recv() {
        let (addr, thread) = gsp2(2, |mut peer| peer.echo_all());
        let mut connection = open(addr);
        connection.send("early 1").unwrap();
        connection.send("early 2").unwrap();
        // The window is full of earlier requests: request makes room.
        assert_eq!(connection.request("now").unwrap(), b"now");
        assert_eq!(connection.outstanding(), 2);
        let replies = connection.pipeline(["p1", "p2", "p3"]);
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0].as_deref().unwrap(), b"p1");
        assert_eq!(replies[2].as_deref().unwrap(), b"p3");
        connection.send("late").unwrap();
        assert_eq!(connection.recv().unwrap(), b"early 1");
        assert_eq!(connection.recv().unwrap(), b"early 2");
        assert_eq!(connection.recv().unwrap(), b"late");
        connection.close().unwrap();
        assert_eq!(thread.join().unwrap(), 7);
    }

    #[test]
    fn a_failure_status_is_an_error_for_that_request_alone() {
        let (addr, thread) = gsp2(8, |mut peer| {
            peer.request().unwrap();
            peer.reply(1, b"line one\nline two");
            peer.request().unwrap();
            peer.reply(9, b"");
            peer.request().unwrap();
            peer.reply(4, b"its worker was killed by SIGSEGV");
            peer.echo_all()
        });
        let mut connection = open(addr);
        let error = connection.request("a").unwrap_err();
        assert!(
            matches!(&error, Error::Failed { status: Status::HandlerError, message, .. } if message == "line one\nline two"),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{addr}: the request failed: handler error: line one\\nline two")
        );
        let error = connection.request("b").unwrap_err();
        assert!(
            matches!(
                error,
                Error::Failed {
                    status: Status::Unknown(9),
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{addr}: the request failed: unknown status 9")
        );
        let error = connection.request("c").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("{addr}: the request failed: worker lost: its worker was killed by SIGSEGV")
        );
        assert_eq!(connection.request("still here").unwrap(), b"still here");
        connection.close().unwrap();
        assert_eq!(thread.join().unwrap(), 1);
    }

    #[test]
    fn a_timeout_ends_the_connection() {
        let (addr, thread) = gsp2(8, |mut peer| {
            peer.request().unwrap();
            peer.request().unwrap();
            std::thread::sleep(Duration::from_millis(1000));
        });
        let mut connection = Connection::open(addr, &millis(200)).unwrap();
        connection.send("slow").unwrap();
        connection.send("slower").unwrap();
        let started = Instant::now();
        let error = connection.recv().unwrap_err();
        assert!(
            matches!(
                error,
                Error::Timeout {
                    stage: Stage::Reply,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(connection.is_closed());
        // The other outstanding request, and every later call: closed.
        assert!(matches!(connection.recv(), Err(Error::Closed { .. })));
        assert!(matches!(connection.recv(), Err(Error::Closed { .. })));
        assert!(matches!(connection.send("x"), Err(Error::Closed { .. })));
        let error = connection.request("x").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("the persistent connection to {addr} is closed: the daemon closed it, or an earlier error ended it")
        );
        assert!(matches!(connection.close(), Err(Error::Closed { .. })));
        thread.join().unwrap();
    }

    #[test]
    fn a_connection_the_server_closed_while_idle_is_noticed_before_sending() {
        let (addr, thread) = gsp2(8, |mut peer| {
            let request = peer.request().unwrap();
            peer.reply(0, &request);
            // Idle: the server closes, as gaspard does after --read-timeout.
        });
        let mut connection = open(addr);
        assert_eq!(connection.request("one").unwrap(), b"one");
        thread.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let error = connection.request("two").unwrap_err();
        assert!(
            matches!(error, Error::Closed { addr: a } if a == addr),
            "{error:?}"
        );
        assert!(connection.is_closed());
    }

    #[test]
    fn bytes_when_no_reply_is_due_break_the_protocol() {
        let (addr, thread) = gsp2(8, |mut peer| {
            peer.stream.write_all(b"unasked").unwrap();
            peer.request()
        });
        let mut connection = open(addr);
        std::thread::sleep(Duration::from_millis(50));
        let error = connection.send("x").unwrap_err();
        assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
        assert!(error.to_string().contains("when no reply was due"));
        assert!(connection.is_closed());
        drop(connection);
        assert_eq!(thread.join().unwrap(), None);
    }

    #[test]
    fn a_reset_part_way_through_a_pipeline() {
        let (addr, thread) = gsp2(4, |mut peer| {
            for _ in 0..3 {
                let request = peer.request().unwrap();
                peer.reply(0, &request);
            }
            socket_reset(peer.stream);
        });
        let mut connection = open(addr);
        let messages: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let results = connection.pipeline(&messages);
        assert_eq!(results.len(), 10);
        for (i, result) in results.iter().enumerate().take(3) {
            assert_eq!(result.as_deref().unwrap(), messages[i].as_bytes());
        }
        assert!(
            matches!(results[3], Err(Error::Reset { .. })),
            "{:?}",
            results[3]
        );
        for result in &results[4..] {
            assert!(matches!(result, Err(Error::Closed { .. })), "{result:?}");
        }
        assert!(connection.is_closed());
        thread.join().unwrap();
    }

    /// Closes once unread bytes are waiting, which makes the kernel reset;
    /// after a pause, so that the client has read the replies sent before.
    /// (Linux may drop received bytes when a reset arrives during a send.)
    fn socket_reset(stream: TcpStream) {
        assert!(stream.peek(&mut [0]).unwrap() > 0);
        std::thread::sleep(Duration::from_millis(100));
    }

    #[test]
    fn after_a_failed_send_the_replies_already_sent_are_still_received() {
        let (addr, thread) = gsp2(8, |mut peer| {
            for _ in 0..2 {
                let request = peer.request().unwrap();
                peer.reply(0, &request);
            }
            assert!(peer.stream.peek(&mut [0]).unwrap() > 0);
            // Closed with "c" unread: a reset.
        });
        let mut connection = open(addr);
        for message in ["a", "b", "c"] {
            connection.send(message).unwrap();
        }
        thread.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let error = connection.send("d").unwrap_err();
        assert!(matches!(error, Error::Reset { .. }), "{error:?}");
        assert!(connection.is_closed());
        assert!(matches!(connection.send("e"), Err(Error::Closed { .. })));
        assert_eq!(connection.outstanding(), 3);
        assert_eq!(connection.recv().unwrap(), b"a");
        assert_eq!(connection.recv().unwrap(), b"b");
        let error = connection.recv().unwrap_err();
        assert!(matches!(error, Error::Closed { .. }), "{error:?}");
        assert!(matches!(connection.recv(), Err(Error::Closed { .. })));
    }

    #[test]
    fn large_requests_and_replies_in_a_pipeline() {
        let (addr, thread) = gsp2(3, |mut peer| peer.echo_all());
        let mut connection = open(addr);
        let messages: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let len = [10, 3 << 20, 64 * 1024, 64 * 1024 + 1][i % 4];
                (0..len).map(|j| (j * 7 + i) as u8).collect()
            })
            .collect();
        let results = connection.pipeline(&messages);
        for (message, result) in messages.iter().zip(results) {
            assert!(result.unwrap() == *message);
        }
        connection.close().unwrap();
        assert_eq!(thread.join().unwrap(), 8);
    }

    #[test]
    fn close_reads_what_is_outstanding_and_waits_for_the_clean_close() {
        let (addr, thread) = gsp2(8, |mut peer| {
            let mut answered = 0;
            while let Some(request) = peer.request() {
                std::thread::sleep(Duration::from_millis(20));
                peer.reply(u8::from(request == b"fail"), b"reply");
                answered += 1;
            }
            answered
        });
        let mut connection = open(addr);
        for message in ["a", "fail", "c"] {
            connection.send(message).unwrap();
        }
        connection.close().unwrap();
        assert_eq!(thread.join().unwrap(), 3);

        // Bytes after the last reply.
        let (addr, thread) = gsp2(8, |mut peer| {
            assert!(peer.request().is_none());
            peer.stream.write_all(b"extra").unwrap();
        });
        let error = open(addr).close().unwrap_err();
        assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
        thread.join().unwrap();

        // A server that never closes.
        let (addr, thread) = gsp2(8, |mut peer| {
            assert!(peer.request().is_none());
            std::thread::sleep(Duration::from_millis(1000));
        });
        let error = Connection::open(addr, &millis(200))
            .unwrap()
            .close()
            .unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn dropping_does_not_wait() {
        let (addr, thread) = gsp2(8, |mut peer| {
            peer.request();
            std::thread::sleep(Duration::from_millis(500));
        });
        let mut connection = open(addr);
        connection.send("never answered").unwrap();
        let started = Instant::now();
        drop(connection);
        assert!(started.elapsed() < Duration::from_millis(100));
        thread.join().unwrap();
    }

    #[test]
    fn close_after_the_server_closed_an_idle_connection_is_ok() {
        let (addr, thread) = gsp2(8, |mut peer| {
            let request = peer.request().unwrap();
            peer.reply(0, &request);
        });
        let mut connection = open(addr);
        assert_eq!(connection.request("last").unwrap(), b"last");
        thread.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        connection.close().unwrap();
    }

    #[test]
    fn a_connection_can_move_to_another_thread() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<Connection>();
        send_and_sync::<Error>();
    }

    #[test]
    fn debug_shows_the_state() {
        let (addr, thread) = gsp2(5, |mut peer| peer.echo_all());
        let mut connection = open(addr);
        connection.send("x").unwrap();
        let debug = format!("{connection:?}");
        assert!(debug.contains("window: 5"), "{debug}");
        assert!(debug.contains("outstanding: 1"), "{debug}");
        connection.close().unwrap();
        thread.join().unwrap();
    }
}
