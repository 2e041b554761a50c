//! `libecho.so`: replies with the request, byte for byte.
//!
//! `gaspard --handler target/release/libecho.so --port 10123`

use std::convert::Infallible;

fn echo(request: &[u8]) -> Result<&[u8], Infallible> {
    Ok(request)
}

gaspard_handler_abi::export_handler!(echo);
