//! The listening socket: bound by gaspard, or handed over by systemd's socket
//! activation (LISTEN_FDS / LISTEN_PID, the first descriptor, fd 3).

use anyhow::{bail, Context as _};
use mio::net::TcpListener;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};

/// The first descriptor systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;

/// The listener, and whether it came from socket activation.
pub fn open(addr: SocketAddr, backlog: i32) -> anyhow::Result<(TcpListener, bool)> {
    if let Some(listener) = activated()? {
        return Ok((listener, true));
    }
    Ok((bind(addr, backlog)?, false))
}

/// A listening socket with our backlog (mio's default of 1024 is small for
/// bursts; gaspar's 50 made clients wait for SYN retries).
fn bind(addr: SocketAddr, backlog: i32) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket
        .listen(backlog)
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The socket systemd passed, if it passed one to this process.
fn activated() -> anyhow::Result<Option<TcpListener>> {
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
    let kind = socket
        .r#type()
        .context("socket activation: fd 3 is not a socket")?;
    if kind != Type::STREAM || !socket.is_listener().unwrap_or(false) {
        bail!("socket activation: fd 3 is not a listening stream socket");
    }
    socket.local_addr()?.as_socket().ok_or_else(|| {
        anyhow::anyhow!("socket activation: fd 3 is not a TCP socket (use ListenStream=PORT)")
    })?;
    // Workers must not inherit it.
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    Ok(Some(TcpListener::from_std(socket.into())))
}
