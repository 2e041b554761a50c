//! A client for [gaspard] and for the Python daemon gaspar it rebuilds: send
//! one request, get the reply bytes back.
//!
//! The protocol is one request per TCP connection: a 4-byte unsigned
//! big-endian length, then that many bytes. The reply is raw bytes ended by a
//! clean close; a request that failed ends with a connection reset instead
//! (see `docs/protocol.md`). This crate speaks it with `std::net` alone; its
//! one dependency, gaspar-protocol (the wire format it shares with gaspard),
//! has no dependencies and does no I/O. (The `gaspar` command built from it
//! needs clap; depend on this crate with `default-features = false` to leave
//! it out.)
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let addr = doc_server::gaspard();
//! # /*
//! let reply = gaspar_client::request("127.0.0.1:10123", "hello")?;
//! # */
//! # let reply = gaspar_client::request(addr, "hello")?;
//! assert_eq!(reply, b"hello");
//! # Ok(())
//! # }
//! # include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/doc_server.rs"));
//! ```
//!
//! Every failure says which of the protocol's outcomes it was, so that a
//! caller can tell a request the daemon refused to complete from a daemon that
//! is slow or not there at all:
//!
//! ```no_run
//! use gaspar_client::{request_with, Error, Options};
//! use std::time::Duration;
//!
//! let options = Options {
//!     read_timeout: Some(Duration::from_secs(5)),
//!     ..Options::default()
//! };
//! match request_with("127.0.0.1:10123", b"\x00\x01binary\xff", &options) {
//!     Ok(reply) => println!("{} bytes", reply.len()),
//!     // The handler returned an error, its worker crashed, or the request
//!     // ran past the daemon's --timeout: the daemon's log says which.
//!     Err(Error::Reset { .. }) => eprintln!("the request failed"),
//!     Err(Error::Timeout { .. }) => eprintln!("no reply within 5 s"),
//!     Err(Error::Refused { .. }) => eprintln!("is gaspard running?"),
//!     Err(other) => eprintln!("{other}"),
//! }
//! ```
//!
//! A client that sends many requests can keep one [`Connection`] open
//! instead, and pipeline them: gaspard's opt-in persistent extension (`GSP2`,
//! "Extensions" in `docs/protocol.md`), where each reply comes back in order
//! with a status saying how the request ended. [`Connection::open`] returns
//! [`Error::NotSupported`] from a server without the extension (gaspar, an
//! older gaspard), so a caller can fall back to [`request_with`].
//!
//! [gaspard]: https://example.invalid/gaspard

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod connection;

pub use connection::{Connection, Status};

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The port gaspard (and gaspar's examples) listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 10123;

/// Bytes in a request's length header.
pub const HEADER_LEN: usize = gaspar_protocol::HEADER_LEN;

/// The largest message a request can carry: 4 GiB - 2. The all-ones length
/// (4 GiB - 1) is not a request's: it announces the persistent extension,
/// and gaspard resets it as a bad preamble. The daemon's own limit
/// (`--max-request-size`, 64 MiB by default) is usually lower; a request
/// over it is reset.
pub const MAX_MESSAGE_LEN: usize = gaspar_protocol::MAX_PAYLOAD as usize;

/// [`Options::connect_timeout`] unless set otherwise: 10 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// [`Options::read_timeout`] unless set otherwise: 60 seconds.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The payload bytes sent in the same `send` as the header, so that a small
/// request leaves as one segment and a large one is not copied.
const FIRST_WRITE: usize = 64 * 1024;

/// Frames a message as a request: its length as 4 bytes, unsigned and
/// big-endian, then the message. The same as gaspar's `client.pack`.
///
/// Useful to talk to the daemon through other means, such as an event loop's
/// own sockets or `nc`.
///
/// ```
/// assert_eq!(gaspar_client::pack("hello"), b"\x00\x00\x00\x05hello");
/// assert_eq!(gaspar_client::pack([0xff; 300])[..4], [0, 0, 1, 0x2c]);
/// assert_eq!(gaspar_client::pack(b""), [0, 0, 0, 0]);
/// ```
///
/// # Panics
///
/// If the message is longer than [`MAX_MESSAGE_LEN`], which no request can
/// carry. [`request`] returns [`Error::TooLarge`] instead.
pub fn pack(message: impl AsRef<[u8]>) -> Vec<u8> {
    let message = message.as_ref();
    let header = header(message.len()).unwrap_or_else(|e| panic!("{e}"));
    let mut frame = Vec::with_capacity(HEADER_LEN + message.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(message);
    frame
}

/// The length header for a message of `len` bytes, checked here for every
/// way a request is sent, one-shot or pipelined.
fn header(len: usize) -> Result<[u8; HEADER_LEN], Error> {
    u32::try_from(len)
        .ok()
        .filter(|&len| u64::from(len) <= gaspar_protocol::MAX_PAYLOAD)
        .map(u32::to_be_bytes)
        .ok_or(Error::TooLarge { len })
}

/// How long [`request_with`] (and a [`Connection`]) waits. `None` waits as
/// long as it takes.
///
/// ```
/// use gaspar_client::Options;
/// use std::time::Duration;
///
/// let patient = Options {
///     read_timeout: Some(Duration::from_secs(600)),
///     ..Options::default()
/// };
/// assert_eq!(patient.connect_timeout, Some(Duration::from_secs(10)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// How long to wait for the TCP connection to be established, for each
    /// address the name resolves to. Default: [`DEFAULT_CONNECT_TIMEOUT`].
    /// [`Connection::open`] also waits as long for the server's answer to
    /// the extension's preamble.
    pub connect_timeout: Option<Duration>,
    /// How long the request may take once connected: sending it, then
    /// receiving the whole reply. This is a deadline for the exchange, not a
    /// limit on each read, so it bounds how long the call blocks. It includes
    /// the time the request waits in the daemon's queue for a free worker.
    /// Default: [`DEFAULT_READ_TIMEOUT`].
    ///
    /// When it passes, the client closes the connection. gaspard cannot tell
    /// that close from a client that half-closed to wait for its reply, so
    /// the request still runs and its reply is thrown away when writing it
    /// fails.
    ///
    /// On a [`Connection`] it bounds each call instead: sending one request,
    /// waiting for one reply, one whole [`Connection::request`].
    pub read_timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            read_timeout: Some(DEFAULT_READ_TIMEOUT),
        }
    }
}

/// What the client was doing when a timeout struck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Establishing the connection.
    Connect,
    /// Sending the request: the daemon was not reading it.
    Send,
    /// Waiting for the reply, or for the rest of it.
    Reply,
    /// Waiting for the server to accept the persistent extension
    /// ([`Connection::open`]), within [`Options::connect_timeout`].
    Handshake,
}

/// Why a request got no reply.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The daemon reset the connection: the request failed. The handler
    /// returned an error or panicked, its worker crashed, it ran past the
    /// daemon's `--timeout`, the request was over `--max-request-size`, or the
    /// queue was full. The reset carries no reason; the daemon's log has it.
    /// Any reply bytes that arrived before the reset are discarded.
    ///
    /// On a [`Connection`], where a failed request is [`Error::Failed`]
    /// instead, a reset ends the whole session: a request over
    /// `--max-request-size`, or the daemon stopping before it answered.
    Reset {
        /// The daemon's address.
        addr: SocketAddr,
    },
    /// No reply in time: [`Options::connect_timeout`] or
    /// [`Options::read_timeout`] passed (or the operating system gave up).
    Timeout {
        /// The daemon's address.
        addr: SocketAddr,
        /// What the client was waiting for.
        stage: Stage,
    },
    /// The connection was refused: nothing listens on that address (on any
    /// of the addresses the name resolves to).
    Refused {
        /// The (last) address tried.
        addr: SocketAddr,
    },
    /// The address could not be parsed or resolved (it must be `host:port`).
    Resolve(io::Error),
    /// The message is longer than [`MAX_MESSAGE_LEN`]; nothing was sent.
    TooLarge {
        /// The message's length.
        len: usize,
    },
    /// Any other I/O error, such as an unreachable network.
    Io {
        /// The daemon's address.
        addr: SocketAddr,
        /// What the operating system said.
        error: io::Error,
    },
    /// [`Connection::open`]: the server does not speak the persistent
    /// extension. It reset or closed the connection on the preamble (gaspar,
    /// or a gaspard without the extension), or answered something else.
    /// Send one request per connection instead, with [`request_with`].
    NotSupported {
        /// The server's address.
        addr: SocketAddr,
    },
    /// A request on a [`Connection`] failed, and the daemon said how: the
    /// handler returned an error, the request ran past the daemon's
    /// `--timeout`, the daemon was overloaded, or its worker died. Only this
    /// request failed: the connection stays usable.
    Failed {
        /// The daemon's address.
        addr: SocketAddr,
        /// How the request failed.
        status: Status,
        /// The daemon's message: the handler's own error message for
        /// [`Status::HandlerError`], gaspard's for the others.
        message: String,
    },
    /// The [`Connection`] is closed: the daemon closed it (gaspard closes a
    /// session idle for its `--read-timeout`, and one it is stopping once
    /// all it has read is answered), or an earlier error on it (a timeout, a
    /// reset) ended it. No reply will come on it; open a new one.
    Closed {
        /// The daemon's address.
        addr: SocketAddr,
    },
    /// [`Connection::send`] with [`Connection::window`] requests already on
    /// the wire: receive a reply first. Nothing was sent; the connection is
    /// unchanged.
    WindowFull {
        /// The daemon's address.
        addr: SocketAddr,
        /// The window, the most requests the daemon takes at a time.
        window: usize,
    },
    /// [`Connection::recv`] with no request outstanding: no reply will come.
    /// The connection is unchanged.
    NothingOutstanding {
        /// The daemon's address.
        addr: SocketAddr,
    },
    /// The server broke the persistent extension's protocol (bytes when no
    /// reply was due, a window of 0). The connection is closed.
    Protocol {
        /// The server's address.
        addr: SocketAddr,
        /// What it did.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Reset { addr } => write!(
                f,
                "{addr} reset the connection: the request failed (the daemon's log says why)"
            ),
            Error::Timeout { addr, stage } => match stage {
                Stage::Connect => write!(f, "timed out connecting to {addr}"),
                Stage::Send => write!(f, "timed out sending the request to {addr}"),
                Stage::Reply => write!(f, "timed out waiting for the reply from {addr}"),
                Stage::Handshake => write!(
                    f,
                    "timed out waiting for {addr} to accept the persistent extension"
                ),
            },
            Error::Refused { addr } => write!(
                f,
                "{addr} refused the connection: nothing is listening there"
            ),
            Error::Resolve(error) => write!(f, "cannot resolve the address: {error}"),
            Error::TooLarge { len } => write!(
                f,
                "a message of {len} bytes is over the protocol's limit of {MAX_MESSAGE_LEN} bytes"
            ),
            Error::Io { addr, error } => write!(f, "{addr}: {error}"),
            Error::NotSupported { addr } => write!(
                f,
                "{addr} does not support the persistent extension (GSP2): send one request per connection"
            ),
            Error::Failed {
                addr,
                status,
                message,
            } => {
                write!(f, "{addr}: the request failed: {status}")?;
                if !message.is_empty() {
                    f.write_str(": ")?;
                    // One line, whatever the message holds.
                    for c in message.chars() {
                        if c.is_control() {
                            write!(f, "{}", c.escape_default())?;
                        } else {
                            write!(f, "{c}")?;
                        }
                    }
                }
                Ok(())
            }
            Error::Closed { addr } => write!(
                f,
                "the persistent connection to {addr} is closed: the daemon closed it, or an earlier error ended it"
            ),
            Error::WindowFull { addr, window } => write!(
                f,
                "{window} requests are already outstanding to {addr}, its whole window: receive a reply first"
            ),
            Error::NothingOutstanding { addr } => write!(
                f,
                "no request is outstanding to {addr}: there is no reply to receive"
            ),
            Error::Protocol { addr, reason } => {
                write!(f, "{addr} broke the persistent extension's protocol: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// For code that deals in `io::Error`: the kind says which outcome it was
/// (`ConnectionReset`, `TimedOut`, `ConnectionRefused`, `InvalidInput`;
/// for [`Connection`]'s: `Unsupported`, `Other` for a failed request,
/// `NotConnected` once closed, `InvalidData` for a protocol violation).
impl From<Error> for io::Error {
    fn from(error: Error) -> io::Error {
        let kind = match &error {
            Error::Reset { .. } => io::ErrorKind::ConnectionReset,
            Error::Timeout { .. } => io::ErrorKind::TimedOut,
            Error::Refused { .. } => io::ErrorKind::ConnectionRefused,
            Error::TooLarge { .. } => io::ErrorKind::InvalidInput,
            Error::Resolve(e) | Error::Io { error: e, .. } => e.kind(),
            Error::NotSupported { .. } => io::ErrorKind::Unsupported,
            Error::Failed { .. } | Error::WindowFull { .. } | Error::NothingOutstanding { .. } => {
                io::ErrorKind::Other
            }
            Error::Closed { .. } => io::ErrorKind::NotConnected,
            Error::Protocol { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, error)
    }
}

/// Sends `message` to the daemon at `addr` and returns the reply, with the
/// default [`Options`]: what gaspar's `client.request("host:port", message)`
/// does.
///
/// `addr` is anything [`ToSocketAddrs`] takes: `"127.0.0.1:10123"`,
/// `"localhost:10123"`, a `SocketAddr`, `("localhost", 10123)`. Each address
/// a name resolves to is tried in turn.
///
/// The reply may be empty: a handler may return nothing, and a message of
/// length zero is closed without a reply (without calling the handler).
///
/// ```
/// # fn main() -> Result<(), gaspar_client::Error> {
/// # let addr = doc_server::gaspard();
/// # /*
/// let addr = "127.0.0.1:10123";
/// # */
/// let reply: Vec<u8> = gaspar_client::request(addr, [0xde, 0xad, 0xbe, 0xef])?;
/// # assert_eq!(reply, [0xde, 0xad, 0xbe, 0xef]);
/// # Ok(())
/// # }
/// # include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/doc_server.rs"));
/// ```
///
/// # Errors
///
/// [`Error::Reset`] if the request failed, [`Error::Timeout`] after
/// [`DEFAULT_CONNECT_TIMEOUT`] or [`DEFAULT_READ_TIMEOUT`], [`Error::Refused`]
/// if nothing listens there; see [`Error`] for the rest.
pub fn request(addr: impl ToSocketAddrs, message: impl AsRef<[u8]>) -> Result<Vec<u8>, Error> {
    request_with(addr, message, &Options::default())
}

/// [`request`] with other timeouts.
///
/// ```
/// use gaspar_client::{request_with, Error, Options, Stage};
/// use std::time::Duration;
///
/// # fn main() -> std::io::Result<()> {
/// // A server that accepts the connection and never answers.
/// let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let options = Options {
///     read_timeout: Some(Duration::from_millis(100)),
///     ..Options::default()
/// };
/// let result = request_with(silent.local_addr()?, "anyone there?", &options);
/// assert!(matches!(result, Err(Error::Timeout { stage: Stage::Reply, .. })));
/// # Ok(())
/// # }
/// ```
///
/// A zero timeout times out at once; `None` waits as long as it takes.
///
/// # Errors
///
/// As [`request`].
pub fn request_with(
    addr: impl ToSocketAddrs,
    message: impl AsRef<[u8]>,
    options: &Options,
) -> Result<Vec<u8>, Error> {
    let message = message.as_ref();
    let header = header(message.len())?;
    let (stream, addr) = connect(addr, options.connect_timeout)?;
    let deadline = deadline_after(options.read_timeout);
    let mut exchange = Exchange {
        stream: &stream,
        addr,
        deadline,
    };
    exchange.send(&header, message)?;
    exchange.receive()
}

/// Connects to the first address that accepts.
fn connect(
    addr: impl ToSocketAddrs,
    timeout: Option<Duration>,
) -> Result<(TcpStream, SocketAddr), Error> {
    let mut last = None;
    for addr in addr.to_socket_addrs().map_err(Error::Resolve)? {
        let attempt = match timeout {
            Some(timeout) if timeout.is_zero() => Err(io::ErrorKind::TimedOut.into()),
            Some(timeout) => TcpStream::connect_timeout(&addr, timeout),
            None => TcpStream::connect(addr),
        };
        match attempt {
            Ok(stream) => return Ok((stream, addr)),
            Err(error) => {
                last = Some(match error.kind() {
                    io::ErrorKind::ConnectionRefused => Error::Refused { addr },
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout {
                        addr,
                        stage: Stage::Connect,
                    },
                    _ => Error::Io { addr, error },
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::Resolve(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the name resolved to no address",
        ))
    }))
}

/// When a wait must end. `None`: no deadline. `Some(None)`: a deadline too
/// far away to represent.
type Deadline = Option<Option<Instant>>;

/// The deadline `timeout` from now.
fn deadline_after(timeout: Option<Duration>) -> Deadline {
    timeout.map(|timeout| Instant::now().checked_add(timeout))
}

/// The time left before `deadline`, as a socket timeout; an error once it has
/// passed.
fn time_left(deadline: Deadline) -> io::Result<Option<Duration>> {
    match deadline {
        None | Some(None) => Ok(None),
        Some(Some(deadline)) => match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(io::ErrorKind::TimedOut.into()),
        },
    }
}

/// One connection's request and reply, within an optional deadline.
struct Exchange<'a> {
    stream: &'a TcpStream,
    addr: SocketAddr,
    deadline: Deadline,
}

impl Exchange<'_> {
    fn time_left(&self) -> io::Result<Option<Duration>> {
        time_left(self.deadline)
    }

    fn send(&mut self, header: &[u8; HEADER_LEN], message: &[u8]) -> Result<(), Error> {
        // Small requests leave in one segment; the rest of a large one is
        // written from the caller's buffer, without a copy. No Nagle delay
        // between the two writes.
        let split = message.len().min(FIRST_WRITE);
        let mut first = Vec::with_capacity(HEADER_LEN + split);
        first.extend_from_slice(header);
        first.extend_from_slice(&message[..split]);
        let sent = self
            .stream
            .set_nodelay(true)
            .and_then(|()| self.write_all(&first))
            .and_then(|()| self.write_all(&message[split..]));
        sent.map_err(|error| self.error(error, Stage::Send))
    }

    /// `write_all` with the deadline re-armed before each write. (`write`
    /// is `send(MSG_NOSIGNAL)`, so a reset connection cannot raise SIGPIPE.)
    fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.deadline.is_some() {
                self.stream.set_write_timeout(self.time_left()?)?;
            }
            match (&mut &*self.stream).write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads until the daemon closes the connection.
    fn receive(&mut self) -> Result<Vec<u8>, Error> {
        let mut reply = Vec::new();
        match self.read_to_end(&mut reply) {
            Ok(_) => Ok(reply),
            Err(error) => Err(self.error(error, Stage::Reply)),
        }
    }

    /// Maps an I/O error to the protocol outcome it means.
    fn error(&self, error: io::Error, stage: Stage) -> Error {
        let addr = self.addr;
        match error.kind() {
            io::ErrorKind::ConnectionReset => Error::Reset { addr },
            // A reset that arrives while the request is still being sent
            // (for instance after an oversize header) makes the send fail
            // with EPIPE or ENOTCONN: gaspard never closes cleanly before it
            // has read the whole request, so these are the same reset.
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::ConnectionAborted
                if stage == Stage::Send =>
            {
                Error::Reset { addr }
            }
            // A socket timeout is EAGAIN on Unix, WSAETIMEDOUT on Windows.
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout { addr, stage },
            _ => Error::Io { addr, error },
        }
    }
}

/// Reads with the deadline re-armed before each read, so that `read_to_end`
/// stops when it passes.
impl Read for Exchange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.deadline.is_some() {
            self.stream.set_read_timeout(self.time_left()?)?;
        }
        (&mut &*self.stream).read(buf)
    }
}

#[cfg(test)]
mod tests {
    //! The error mapping, against in-process servers that misbehave on
    //! purpose. tests/daemon.rs does the same against the real daemon.

    use super::*;
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A server for one connection, running `serve` on it.
    fn server(serve: impl FnOnce(TcpStream) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || serve(listener.accept().unwrap().0));
        (addr, thread)
    }

    fn read_request(stream: &mut TcpStream) -> Vec<u8> {
        let mut header = [0; 4];
        stream.read_exact(&mut header).unwrap();
        let mut body = vec![0; u32::from_be_bytes(header) as usize];
        stream.read_exact(&mut body).unwrap();
        body
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn millis(ms: u64) -> Options {
        Options {
            read_timeout: Some(Duration::from_millis(ms)),
            ..Options::default()
        }
    }

    #[test]
    fn pack_prefixes_the_big_endian_length() {
        assert_eq!(pack(b"hello"), b"\0\0\0\x05hello");
        assert_eq!(pack(vec![7u8; 0x0102_0304])[..5], [1, 2, 3, 4, 7]);
        assert_eq!(pack(""), [0, 0, 0, 0]);
        assert_eq!(header(MAX_MESSAGE_LEN).unwrap(), [0xff, 0xff, 0xff, 0xfe]);
    }

    #[test]
    fn a_message_the_length_of_the_extension_mark_is_refused() {
        // Its header would be the preamble's 0xFFFFFFFF.
        let error = header(u32::MAX as usize).unwrap_err();
        assert!(matches!(error, Error::TooLarge { len } if len == 0xffff_ffff));
        assert_eq!(
            error.to_string(),
            "a message of 4294967295 bytes is over the protocol's limit of 4294967294 bytes"
        );
    }

    #[test]
    fn a_message_over_4_gib_is_refused_before_connecting() {
        let error = header(u32::MAX as usize + 1).unwrap_err();
        assert!(matches!(error, Error::TooLarge { len } if len == 1 << 32));
        assert_eq!(
            error.to_string(),
            "a message of 4294967296 bytes is over the protocol's limit of 4294967294 bytes"
        );
    }

    #[test]
    fn the_reply_is_every_byte_until_the_close() {
        let payload = pattern(3 << 20);
        let (addr, thread) = server(|mut stream| {
            let request = read_request(&mut stream);
            // Answer in pieces, reversed, to show the bytes are the reply's.
            for chunk in request.chunks(100_000).rev() {
                stream.write_all(chunk).unwrap();
            }
        });
        let reply = request(addr, &payload).unwrap();
        let expected: Vec<u8> = payload.chunks(100_000).rev().flatten().copied().collect();
        assert!(reply == expected, "{} bytes", reply.len());
        thread.join().unwrap();
    }

    #[test]
    fn an_empty_reply_is_an_empty_vec() {
        let (addr, thread) = server(|mut stream| {
            assert_eq!(read_request(&mut stream), b"");
        });
        assert_eq!(request(addr, b"").unwrap(), b"");
        thread.join().unwrap();
    }

    #[test]
    fn a_reset_after_part_of_a_reply_is_a_reset() {
        let (addr, thread) = server(|mut stream| {
            let mut header = [0; 4];
            stream.read_exact(&mut header).unwrap();
            stream.write_all(b"partial").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            // Closing with unread bytes makes the kernel send a reset.
        });
        let error = request(addr, b"never read").unwrap_err();
        assert!(
            matches!(error, Error::Reset { addr: a } if a == addr),
            "{error:?}"
        );
        assert!(error.to_string().contains("reset the connection"));
        assert_eq!(
            io::Error::from(error).kind(),
            io::ErrorKind::ConnectionReset
        );
        thread.join().unwrap();
    }

    #[test]
    fn a_reset_while_sending_is_a_reset() {
        let (addr, thread) = server(|mut stream| {
            let mut header = [0; 4];
            stream.read_exact(&mut header).unwrap();
        });
        // Far more than the socket buffers hold, so the send is cut short.
        let error = request(addr, pattern(64 << 20)).unwrap_err();
        assert!(matches!(error, Error::Reset { .. }), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn a_silent_server_times_out_within_the_read_timeout() {
        let (addr, thread) = server(|mut stream| {
            read_request(&mut stream);
            std::thread::sleep(Duration::from_millis(1500));
        });
        let started = Instant::now();
        let error = request_with(addr, b"slow", &millis(200)).unwrap_err();
        let took = started.elapsed();
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
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_millis(1200), "{took:?}");
        thread.join().unwrap();
    }

    #[test]
    fn the_read_timeout_is_a_deadline_not_a_limit_per_read() {
        // A byte every 50 ms never leaves a single read waiting 300 ms.
        let (addr, thread) = server(|mut stream| {
            read_request(&mut stream);
            for _ in 0..30 {
                if stream.write_all(b".").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let error = request_with(addr, b"drip", &millis(300)).unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
        assert!(started.elapsed() < Duration::from_millis(1000));
        thread.join().unwrap();
    }

    #[test]
    fn a_server_that_does_not_read_times_out_while_sending() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let error = request_with(
            listener.local_addr().unwrap(),
            pattern(64 << 20),
            &millis(200),
        )
        .unwrap_err();
        assert!(
            matches!(
                error,
                Error::Timeout {
                    stage: Stage::Send,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "timed out sending the request to {}",
                listener.local_addr().unwrap()
            )
        );
    }

    #[test]
    fn a_zero_read_timeout_times_out_at_once_and_none_waits() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let error = request_with(listener.local_addr().unwrap(), b"x", &millis(0)).unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error:?}");

        let (addr, thread) = server(|mut stream| {
            read_request(&mut stream);
            std::thread::sleep(Duration::from_millis(100));
            stream.write_all(b"late").unwrap();
        });
        let forever = Options {
            connect_timeout: None,
            read_timeout: None,
        };
        assert_eq!(request_with(addr, b"x", &forever).unwrap(), b"late");
        thread.join().unwrap();
    }

    #[test]
    fn a_closed_port_is_refused() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let error = request(addr, b"hello").unwrap_err();
        assert!(
            matches!(error, Error::Refused { addr: a } if a == addr),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{addr} refused the connection: nothing is listening there")
        );
    }

    #[test]
    fn an_address_without_a_port_does_not_resolve() {
        let error = request("127.0.0.1", b"hello").unwrap_err();
        assert!(matches!(error, Error::Resolve(_)), "{error:?}");
        assert!(error
            .to_string()
            .starts_with("cannot resolve the address: "));
    }
}
