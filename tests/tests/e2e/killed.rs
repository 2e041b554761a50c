//! A daemon killed with SIGKILL: the kernel closes every client socket, and
//! a client that did not get its whole reply must see a reset, never a
//! clean end that reads as a (short or empty) success.

use gaspard_tests::{connect, pack, start};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Reads until the end of the stream or an error: the bytes, and how it ended.
fn read_to_end(stream: &mut TcpStream) -> (usize, std::io::Result<()>) {
    let mut total = 0;
    let mut buf = vec![0; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (total, Err(e)),
        }
    }
}

fn is_reset(ended: &std::io::Result<()>) -> bool {
    matches!(ended, Err(e) if e.kind() == ErrorKind::ConnectionReset)
}

#[test]
fn a_killed_daemon_resets_every_client_it_had_not_answered_in_full() {
    let mut daemon = start("fault", &["--workers", "2"]);
    let timeout = Some(Duration::from_secs(20));

    // Waiting for a worker that is still running its request.
    let mut waiting = connect(daemon.addr).unwrap();
    waiting.set_read_timeout(timeout).unwrap();
    waiting.write_all(&pack(b"sleep:20000")).unwrap();

    // Half-way through a 16 MiB reply it stopped reading.
    const BIG: usize = 16 << 20;
    let mut reading = connect(daemon.addr).unwrap();
    reading.set_read_timeout(timeout).unwrap();
    reading
        .write_all(&pack(format!("big:{BIG}").as_bytes()))
        .unwrap();
    let mut first = vec![0; 1 << 16];
    reading.read_exact(&mut first).unwrap();
    assert_eq!(&first[..10], b"0123456789", "the reply has begun");

    // In the middle of sending its request.
    let mut sending = connect(daemon.addr).unwrap();
    sending.set_read_timeout(timeout).unwrap();
    sending.write_all(&pack(&[b'x'; 100])[..50]).unwrap();

    // Let the daemon take all three in, and fill the big reply's buffers.
    std::thread::sleep(Duration::from_millis(500));
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10)).expect("killed");

    let (got, ended) = read_to_end(&mut waiting);
    assert!(is_reset(&ended), "waiting: {got} bytes, then {ended:?}");
    let (got, ended) = read_to_end(&mut reading);
    assert!(
        got + first.len() < BIG,
        "the reply cannot have been finished"
    );
    assert!(
        is_reset(&ended),
        "mid-reply: {got} more bytes, then {ended:?}"
    );
    let (got, ended) = read_to_end(&mut sending);
    assert!(is_reset(&ended), "mid-request: {got} bytes, then {ended:?}");
}

#[test]
fn a_reply_written_in_full_still_ends_with_a_clean_close() {
    let daemon = start("fault", &["--workers", "1"]);
    let mut stream = connect(daemon.addr).unwrap();
    stream.write_all(&pack(b"big:3000000")).unwrap();
    let (got, ended) = read_to_end(&mut stream);
    assert_eq!((got, ended.is_ok()), (3_000_000, true), "{ended:?}");
    let mut empty = connect(daemon.addr).unwrap();
    empty.write_all(&[0, 0, 0, 0]).unwrap();
    let (got, ended) = read_to_end(&mut empty);
    assert_eq!(
        (got, ended.is_ok()),
        (0, true),
        "an empty request: {ended:?}"
    );
}
