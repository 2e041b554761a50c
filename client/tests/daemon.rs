//! The library against the real daemon: the real `gaspard` binary and real
//! handler plugins, started by the workspace's test harness, on 127.0.0.1.
//! (The `gaspar` command and the Python client are tested the same way in
//! tests/tests/e2e/clients.rs.)

use gaspar_client::{request, request_with, Error, Options, Stage};
use gaspard_tests::start;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// Deterministic bytes covering every value, so a shifted or truncated reply shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn the_reply_is_the_handlers_bytes() {
    let daemon = start("echo", &["--workers", "1"]);
    assert_eq!(request(daemon.addr, "hello").unwrap(), b"hello");
    // gaspar's call shape: a "host:port" string.
    let addr = format!("127.0.0.1:{}", daemon.addr.port());
    assert_eq!(request(addr.as_str(), b"by name").unwrap(), b"by name");
    let every_byte: Vec<u8> = (0..=255u8).rev().collect();
    assert_eq!(request(daemon.addr, &every_byte).unwrap(), every_byte);
    for len in [1, 65_535, 65_536, 65_537, 5 << 20] {
        let payload = pattern(len);
        let reply = request(daemon.addr, &payload).unwrap();
        assert!(reply == payload, "{len} bytes: got {}", reply.len());
    }
}

#[test]
fn an_empty_message_and_an_empty_reply_are_both_an_empty_vec() {
    let daemon = start("fault", &["--workers", "1"]);
    assert_eq!(request(daemon.addr, b"").unwrap(), b"");
    assert_eq!(request(daemon.addr, b"echo:").unwrap(), b"");
    assert_eq!(request(daemon.addr, b"echo:x").unwrap(), b"x");
}

#[test]
fn a_handler_error_is_a_reset() {
    let daemon = start("fault", &["--workers", "1"]);
    let error = request(daemon.addr, b"error:the disk is on fire").unwrap_err();
    assert!(
        matches!(error, Error::Reset { addr } if addr == daemon.addr),
        "{error:?}"
    );
    daemon.expect_log("handler failed: the disk is on fire");
    let error = request(daemon.addr, b"panic:oops").unwrap_err();
    assert!(matches!(error, Error::Reset { .. }), "{error:?}");
    assert_eq!(
        request(daemon.addr, b"echo:still here").unwrap(),
        b"still here"
    );
}

#[test]
fn a_request_over_the_daemons_size_limit_is_a_reset() {
    let daemon = start("echo", &["--workers", "1", "--max-request-size", "1K"]);
    // The daemon resets on the header; the client may still be sending.
    for len in [1025, 8 << 20] {
        let error = request(daemon.addr, pattern(len)).unwrap_err();
        assert!(matches!(error, Error::Reset { .. }), "{len}: {error:?}");
    }
    assert_eq!(request(daemon.addr, [b'k'; 1024]).unwrap(), [b'k'; 1024]);
}

#[test]
fn a_slow_request_times_out_at_the_read_timeout() {
    let daemon = start("fault", &["--workers", "2"]);
    let options = Options {
        read_timeout: Some(Duration::from_millis(500)),
        ..Options::default()
    };
    let started = Instant::now();
    let error = request_with(daemon.addr, b"sleep:3000", &options).unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(error, Error::Timeout { addr, stage: Stage::Reply } if addr == daemon.addr),
        "{error:?}"
    );
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    // The other worker serves meanwhile, under the same options.
    assert_eq!(
        request_with(daemon.addr, b"echo:quick", &options).unwrap(),
        b"quick"
    );
}

#[test]
fn a_port_nothing_listens_on_is_refused() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let error = request(addr, b"hello").unwrap_err();
    assert!(
        matches!(error, Error::Refused { addr: a } if a == addr),
        "{error:?}"
    );
}
