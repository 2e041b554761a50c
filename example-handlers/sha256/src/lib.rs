//! `libsha256.so`: replies with the lower-case hex SHA-256 digest of the
//! request (64 bytes). A real CPU-bound handler: about 2 ms per MiB.

use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::fmt::Write;

fn sha256(request: &[u8]) -> Result<String, Infallible> {
    let digest = Sha256::digest(request);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    Ok(hex)
}

gaspard_handler_abi::export_handler!(sha256);
