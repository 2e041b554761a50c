//! `libspin.so`: busy-spins on the CPU for the number of microseconds given in
//! the request as ASCII decimal (e.g. `1000`), then replies `ok`. It models a
//! CPU-bound handler of known cost, for benchmarks.

use std::time::{Duration, Instant};

fn spin(request: &[u8]) -> Result<&'static [u8], String> {
    let text = std::str::from_utf8(request).map_err(|_| "request is not ASCII digits")?;
    let micros: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("request {text:?} is not a number of microseconds"))?;
    let deadline = Instant::now() + Duration::from_micros(micros);
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
    Ok(b"ok")
}

gaspard_handler_abi::export_handler!(spin);
