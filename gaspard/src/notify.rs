//! sd_notify: telling systemd (Type=notify) when gaspard is ready, reloading
//! or stopping, and feeding its watchdog. Std only: one datagram per message
//! to the socket named by NOTIFY_SOCKET; nothing at all without it.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Environment variables that belong to the daemon and must not reach workers.
const DAEMON_ONLY_ENV: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Leaves the daemon's own variables out of a child's environment: a
/// worker or the `--check` child must not talk to systemd as if it were
/// the daemon, nor take its socket.
pub(crate) fn forget_daemon_env(command: &mut std::process::Command) {
    for name in DAEMON_ONLY_ENV {
        command.env_remove(name);
    }
}

pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier systemd asked for, if any.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let addr = match path.as_encoded_bytes() {
            [b'@', name @ ..] => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
            _ => SocketAddr::from_pathname(&path),
        };
        let addr = addr
            .map_err(|e| log::warn!("NOTIFY_SOCKET {path:?} is unusable: {e}"))
            .ok()?;
        let socket = UnixDatagram::unbound()
            .map_err(|e| log::warn!("cannot create the sd_notify socket: {e}"))
            .ok()?;
        Some(Notifier { socket, addr })
    }

    /// Sends one state message, such as `READY=1`. Failures are logged only:
    /// systemd being unreachable must not stop the daemon.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            log::warn!("sd_notify {state:?} failed: {e}");
        }
    }

    /// `RELOADING=1` with the timestamp systemd's notify-reload wants.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }
}

/// How often to send WATCHDOG=1: half of WATCHDOG_USEC, if the watchdog is
/// meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
