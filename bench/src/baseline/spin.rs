//! `serve-baseline --spin N`: libspin.so's work done in-process on a pool of
//! N threads, for CPU-bound figures to be compared with gaspard running
//! libspin.so on N workers.
//!
//! Each thread accepts a connection (the kernel hands each waiting
//! connection to one of the threads blocked in `accept`), reads its v1
//! request, spins for the microseconds it names exactly as libspin.so does
//! (wall-clock time, from the request's ASCII decimal), writes `ok` and
//! closes. No hand-off between threads, so no wake-up beyond the client's
//! own: the in-process limit for this work. A request libspin.so would
//! refuse (not a number) is reset, as gaspard fails a v1 request. v1 only:
//! GSP2's preamble is an oversized length, also reset.

use crate::frame;
use socket2::SockRef;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The longest request read: a number of microseconds needs far fewer bytes.
const MAX_REQUEST: usize = 4096;

/// How long a thread waits for a request's bytes before it gives up on them.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// libspin.so's reply.
pub const REPLY: &[u8] = b"ok";

/// Why a request cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpinError {
    #[error("request is not ASCII digits")]
    NotText,
    #[error("request {0:?} is not a number of microseconds")]
    NotANumber(String),
}

/// What libspin.so does with a request: spin on the CPU for the number of
/// microseconds it gives in ASCII decimal (surrounding white space allowed),
/// then answer [`REPLY`].
pub fn spin(request: &[u8]) -> Result<&'static [u8], SpinError> {
    let text = std::str::from_utf8(request).map_err(|_| SpinError::NotText)?;
    let micros: u64 = text
        .trim()
        .parse()
        .map_err(|_| SpinError::NotANumber(text.to_string()))?;
    let deadline = Instant::now() + Duration::from_micros(micros);
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
    Ok(REPLY)
}

/// Serves on `listener` (blocking) with `threads` threads, until the process
/// is killed.
pub fn serve(listener: TcpListener, threads: usize) -> io::Result<()> {
    let mut pool = Vec::with_capacity(threads);
    for _ in 0..threads {
        let listener = listener.try_clone()?;
        pool.push(std::thread::spawn(move || accept_forever(&listener)));
    }
    for thread in pool {
        // The threads never return; a panic in one is a bug worth showing.
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
    Ok(())
}

fn accept_forever(listener: &TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => answer(stream),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(error) => {
                // Out of file descriptors, most likely: wait for some to close.
                eprintln!("serve-baseline: accept: {error}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One v1 exchange. Errors only end the connection: there is nobody to tell.
fn answer(mut stream: TcpStream) {
    match exchange(&mut stream) {
        Ok(()) => {}
        Err(Failure::Closed) => {}
        Err(Failure::Refused) => {
            // Linger 0: close() sends RST, as a failed request must end.
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    }
}

enum Failure {
    /// The client went away, or closed without a request.
    Closed,
    /// A request that cannot be answered: a reset.
    Refused,
}

impl From<io::Error> for Failure {
    fn from(_: io::Error) -> Failure {
        Failure::Closed
    }
}

fn exchange(stream: &mut TcpStream) -> Result<(), Failure> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut header = [0; frame::HEADER_LEN];
    // A connection closed before its first byte (a probe) is no failure.
    let first = stream.read(&mut header)?;
    if first == 0 {
        return Err(Failure::Closed);
    }
    stream
        .read_exact(&mut header[first..])
        .map_err(|_| Failure::Refused)?;
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        // As gaspard: an empty request is closed without calling the handler.
        return Ok(());
    }
    if len > MAX_REQUEST {
        return Err(Failure::Refused);
    }
    let mut request = vec![0; len];
    stream
        .read_exact(&mut request)
        .map_err(|_| Failure::Refused)?;
    let reply = spin(&request).map_err(|_| Failure::Refused)?;
    stream.write_all(reply)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_as_libspin_reads_them() {
        assert_eq!(spin(b"0"), Ok(REPLY));
        assert_eq!(spin(b" 1\n"), Ok(REPLY));
        assert_eq!(spin(b"1ms"), Err(SpinError::NotANumber("1ms".into())));
        assert_eq!(spin(b"-1"), Err(SpinError::NotANumber("-1".into())));
        assert_eq!(spin(b"\xff"), Err(SpinError::NotText));
    }
}
