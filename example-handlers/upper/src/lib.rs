//! `libupper.so`: replies with the request, ASCII letters upper-cased; other
//! bytes (including UTF-8 sequences) pass through unchanged.

use std::convert::Infallible;

fn upper(request: &[u8]) -> Result<Vec<u8>, Infallible> {
    Ok(request.to_ascii_uppercase())
}

gaspard_handler_abi::export_handler!(upper);
