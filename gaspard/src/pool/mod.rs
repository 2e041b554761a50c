//! Worker pools on other machines.
//!
//! A daemon given `--pool-listen` accepts worker hosts on a zmq ROUTER
//! socket (`server`, part of the workers part); a worker host, `gaspard
//! worker --connect` (`host`), runs worker processes of its own and relays
//! requests and replies over one DEALER socket. The messages are in
//! [`protocol`]; CURVE keys in [`keys`].
//!
//! Why one DEALER per host rather than per worker process: the host's loop
//! never runs handler code, so its heartbeats say whether the host and the
//! network are alive however long a handler call takes (a worker process
//! would fall silent during a long call); the host sees a worker crash at
//! once and fails exactly that worker's requests, within milliseconds; its
//! worker processes are supervised by the same code as a daemon's local
//! workers (back-off, claims, take-backs, --timeout); and one CURVE
//! handshake and one TCP connection serve all its workers.

pub mod host;
pub mod keys;
pub(crate) mod protocol;
pub(crate) mod server;

/// The host of a `tcp://HOST:PORT` endpoint, without an IPv6 address's
/// brackets; `None` if it is not one.
pub(crate) fn endpoint_host(endpoint: &str) -> Option<&str> {
    let (host, _port) = endpoint.strip_prefix("tcp://")?.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

/// Whether `host` (from [`endpoint_host`]) names this machine.
pub(crate) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_endpoints_are_told_from_others() {
        let loopback = |endpoint| endpoint_host(endpoint).is_some_and(is_loopback);
        assert!(loopback("tcp://127.0.0.1:1"));
        assert!(loopback("tcp://localhost:1"));
        assert!(loopback("tcp://[::1]:1"));
        assert!(!loopback("tcp://192.0.2.1:1"));
        assert!(!loopback("tcp://daemon.example:1"));
        assert_eq!(endpoint_host("udp://127.0.0.1:1"), None);
        assert_eq!(endpoint_host("tcp://127.0.0.1"), None);
    }
}
