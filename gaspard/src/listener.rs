//! The listening socket: bound by gaspard, or handed over by systemd's socket
//! activation (LISTEN_FDS / LISTEN_PID, the first descriptor, fd 3).

use mio::net::TcpListener;
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};

/// The first descriptor systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;

/// Why there is no listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket activation: fd 3 is not a socket: {0}")]
    NotASocket(io::Error),
    #[error("socket activation: fd 3 is not a listening stream socket")]
    NotListening,
    #[error("socket activation: fd 3 is not a TCP socket (use ListenStream=PORT)")]
    NotTcp,
    #[error("socket activation: {0}")]
    Activated(io::Error),
    #[error("cannot set SO_LINGER on the listener: {0}")]
    Linger(io::Error),
}

/// Errors after which retrying accept at once would spin: out of file
/// descriptors or memory.
pub(crate) fn is_resource_exhaustion(error: &io::Error) -> bool {
    use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(error.raw_os_error(), Some(errno) if [EMFILE, ENFILE, ENOBUFS, ENOMEM].contains(&errno))
}

/// The listener, and whether it came from socket activation.
///
/// Connections it accepts start with SO_LINGER {on, 0} (Linux copies the
/// listener's socket options into each accepted socket): until its reply
/// is written in full, a client's socket closes with a reset, even when the
/// daemon is killed and the kernel closes it. gaspar's framing ends a reply
/// with the close, so a plain FIN there would read as a complete (short or
/// empty) reply. A connection that ends well restores the normal close
/// (`Connection::close`).
pub(crate) fn open(addr: SocketAddr, backlog: i32) -> Result<(TcpListener, bool), ListenError> {
    let (listener, activated) = match activated()? {
        Some(listener) => (listener, true),
        None => (bind(addr, backlog)?, false),
    };
    socket2::SockRef::from(&listener)
        .set_linger(Some(std::time::Duration::ZERO))
        .map_err(ListenError::Linger)?;
    Ok((listener, activated))
}

/// A listening socket with our backlog (mio's default of 1024 is small for
/// bursts; gaspar's 50 made clients wait for SYN retries).
fn bind(addr: SocketAddr, backlog: i32) -> Result<TcpListener, ListenError> {
    let listen = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        Ok(socket)
    };
    let socket = listen().map_err(|source| ListenError::Bind { addr, source })?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The socket systemd passed, if it passed one to this process.
fn activated() -> Result<Option<TcpListener>, ListenError> {
    let Some(pid) = std::env::var_os("LISTEN_PID") else {
        return Ok(None);
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None); // meant for another process
    }
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if count < 1 {
        return Ok(None);
    }
    if count > 1 {
        log::warn!("socket activation passed {count} sockets; serving the first only");
    }
    // SAFETY: systemd's protocol hands this process descriptors 3.. as its
    // own; nothing else in gaspard has taken fd 3.
    let socket = unsafe { Socket::from_raw_fd(SD_LISTEN_FDS_START) };
    let kind = socket.r#type().map_err(ListenError::NotASocket)?;
    if kind != Type::STREAM || !socket.is_listener().unwrap_or(false) {
        return Err(ListenError::NotListening);
    }
    let local = socket.local_addr().map_err(ListenError::Activated)?;
    local.as_socket().ok_or(ListenError::NotTcp)?;
    // Workers must not inherit it.
    socket.set_cloexec(true).map_err(ListenError::Activated)?;
    socket
        .set_nonblocking(true)
        .map_err(ListenError::Activated)?;
    Ok(Some(TcpListener::from_std(socket.into())))
}
