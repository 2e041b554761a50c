//! gaspar's wire protocol, as pure functions: a request is a 4-byte unsigned
//! big-endian length followed by that many bytes; the reply is raw bytes
//! followed by a clean close. See `docs/protocol.md`.
//!
//! A connection's first frame may instead be the persistent extension's
//! preamble ([`Decoded::Extension`]).
//!
//! The wire format and the incremental request decoder are gaspar-protocol's,
//! shared with the client and the load generator, so there is one decoder of
//! untrusted bytes, tested and fuzzed there on its own.

#[cfg(test)]
pub use gaspar_protocol::request as pack;
pub use gaspar_protocol::{
    handshake, reply_header, Decoded, RequestDecoder, Status, REPLY_HEADER_LEN,
};
