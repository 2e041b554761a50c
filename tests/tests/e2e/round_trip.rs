//! Requests and replies, byte for byte.

use gaspard_tests::{is_reset, raw_exchange, request, start, with_link, LOCAL_LINK, ZMQ_LINK};
use sha2::{Digest, Sha256};

/// Deterministic bytes covering every value, so a shifted or truncated reply shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn echo_round_trips_1_byte_64_kib_and_16_mib() {
    echo_round_trips(LOCAL_LINK);
}

#[test]
fn echo_round_trips_1_byte_64_kib_and_16_mib_over_zmq() {
    echo_round_trips(ZMQ_LINK);
}

fn echo_round_trips(link: &[&str]) {
    let daemon = start("echo", &with_link(&["--workers", "2"], link));
    for len in [1, 64 << 10, 16 << 20] {
        let payload = pattern(len);
        let reply = daemon.request(&payload).expect("echo reply");
        assert_eq!(reply.len(), len, "reply length for a {len}-byte request");
        assert!(
            reply == payload,
            "reply bytes differ for a {len}-byte request"
        );
    }
}

#[test]
fn zero_length_request_is_closed_without_a_reply() {
    let daemon = start("echo", &["--workers", "1"]);
    let reply = raw_exchange(daemon.addr, &[0, 0, 0, 0]).expect("a clean close, not a reset");
    assert!(reply.is_empty());
    // The daemon still serves.
    assert_eq!(daemon.request(b"after").unwrap(), b"after");
}

#[test]
fn a_client_may_half_close_and_still_get_its_reply() {
    let daemon = start("upper", &["--workers", "1"]);
    let reply = raw_exchange(daemon.addr, &gaspard_tests::pack(b"shout, gaspard")).unwrap();
    assert_eq!(reply, b"SHOUT, GASPARD");
}

#[test]
fn trailing_bytes_after_the_request_are_ignored() {
    let daemon = start("echo", &["--workers", "1"]);
    let mut bytes = gaspard_tests::pack(b"hello");
    bytes.extend_from_slice(b"\n");
    assert_eq!(raw_exchange(daemon.addr, &bytes).unwrap(), b"hello");
}

#[test]
fn sha256_handler_hashes_the_payload() {
    let daemon = start("sha256", &["--workers", "2"]);
    for payload in [&b""[..], b"abc", &pattern(1 << 20)] {
        if payload.is_empty() {
            continue; // an empty request gets no reply by protocol
        }
        let expected: String = Sha256::digest(payload)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(daemon.request(payload).unwrap(), expected.as_bytes());
    }
}

#[test]
fn the_c_handler_echoes() {
    let daemon = start("echo_c", &["--workers", "2"]);
    for len in [1, 4096, 1 << 20] {
        let payload = pattern(len);
        assert!(daemon.request(&payload).unwrap() == payload, "{len} bytes");
    }
}

#[test]
fn two_hundred_concurrent_clients_are_all_answered_correctly() {
    two_hundred_concurrent_clients(LOCAL_LINK);
}

#[test]
fn two_hundred_concurrent_clients_are_all_answered_correctly_over_zmq() {
    two_hundred_concurrent_clients(ZMQ_LINK);
}

fn two_hundred_concurrent_clients(link: &[&str]) {
    let daemon = start("echo", &with_link(&["--workers", "2"], link));
    let addr = daemon.addr;
    let clients: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || {
                let payload = format!("client {i}: {}", "x".repeat(i * 37)).into_bytes();
                (request(addr, &payload), payload)
            })
        })
        .collect();
    for client in clients {
        let (reply, payload) = client.join().unwrap();
        assert_eq!(reply.expect("every client gets a reply"), payload);
    }
}

#[test]
fn an_oversized_header_is_reset_before_any_body_arrives() {
    let daemon = start("echo", &["--workers", "1", "--max-request-size", "1K"]);
    // Only the header is sent: the refusal must not wait for the body.
    let result = raw_exchange(daemon.addr, &2048u32.to_be_bytes());
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log("announced a request of 2048 bytes, over the limit of 1024");
    assert_eq!(daemon.request(&[b'k'; 1024]).unwrap(), vec![b'k'; 1024]);
}
