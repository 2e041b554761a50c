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
