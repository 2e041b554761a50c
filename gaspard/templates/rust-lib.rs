//! @NAME@: a gaspard handler.
//!
//! Build, check and serve:
//!
//! ```sh
//! cargo build --release
//! gaspard --check --handler target/release/lib@LIB@.so
//! gaspard --handler target/release/lib@LIB@.so --handler-config 'hello, '
//! ```
//!
//! The contract (threads, state, errors) is in gaspard's docs/handler-abi.md.

use gaspard_handler_abi::{export_handler, Handler};

/// Per-worker state: each worker process builds its own with `init`.
struct State {
    /// The `--handler-config` string, put in front of every reply.
    prefix: Vec<u8>,
}

impl Handler for State {
    /// Shown in gaspard's log when `init` or `handle` fails.
    type Error = String;

    /// Runs once in each worker with the `--handler-config` string.
    fn init(config: &str) -> Result<Self, String> {
        Ok(State {
            prefix: config.as_bytes().to_vec(),
        })
    }

    /// Runs once per request; the returned bytes are the reply. An `Err` (or
    /// a panic) fails the request: the client's connection is reset.
    fn handle(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        Ok([self.prefix.as_slice(), request].concat())
    }
}

// A stateless handler, a `fn(&[u8]) -> Result<R, E>`, is exported with
// `export_handler!(function)` instead.
export_handler!(state = State);
