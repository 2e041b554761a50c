//! The zmq link between the daemon and its workers.
//!
//! Each worker binds its own PULL socket (`w<incarnation>.ipc`), and the daemon
//! connects one PUSH socket to it once the worker says it is ready: the daemon
//! then knows exactly which worker holds which request. Every worker connects a
//! PUSH socket to the daemon's one PULL socket (`replies.ipc`) for replies.
//! Both live in the private runtime directory.
//!
//! Messages are two frames. Daemon → worker: the request id (little-endian
//! u64, 8 bytes), then the payload. Worker → daemon: a 9-byte header (a
//! [`Kind`] byte, then a little-endian u64), then a body. `ZMQ_FD` is
//! edge-triggered: callers drain until `EAGAIN`.

use std::path::Path;

/// Frame header of worker → daemon messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The handler loaded and initialised; the value is the worker incarnation.
    Ready = 1,
    /// Loading or init failed; value: incarnation; body: the reason.
    InitFailed = 2,
    /// A reply; value: request id; body: the reply bytes.
    Reply = 3,
    /// The handler failed; value: request id; body: its message.
    Failed = 4,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Ready,
            2 => Kind::InitFailed,
            3 => Kind::Reply,
            4 => Kind::Failed,
            _ => return None,
        })
    }
}

const HEADER_LEN: usize = 9;

/// Encodes a message header.
pub fn header(kind: Kind, value: u64) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&value.to_le_bytes());
    header
}

/// Decodes a message header; `None` for anything malformed.
pub fn parse_header(bytes: &[u8]) -> Option<(Kind, u64)> {
    let bytes: &[u8; HEADER_LEN] = bytes.try_into().ok()?;
    let kind = Kind::from_byte(bytes[0])?;
    let value = u64::from_le_bytes(bytes[1..].try_into().ok()?);
    Some((kind, value))
}

/// The socket file a worker incarnation binds for requests.
pub fn worker_socket(dir: &Path, incarnation: u64) -> std::path::PathBuf {
    dir.join(format!("w{incarnation}.ipc"))
}

/// The endpoint a worker incarnation binds for requests.
pub fn worker_endpoint(dir: &Path, incarnation: u64) -> String {
    format!("ipc://{}", worker_socket(dir, incarnation).display())
}

/// The endpoint the daemon binds for replies.
pub fn replies_endpoint(dir: &Path) -> String {
    format!("ipc://{}/replies.ipc", dir.display())
}

/// A socket that never blocks process exit on unsent messages.
pub fn socket(ctx: &zmq::Context, kind: zmq::SocketType) -> zmq::Result<zmq::Socket> {
    let socket = ctx.socket(kind)?;
    socket.set_linger(0)?;
    Ok(socket)
}

/// One message received by the daemon.
pub struct FromWorker {
    pub kind: Kind,
    pub value: u64,
    pub body: zmq::Message,
}

/// Receives one whole message without blocking. `Ok(None)`: nothing waiting.
/// Malformed messages are skipped with a log line.
pub fn try_recv(socket: &zmq::Socket) -> zmq::Result<Option<FromWorker>> {
    loop {
        let mut head = zmq::Message::new();
        match socket.recv(&mut head, zmq::DONTWAIT) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => return Ok(None),
            Err(zmq::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
        // A message's frames arrive together, so the body is already here.
        let mut body = zmq::Message::new();
        let whole = head.get_more() && socket.recv(&mut body, zmq::DONTWAIT).is_ok();
        let mut extra = false;
        while body.get_more() {
            extra = true;
            let _ = socket.recv(&mut body, zmq::DONTWAIT);
        }
        match parse_header(&head) {
            Some((kind, value)) if whole && !extra => {
                return Ok(Some(FromWorker { kind, value, body }))
            }
            _ => log::error!(
                "dropped a malformed message from a worker ({} byte header)",
                head.len()
            ),
        }
    }
}

/// Sends a two-frame message without blocking. On `EAGAIN` nothing was sent.
pub fn try_send(socket: &zmq::Socket, head: &[u8], body: zmq::Message) -> zmq::Result<()> {
    socket.send(head, zmq::DONTWAIT | zmq::SNDMORE)?;
    // With the first frame queued, libzmq guarantees room for the rest.
    socket.send(body, zmq::DONTWAIT)
}
