//! The `gaspar` command's exit statuses for what it can tell without a
//! daemon. (Against the real daemon: tests/tests/e2e/clients.rs.)

#![cfg(feature = "cli")]

use std::process::{Command, Output};

fn gaspar(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gaspar"))
        .args(args)
        .output()
        .expect("run gaspar")
}

#[test]
fn an_address_without_a_port_number_is_a_usage_error() {
    for addr in ["127.0.0.1:x", "localhost", "127.0.0.1:65536", "127.0.0.1:"] {
        let output = gaspar(&[addr, "hello"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{addr}: {stderr}");
        assert_eq!(output.stdout, b"", "{addr}");
        assert!(
            stderr.contains("expected HOST:PORT, such as 127.0.0.1:10123"),
            "{addr}: {stderr}"
        );
    }
}

#[test]
fn a_port_nothing_listens_on_is_still_refused() {
    // Bound, then closed: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let output = gaspar(&[&addr.to_string(), "hello"]);
    assert_eq!(output.status.code(), Some(5), "{output:?}");
}
