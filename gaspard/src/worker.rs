//! The worker process: `gaspard` re-executed with the hidden `__worker`
//! argument. It loads the handler, tells the daemon it is ready, then serves
//! requests one at a time until it is killed or the daemon disappears.
//!
//! It knows nothing about TCP clients: requests come in on its end of the
//! link to the daemon (a socket and a pipe inherited at start, see `link.rs`,
//! or with `--link zmq` two zmq sockets, see `zmq_link.rs`) and its replies
//! go back the same way.

use crate::plugin::Plugin;
use crate::workers::areas::{self, AreaBuffer, ReplyArea};
pub use crate::workers::args::{ArgsError, LinkArgs, WorkerArgs, WORKER_ARG};
use crate::workers::claims::{Claims, Ticket};
use crate::workers::link::{self, Header, Kind, RingWriter, HEADER_LEN};
use crate::workers::zmq_link::{WorkerZmq, ZmqLinkError};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a worker waiting for a request re-checks whether it was asked to
/// stop: a SIGTERM that lands just before the wait must not be lost.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// The worker's read buffer: every request the daemon sent at once is
/// taken in one `read`.
const READ_BUFFER: usize = 64 * 1024;

/// A handler's error message is cut to this many bytes: it is for logs
/// and statuses, and must fit a frame.
const MAX_ERROR: usize = 64 * 1024;

/// Request and reply buffers larger than this are freed after use.
const KEEP_BUFFER: usize = 8 * 1024 * 1024;

/// Exit code of a worker whose handler could not be loaded.
pub const EXIT_INIT_FAILED: u8 = 3;

/// Why a worker stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{what} fd {fd}: {source}")]
    Fd {
        what: &'static str,
        fd: RawFd,
        source: nix::errno::Errno,
    },
    #[error("{what} fd {fd} is not what the daemon passes")]
    FdKind { what: &'static str, fd: RawFd },
    #[error("unexpected {0:?} frame from the daemon")]
    UnexpectedFrame(Kind),
    #[error("request {id} came with claim ticket {bits:#x}")]
    BadTicket { id: u64, bits: u32 },
    #[error("request {id} is said to lie outside the request area")]
    BadArea { id: u64 },
    #[error("cannot watch for SIGTERM: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Zmq(#[from] ZmqLinkError),
    /// The handler could not be loaded (the daemon was told why).
    #[error("the handler could not be loaded")]
    InitFailed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A reply the handler writes into.
enum ReplyBuffer {
    /// In the worker's own memory, with room in front for the frame header
    /// so that header and reply leave in one `write`.
    Own(Vec<u8>),
    /// In its reply area, where the daemon takes it (`areas.rs`).
    Area(AreaBuffer),
}

impl AsMut<[u8]> for ReplyBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            ReplyBuffer::Own(buffer) => &mut buffer[HEADER_LEN..],
            ReplyBuffer::Area(buffer) => buffer.as_mut(),
        }
    }
}

/// A buffer of `len` bytes for the handler to fill: in the reply `area` if
/// it is large and fits there (not zeroed: like `malloc`'s, its bytes are
/// this worker's earlier replies), else reusing `spare`; `None` (NULL to the
/// handler) if it is too large for a frame or cannot be allocated, rather
/// than an abort.
fn reply_buffer(
    spare: &mut Vec<u8>,
    area: Option<&mut ReplyArea<'_>>,
    len: usize,
) -> Option<ReplyBuffer> {
    if len > link::MAX_BODY {
        return None;
    }
    if let Some(buffer) = area.and_then(|area| area.buffer(len)) {
        return Some(ReplyBuffer::Area(buffer));
    }
    let mut buffer = std::mem::take(spare);
    buffer.clear();
    buffer.try_reserve_exact(HEADER_LEN + len).ok()?;
    buffer.resize(HEADER_LEN + len, 0);
    Some(ReplyBuffer::Own(buffer))
}

/// Closes every fd of this process but stdio and `keep`. A process gaspard
/// starts from its own binary (a worker, the `--check` child) inherits
/// whatever the daemon inherited without close-on-exec (a socket systemd
/// passed, a shell's fd 3): the handler it loads must not get those. Call
/// it first, before anything in the process opens an fd of its own.
pub(crate) fn close_inherited_fds(keep: &[RawFd]) {
    // Listed first, then closed: the listing's own fd is closed by then
    // (closing it again fails harmlessly).
    let open: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => {
            log::warn!(
                "cannot list open fds in /proc/self/fd ({e}): the handler may inherit the daemon's"
            );
            return;
        }
    };
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// The worker's main function.
pub fn run(args: WorkerArgs) -> ExitCode {
    crate::buffers::keep_large_buffers();
    let mut keep = vec![args.claims_fd];
    if let LinkArgs::Local {
        requests_fd,
        replies_fd,
    } = args.link
    {
        keep.extend([requests_fd, replies_fd]);
    }
    close_inherited_fds(&keep);
    // Die with the daemon, even on kill -9; if it is already gone, stop now.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        log::warn!("worker: cannot ask to die with the daemon: {e}");
    }
    if nix::unistd::getppid().as_raw() != args.daemon_pid {
        return ExitCode::FAILURE;
    }
    match serve(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(WorkerError::InitFailed) => ExitCode::from(EXIT_INIT_FAILED),
        // The daemon closed the link while this worker wrote to it or read
        // a frame (it is stopping, or gone): nobody is left to answer.
        Err(WorkerError::Io(e)) if daemon_gone(&e) => {
            log::debug!(
                "worker {}: the daemon closed the link: {e}",
                args.incarnation
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("worker {}: {e}", args.incarnation);
            ExitCode::FAILURE
        }
    }
}

/// Takes an fd the daemon passed, if it is of the `kind` expected (a
/// worker started by hand with a wrong number must not write into a file).
pub(crate) fn inherited(
    fd: RawFd,
    what: &'static str,
    kind: nix::sys::stat::SFlag,
) -> Result<OwnedFd, WorkerError> {
    use nix::sys::stat::{fstat, SFlag};
    let stat = fstat(fd).map_err(|source| WorkerError::Fd { what, fd, source })?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != kind {
        return Err(WorkerError::FdKind { what, fd });
    }
    // SAFETY: the daemon passed this fd open for this process alone (see
    // Supervisor::start), it is of the expected kind (checked above), and
    // nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Close-on-exec from here on: a handler that starts programs must not
    // hand them the daemon's fds.
    nix::fcntl::fcntl(
        owned.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|source| WorkerError::Fd { what, fd, source })?;
    Ok(owned)
}

fn serve(args: &WorkerArgs) -> Result<(), WorkerError> {
    use nix::sys::stat::SFlag;
    let claims = Claims::open(inherited(args.claims_fd, "claims", SFlag::S_IFREG)?)?;
    match &args.link {
        LinkArgs::Local {
            requests_fd,
            replies_fd,
        } => {
            let socket = UnixStream::from(inherited(*requests_fd, "requests", SFlag::S_IFSOCK)?);
            let pipe = File::from(inherited(*replies_fd, "replies", SFlag::S_IFIFO)?);
            // Waiting for a request wakes every STOP_CHECK to look at the
            // stop flag.
            socket.set_read_timeout(Some(STOP_CHECK))?;
            let mut link = LocalEnds {
                reader: BufReader::with_capacity(READ_BUFFER, &socket),
                pipe: &pipe,
                socket: &socket,
                ring: RingWriter::new(claims.ring()),
                claims: &claims,
                payload: Vec::new(),
            };
            serve_on(args, &claims, &mut link, Some(ReplyArea::new(&claims)))
        }
        LinkArgs::Zmq { requests, replies } => {
            // Made here, after exec: a zmq context never crosses a fork.
            let mut link = WorkerZmq::connect(requests, replies, args.slot, args.incarnation)?;
            serve_on(args, &claims, &mut link, None)
        }
    }
}

/// What a worker waits for next.
enum Incoming<'a> {
    /// A request: its header and its payload, where the link holds it.
    Request(Header, &'a [u8]),
    /// Nothing within [`STOP_CHECK`].
    Idle,
    /// The daemon closed the link.
    Closed,
}

/// A worker's end of its link, whatever carries it.
trait WorkerLink {
    /// The next request; its payload is borrowed from the link until the
    /// next call (no copy where the link has it in a buffer already).
    fn next(&mut self) -> Result<Incoming<'_>, WorkerError>;
    /// Sends `frame`, a header and its body. A reply may wait (in shared
    /// memory) to leave with the next ones: see [`WorkerLink::flush`].
    /// `now`: the time the caller read last (a reply's end of call), so
    /// that a reply costs one clock read.
    fn send(&mut self, frame: &[u8], now: Instant) -> std::io::Result<()>;
    /// Announces the replies that wait, if any (also done before the link
    /// waits for a request).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves requests from `link`; large replies go into `reply_area` where
/// the link has one (the local link).
fn serve_on(
    args: &WorkerArgs,
    claims: &Claims,
    link: &mut impl WorkerLink,
    mut reply_area: Option<ReplyArea<'_>>,
) -> Result<(), WorkerError> {
    let mut plugin = match Plugin::load_as(&args.load_from, &args.handler, &args.handler_config) {
        Ok(plugin) => plugin,
        Err(e) => {
            let reason = e.to_string();
            send(link, Kind::InitFailed, args.incarnation, reason.as_bytes())?;
            return Err(WorkerError::InitFailed);
        }
    };
    log::debug!(
        "worker {} (pid {}): handler {:?} ready",
        args.incarnation,
        std::process::id(),
        plugin.name()
    );
    // SIGTERM asks for a graceful stop: finish the request at hand, then
    // call the handler's shutdown. Set up before Ready, so that a stop sent
    // as soon as the daemon knows this worker still calls shutdown.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))
        .map_err(WorkerError::Signals)?;
    let pid = std::process::id().to_string();
    send(link, Kind::Ready, args.incarnation, pid.as_bytes())?;

    let mut spare = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // Between requests, not only when none comes for a while: a worker
        // kept busy with small requests must still give back the pages of
        // a large reply once the daemon is done with it.
        if let Some(area) = reply_area.as_mut().filter(|area| area.holds_pages()) {
            area.idle(Instant::now());
        }
        let (header, payload) = match link.next()? {
            Incoming::Request(header, payload) => (header, payload),
            Incoming::Idle => {
                if let Some(area) = &mut reply_area {
                    area.protect_held();
                }
                continue;
            }
            // The daemon is gone: nobody is left to answer.
            Incoming::Closed => break,
        };
        let id = header.value;
        let Some(ticket) = Ticket::decode(header.extra) else {
            return Err(WorkerError::BadTicket {
                id,
                bits: header.extra,
            });
        };
        // The daemon may have taken it back (it waited behind a slow call)
        // and given it to another worker: then it must not run here.
        if !claims.start(ticket, id) {
            continue;
        }
        if let Some(area) = &mut reply_area {
            area.protect_held();
        }
        let started = Instant::now();
        let outcome = plugin.handle(payload, |len| {
            reply_buffer(&mut spare, reply_area.as_mut(), len)
        });
        let now = Instant::now();
        let micros = u32::try_from((now - started).as_micros()).unwrap_or(u32::MAX);
        // Each reply leaves (or, on the local link, is in the shared reply
        // ring) before the next request is claimed: if this worker dies, its
        // claims tell the daemon which one was running, and it has every
        // reply finished before.
        match outcome {
            Ok(Some(ReplyBuffer::Own(mut reply))) => {
                let len = reply.len() - HEADER_LEN;
                let header = link::reply_header(Kind::Reply, micros, link::body_len(len)?, id);
                reply[..HEADER_LEN].copy_from_slice(&header);
                link.send(&reply, now)?;
                spare = reply;
            }
            Ok(Some(ReplyBuffer::Area(buffer))) => {
                let frame =
                    link::area_frame(Kind::ReplyInArea, micros, id, buffer.at, buffer.len());
                if let Some(area) = &mut reply_area {
                    area.sent(&buffer);
                }
                link.send(&frame, now)?;
            }
            Ok(None) => link.send(&link::reply_header(Kind::Reply, micros, 0, id), now)?,
            Err(error) => {
                let error = clip(&error, MAX_ERROR);
                let len = link::body_len(error.len())?;
                let mut frame = link::reply_header(Kind::Failed, micros, len, id).to_vec();
                frame.extend_from_slice(error.as_bytes());
                link.send(&frame, now)?;
            }
        }
        // Buffers are reused between requests, but one large reply must not
        // keep its memory for the worker's whole life (see `LocalEnds::next`
        // for requests).
        if spare.capacity() > KEEP_BUFFER {
            spare = Vec::new();
        }
    }
    log::debug!("worker {}: stopping", args.incarnation);
    link.flush()?;
    // The handler's shutdown runs next: a reply still held must not be
    // within its reach.
    if let Some(area) = &mut reply_area {
        area.protect_held();
    }
    drop(plugin);
    Ok(())
}

/// Sends a frame of `kind` with `value` and `body`.
fn send(link: &mut impl WorkerLink, kind: Kind, value: u64, body: &[u8]) -> std::io::Result<()> {
    let mut frame = link::header(kind, link::body_len(body.len())?, value).to_vec();
    frame.extend_from_slice(body);
    link.send(&frame, Instant::now())
}

/// A worker's end of a local link: requests on the socket; replies go into
/// the reply ring and are announced on the pipe in batches, other frames go
/// on the pipe, except that a body larger than [`link::MAX_PIPED_BODY`]
/// follows its header on the socket (`link.rs`).
struct LocalEnds<'a> {
    reader: BufReader<&'a UnixStream>,
    pipe: &'a File,
    socket: &'a UnixStream,
    ring: RingWriter<'a>,
    /// Where large requests are (`areas.rs`).
    claims: &'a Claims,
    /// The request being run, read here (reused, freed when large).
    payload: Vec<u8>,
}

impl LocalEnds<'_> {
    /// Whether a whole request is in the read buffer: the next one runs
    /// without waiting for the daemon.
    fn request_buffered(&self) -> bool {
        let buffered = self.reader.buffer();
        buffered.len() >= HEADER_LEN && {
            let len = u32::from_le_bytes(buffered[4..8].try_into().expect("4 bytes"));
            buffered.len() - HEADER_LEN >= len as usize
        }
    }

    /// Announces what the ring holds unannounced, in one write.
    fn announce(&mut self) -> std::io::Result<()> {
        match self.ring.announcement() {
            Some(frame) => self.pipe.write_all(&frame),
            None => Ok(()),
        }
    }
}

impl WorkerLink for LocalEnds<'_> {
    fn next(&mut self) -> Result<Incoming<'_>, WorkerError> {
        // One large request must not keep its memory for the worker's life.
        if self.payload.capacity() > KEEP_BUFFER {
            self.payload = Vec::new();
        }
        // Nothing left to run without waiting: the replies go now.
        if !self.request_buffered() {
            self.announce()?;
        }
        match self.reader.fill_buf() {
            Ok([]) => return Ok(Incoming::Closed),
            Ok(_) => {}
            Err(e) if is_retry(&e) => return Ok(Incoming::Idle),
            Err(e) => return Err(e.into()),
        }
        let mut head = [0; HEADER_LEN];
        read_full(&mut self.reader, &mut head)?;
        let header = link::parse_header(&head)?;
        match header.kind {
            Kind::Request => {
                read_payload(&mut self.reader, header.len, &mut self.payload)?;
                Ok(Incoming::Request(header, &self.payload))
            }
            Kind::RequestInArea => {
                let mut place = [0; areas::FRAME_BODY];
                if header.len != place.len() {
                    return Err(WorkerError::BadArea { id: header.value });
                }
                read_full(&mut self.reader, &mut place)?;
                // SAFETY: the daemon wrote these bytes before it sent this
                // frame, and writes them again only after this request is
                // answered (or taken back, and then this worker cannot claim
                // it and does not read them).
                let payload = unsafe { areas::request_body(self.claims, &place) };
                let payload = payload.ok_or(WorkerError::BadArea { id: header.value })?;
                Ok(Incoming::Request(header, payload))
            }
            other => Err(WorkerError::UnexpectedFrame(other)),
        }
    }

    /// A reply goes into the ring, and after a quick call is announced with
    /// those that follow it (see `link.rs`); before any other frame, what
    /// the ring holds is announced, so frames keep their order. A small
    /// frame leaves in one `write`, so a worker that dies leaves at most the
    /// frame it was writing torn.
    fn send(&mut self, frame: &[u8], now: Instant) -> std::io::Result<()> {
        let head: &[u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("a whole header");
        let header = link::parse_header(head)?;
        let is_reply = matches!(header.kind, Kind::Reply | Kind::Failed | Kind::ReplyInArea);
        if is_reply && self.ring.push(frame, now) {
            let quick = u128::from(header.extra) < link::QUICK_CALL.as_micros();
            if !quick || self.ring.overdue(now) {
                self.announce()?;
            }
            return Ok(());
        }
        self.announce()?;
        let (mut pipe, mut socket) = (self.pipe, self.socket);
        let (header, body) = frame.split_at(HEADER_LEN);
        if body.len() <= link::MAX_PIPED_BODY {
            return pipe.write_all(frame);
        }
        pipe.write_all(header)?;
        socket.write_all(body)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.announce()
    }
}

impl WorkerLink for WorkerZmq {
    fn next(&mut self) -> Result<Incoming<'_>, WorkerError> {
        Ok(match self.next_request(STOP_CHECK)? {
            Some((header, payload)) => Incoming::Request(header, payload),
            None => Incoming::Idle,
        })
    }

    fn send(&mut self, frame: &[u8], _now: Instant) -> std::io::Result<()> {
        WorkerZmq::send(self, frame)
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub(crate) fn clip(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether an error says the daemon has closed the link (it is stopping, or
/// gone): a write finds no reader, or a frame ends early. Its end of the
/// link reaching its end between frames is the normal way to stop.
fn daemon_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), BrokenPipe | ConnectionReset | UnexpectedEof)
}

/// Whether a read should simply be tried again: interrupted, or woken by
/// the read timeout.
fn is_retry(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
    matches!(e.kind(), Interrupted | TimedOut | WouldBlock)
}

/// Reads a request's `len` bytes into `payload` (reused, not zeroed first).
fn read_payload(reader: &mut impl Read, len: usize, payload: &mut Vec<u8>) -> std::io::Result<()> {
    payload.clear();
    payload.try_reserve_exact(len).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!("cannot allocate {len} bytes for a request"),
        )
    })?;
    while payload.len() < len {
        let missing = (len - payload.len()) as u64;
        // Appends what arrives, even when the read timeout then interrupts it.
        match reader.take(missing).read_to_end(payload) {
            Ok(_) if payload.len() < len => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes of a frame that has begun: the rest is on
/// its way, so the read timeout only means "not yet".
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_error_messages_are_cut_at_a_character_boundary() {
        assert_eq!(clip("short", 64), "short");
        assert_eq!(clip("héllo", 2), "h", "not inside the two-byte é");
        assert_eq!(clip(&"x".repeat(100_000), MAX_ERROR).len(), MAX_ERROR);
    }
}
