//! `serve-baseline`: gaspar's protocol answered in-process, on one mio thread
//! with no workers, echoing each request's payload. No server that passes
//! requests to other processes can beat it on the same machine, so it is the
//! yardstick a gaspard figure is divided by.
//!
//! It speaks v1 (one request per connection, the reply, a clean close) and
//! GSP2 (see `frame`): the first four bytes of a connection say which.
//! Everything is non-blocking and edge-triggered; partial reads and writes are
//! the normal case, and a request may be up to 64 MiB.
//!
//! A v1 body that does not arrive with its header is read straight into a
//! buffer of its whole length, taken from a pool of buffers that outlive
//! their connections, and the reply is written from there: no copy between
//! the socket's reads and its write, and no allocation or page fault per
//! request once the pool holds a buffer of the size. (Allocating a fresh
//! megabyte per request cost about 210 page faults each, as glibc gave the
//! freed top of its heap back to the kernel between requests.)

pub mod spin;

use crate::frame::{self, Header};
use crate::limits;
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use socket2::{Domain, SockRef, Socket, Type};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

/// The listener's token; connections use their slab keys.
const LISTENER: Token = Token(usize::MAX);

/// Largest request accepted, as gaspard's default --max-request-size.
const MAX_REQUEST: u32 = 64 << 20;

/// The kernel's accept queue, as gaspard's default --backlog.
const BACKLOG: i32 = 4096;

/// Bytes read per `read` call into the scratch buffer.
const SCRATCH: usize = 256 * 1024;

/// Bytes of a connection's first read (its header and, if it is small, its
/// whole request): what such a read brings of a larger body is copied into
/// the body's buffer, so this bounds that copy.
const FIRST_READ: usize = 64 * 1024;

/// Bodies up to this size are written over before they are read into: with
/// a buffer that had left the cache, the kernel's copy from the socket cost
/// more than a `memset` and the copy together (1 MiB at four connections:
/// about 500 µs of CPU per request without, 400 with, as much as a server
/// that allocates and zeroes a buffer per request). Larger bodies do not fit
/// the cache anyway.
const WARM_UP_TO: usize = 2 << 20;

/// Bytes of free body buffers the pool keeps for the next requests.
const POOL_KEEP: usize = 256 << 20;

/// Consumed bytes kept at the front of a buffer before it is compacted.
const COMPACT_AFTER: usize = 64 * 1024;

/// Where and how to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub listen: SocketAddr,
    /// Requests a GSP2 client may have outstanding on a connection.
    pub window: u32,
    /// Answer as libspin.so does, on a pool of this many threads, instead
    /// of echoing (see [`spin`]).
    pub spin_threads: Option<usize>,
}

/// Serves until the process is killed. Prints `listening on ADDR` on
/// standard error once connections are accepted.
pub fn serve(options: &Options) -> io::Result<()> {
    let listener = listen(options.listen)?;
    // As many connections as the hard limit allows.
    limits::raise_open_files(u64::MAX);
    let mut stderr = io::stderr();
    writeln!(stderr, "listening on {}", listener.local_addr()?)?;
    stderr.flush()?;
    match options.spin_threads {
        Some(threads) => spin::serve(listener, threads),
        None => {
            listener.set_nonblocking(true)?;
            echo(TcpListener::from_std(listener), options.window as usize)
        }
    }
}

/// The echo server's loop.
fn echo(mut listener: TcpListener, window: usize) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut connections = Slab::new();
    let mut buffers = Buffers::new();
    loop {
        match poll.poll(&mut events, None) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        }
        for event in &events {
            if event.token() == LISTENER {
                accept(
                    &listener,
                    poll.registry(),
                    &mut connections,
                    &mut buffers,
                    window,
                );
                continue;
            }
            let key = event.token().0;
            let Some(connection) = connections.get_mut(key) else {
                continue;
            };
            connection.note(event);
            let verdict = connection.drive(&mut buffers, window);
            settle(
                poll.registry(),
                &mut connections,
                &mut buffers.pool,
                key,
                verdict,
            );
        }
    }
}

/// A listening socket with gaspard's backlog (mio's default is 1024), in
/// blocking mode.
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn accept(
    listener: &TcpListener,
    registry: &Registry,
    connections: &mut Slab<Connection>,
    buffers: &mut Buffers,
    window: usize,
) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // The client speaks first and its request has often arrived
                // by now: serving it before registering saves the trip
                // through the poll, and often the registration itself.
                let mut connection = Connection::new(stream);
                let verdict = connection.drive(buffers, window);
                let key = connections.insert(connection);
                settle(registry, connections, &mut buffers.pool, key, verdict);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(error) => {
                // Out of file descriptors, most likely: connections wait in
                // the backlog until one closes and the next one arrives.
                eprintln!("serve-baseline: accept: {error}");
                return;
            }
        }
    }
}

/// Carries out what [`Connection::drive`] decided.
fn settle(
    registry: &Registry,
    connections: &mut Slab<Connection>,
    pool: &mut Pool,
    key: usize,
    verdict: Verdict,
) {
    match verdict {
        Verdict::Wait => {
            let connection = &mut connections[key];
            if let Err(error) = connection.register(registry, Token(key)) {
                eprintln!("serve-baseline: register a connection: {error}");
                pool.give(connections.remove(key).body);
            }
        }
        // Dropping the stream closes it, which also takes it out of the poll.
        Verdict::Close => pool.give(connections.remove(key).body),
        Verdict::Reset => {
            let connection = connections.remove(key);
            // Linger 0: close() sends RST, as a failed request must end.
            let _ = SockRef::from(&connection.stream).set_linger(Some(std::time::Duration::ZERO));
            pool.give(connection.body);
        }
    }
}

/// What every connection's reads borrow: the scratch buffer small reads go
/// into, and the pool large bodies are read into.
struct Buffers {
    scratch: Vec<u8>,
    pool: Pool,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            scratch: vec![0; SCRATCH],
            pool: Pool::default(),
        }
    }
}

/// Body buffers free for the next large requests. Each is initialised over
/// its whole length (a read may fill any part of it), so it is zeroed once,
/// when first allocated, and never again.
#[derive(Default)]
struct Pool {
    free: Vec<Vec<u8>>,
    /// The bytes in `free`.
    kept: usize,
}

impl Pool {
    /// A buffer of at least `len` bytes: the smallest free one that fits
    /// (of those, the one given back last, the likeliest still in cache), or
    /// a new one rounded up to a power of two (`calloc` maps zeroed pages
    /// lazily, so the rounding costs address space, not memory).
    fn take(&mut self, len: usize) -> Vec<u8> {
        let best = self
            .free
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, buffer)| buffer.len() >= len)
            .min_by_key(|(_, buffer)| buffer.len())
            .map(|(index, _)| index);
        match best {
            Some(index) => {
                let buffer = self.free.swap_remove(index);
                self.kept -= buffer.len();
                buffer
            }
            None => vec![0; len.next_power_of_two()],
        }
    }

    /// Keeps `buffer` for a later request, within [`POOL_KEEP`].
    fn give(&mut self, buffer: Vec<u8>) {
        if !buffer.is_empty() && self.kept + buffer.len() <= POOL_KEEP {
            self.kept += buffer.len();
            self.free.push(buffer);
        }
    }
}

/// What a connection needs next.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// An event: it is registered for what it waits for.
    Wait,
    /// A clean close (FIN).
    Close,
    /// A reset (RST): a framing violation.
    Reset,
}

#[derive(Debug)]
enum Mode {
    /// The first four bytes will say v1 or GSP2.
    Start,
    /// A v1 request is arriving into `body`, `body_end` bytes in all.
    Request,
    /// The v1 reply is being written; then the connection closes.
    Replying,
    /// GSP2: requests, then replies in order.
    Persistent {
        /// Where each reply not yet wholly written ends, counted in bytes
        /// since the connection opened.
        replies: VecDeque<u64>,
        /// The zero-length request (or EOF) arrived: no more requests.
        ending: bool,
    },
}

struct Connection {
    stream: TcpStream,
    mode: Mode,
    /// Bytes received; those before `rx_pos` are consumed.
    rx: Vec<u8>,
    rx_pos: usize,
    /// Bytes to send; those before `tx_pos` are sent.
    tx: Vec<u8>,
    tx_pos: usize,
    /// Bytes removed from the front of `tx` so far.
    tx_base: u64,
    /// A v1 request too large for its first read, header and payload, from
    /// the pool: bytes before `body_filled` have arrived; the request (and
    /// then the reply, from `tx_pos`) ends at `body_end`. Empty otherwise.
    body: Vec<u8>,
    body_filled: usize,
    body_end: usize,
    /// The last read (write) said "would block": wait for an event.
    read_blocked: bool,
    /// An event said the client has closed its side.
    peer_closed: bool,
    write_blocked: bool,
    registered: Option<Interest>,
}

impl Connection {
    fn new(stream: TcpStream) -> Connection {
        Connection {
            stream,
            mode: Mode::Start,
            rx: Vec::new(),
            rx_pos: 0,
            tx: Vec::new(),
            tx_pos: 0,
            tx_base: 0,
            body: Vec::new(),
            body_filled: 0,
            body_end: 0,
            read_blocked: false,
            peer_closed: false,
            write_blocked: false,
            registered: None,
        }
    }

    /// Takes in what an event says may now make progress.
    fn note(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read_blocked = false;
        }
        self.peer_closed |= event.is_read_closed();
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.write_blocked = false;
        }
    }

    /// Reads, answers and writes as far as the socket allows.
    fn drive(&mut self, buffers: &mut Buffers, window: usize) -> Verdict {
        loop {
            if let Some(verdict) = self.parse(&mut buffers.pool, window) {
                return verdict;
            }
            if self.write().is_err() {
                // The client is gone; nothing is left to tell it.
                return Verdict::Close;
            }
            if self.done() {
                return Verdict::Close;
            }
            if self.request_waiting(window) {
                // A write made room in the window for a request already read.
                continue;
            }
            if self.read_blocked || !self.wants_read(window) {
                return Verdict::Wait;
            }
            // A large body goes straight where it is answered from.
            let into_body = matches!(self.mode, Mode::Request);
            let target = match self.mode {
                Mode::Request => &mut self.body[self.body_filled..self.body_end],
                Mode::Start => &mut buffers.scratch[..FIRST_READ],
                _ => &mut buffers.scratch[..],
            };
            let asked = target.len();
            match self.stream.read(target) {
                Ok(0) => {
                    if let Some(verdict) = self.end_of_input() {
                        return verdict;
                    }
                }
                Ok(n) => {
                    if into_body {
                        self.body_filled += n;
                    } else {
                        self.rx.extend_from_slice(&buffers.scratch[..n]);
                    }
                    // A short read took all that was queued: reading again
                    // would only say "would block", and any later arrival
                    // is a new event. Not once the client has closed its
                    // side: no event follows that, so read on to the EOF.
                    if n < asked && !self.peer_closed {
                        self.read_blocked = true;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.read_blocked = true;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Close,
            }
        }
    }

    /// Acts on the bytes received: `Some` ends the connection.
    ///
    /// Not gaspar-protocol's `RequestDecoder`: that one gathers each payload
    /// into a `Vec` of its own, which in GSP2 would be an allocation and a
    /// copy per request on top of this server's, as it answers from its
    /// receive buffer. Only the header's rules ([`Header`]) are shared.
    fn parse(&mut self, pool: &mut Pool, window: usize) -> Option<Verdict> {
        loop {
            match &mut self.mode {
                Mode::Start => {
                    let len = match Header::peek(&self.rx, MAX_REQUEST, true)? {
                        Err(_) => return Some(Verdict::Reset),
                        Ok(Header::Empty) => return Some(Verdict::Close),
                        Ok(Header::Payload(len)) => len as usize,
                        Ok(Header::Extension) => {
                            if self.rx.len() < frame::PREAMBLE.len() {
                                return None;
                            }
                            if self.rx[..frame::PREAMBLE.len()] != frame::PREAMBLE {
                                return Some(Verdict::Reset);
                            }
                            // Pipelined small replies must not wait for an ACK.
                            if self.stream.set_nodelay(true).is_err() {
                                return Some(Verdict::Close);
                            }
                            self.rx_pos = frame::PREAMBLE.len();
                            self.tx.extend_from_slice(&frame::handshake(window as u32));
                            self.mode = Mode::Persistent {
                                replies: VecDeque::new(),
                                ending: false,
                            };
                            continue;
                        }
                    };
                    let whole = frame::HEADER_LEN + len;
                    if self.rx.len() >= whole {
                        // The reply is the payload: send it from where it
                        // was received. Bytes after the request are dropped.
                        self.tx = std::mem::take(&mut self.rx);
                        self.tx.truncate(whole);
                        self.tx_pos = frame::HEADER_LEN;
                        self.mode = Mode::Replying;
                        return None;
                    }
                    // The rest is read into a buffer of the request's
                    // whole length (at most 64 MiB), from the pool.
                    self.body = pool.take(whole);
                    self.body[..self.rx.len()].copy_from_slice(&self.rx);
                    if whole <= WARM_UP_TO {
                        // Writing the buffer first brings it into the
                        // cache, which the kernel's copy into it then hits.
                        self.body[self.rx.len()..whole].fill(0);
                    }
                    self.body_filled = self.rx.len();
                    self.body_end = whole;
                    self.rx = Vec::new();
                    self.mode = Mode::Request;
                }
                Mode::Request => {
                    if self.body_filled < self.body_end {
                        return None;
                    }
                    self.tx_pos = frame::HEADER_LEN;
                    self.mode = Mode::Replying;
                    return None;
                }
                Mode::Replying => return None,
                Mode::Persistent { replies, ending } => {
                    while !*ending && replies.len() < window {
                        let input = &self.rx[self.rx_pos..];
                        let len = match Header::peek(input, MAX_REQUEST, false) {
                            None => break,
                            // Extension: not after the first frame.
                            Some(Err(_) | Ok(Header::Extension)) => return Some(Verdict::Reset),
                            Some(Ok(Header::Empty)) => {
                                *ending = true;
                                self.rx_pos += frame::HEADER_LEN;
                                break;
                            }
                            Some(Ok(Header::Payload(len))) => len,
                        };
                        let whole = frame::HEADER_LEN + len as usize;
                        if input.len() < whole {
                            self.rx.reserve(whole - input.len());
                            break;
                        }
                        self.tx
                            .extend_from_slice(&frame::reply_header(frame::Status::Ok, len));
                        self.tx.extend_from_slice(&input[frame::HEADER_LEN..whole]);
                        self.rx_pos += whole;
                        replies.push_back(self.tx_base + self.tx.len() as u64);
                    }
                    if self.rx_pos == self.rx.len() {
                        self.rx.clear();
                        self.rx_pos = 0;
                    } else if self.rx_pos >= COMPACT_AFTER {
                        self.rx.drain(..self.rx_pos);
                        self.rx_pos = 0;
                    }
                    return None;
                }
            }
        }
    }

    /// The bytes still to send: of a v1 reply from `body`, or of `tx`.
    fn unsent(&self) -> &[u8] {
        if self.body.is_empty() {
            &self.tx[self.tx_pos..]
        } else {
            &self.body[self.tx_pos.min(self.body_end)..self.body_end]
        }
    }

    /// Writes what is due until done or the socket would block.
    fn write(&mut self) -> io::Result<()> {
        if matches!(self.mode, Mode::Request) {
            return Ok(());
        }
        while !self.write_blocked {
            // Not `unsent()`: the stream is borrowed apart from the bytes.
            let unsent = if self.body.is_empty() {
                &self.tx[self.tx_pos..]
            } else {
                &self.body[self.tx_pos..self.body_end]
            };
            if unsent.is_empty() {
                break;
            }
            match self.stream.write(unsent) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_pos += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if let Mode::Persistent { replies, .. } = &mut self.mode {
            let sent = self.tx_base + self.tx_pos as u64;
            while replies.front().is_some_and(|&end| end <= sent) {
                replies.pop_front();
            }
            if self.tx_pos == self.tx.len() {
                self.tx_base += self.tx.len() as u64;
                self.tx.clear();
                self.tx_pos = 0;
            } else if self.tx_pos >= COMPACT_AFTER {
                self.tx_base += self.tx_pos as u64;
                self.tx.drain(..self.tx_pos);
                self.tx_pos = 0;
            }
        }
        Ok(())
    }

    /// Whether everything is answered and written, so the connection can close.
    fn done(&self) -> bool {
        let written = self.unsent().is_empty();
        match &self.mode {
            Mode::Replying => written,
            Mode::Persistent { ending, .. } => *ending && written,
            Mode::Start | Mode::Request => false,
        }
    }

    /// Whether a GSP2 request already received can be taken now.
    fn request_waiting(&self, window: usize) -> bool {
        let Mode::Persistent { replies, ending } = &self.mode else {
            return false;
        };
        let input = &self.rx[self.rx_pos..];
        !*ending
            && replies.len() < window
            && match Header::peek(input, MAX_REQUEST, false) {
                None => false,
                // Acted on at once: the end, or a reset.
                Some(Err(_) | Ok(Header::Empty | Header::Extension)) => true,
                Some(Ok(Header::Payload(len))) => input.len() >= frame::HEADER_LEN + len as usize,
            }
    }

    fn wants_read(&self, window: usize) -> bool {
        match &self.mode {
            Mode::Start | Mode::Request => true,
            Mode::Replying => false,
            // Past the window, requests wait in the client's socket.
            Mode::Persistent { replies, ending } => !*ending && replies.len() < window,
        }
    }

    /// The client shut its side: `Some` ends the connection now.
    fn end_of_input(&mut self) -> Option<Verdict> {
        let partial = self.rx.len() > self.rx_pos;
        match &mut self.mode {
            // Connected and closed without a byte: nothing to say.
            Mode::Start if !partial => Some(Verdict::Close),
            // Half a request can never be completed.
            Mode::Start | Mode::Request => Some(Verdict::Reset),
            Mode::Persistent { .. } if partial => Some(Verdict::Reset),
            // As if it had sent the zero-length request: answer, then close.
            Mode::Persistent { ending, .. } => {
                *ending = true;
                None
            }
            Mode::Replying => None,
        }
    }

    /// Registers for readiness: always readable, writable once a write has
    /// had to wait (kept after that; edge-triggered, it costs nothing).
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let both = Interest::READABLE | Interest::WRITABLE;
        let wanted = if self.write_blocked || self.registered == Some(both) {
            both
        } else {
            Interest::READABLE
        };
        match self.registered {
            None => registry.register(&mut self.stream, token, wanted)?,
            Some(current) if current != wanted => {
                registry.reregister(&mut self.stream, token, wanted)?
            }
            Some(_) => return Ok(()),
        }
        self.registered = Some(wanted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::time::Duration;

    /// A baseline server on a free port, in a thread of this test process.
    fn server() -> SocketAddr {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        std::thread::spawn(move || {
            serve(&Options {
                listen: addr,
                window: 4,
                spin_threads: None,
            })
        });
        // Wait until it accepts.
        for _ in 0..500 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return addr;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the baseline server did not start");
    }

    fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> io::Result<Vec<u8>> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(bytes)?;
        if half_close {
            stream.shutdown(Shutdown::Write)?;
        }
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply)?;
        Ok(reply)
    }

    #[test]
    fn the_pool_lends_the_smallest_buffer_that_fits_and_keeps_a_bounded_few() {
        let mut pool = Pool::default();
        let new = pool.take(1000);
        assert_eq!(new.len(), 1024);
        pool.give(new);
        pool.give(vec![0; 4096]);
        assert_eq!(pool.take(900).len(), 1024);
        assert_eq!(pool.take(900).len(), 4096);
        assert_eq!(pool.kept, 0);
        pool.give(vec![0; POOL_KEEP]);
        pool.give(vec![0; 1]);
        assert_eq!((pool.free.len(), pool.kept), (1, POOL_KEEP));
        pool.give(Vec::new());
        assert_eq!(pool.free.len(), 1);
    }

    #[test]
    fn v1_requests_are_echoed_then_closed() {
        let addr = server();
        assert_eq!(
            exchange(addr, &frame::request(b"hello"), false).unwrap(),
            b"hello"
        );
        assert_eq!(exchange(addr, &[0, 0, 0, 0], false).unwrap(), b"");
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(exchange(addr, &frame::request(&big), false).unwrap(), big);
    }

    #[test]
    fn framing_violations_are_reset() {
        let addr = server();
        let over = (MAX_REQUEST + 1).to_be_bytes();
        let error = exchange(addr, &over, false).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        // Half of a request, then the client's half-close.
        let error = exchange(addr, &[0, 0, 0, 9, b'a'], true).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        // 0xFFFFFFFF without the magic.
        let error = exchange(addr, b"\xff\xff\xff\xffHTTP", false).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn gsp2_answers_pipelined_requests_in_order_then_closes() {
        let addr = server();
        let mut stream = frame::PREAMBLE.to_vec();
        for i in 0..20u32 {
            stream.extend_from_slice(&frame::request(format!("request {i}").as_bytes()));
        }
        stream.extend_from_slice(&frame::END_OF_REQUESTS);
        let reply = exchange(addr, &stream, false).unwrap();
        let mut want = frame::handshake(4).to_vec();
        for i in 0..20u32 {
            let payload = format!("request {i}");
            want.extend_from_slice(&frame::reply_header(
                frame::Status::Ok,
                payload.len() as u32,
            ));
            want.extend_from_slice(payload.as_bytes());
        }
        assert_eq!(reply, want);
    }

    #[test]
    fn gsp2_ends_on_eof_and_resets_on_an_oversize_length() {
        let addr = server();
        let mut stream = frame::PREAMBLE.to_vec();
        stream.extend_from_slice(&frame::request(b"x"));
        let reply = exchange(addr, &stream, true).unwrap();
        assert_eq!(&reply[8..], b"\0\0\0\0\x01x");
        let mut stream = frame::PREAMBLE.to_vec();
        stream.extend_from_slice(&(MAX_REQUEST + 1).to_be_bytes());
        let error = exchange(addr, &stream, false).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }
}
