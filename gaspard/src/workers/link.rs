//! The link between the daemon and one local worker, made when the worker is
//! started: a Unix stream socket pair that carries requests to the worker
//! (and large replies back), and a pipe that carries replies. The daemon's
//! loop keeps one end of each; the worker process inherits the other two.
//!
//! Why not zmq ipc: libzmq moves every message through an I/O thread on each
//! side, so one request cost about nine thread wake-ups more than the work
//! itself (see `docs/benchmarks.md`). A link costs one wake-up each way (two
//! for a reply over [`MAX_PIPED_BODY`]), and none at all while the worker
//! still has requests buffered. It is private
//! by construction (no path anyone could connect to), belongs to one
//! incarnation (nothing of a dead worker can reach its replacement), and
//! tells each side at once when the other is gone.
//!
//! Why a pipe for replies: a pipe write costs half what a socket write
//! does. It also spares the worker a wake-up:
//! a socket's reader is woken whenever its peer frees buffer space, so
//! replies read from the socket the worker sleeps on would wake it for
//! nothing. Why not a pipe both ways: a pipe copies in and out under one
//! lock, so a large body crosses it at half the speed of a socket, where
//! the reader copies out while the writer still copies in. Requests leave in
//! batches (one `writev`), where the socket's cost hardly shows, and a reply
//! body larger than [`MAX_PIPED_BODY`] follows its header on the socket.
//!
//! Replies to quick calls leave in batches: the worker writes each into its
//! reply ring (shared memory, `claims.rs`) before it claims its next
//! request, so that if it dies the daemon still has every reply it
//! finished, and announces them with one [`Kind::Replies`] frame on the
//! pipe when it has no whole request left to run, after a call that was not
//! quick ([`QUICK_CALL`]), after [`BATCH_WINDOW`], or before any other frame
//! (so frames keep their order). One write and one wake-up per batch
//! instead of one per reply. See [`RingWriter`] and [`Link::try_recv`].
//!
//! Both directions carry frames (a large reply's body on the socket, as
//! above): a [`HEADER_LEN`]-byte header (a [`Kind`]
//! byte; for replies, how long the handler ran in microseconds, for
//! requests, the request's claim ticket (`claims.rs`), as a 24-bit
//! little-endian number, saturating, else three zero bytes; the body length
//! as u32 little-endian; a value as u64 little-endian), then the body. Frames
//! are written back to back, so one `read` can bring many and one `writev`
//! can send many.

use super::areas::{self, AreaBody, ReplyAreaReader, ReplyBody, RequestArea, RequestBody};
use super::claims::{Claims, Ring, RING_LEN};
use crate::buffers::{gather, read_appending};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

pub const HEADER_LEN: usize = 16;

/// What a frame carries, and what its value means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Worker → daemon: the handler is loaded; value: incarnation; body: pid.
    Ready = 1,
    /// Worker → daemon: loading failed; value: incarnation; body: the reason.
    InitFailed = 2,
    /// Worker → daemon: a reply; value: request id; body: the reply bytes.
    Reply = 3,
    /// Worker → daemon: the handler failed; value: request id; body: its message.
    Failed = 4,
    /// Daemon → worker: a request; value: request id; body: the payload.
    Request = 5,
    /// Worker → daemon: the frames in its reply ring up to value (a byte
    /// position, see [`RingWriter`]) are written; no body.
    Replies = 6,
    /// Daemon → worker: a request whose payload is in the worker's request
    /// area (`areas.rs`); value: request id; body: where (`areas::encode`).
    RequestInArea = 7,
    /// Worker → daemon: a reply whose bytes are in its reply area; value:
    /// request id; body: where. The daemon's link takes it as a
    /// [`Kind::Reply`].
    ReplyInArea = 8,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Ready,
            2 => Kind::InitFailed,
            3 => Kind::Reply,
            4 => Kind::Failed,
            5 => Kind::Request,
            6 => Kind::Replies,
            7 => Kind::RequestInArea,
            8 => Kind::ReplyInArea,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// Replies: how long the handler ran, in microseconds. Requests: the
    /// encoded claim ticket.
    pub extra: u32,
    pub len: usize,
    pub value: u64,
}

/// The most microseconds a header can tell (about 16.8 s).
pub const MAX_MICROS: u32 = (1 << 24) - 1;

/// The most a body may hold: its length travels as a u32.
pub const MAX_BODY: usize = u32::MAX as usize;

/// Encodes a frame header.
pub fn header(kind: Kind, len: u32, value: u64) -> [u8; HEADER_LEN] {
    reply_header(kind, 0, len, value)
}

/// Encodes the header of request `id` with its encoded claim ticket.
pub fn request_header(ticket: u32, len: u32, id: u64) -> [u8; HEADER_LEN] {
    reply_header(Kind::Request, ticket, len, id)
}

/// Encodes the header of a reply whose handler ran for `micros`.
pub fn reply_header(kind: Kind, micros: u32, len: u32, value: u64) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[0] = kind as u8;
    header[1..4].copy_from_slice(&micros.min(MAX_MICROS).to_le_bytes()[..3]);
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..].copy_from_slice(&value.to_le_bytes());
    header
}

/// A whole [`Kind::RequestInArea`] or [`Kind::ReplyInArea`] frame: its
/// header (`extra` is the claim ticket or the handler's micros) and where in
/// the area its `len` bytes at position `at` are.
pub fn area_frame(
    kind: Kind,
    extra: u32,
    value: u64,
    at: u64,
    len: usize,
) -> [u8; HEADER_LEN + areas::FRAME_BODY] {
    let mut frame = [0; HEADER_LEN + areas::FRAME_BODY];
    frame[..HEADER_LEN].copy_from_slice(&reply_header(
        kind,
        extra,
        areas::FRAME_BODY as u32,
        value,
    ));
    frame[HEADER_LEN..].copy_from_slice(&areas::encode(at, len));
    frame
}

/// The length of a body as a frame carries it, or an error for a body
/// larger than a frame can say (never cut short into another length).
pub fn body_len(len: usize) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a body of {len} bytes is more than a frame can carry"),
        )
    })
}

/// Decodes a frame header; an error means the stream cannot be trusted.
pub fn parse_header(bytes: &[u8; HEADER_LEN]) -> io::Result<Header> {
    let Some(kind) = Kind::from_byte(bytes[0]) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed frame header {:02x?}", &bytes[..4]),
        ));
    };
    let extra = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], 0]);
    let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    let value = u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes"));
    Ok(Header {
        kind,
        extra,
        len,
        value,
    })
}

/// Whether a write error means the worker's end is closed: it died (or is
/// exiting), which its death will tell.
pub fn is_closed_by_peer(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// The worker's ends of its link, which the supervisor lets exactly one
/// child inherit.
#[derive(Debug)]
pub struct WorkerEnds {
    /// The socket: requests in, large reply bodies out. Blocking.
    pub requests: OwnedFd,
    /// The pipe's write end: replies out. Blocking.
    pub replies: OwnedFd,
}

/// Makes a new link: the daemon's ends (non-blocking, for the loop) and the
/// worker's. All four fds are close-on-exec.
pub fn pair() -> io::Result<(Link, WorkerEnds)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (to_worker, requests) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // Larger buffers (as far as the kernel allows) move a large request or
    // reply in fewer write/wake-up rounds; memory is only taken while in use.
    for end in [&to_worker, &requests] {
        let _ = socket2::SockRef::from(end).set_send_buffer_size(SOCKET_BUFFER);
    }
    let to_worker = std::os::unix::net::UnixStream::from(to_worker);
    to_worker.set_nonblocking(true)?;
    let (replies, from_worker) = mio::unix::pipe::new()?;
    replies.set_nonblocking(false)?;
    // The most replies that fit the pipe before the worker must wait for
    // the daemon. Pages are only taken while in use, but the size counts
    // against the user's pipe quota (`fs.pipe-user-pages-soft`, not for
    // root), so a larger size is not always granted.
    for size in PIPE_SIZES {
        let set_size = nix::fcntl::FcntlArg::F_SETPIPE_SZ(size);
        if nix::fcntl::fcntl(from_worker.as_raw_fd(), set_size).is_ok() {
            break;
        }
    }
    let link = Link::new(mio::net::UnixStream::from_std(to_worker), from_worker);
    let ends = WorkerEnds {
        requests,
        replies: replies.into(),
    };
    Ok((link, ends))
}

/// One frame received by the daemon.
#[derive(Debug)]
pub struct Message {
    pub kind: Kind,
    /// Replies: how long the handler ran, in microseconds.
    pub micros: u32,
    pub value: u64,
    /// For a reply from the reply area, where the worker wrote it.
    pub body: ReplyBody,
}

/// Reply bodies up to this size travel in the pipe with their header;
/// larger ones follow it on the socket (and are read straight into their
/// own buffer, so they are copied once).
pub const MAX_PIPED_BODY: usize = 32 * 1024;
/// Size of the daemon's read buffer per link: many replies per `read`.
const INPUT_LEN: usize = 64 * 1024;
/// The socket send buffer each end asks for (the kernel caps it at
/// `net.core.wmem_max`).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Sizes to ask for the reply pipe, largest first (an unprivileged daemon is
/// capped by `fs.pipe-max-size`, 1 MiB by default, and by its user's pipe
/// quota; 64 KiB is the kernel's default).
const PIPE_SIZES: [i32; 2] = [1 << 20, 256 << 10];
/// Frames per `writev`.
const FRAMES_PER_WRITE: usize = 64;

struct Outgoing {
    /// The header, and for a request in the area where its body is.
    header: [u8; HEADER_LEN + areas::FRAME_BODY],
    header_len: usize,
    /// Shared with the dispatcher, which keeps a request until its reply
    /// (`None`: the body is in the request area).
    body: Option<Rc<RequestBody>>,
}

impl Outgoing {
    fn parts(&self) -> [&[u8]; 2] {
        let body = self.body.as_deref().map_or(&[][..], |body| &body[..]);
        [&self.header[..self.header_len], body]
    }

    fn len(&self) -> usize {
        self.header_len + self.body.as_ref().map_or(0, |body| body.len())
    }
}

/// A frame whose body is being read into its own buffer (allocated at its
/// full length up front, filled without zeroing it first).
struct LargeBody {
    header: Header,
    body: Vec<u8>,
}

/// What one read of a large reply body from the socket did.
enum BodyRead {
    /// The body is complete.
    Whole,
    /// Part of it came; the rest is not there yet.
    Partial,
    /// Nothing came: the read's own result (0 at the end of the stream).
    Ended(io::Result<usize>),
}

/// Reads what the socket has of `large`'s body, appending what is there even
/// when the read then hits WouldBlock (and without zeroing the buffer first,
/// see `read_appending`).
fn read_body(socket: &mio::net::UnixStream, large: &mut LargeBody) -> BodyRead {
    let mut read = 0;
    loop {
        let missing = large.header.len - large.body.len();
        if missing == 0 {
            return BodyRead::Whole;
        }
        match read_appending(socket, &mut large.body, missing) {
            Ok(0) => return BodyRead::Ended(Ok(0)), // the end of the stream
            Ok(n) => read += n,
            // A worker that dies with requests unread makes the kernel
            // report ECONNRESET once everything it sent was read (here,
            // perhaps right after the part of the body it sent): the end of
            // the stream too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return BodyRead::Ended(Ok(0)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => {
                return BodyRead::Partial
            }
            Err(e) => return BodyRead::Ended(Err(e)),
        }
    }
}

/// The daemon's end of a link: frames to send, and a buffer of bytes
/// received. Never blocks: the loop calls [`Link::flush`] when the socket is
/// writable and [`Link::try_recv`] until it returns `None` when the socket
/// or the pipe is readable.
pub struct Link {
    /// Requests out, large reply bodies in.
    socket: mio::net::UnixStream,
    /// Replies in.
    pipe: mio::unix::pipe::Receiver,
    /// The loop is told when the socket is writable (only while frames wait
    /// for room: each time the worker reads, the socket would say so).
    watching_writable: bool,
    out: VecDeque<Outgoing>,
    /// Bytes of `out`'s first frame already written.
    written: usize,
    input: Box<[u8]>,
    start: usize,
    end: usize,
    large: Option<LargeBody>,
    closed: bool,
    /// The last read of the pipe came back short: it was empty, and the next
    /// bytes to arrive will be announced by a new readiness event.
    drained: bool,
    /// How far the worker's reply ring has been read (this side's own
    /// count: the one in shared memory is only published).
    ring_tail: u64,
    /// How far it may be read: announced, or (the worker is gone, or runs a
    /// slow call) all it has written.
    ring_until: u64,
    /// The large request bodies in the worker's request area.
    request_area: RequestArea,
    /// How far the worker's reply area has been taken.
    reply_area: ReplyAreaReader,
}

impl Link {
    fn new(socket: mio::net::UnixStream, pipe: mio::unix::pipe::Receiver) -> Link {
        Link {
            socket,
            pipe,
            watching_writable: false,
            out: VecDeque::new(),
            written: 0,
            input: vec![0; INPUT_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            large: None,
            closed: false,
            drained: false,
            ring_tail: 0,
            ring_until: 0,
            request_area: RequestArea::default(),
            reply_area: ReplyAreaReader::default(),
        }
    }

    /// The link is readable again (or is read to its end now): the next
    /// [`Link::try_recv`] reads the pipe even if the last read came back short.
    pub fn readable(&mut self) {
        self.drained = false;
    }

    /// Puts the link into the loop, under one token for both ends.
    pub fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        registry.register(&mut self.socket, token, mio::Interest::READABLE)?;
        registry.register(&mut self.pipe, token, mio::Interest::READABLE)
    }

    /// Takes the link out of the loop.
    pub fn deregister(&mut self, registry: &mio::Registry) {
        let _ = registry.deregister(&mut self.socket);
        let _ = registry.deregister(&mut self.pipe);
    }

    /// Asks the loop to say when the socket is writable while frames wait
    /// for room, and to stop when none do. Call after [`Link::flush`].
    pub fn watch_writable(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> io::Result<()> {
        let waiting = !self.out.is_empty();
        if waiting != self.watching_writable {
            let interest = if waiting {
                mio::Interest::READABLE | mio::Interest::WRITABLE
            } else {
                mio::Interest::READABLE
            };
            registry.reregister(&mut self.socket, token, interest)?;
            self.watching_writable = waiting;
        }
        Ok(())
    }

    /// Queues request `id` with its encoded claim ticket for the worker in
    /// `slot`; [`Link::flush`] sends it. A large body already read into
    /// this worker's request area is sent as a frame that says where it
    /// lies; another is moved into that area in `claims` if it fits there
    /// (`areas.rs`), and likewise sent as a frame; else the body is sent
    /// from where it is, without a copy. The body is at most [`MAX_BODY`]
    /// bytes: the workers part refuses larger requests. Returns the body as
    /// it lies in the area if it was moved there: the caller keeps that
    /// instead, and the daemon's own copy goes.
    #[must_use = "a body moved into the area is freed with it: keep it until answered"]
    pub fn queue_request(
        &mut self,
        id: u64,
        ticket: u32,
        body: Rc<RequestBody>,
        slot: usize,
        claims: Option<&Rc<Claims>>,
    ) -> Option<Rc<RequestBody>> {
        let mut moved = None;
        let mut in_area = self.request_area.position_of(&body);
        if let (None, Some(claims)) = (in_area, claims) {
            let area_body = self.request_area.move_in(claims, slot, &body);
            moved = area_body.map(|area_body| Rc::new(RequestBody::Area(area_body)));
            in_area = moved
                .as_ref()
                .and_then(|moved| self.request_area.position_of(moved));
        }
        if let Some(at) = in_area {
            self.out.push_back(Outgoing {
                header: area_frame(Kind::RequestInArea, ticket, id, at, body.len()),
                header_len: HEADER_LEN + areas::FRAME_BODY,
                body: None,
            });
            return moved;
        }
        let len = u32::try_from(body.len()).expect("requests over MAX_BODY are refused");
        let mut header = [0; HEADER_LEN + areas::FRAME_BODY];
        header[..HEADER_LEN].copy_from_slice(&request_header(ticket, len, id));
        self.out.push_back(Outgoing {
            header,
            header_len: HEADER_LEN,
            body: Some(body),
        });
        None
    }

    /// Room in the worker's request area for a body of `len` bytes to be
    /// read there from its client (see [`AreaBody`]).
    pub fn place_body(&mut self, claims: &Rc<Claims>, slot: usize, len: usize) -> Option<AreaBody> {
        self.request_area.place(claims, slot, len)
    }

    /// Bodies read into the worker's request area and not yet given back.
    pub fn bodies_read_in_place(&self) -> usize {
        self.request_area.read_in_place()
    }

    /// Whether the request area holds pages [`Self::trim`] may give back.
    pub fn area_holds_pages(&self) -> bool {
        self.request_area.holds_pages()
    }

    /// The worker is dead: gives back its areas' pages but for the replies
    /// still held for clients (`areas.rs`).
    pub fn worker_gone(&mut self, claims: &Claims) {
        self.request_area.worker_gone(claims);
        self.reply_area.worker_gone(claims);
    }

    /// Gives back the request area's pages if it has been empty a while.
    pub fn trim(&mut self, claims: &Claims, now: Instant) {
        self.request_area.trim(claims, now);
    }

    /// Whether queued frames are waiting for the socket to take them.
    #[cfg(test)]
    fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Gives up sending what is queued (the worker cannot take it).
    pub fn discard_output(&mut self) {
        self.out.clear();
        self.written = 0;
    }

    /// Writes queued frames until done or the socket is full. An error means
    /// the worker is gone (or never read): its requests cannot be delivered.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let parts = self.out.iter().flat_map(Outgoing::parts);
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let filled = gather(parts, self.written, &mut slices);
            let n = match self.socket.write_vectored(&slices[..filled]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.written += n;
            while let Some(frame) = self.out.front() {
                let len = frame.len();
                if self.written < len {
                    break;
                }
                self.written -= len;
                self.out.pop_front();
            }
        }
        Ok(())
    }

    /// Whether the worker's end is closed and everything it sent was taken.
    #[cfg(test)]
    fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next whole frame, reading from the pipe (and for a large reply
    /// body, the socket) as needed, and the frames of the worker's reply
    /// ring (in its `claims`, if it has them) where the pipe announces
    /// them; a reply in its reply area comes as a [`Kind::Reply`] whose
    /// body stays there ([`ReplyBody::Area`], given back when dropped).
    /// `Ok(None)`: nothing more until the link is readable again (or it
    /// closed; a frame cut short by the end is dropped). An error means the
    /// stream is broken or out of step.
    pub fn try_recv(&mut self, claims: Option<&Rc<Claims>>) -> io::Result<Option<Message>> {
        let Some(mut message) = self.next_frame(claims.map(|claims| claims.ring()))? else {
            return Ok(None);
        };
        if message.kind == Kind::ReplyInArea {
            let Some(claims) = claims else {
                return Err(garbage("a reply in an area it does not have"));
            };
            message.body = self.reply_area.take(claims, &message.body)?;
            message.kind = Kind::Reply;
        }
        Ok(Some(message))
    }

    fn next_frame(&mut self, ring: Option<Ring<'_>>) -> io::Result<Option<Message>> {
        loop {
            if let Some(ring) = &ring {
                if self.ring_tail < self.ring_until {
                    return self.take_ringed(ring).map(Some);
                }
            }
            if let Some(message) = self.take_buffered()? {
                if message.kind != Kind::Replies {
                    return Ok(Some(message));
                }
                let Some(ring) = &ring else {
                    return Err(garbage("announced replies without a reply ring"));
                };
                self.allow_ring_until(ring, message.value)?;
                continue;
            }
            if self.closed {
                // The worker is gone: what it wrote in its ring and never
                // announced are its last replies (it writes each there
                // before it claims its next request).
                if let Some(ring) = &ring {
                    self.allow_ring_until(ring, ring.head())?;
                    if self.ring_tail < self.ring_until {
                        continue;
                    }
                }
                return Ok(None);
            }
            let read = match &mut self.large {
                Some(large) => match read_body(&self.socket, large) {
                    BodyRead::Whole => continue,
                    BodyRead::Partial => return Ok(None),
                    BodyRead::Ended(read) => read,
                },
                None if self.drained => return Ok(None),
                None => {
                    if self.end == self.input.len() {
                        // Only a partial frame is left: move it to the front.
                        self.input.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                    }
                    self.pipe.read(&mut self.input[self.end..])
                }
            };
            match read {
                Ok(0) => {
                    // A worker killed while writing a reply leaves it torn.
                    // It writes replies in order, so the torn one belongs to
                    // the request it was running: that request's fate is
                    // settled with the worker's death, like any other.
                    self.closed = true;
                    self.large = None;
                    self.start = 0;
                    self.end = 0;
                }
                Ok(n) => {
                    // Short: the pipe is empty for now (saves the read
                    // that would only say so).
                    self.drained = self.end + n < self.input.len();
                    self.end += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Lets [`Self::try_recv`] take what the worker has written in its
    /// ring and not announced yet: its handler runs a call that turned out
    /// slow (or past --timeout), and replies it finished before must not
    /// wait for it. Only between frames of the pipe (call after reading it
    /// to `None`), so that frames keep their order.
    pub fn take_unannounced(&mut self, claims: &Claims) -> io::Result<()> {
        if self.large.is_none() && self.start == self.end {
            let ring = claims.ring();
            self.allow_ring_until(&ring, ring.head())?;
        }
        Ok(())
    }

    /// The ring may be read up to `until`, if the worker's head says it
    /// has written that far (a position already read is nothing new).
    fn allow_ring_until(&mut self, ring: &Ring<'_>, until: u64) -> io::Result<()> {
        let head = ring.head();
        let written = head.checked_sub(self.ring_tail);
        if written.map_or(true, |written| written > RING_LEN as u64) || until > head {
            return Err(garbage(&format!(
                "reply ring positions out of range (read {}, written {head}, announced {until})",
                self.ring_tail
            )));
        }
        self.ring_until = self.ring_until.max(until);
        Ok(())
    }

    /// The frame at the ring's tail, which must lie whole before
    /// `ring_until`; the space it took is given back to the worker.
    fn take_ringed(&mut self, ring: &Ring<'_>) -> io::Result<Message> {
        let available = self.ring_until - self.ring_tail;
        let mut head = [0; HEADER_LEN];
        if available < HEADER_LEN as u64 {
            return Err(garbage("a frame cut short in its reply ring"));
        }
        ring.read(self.ring_tail, &mut head);
        let header = parse_header(&head)?;
        if header.kind == Kind::Replies || header.len as u64 > available - HEADER_LEN as u64 {
            return Err(garbage(
                "a frame that does not fit where it is in its reply ring",
            ));
        }
        let mut body = vec![0; header.len];
        ring.read(self.ring_tail + HEADER_LEN as u64, &mut body);
        self.ring_tail += (HEADER_LEN + header.len) as u64;
        ring.publish_tail(self.ring_tail);
        Ok(Message {
            kind: header.kind,
            micros: header.extra,
            value: header.value,
            body: body.into(),
        })
    }

    /// A whole frame from what was already read, if there is one.
    fn take_buffered(&mut self) -> io::Result<Option<Message>> {
        if let Some(large) = &self.large {
            if large.body.len() < large.header.len {
                return Ok(None);
            }
            let large = self.large.take().expect("checked above");
            return Ok(Some(Message {
                kind: large.header.kind,
                micros: large.header.extra,
                value: large.header.value,
                body: large.body.into(),
            }));
        }
        let available = self.end - self.start;
        if available < HEADER_LEN {
            self.rewind_if_empty();
            return Ok(None);
        }
        let head: &[u8; HEADER_LEN] = self.input[self.start..self.start + HEADER_LEN]
            .try_into()
            .expect("HEADER_LEN bytes");
        let header = parse_header(head)?;
        let body_start = self.start + HEADER_LEN;
        if header.len > MAX_PIPED_BODY {
            // The body follows on the socket; the pipe goes on with the
            // next frame, which waits in `input` until this one is whole.
            let mut body = Vec::new();
            if body.try_reserve_exact(header.len).is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("cannot allocate {} bytes for a reply", header.len),
                ));
            }
            self.start = body_start;
            self.rewind_if_empty();
            self.large = Some(LargeBody { header, body });
            return Ok(None);
        }
        if header.len > self.end - body_start {
            return Ok(None);
        }
        let body = self.input[body_start..body_start + header.len].to_vec();
        self.start = body_start + header.len;
        self.rewind_if_empty();
        Ok(Some(Message {
            kind: header.kind,
            micros: header.extra,
            value: header.value,
            body: body.into(),
        }))
    }

    fn rewind_if_empty(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// An error for bytes from a worker that make no frame.
fn garbage(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The largest frame that goes through the reply ring; larger ones take the
/// pipe (or the socket), as before the ring.
pub const MAX_RINGED_FRAME: usize = 16 * 1024;
/// A handler call shorter than this is quick: its reply may wait in the
/// ring, unannounced, while the worker runs the next request it already
/// has. After a longer one the worker announces at once, so a reply never
/// waits for a call unless the one before it was quick (and then the
/// daemon takes it anyway once that call has run `SLOW_CALL`, see
/// `Workers::take_back_stuck`).
pub const QUICK_CALL: Duration = Duration::from_micros(50);
/// The longest a reply waits in the ring, unannounced, while quick calls
/// follow it.
pub const BATCH_WINDOW: Duration = Duration::from_micros(200);

/// The worker's side of its reply ring: frames written at the head, and
/// the position last announced on the pipe.
pub struct RingWriter<'a> {
    ring: Ring<'a>,
    head: u64,
    announced: u64,
    /// When the oldest frame not announced yet was written.
    since: Option<Instant>,
}

impl<'a> RingWriter<'a> {
    pub fn new(ring: Ring<'a>) -> RingWriter<'a> {
        let head = ring.head();
        RingWriter {
            ring,
            head,
            announced: head,
            since: None,
        }
    }

    /// Writes `frame` into the ring, if it is small enough and the daemon
    /// has read enough to make room; false if not (then it takes the pipe,
    /// after [`Self::announcement`]).
    pub fn push(&mut self, frame: &[u8], now: Instant) -> bool {
        let used = self.head.saturating_sub(self.ring.tail());
        if frame.len() > MAX_RINGED_FRAME || used + frame.len() as u64 > RING_LEN as u64 {
            return false;
        }
        self.ring.write(self.head, frame);
        self.head += frame.len() as u64;
        self.ring.publish_head(self.head);
        self.since.get_or_insert(now);
        true
    }

    /// Whether frames wait unannounced since before `now - BATCH_WINDOW`.
    pub fn overdue(&self, now: Instant) -> bool {
        self.since
            .is_some_and(|since| now.saturating_duration_since(since) >= BATCH_WINDOW)
    }

    /// The frame that announces what was written since the last one, if
    /// anything was.
    pub fn announcement(&mut self) -> Option<[u8; HEADER_LEN]> {
        if self.head == self.announced {
            return None;
        }
        self.announced = self.head;
        self.since = None;
        Some(header(Kind::Replies, 0, self.head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// The worker's ends, blocking.
    struct Worker {
        socket: UnixStream,
        pipe: File,
    }

    impl Worker {
        /// Sends a frame as the worker does: a large body on the socket.
        fn send(&mut self, frame: &[u8]) {
            if frame.len() - HEADER_LEN <= MAX_PIPED_BODY {
                self.pipe.write_all(frame).unwrap();
            } else {
                self.pipe.write_all(&frame[..HEADER_LEN]).unwrap();
                self.socket.write_all(&frame[HEADER_LEN..]).unwrap();
            }
        }
    }

    /// Reads the link to its end: no frame comes, and it closes. A process
    /// another test forks holds copies of every fd until it execs, the
    /// worker's ends too, so the end may come a moment later.
    fn assert_ends(link: &mut Link) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            link.readable();
            assert!(link.try_recv(None).unwrap().is_none(), "no more frames");
            if link.is_closed() {
                return;
            }
            assert!(Instant::now() < deadline, "the link never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn linked() -> (Link, Worker) {
        let (link, ends) = pair().unwrap();
        let worker = Worker {
            socket: UnixStream::from(ends.requests),
            pipe: File::from(ends.replies),
        };
        (link, worker)
    }

    fn frame(kind: Kind, value: u64, body: &[u8]) -> Vec<u8> {
        let mut bytes = header(kind, body_len(body.len()).unwrap(), value).to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        let bytes = reply_header(Kind::Reply, 1234, 7, u64::MAX - 1);
        let parsed = parse_header(&bytes).unwrap();
        assert_eq!(
            (parsed.kind, parsed.extra, parsed.len, parsed.value),
            (Kind::Reply, 1234, 7, u64::MAX - 1)
        );
        // Long handler times saturate rather than wrap.
        let long = parse_header(&reply_header(Kind::Failed, u32::MAX, 0, 1)).unwrap();
        assert_eq!(long.extra, MAX_MICROS);
        let mut bad = bytes;
        bad[0] = 9;
        assert!(parse_header(&bad).is_err());
        // A length is never cut short into another one.
        assert_eq!(body_len(MAX_BODY).unwrap(), u32::MAX);
        assert!(body_len(MAX_BODY + 1).is_err());
    }

    #[test]
    fn many_small_frames_arrive_whole_and_in_order() {
        let (mut link, mut worker) = linked();
        let mut bytes = Vec::new();
        for i in 0..5000u64 {
            bytes.extend(frame(Kind::Reply, i, &i.to_le_bytes()[..(i % 9) as usize]));
        }
        let writer = std::thread::spawn(move || {
            // Odd-sized writes split headers and bodies across reads.
            for chunk in bytes.chunks(997) {
                worker.pipe.write_all(chunk).unwrap();
            }
        });
        let mut next = 0u64;
        while next < 5000 {
            link.readable();
            match link.try_recv(None).unwrap() {
                Some(message) => {
                    assert_eq!(message.kind, Kind::Reply);
                    assert_eq!(message.value, next);
                    assert_eq!(&*message.body, &next.to_le_bytes()[..(next % 9) as usize]);
                    next += 1;
                }
                None => std::thread::sleep(std::time::Duration::from_micros(50)),
            }
        }
        writer.join().unwrap();
    }

    #[test]
    fn a_large_body_is_read_whole_then_the_stream_continues() {
        let (mut link, mut worker) = linked();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let first = frame(Kind::Reply, 1, &big);
        let writer = std::thread::spawn(move || {
            worker.send(&first);
            worker.send(&frame(Kind::Failed, 2, b"after"));
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            link.readable();
            match link.try_recv(None).unwrap() {
                Some(message) => got.push(message),
                None => std::thread::sleep(std::time::Duration::from_micros(50)),
            }
        }
        writer.join().unwrap();
        assert_eq!((got[0].value, *got[0].body == big), (1, true));
        assert_eq!(
            (got[1].kind, &got[1].body[..]),
            (Kind::Failed, &b"after"[..])
        );
    }

    /// The daemon's and a worker's views of one worker's shared memory,
    /// with body areas for requests of up to `max` bytes.
    fn shared_areas(max: usize) -> (Rc<Claims>, Claims) {
        let (daemon, fd) = Claims::create(super::super::claims::area_len_for(max)).unwrap();
        (Rc::new(daemon), Claims::open(fd).unwrap())
    }

    #[test]
    fn large_bodies_cross_in_the_areas_and_only_frames_take_the_link() {
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared_areas(1 << 20);
        let big = Rc::new(RequestBody::from(vec![5u8; 300_000]));
        let _kept = link.queue_request(1, 3, Rc::clone(&big), 0, Some(&daemon));
        let _kept = link.queue_request(2, 4, Rc::new(b"small".to_vec().into()), 0, Some(&daemon));
        link.flush().unwrap();
        // The worker reads two frames: the first says where its body is.
        let mut got = vec![0; 2 * HEADER_LEN + areas::FRAME_BODY + 5];
        worker.socket.read_exact(&mut got).unwrap();
        let first = parse_header(got[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            (first.kind, first.extra, first.len, first.value),
            (Kind::RequestInArea, 3, 16, 1)
        );
        // SAFETY: written before the frame was sent; nothing writes it now.
        let body = unsafe { areas::request_body(&claims, &got[HEADER_LEN..HEADER_LEN + 16]) };
        assert!(body.unwrap() == &big[..]);
        let second = parse_header(
            got[HEADER_LEN + 16..2 * HEADER_LEN + 16]
                .try_into()
                .unwrap(),
        );
        assert_eq!(second.unwrap().kind, Kind::Request);
        assert_eq!(&got[2 * HEADER_LEN + 16..], b"small");

        // The worker's reply in its reply area comes as a Reply, its bytes
        // where the worker wrote them.
        let mut area = areas::ReplyArea::new(&claims);
        let mut buffer = area.buffer(200_000).unwrap();
        buffer.as_mut().fill(9);
        area.sent(&buffer);
        let place = areas::encode(buffer.at, buffer.len());
        worker.send(&frame(Kind::ReplyInArea, 1, &place));
        let replies = receive_all(&mut link, &daemon);
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0].kind, replies[0].value), (Kind::Reply, 1));
        assert!(*replies[0].body == [9; 200_000]);
        assert!(matches!(replies[0].body, ReplyBody::Area(_)));
        assert!(
            area.buffer(900_000).is_none(),
            "held until the daemon is done with it"
        );
        drop(replies);
        assert!(area.buffer(900_000).is_some(), "given back");

        // The same position again: out of step, the link is broken.
        worker.send(&frame(Kind::ReplyInArea, 2, &place));
        link.readable();
        assert!(link.try_recv(Some(&daemon)).is_err());
    }

    #[test]
    fn a_reply_in_an_area_the_worker_has_not_is_garbage() {
        let (mut link, mut worker) = linked();
        let (daemon, _claims) = shared();
        worker.send(&frame(Kind::ReplyInArea, 1, &areas::encode(0, 100_000)));
        link.readable();
        assert!(link.try_recv(Some(&daemon)).is_err());
    }

    #[test]
    fn a_body_that_does_not_fit_its_area_takes_the_socket() {
        let (mut link, mut worker) = linked();
        let (daemon, _claims) = shared_areas(100_000);
        // The first moves into the area: the dispatcher keeps it as it lies
        // there, and the daemon's own copy goes.
        let own = Rc::new(vec![1; 80_000].into());
        let own_copy = Rc::downgrade(&own);
        let first = link.queue_request(1, 0, own, 0, Some(&daemon));
        assert!(
            first
                .as_ref()
                .is_some_and(|body| body.area_slot() == Some(0)),
            "moved in"
        );
        assert!(
            own_copy.upgrade().is_none(),
            "the daemon's own copy is freed"
        );
        let second = link.queue_request(2, 0, Rc::new(vec![2; 80_000].into()), 0, Some(&daemon));
        assert!(second.is_none(), "no room: it stays where it is");
        link.flush().unwrap();
        let mut got = vec![0; 2 * HEADER_LEN + areas::FRAME_BODY + 80_000];
        worker.socket.read_exact(&mut got).unwrap();
        let second = &got[HEADER_LEN + areas::FRAME_BODY..];
        let header = parse_header(second[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!((header.kind, header.len), (Kind::Request, 80_000));
        assert!(second[HEADER_LEN..].iter().all(|&b| b == 2));
        // Once the first is answered (and the dispatcher drops it), its
        // place is free again.
        worker.send(&frame(Kind::Reply, 1, b"done"));
        assert_eq!(receive_all(&mut link, &daemon).len(), 1);
        drop(first);
        let _kept = link.queue_request(3, 0, Rc::new(vec![3; 80_000].into()), 0, Some(&daemon));
        link.flush().unwrap();
        let mut head = [0; HEADER_LEN];
        worker.socket.read_exact(&mut head).unwrap();
        assert_eq!(parse_header(&head).unwrap().kind, Kind::RequestInArea);
    }

    #[test]
    fn queued_frames_are_written_whole_even_when_the_socket_fills() {
        let (mut link, mut worker) = linked();
        let big = vec![7u8; 16 << 20];
        let _kept = link.queue_request(1, 0, Rc::new(big.clone().into()), 0, None);
        let _kept = link.queue_request(2, 1, Rc::new(b"small".to_vec().into()), 0, None);
        link.flush().unwrap();
        assert!(
            link.has_output(),
            "16 MiB does not fit a socket buffer at once"
        );
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            worker.socket.read_to_end(&mut all).unwrap();
            all
        });
        while link.has_output() {
            link.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        drop(link);
        let all = reader.join().unwrap();
        let mut expected = request_header(0, body_len(big.len()).unwrap(), 1).to_vec();
        expected.extend(&big);
        expected.extend(request_header(1, 5, 2));
        expected.extend(b"small");
        assert!(all == expected);
    }

    /// The daemon's and a worker's views of one worker's claims memory.
    fn shared() -> (
        Rc<crate::workers::claims::Claims>,
        crate::workers::claims::Claims,
    ) {
        use crate::workers::claims::Claims;
        let (daemon, fd) = Claims::create(0).unwrap();
        (Rc::new(daemon), Claims::open(fd).unwrap())
    }

    /// Reads what the link has now (the worker is done writing).
    fn receive_all(link: &mut Link, ring: &Rc<crate::workers::claims::Claims>) -> Vec<Message> {
        let mut got = Vec::new();
        link.readable();
        while let Some(message) = link.try_recv(Some(ring)).unwrap() {
            got.push(message);
        }
        got
    }

    #[test]
    fn replies_in_the_ring_arrive_when_announced_in_order_with_the_pipe() {
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        let mut ring = RingWriter::new(claims.ring());
        let now = Instant::now();
        assert!(ring.push(&frame(Kind::Reply, 1, b"one"), now));
        assert!(ring.push(&frame(Kind::Failed, 2, b"two"), now));
        assert!(
            receive_all(&mut link, &daemon).is_empty(),
            "nothing is read before it is announced"
        );
        // Another frame takes the pipe only after the announcement.
        worker
            .pipe
            .write_all(&ring.announcement().unwrap())
            .unwrap();
        worker.send(&frame(Kind::Reply, 3, &[7; MAX_RINGED_FRAME]));
        assert!(ring.push(&frame(Kind::Reply, 4, b"four"), now));
        worker
            .pipe
            .write_all(&ring.announcement().unwrap())
            .unwrap();
        assert_eq!(ring.announcement(), None, "nothing new to announce");
        let got = receive_all(&mut link, &daemon);
        let ids: Vec<(Kind, u64, usize)> = got
            .iter()
            .map(|m| (m.kind, m.value, m.body.len()))
            .collect();
        assert_eq!(
            ids,
            [
                (Kind::Reply, 1, 3),
                (Kind::Failed, 2, 3),
                (Kind::Reply, 3, MAX_RINGED_FRAME),
                (Kind::Reply, 4, 4)
            ]
        );
        assert_eq!(&got[3].body[..], b"four");
    }

    #[test]
    fn the_ring_refuses_what_does_not_fit_until_the_daemon_reads() {
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        let mut ring = RingWriter::new(claims.ring());
        let now = Instant::now();
        assert!(!ring.push(&frame(Kind::Reply, 1, &[0; MAX_RINGED_FRAME]), now));
        let reply = frame(Kind::Reply, 1, &[1; 8000]);
        let fit = RING_LEN / reply.len();
        for _ in 0..fit {
            assert!(ring.push(&reply, now));
        }
        assert!(!ring.push(&reply, now), "the ring is full");
        worker
            .pipe
            .write_all(&ring.announcement().unwrap())
            .unwrap();
        assert_eq!(receive_all(&mut link, &daemon).len(), fit);
        // Read: its room is the worker's again, and it wraps around.
        for _ in 0..fit {
            assert!(ring.push(&reply, now));
        }
        worker
            .pipe
            .write_all(&ring.announcement().unwrap())
            .unwrap();
        let got = receive_all(&mut link, &daemon);
        assert_eq!(got.len(), fit);
        assert!(got.iter().all(|m| *m.body == [1; 8000]));
    }

    #[test]
    fn a_batch_waits_at_most_the_batch_window() {
        let (_daemon, claims) = shared();
        let mut ring = RingWriter::new(claims.ring());
        let now = Instant::now();
        assert!(!ring.overdue(now + BATCH_WINDOW), "nothing waits");
        assert!(ring.push(&frame(Kind::Reply, 1, b"a"), now));
        assert!(ring.push(&frame(Kind::Reply, 2, b"b"), now + BATCH_WINDOW / 2));
        assert!(!ring.overdue(now + BATCH_WINDOW / 2));
        assert!(
            ring.overdue(now + BATCH_WINDOW),
            "the first one set the clock"
        );
        ring.announcement().unwrap();
        assert!(!ring.overdue(now + BATCH_WINDOW * 2));
    }

    /// A worker that dies with replies written in its ring and not yet
    /// announced (it was running the next request): they are still
    /// delivered, before the end of the link.
    #[test]
    fn replies_a_dead_worker_never_announced_are_delivered() {
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        let mut ring = RingWriter::new(claims.ring());
        let now = Instant::now();
        assert!(ring.push(&frame(Kind::Reply, 1, b"announced"), now));
        worker
            .pipe
            .write_all(&ring.announcement().unwrap())
            .unwrap();
        assert!(ring.push(&frame(Kind::Reply, 2, b"finished"), now));
        assert!(ring.push(&frame(Kind::Reply, 3, b"also"), now));
        assert_eq!(receive_all(&mut link, &daemon).len(), 1);
        drop(worker);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while !link.is_closed() {
            got.extend(receive_all(&mut link, &daemon));
            assert!(Instant::now() < deadline, "the link never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
        got.extend(receive_all(&mut link, &daemon));
        let ids: Vec<u64> = got.iter().map(|m| m.value).collect();
        assert_eq!(ids, [2, 3]);
    }

    /// The daemon takes what a worker running a long call has not announced.
    #[test]
    fn unannounced_replies_can_be_taken_early() {
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        let mut ring = RingWriter::new(claims.ring());
        assert!(ring.push(&frame(Kind::Reply, 5, b"done"), Instant::now()));
        assert!(receive_all(&mut link, &daemon).is_empty());
        link.take_unannounced(&daemon).unwrap();
        let got = receive_all(&mut link, &daemon);
        assert_eq!((got.len(), got[0].value), (1, 5));
        // Its announcement, read later, brings nothing twice.
        worker
            .pipe
            .write_all(&ring.announcement().unwrap())
            .unwrap();
        assert!(receive_all(&mut link, &daemon).is_empty());
    }

    #[test]
    fn a_ring_out_of_step_is_garbage() {
        let announce = |at: u64| header(Kind::Replies, 0, at);
        // Announced beyond what was written.
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        claims.ring().publish_head(10);
        worker.pipe.write_all(&announce(11)).unwrap();
        assert!(link.try_recv(Some(&daemon)).is_err());
        // Written beyond what the ring holds.
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        claims.ring().publish_head(RING_LEN as u64 + 1);
        worker.pipe.write_all(&announce(1)).unwrap();
        assert!(link.try_recv(Some(&daemon)).is_err());
        // A frame longer than what was announced.
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        let long = frame(Kind::Reply, 1, b"0123456789");
        claims.ring().write(0, &long);
        claims.ring().publish_head(long.len() as u64);
        worker
            .pipe
            .write_all(&announce(long.len() as u64 - 1))
            .unwrap();
        assert!(link.try_recv(Some(&daemon)).is_err());
        // An announcement in the ring itself, or with no ring at all.
        let (mut link, mut worker) = linked();
        let (daemon, claims) = shared();
        claims.ring().write(0, &announce(0));
        claims.ring().publish_head(HEADER_LEN as u64);
        worker.pipe.write_all(&announce(HEADER_LEN as u64)).unwrap();
        assert!(link.try_recv(Some(&daemon)).is_err());
        let (mut link, mut worker) = linked();
        worker.pipe.write_all(&announce(0)).unwrap();
        assert!(link.try_recv(None).is_err());
    }

    #[test]
    fn a_closed_peer_is_reported_a_torn_frame_dropped_and_garbage_refused() {
        let (mut link, mut worker) = linked();
        worker.send(&frame(Kind::Ready, 3, b"42"));
        drop(worker);
        let message = link.try_recv(None).unwrap().unwrap();
        assert_eq!((message.kind, message.value), (Kind::Ready, 3));
        assert_ends(&mut link);

        // The worker died with a request unread: its replies are still all
        // there, and then the stream simply ends.
        let (mut link, mut worker) = linked();
        let _kept = link.queue_request(9, 0, Rc::new(b"never read".to_vec().into()), 0, None);
        link.flush().unwrap();
        worker.send(&frame(Kind::Reply, 8, b"done"));
        drop(worker);
        let message = link.try_recv(None).unwrap().unwrap();
        assert_eq!((message.value, &message.body[..]), (8, &b"done"[..]));
        assert_ends(&mut link);

        let (mut link, mut worker) = linked();
        worker
            .pipe
            .write_all(&frame(Kind::Reply, 1, b"abc")[..10])
            .unwrap();
        drop(worker);
        // A short read: nothing more is read until the pipe is readable again.
        assert!(link.try_recv(None).unwrap().is_none());
        assert_ends(&mut link); // the torn frame is dropped

        // Killed halfway through a large body on the socket, with a request
        // still unread there (so the daemon's read ends in ECONNRESET, in the
        // same read as the body's last bytes or the next): the frame is
        // dropped too, even though the pipe had its whole header.
        for read_before_death in [false, true] {
            let (mut link, mut worker) = linked();
            let _kept = link.queue_request(9, 0, Rc::new(b"never read".to_vec().into()), 0, None);
            link.flush().unwrap();
            let large = frame(Kind::Reply, 2, &[5; MAX_PIPED_BODY + 1]);
            worker.pipe.write_all(&large[..HEADER_LEN]).unwrap();
            worker.socket.write_all(&large[HEADER_LEN..1000]).unwrap();
            if read_before_death {
                assert!(link.try_recv(None).unwrap().is_none());
                worker.socket.write_all(&large[1000..2000]).unwrap();
            }
            drop(worker);
            assert_ends(&mut link);
        }

        let (mut link, mut worker) = linked();
        worker.pipe.write_all(&[9; HEADER_LEN]).unwrap();
        assert!(link.try_recv(None).is_err(), "garbage is an error");
    }

    /// Properties of what the daemon makes of the bytes a worker sends:
    /// anything it sends is untrusted.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_kind() -> impl Strategy<Value = Kind> {
            prop_oneof![
                Just(Kind::Ready),
                Just(Kind::InitFailed),
                Just(Kind::Reply),
                Just(Kind::Failed),
                Just(Kind::Request),
            ]
        }

        /// A frame a worker might send; its body is made from `seed`, so
        /// that a large one costs proptest nothing to make or shrink.
        #[derive(Debug, Clone)]
        struct Spec {
            kind: Kind,
            micros: u32,
            value: u64,
            len: usize,
            seed: u8,
        }

        impl Spec {
            fn body(&self) -> Vec<u8> {
                (0..self.len).map(|i| (i % 251) as u8 ^ self.seed).collect()
            }
        }

        /// Mostly small bodies, some either side of [`MAX_PIPED_BODY`], a
        /// few large (those travel on the socket).
        fn any_spec() -> impl Strategy<Value = Spec> {
            let len = prop_oneof![
                6 => 0usize..64,
                2 => (MAX_PIPED_BODY - 2)..=(MAX_PIPED_BODY + 2),
                1 => (MAX_PIPED_BODY + 3)..200_000,
            ];
            (any_kind(), any::<u32>(), any::<u64>(), len, any::<u8>()).prop_map(
                |(kind, micros, value, len, seed)| Spec {
                    kind,
                    micros,
                    value,
                    len,
                    seed,
                },
            )
        }

        /// Bytes that look like frames now and then: random bytes, headers
        /// of a known kind with any length, and with a short one.
        fn garbage() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                (any_kind(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
                    |(kind, micros, len, value)| {
                        reply_header(kind, micros, len, value).to_vec()
                    }
                ),
                (any_kind(), 0u32..64, any::<u64>())
                    .prop_map(|(kind, len, value)| header(kind, len, value).to_vec()),
            ];
            prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
        }

        /// Writes `bytes` in pieces of the sizes in `cuts` (taken in turn).
        fn write_cut(
            out: &mut impl Write,
            bytes: &[u8],
            cuts: &mut impl Iterator<Item = usize>,
        ) -> io::Result<()> {
            let mut at = 0;
            while at < bytes.len() {
                let end = (at + cuts.next().expect("cycled")).min(bytes.len());
                out.write_all(&bytes[at..end])?;
                at = end;
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn any_header_bytes_decode_to_a_known_kind_or_an_error(
                mut bytes in any::<[u8; HEADER_LEN]>(),
            ) {
                // Every kind byte, with the rest of the header at random.
                for kind in 0..=u8::MAX {
                    bytes[0] = kind;
                    let known = (1..=8).contains(&kind);
                    match parse_header(&bytes) {
                        Ok(header) => {
                            prop_assert!(known, "kind {} accepted", kind);
                            prop_assert_eq!(header.kind as u8, kind);
                            prop_assert!(header.extra <= MAX_MICROS);
                            let len = u32::try_from(header.len).expect("a u32 length");
                            let encoded =
                                reply_header(header.kind, header.extra, len, header.value);
                            prop_assert_eq!(encoded, bytes);
                        }
                        Err(e) => {
                            prop_assert!(!known, "kind {} refused: {}", kind, e);
                            prop_assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                        }
                    }
                }
            }

            #[test]
            fn any_header_round_trips(
                kind in any_kind(),
                micros in any::<u32>(),
                len in any::<u32>(),
                value in any::<u64>(),
            ) {
                let header = parse_header(&reply_header(kind, micros, len, value)).unwrap();
                prop_assert_eq!(
                    (header.kind, header.extra, header.len, header.value),
                    (kind, micros.min(MAX_MICROS), len as usize, value)
                );
            }

            /// Frames written as a worker writes them (a body over
            /// MAX_PIPED_BODY on the socket, after its header in the pipe),
            /// cut into any pieces, arrive whole and in order, and nothing
            /// else does.
            #[test]
            fn valid_frames_cut_anyhow_arrive_whole_and_in_order(
                specs in prop::collection::vec(any_spec(), 1..40),
                cuts in prop::collection::vec(1usize..3000, 1..16),
            ) {
                let (mut link, worker) = linked();
                let sent = specs.clone();
                let writer = std::thread::spawn(move || -> io::Result<()> {
                    let Worker { mut socket, mut pipe } = worker;
                    let mut cuts = cuts.into_iter().cycle();
                    // The pipe's bytes, and the large bodies with the offset
                    // in them where their header ends.
                    let mut piped = Vec::new();
                    let mut large = VecDeque::new();
                    for spec in &sent {
                        let len = u32::try_from(spec.len).expect("small");
                        piped.extend(reply_header(spec.kind, spec.micros, len, spec.value));
                        if spec.len > MAX_PIPED_BODY {
                            large.push_back((piped.len(), spec.body()));
                        } else {
                            piped.extend(spec.body());
                        }
                    }
                    let mut at = 0;
                    while at < piped.len() {
                        let end = (at + cuts.next().expect("cycled")).min(piped.len());
                        pipe.write_all(&piped[at..end])?;
                        at = end;
                        while large.front().is_some_and(|(after, _)| *after <= at) {
                            let (_, body) = large.pop_front().expect("checked");
                            write_cut(&mut socket, &body, &mut cuts)?;
                        }
                    }
                    Ok(())
                });
                let deadline = Instant::now() + Duration::from_secs(10);
                for (i, spec) in specs.iter().enumerate() {
                    let message = loop {
                        link.readable();
                        match link.try_recv(None) {
                            Ok(Some(message)) => break message,
                            Ok(None) => {
                                // Fail fast once the worker's ends are closed
                                // (the writer is done) rather than wait.
                                prop_assert!(!link.is_closed(), "frame {}: the link ended first", i);
                                prop_assert!(Instant::now() < deadline, "frame {} never came", i);
                                std::thread::sleep(Duration::from_micros(50));
                            }
                            Err(e) => prop_assert!(false, "frame {}: {}", i, e),
                        }
                    };
                    prop_assert_eq!(
                        (message.kind, message.micros, message.value, message.body.len()),
                        (spec.kind, spec.micros.min(MAX_MICROS), spec.value, spec.len),
                        "frame {}", i
                    );
                    prop_assert!(*message.body == spec.body(), "frame {}: its body differs", i);
                }
                writer.join().expect("the writer does not panic").unwrap();
                // The worker's ends are closed now: nothing more, and the
                // end. (A process another test forks holds copies of every
                // fd until it execs, the pipe's write end too: the end may
                // come a moment later.)
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    link.readable();
                    prop_assert!(link.try_recv(None).unwrap().is_none());
                    if link.is_closed() {
                        break;
                    }
                    prop_assert!(Instant::now() < deadline, "the link never ended");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }

            /// Garbage in the pipe (and on the socket) is refused, or read as
            /// frames made of the bytes written, never more; it never panics.
            #[test]
            fn garbage_is_refused_or_read_as_no_more_than_was_written(
                piped in garbage(),
                socketed in prop::collection::vec(any::<u8>(), 0..2048),
                close in any::<bool>(),
            ) {
                let (mut link, mut worker) = linked();
                worker.pipe.write_all(&piped).unwrap();
                worker.socket.write_all(&socketed).unwrap();
                // Kept open or not: the link must not wait for more either way.
                let _open = (!close).then_some(worker);
                let (mut from_pipe, mut from_socket) = (0, 0);
                // Each frame takes at least a header from the pipe.
                for _ in 0..piped.len() / HEADER_LEN + 4 {
                    link.readable();
                    match link.try_recv(None) {
                        Ok(Some(message)) => {
                            from_pipe += HEADER_LEN;
                            if message.body.len() > MAX_PIPED_BODY {
                                from_socket += message.body.len();
                            } else {
                                from_pipe += message.body.len();
                            }
                            prop_assert!(
                                from_pipe <= piped.len() && from_socket <= socketed.len(),
                                "read {} + {} bytes of {} + {} written",
                                from_pipe, from_socket, piped.len(), socketed.len()
                            );
                        }
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
