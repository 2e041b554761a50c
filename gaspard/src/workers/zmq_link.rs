//! gaspar's own link, offered as `--link zmq`: libzmq PUSH/PULL over `ipc://`
//! endpoints in the daemon's private runtime directory.
//!
//! Each worker incarnation gets a PUSH socket of its own in the daemon,
//! connected to the PULL endpoint that worker binds, so that the daemon,
//! not libzmq, chooses which worker runs a request: one PUSH socket fanned
//! out to several workers queues ahead into each and silently drops what a
//! dead one had queued. The daemon connects rather than binds so that a
//! request sent before the worker has bound waits in the daemon's queue
//! instead of failing (a bound PUSH with no peer has nowhere to put it).
//! Replies from every worker come back on one PULL socket the daemon binds,
//! as two-part messages: the worker's tag (its slot, u32, then its
//! incarnation, u64, little-endian; the slot finds it, the incarnation
//! proves it is the slot's current worker),
//! then a frame of the local link's format (`link.rs`: header, body). A
//! frame from an incarnation that is gone is dropped; one that breaks the
//! format breaks that worker's link, as on the local link.
//!
//! The claims of each worker (`claims.rs`) are shared memory as on the
//! local link: the worker is on this machine.
//!
//! Slower than the local link (each message crosses a libzmq I/O thread on
//! each side; `docs/benchmarks.md`), which is why it is not the default.
//! libzmq's `ZMQ_FD` is edge-triggered and also signals commands, so the
//! replies socket is read until `EAGAIN` every time it is read at all.

use super::areas::RequestBody;
use super::args::LinkArgs;
use super::link::{self, Kind, Message, HEADER_LEN};
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The longest path an `ipc://` endpoint can have (`sun_path`, less its NUL).
const MAX_IPC_PATH: usize = 107;
/// Requests a worker's PUSH socket may queue: more than the most credit a
/// worker can have (`claims::ENTRIES`), so a send never finds it full.
const SEND_QUEUE: i32 = 4 * super::claims::ENTRIES as i32;
/// How soon the daemon tries again to reach a worker that has not bound its
/// endpoint yet (libzmq's default, 100 ms, would delay first requests).
const RECONNECT_MS: i32 = 5;

/// Why the zmq link cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ZmqLinkError {
    #[error("zmq: {what}: {source}")]
    Zmq {
        what: &'static str,
        #[source]
        source: zmq::Error,
    },
    #[error(
        "the zmq endpoint {0} is longer than an ipc:// path may be \
         (107 bytes); give a shorter --runtime-dir"
    )]
    PathTooLong(PathBuf),
}

fn zmq_err(what: &'static str) -> impl FnOnce(zmq::Error) -> ZmqLinkError {
    move |source| ZmqLinkError::Zmq { what, source }
}

/// Where worker `incarnation` binds its request endpoint in `runtime_dir`.
fn worker_path(runtime_dir: &Path, incarnation: u64) -> PathBuf {
    runtime_dir.join(format!("worker-{incarnation}.zmq"))
}

fn ipc_endpoint(path: &Path) -> Result<String, ZmqLinkError> {
    if path.as_os_str().len() > MAX_IPC_PATH {
        return Err(ZmqLinkError::PathTooLong(path.to_path_buf()));
    }
    Ok(format!("ipc://{}", path.display()))
}

/// The daemon's side of every zmq link: the context and the socket that
/// replies arrive on.
pub(super) struct ZmqHub {
    context: zmq::Context,
    replies: zmq::Socket,
    replies_endpoint: String,
    runtime_dir: PathBuf,
}

/// A message read from the replies socket.
pub(super) enum Received {
    /// From worker `incarnation` in `slot`: a frame, or why it is not one.
    Frame {
        slot: usize,
        incarnation: u64,
        frame: io::Result<Message>,
    },
    /// Not even tagged with a worker: nobody to blame, so it is dropped.
    Untagged,
}

impl ZmqHub {
    /// Binds the replies socket in `runtime_dir` (private to the daemon).
    pub(super) fn bind(runtime_dir: &Path) -> Result<ZmqHub, ZmqLinkError> {
        let context = zmq::Context::new();
        let replies = context
            .socket(zmq::PULL)
            .map_err(zmq_err("replies socket"))?;
        replies.set_linger(0).map_err(zmq_err("replies linger"))?;
        let replies_endpoint = ipc_endpoint(&runtime_dir.join("replies.zmq"))?;
        // Every worker's endpoint must fit too, the last one the daemon
        // could ever start included: known now, not when it starts.
        ipc_endpoint(&worker_path(runtime_dir, u64::MAX))?;
        replies
            .bind(&replies_endpoint)
            .map_err(zmq_err("binding the replies endpoint"))?;
        Ok(ZmqHub {
            context,
            replies,
            replies_endpoint,
            runtime_dir: runtime_dir.to_path_buf(),
        })
    }

    /// Puts the replies socket into the loop (edge-triggered readable).
    pub(super) fn register(&self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        let fd = self.replies.get_fd().map_err(io::Error::from)?;
        registry.register(
            &mut mio::unix::SourceFd(&fd),
            token,
            mio::Interest::READABLE,
        )
    }

    /// Opens the link to worker `incarnation`: its PUSH socket here, and
    /// what to tell the worker.
    pub(super) fn open(&self, incarnation: u64) -> Result<(ZmqLink, LinkArgs), ZmqLinkError> {
        let path = worker_path(&self.runtime_dir, incarnation);
        let endpoint = ipc_endpoint(&path)?;
        let push = self
            .context
            .socket(zmq::PUSH)
            .map_err(zmq_err("request socket"))?;
        push.set_linger(0).map_err(zmq_err("request linger"))?;
        push.set_sndhwm(SEND_QUEUE)
            .map_err(zmq_err("request queue"))?;
        push.set_reconnect_ivl(RECONNECT_MS)
            .map_err(zmq_err("request reconnect"))?;
        push.connect(&endpoint)
            .map_err(zmq_err("connecting a request socket"))?;
        let args = LinkArgs::Zmq {
            requests: endpoint,
            replies: self.replies_endpoint.clone(),
        };
        let link = ZmqLink {
            push,
            path,
            outgoing: VecDeque::new(),
        };
        Ok((link, args))
    }

    /// Waits up to `timeout` for a message on the replies socket.
    pub(super) fn wait_readable(&self, timeout: std::time::Duration) {
        let millis = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        // An error or EINTR is a wait that ended early: the caller reads
        // whatever is there and decides whether to wait again.
        let _ = self.replies.poll(zmq::POLLIN, millis);
    }

    /// The next message on the replies socket, if one is there.
    pub(super) fn try_recv(&self) -> io::Result<Option<Received>> {
        let parts = match self.replies.recv_multipart(zmq::DONTWAIT) {
            Ok(parts) => parts,
            Err(zmq::Error::EAGAIN) => return Ok(None),
            Err(zmq::Error::EINTR) => return self.try_recv(),
            Err(e) => return Err(e.into()),
        };
        let [tag, frame] = parts.as_slice() else {
            return Ok(Some(Received::Untagged));
        };
        let Some((slot, incarnation)) = untag(tag) else {
            return Ok(Some(Received::Untagged));
        };
        Ok(Some(Received::Frame {
            slot,
            incarnation,
            frame: parse_frame(frame),
        }))
    }
}

/// A worker's tag: its slot and incarnation.
fn tag(slot: usize, incarnation: u64) -> [u8; TAG_LEN] {
    let mut tag = [0; TAG_LEN];
    tag[..4].copy_from_slice(&u32::try_from(slot).unwrap_or(u32::MAX).to_le_bytes());
    tag[4..].copy_from_slice(&incarnation.to_le_bytes());
    tag
}

/// The slot and incarnation of a tag, if it is one.
fn untag(bytes: &[u8]) -> Option<(usize, u64)> {
    let bytes: &[u8; TAG_LEN] = bytes.try_into().ok()?;
    let (slot, incarnation) = bytes.split_at(4);
    let slot = u32::from_le_bytes(slot.try_into().ok()?);
    let incarnation = u64::from_le_bytes(incarnation.try_into().ok()?);
    Some((usize::try_from(slot).ok()?, incarnation))
}

/// A frame from a worker, copied out of its message.
fn parse_frame(bytes: &[u8]) -> io::Result<Message> {
    let (header, body) = split_frame(bytes)?;
    Ok(Message {
        kind: header.kind,
        micros: header.extra,
        value: header.value,
        body: body.to_vec().into(),
    })
}

/// The daemon's end of one worker's zmq link: the socket its requests go on.
pub(super) struct ZmqLink {
    push: zmq::Socket,
    /// The worker's endpoint, removed with the link (a worker that died
    /// cannot remove it).
    path: PathBuf,
    outgoing: VecDeque<Vec<u8>>,
}

impl ZmqLink {
    /// Queues request `id` (sent by [`Self::flush`]).
    pub(super) fn queue_request(&mut self, id: u64, ticket: u32, body: Rc<RequestBody>) {
        // Checked by Workers::submit.
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let mut message = Vec::with_capacity(HEADER_LEN + body.len());
        message.extend_from_slice(&link::request_header(ticket, len, id));
        message.extend_from_slice(&body);
        self.outgoing.push_back(message);
    }

    /// Sends what is queued. The socket's queue is larger than any worker's
    /// credit, so a full one means something is wrong with the worker.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        while let Some(message) = self.outgoing.pop_front() {
            match self.push.send(message, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "its zmq request queue is full",
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Forgets what is queued.
    pub(super) fn discard_output(&mut self) {
        self.outgoing.clear();
    }
}

impl Drop for ZmqLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The worker's side of a zmq link (`crate::worker`): it binds its request
/// endpoint and connects to the daemon's replies endpoint. Made after exec,
/// in the worker, never shared across a fork.
pub(crate) struct WorkerZmq {
    requests: zmq::Socket,
    replies: zmq::Socket,
    tag: [u8; TAG_LEN],
    /// The request being run: its payload is read in place, not copied.
    request: Option<zmq::Message>,
    // Last: dropped after the sockets, waiting for what they still send.
    _context: zmq::Context,
}

/// A reply's tag: the worker's slot (u32) and incarnation (u64).
const TAG_LEN: usize = 12;

/// How long a worker's last replies may take to leave when it stops.
const WORKER_LINGER_MS: i32 = 2000;

impl WorkerZmq {
    pub(crate) fn connect(
        requests: &str,
        replies: &str,
        slot: usize,
        incarnation: u64,
    ) -> Result<WorkerZmq, ZmqLinkError> {
        let context = zmq::Context::new();
        let pull = context
            .socket(zmq::PULL)
            .map_err(zmq_err("request socket"))?;
        pull.set_linger(0).map_err(zmq_err("request linger"))?;
        pull.bind(requests)
            .map_err(zmq_err("binding the request endpoint"))?;
        let push = context
            .socket(zmq::PUSH)
            .map_err(zmq_err("replies socket"))?;
        push.set_linger(WORKER_LINGER_MS)
            .map_err(zmq_err("replies linger"))?;
        push.connect(replies)
            .map_err(zmq_err("connecting to the replies endpoint"))?;
        Ok(WorkerZmq {
            requests: pull,
            replies: push,
            tag: tag(slot, incarnation),
            request: None,
            _context: context,
        })
    }

    /// Waits up to `timeout` for the next request: its header and payload
    /// (in the message, kept until the next call); `None` if none came.
    pub(crate) fn next_request(
        &mut self,
        timeout: std::time::Duration,
    ) -> io::Result<Option<(link::Header, &[u8])>> {
        self.request = self.recv(timeout)?;
        match &self.request {
            Some(message) => request_of(message).map(Some),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for a request message; `None` if none came.
    fn recv(&self, timeout: std::time::Duration) -> io::Result<Option<zmq::Message>> {
        let millis = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        match self.requests.poll(zmq::POLLIN, millis) {
            Ok(0) | Err(zmq::Error::EINTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        match self.requests.recv_msg(zmq::DONTWAIT) {
            Ok(message) => Ok(Some(message)),
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `frame` (a header and its body), tagged with this worker.
    pub(crate) fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.replies.send(&self.tag[..], zmq::SNDMORE)?;
        self.replies.send(frame, 0)?;
        Ok(())
    }
}

/// A request message's header, checked as the worker reads it.
fn request_of(message: &[u8]) -> io::Result<(link::Header, &[u8])> {
    let frame = split_frame(message)?;
    if frame.0.kind != Kind::Request {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {:?} frame where a request was expected", frame.0.kind),
        ));
    }
    Ok(frame)
}

/// A frame of the local link's format that is one whole message: a header
/// whose length is exactly what follows it.
fn split_frame(bytes: &[u8]) -> io::Result<(link::Header, &[u8])> {
    let Some((head, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {} bytes, shorter than a header", bytes.len()),
        ));
    };
    let header = link::parse_header(head)?;
    if header.len != body.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a frame that says {} bytes and carries {}",
                header.len,
                body.len()
            ),
        ));
    }
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_must_be_exactly_as_long_as_its_header_says() {
        let mut frame = link::reply_header(Kind::Reply, 7, 3, 42).to_vec();
        frame.extend_from_slice(b"abc");
        let message = parse_frame(&frame).unwrap();
        assert_eq!(
            (
                message.kind,
                message.micros,
                message.value,
                &message.body[..]
            ),
            (Kind::Reply, 7, 42, &b"abc"[..])
        );
        frame.push(b'd');
        assert!(parse_frame(&frame).is_err(), "one byte too many");
        frame.truncate(frame.len() - 2);
        assert!(parse_frame(&frame).is_err(), "one byte too few");
        assert!(
            parse_frame(&frame[..HEADER_LEN - 1]).is_err(),
            "torn header"
        );
    }

    #[test]
    fn requests_cross_from_a_daemon_link_to_a_worker_and_replies_come_back_tagged() {
        let dir = tempfile::tempdir().unwrap();
        let hub = ZmqHub::bind(dir.path()).unwrap();
        let (mut link, args) = hub.open(9).unwrap();
        // Queued before the worker has bound: it must wait, not fail.
        link.queue_request(5, 1, Rc::new(b"hello".to_vec().into()));
        link.flush().unwrap();
        let LinkArgs::Zmq { requests, replies } = args else {
            panic!("{args:?}")
        };
        let worker = WorkerZmq::connect(&requests, &replies, 4, 9).unwrap();
        let message = loop {
            if let Some(m) = worker.recv(std::time::Duration::from_secs(5)).unwrap() {
                break m;
            }
        };
        let (header, body) = request_of(&message).unwrap();
        assert_eq!((header.value, header.extra, body), (5, 1, &b"hello"[..]));

        let mut reply = link::reply_header(Kind::Reply, 1, 2, 5).to_vec();
        reply.extend_from_slice(b"ok");
        worker.send(&reply).unwrap();
        let received = loop {
            if let Some(r) = hub.try_recv().unwrap() {
                break r;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        let Received::Frame {
            slot,
            incarnation,
            frame,
        } = received
        else {
            panic!("untagged")
        };
        let frame = frame.unwrap();
        assert_eq!(
            (slot, incarnation, frame.value, &frame.body[..]),
            (4, 9, 5, &b"ok"[..])
        );
    }

    #[test]
    fn only_a_tag_of_a_slot_and_an_incarnation_names_a_worker() {
        assert_eq!(untag(&tag(4, 9)), Some((4, 9)));
        assert_eq!(untag(&tag(0, u64::MAX)), Some((0, u64::MAX)));
        assert_eq!(untag(&[0; 8]), None, "an incarnation alone");
        assert_eq!(untag(&[0; TAG_LEN + 1]), None);
    }
}
