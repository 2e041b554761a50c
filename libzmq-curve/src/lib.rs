//! libzmq 4.3.4 with CURVE, for the `zmq` crate: built from source with
//! libsodium, so that a fresh machine needs no system package (see
//! `build.rs` and the workspace's `.cargo/config.toml`). Depend on it beside
//! `zmq`; there is nothing to call.

/// Whether this crate built the libzmq in use (else zmq-sys built its own).
pub const BUILT_HERE: bool = cfg!(curve_built_here);
