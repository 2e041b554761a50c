//! `--allow`: who may connect. The loopback range stands in for a network:
//! the daemon listens on 127.0.0.1 and clients pick their source address
//! (127.0.0.1 or 127.0.0.2) by binding before they connect.

use gaspard_tests::{is_reset, metric, pack, read_reply, start, try_start_with_env};
use socket2::{Domain, Socket, Type};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// A connection to `addr` from the address `source`.
fn connect_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&addr.into())?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(stream)
}

const ALLOWED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[test]
fn only_allowed_addresses_are_served_and_others_are_reset_before_a_byte_is_read() {
    let daemon = start(
        "echo",
        &[
            "--workers",
            "1",
            "--bind",
            "127.0.0.1",
            "--allow",
            "127.0.0.2/32",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    daemon.expect_log("clients accepted only from 127.0.0.2/32 (--allow)");

    let mut allowed = connect_from(ALLOWED, daemon.addr).unwrap();
    allowed.write_all(&pack(b"let me in")).unwrap();
    assert_eq!(read_reply(&mut allowed).unwrap(), b"let me in");

    // The refused client sends nothing: the reset comes at accept, without
    // waiting for a request.
    let mut refused = connect_from(OTHER, daemon.addr).unwrap();
    let source = refused.local_addr().unwrap();
    let result = read_reply(&mut refused);
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log(&format!(
        "client {source}: address not in --allow; connection reset"
    ));

    // One that sends its request is reset all the same, and never served.
    let mut refused = connect_from(OTHER, daemon.addr).unwrap();
    let sent = refused.write_all(&pack(b"sneak in"));
    let result = sent.and_then(|()| read_reply(&mut refused));
    assert!(
        matches!(&result, Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)),
        "{result:?}"
    );

    let scrape = daemon.scrape();
    assert_eq!(
        metric(
            &scrape,
            "gaspard_connections_refused_total{reason=\"not_allowed\"}"
        ),
        2.0,
        "{scrape}"
    );
    assert_eq!(
        metric(&scrape, "gaspard_requests_total{outcome=\"ok\"}"),
        1.0,
        "{scrape}"
    );
    // Refusals do not stop the allowed client being served.
    let mut allowed = connect_from(ALLOWED, daemon.addr).unwrap();
    allowed.write_all(&pack(b"still here")).unwrap();
    assert_eq!(read_reply(&mut allowed).unwrap(), b"still here");
}

const EXPOSED: &str = "is open to anyone who can reach it";

#[test]
fn a_port_open_beyond_loopback_without_allow_is_warned_about_at_start() {
    let daemon = start("echo", &["--workers", "1", "--bind", "0.0.0.0"]);
    let warning = daemon.expect_log(EXPOSED);
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&format!("the client port 0.0.0.0:{}", daemon.addr.port())),
        "{warning}"
    );
    assert!(warning.contains("--allow CIDR"), "{warning}");
}

#[test]
fn a_port_open_beyond_loopback_with_allow_is_not_warned_about() {
    // Through the environment, as a comma list.
    let daemon = try_start_with_env(
        "echo",
        &["--workers", "1", "--bind", "0.0.0.0"],
        &[("GASPARD_ALLOW", "127.0.0.0/8,::1")],
    )
    .unwrap_or_else(|(status, log)| panic!("did not start ({status:?}):\n{:?}", log.lines()));
    daemon.expect_log("clients accepted only from 127.0.0.0/8, ::1/128 (--allow)");
    // The log is complete up to "listening on", logged after the check.
    assert!(!daemon.log.contains(EXPOSED), "{:?}", daemon.log.lines());
    let loopback = SocketAddr::new(OTHER, daemon.addr.port());
    assert_eq!(gaspard_tests::request(loopback, b"in").unwrap(), b"in");
}

#[test]
fn the_loopback_default_is_not_warned_about() {
    let daemon = start("echo", &["--workers", "1"]);
    assert!(!daemon.log.contains(EXPOSED), "{:?}", daemon.log.lines());
}
