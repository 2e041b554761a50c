//! `GET /healthz` on the metrics listener, and the drain a load balancer can
//! see: `--drain-delay`, and a second signal during it.

use gaspard_tests::{http, is_reset, request, start, start_unready, Daemon};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Asks `/healthz` until it says `body` with `status`, or fails the test
/// after `timeout` with what it said last. The loop publishes its health at
/// the end of the turn that changed it, just after the log line that says
/// so: a check right after the line may still see the last turn's.
fn wait_health(daemon: &Daemon, status: u16, body: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let said = daemon.health();
        if said == (status, body.to_string()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz said {said:?}, not {status} {body:?}\n{}",
            daemon.log.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn healthz_says_ok_while_serving_over_http_1_0_1_1_and_head() {
    let daemon = start("fault", &["--workers", "1", "--metrics", "127.0.0.1:0"]);
    wait_health(&daemon, 200, "ok\n", Duration::from_secs(2));
    let metrics = daemon.metrics_addr();
    // HAProxy's `option httpchk GET /healthz` sends HTTP/1.0 without a Host.
    let old = http(metrics, "GET /healthz HTTP/1.0\r\n\r\n");
    assert!(old.starts_with("HTTP/1.1 200 OK\r\n"), "{old}");
    assert!(old.contains("\r\nCache-Control: no-store\r\n"), "{old}");
    assert!(old.contains("\r\nConnection: close\r\n"), "{old}");
    assert!(old.contains("\r\nContent-Length: 3\r\n"), "{old}");
    assert!(old.ends_with("\r\n\r\nok\n"), "{old}");
    let head = http(metrics, "HEAD /healthz HTTP/1.1\r\nHost: gaspard\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.ends_with("\r\nConnection: close\r\n\r\n"), "{head}");
    // The metrics stay where they were.
    assert!(daemon.scrape().contains("gaspard_workers_ready 1"));
}

#[test]
fn healthz_says_starting_until_the_first_workers_are_ready() {
    let mut daemon = start_unready(
        "fault",
        &[
            "--workers",
            "1",
            "--handler-config",
            "sleep:1500",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(daemon.health(), (503, "starting\n".to_string()));
    // Still while the loop runs and the worker's init sleeps.
    daemon.expect_log("worker 1 started in slot 0");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(daemon.health(), (503, "starting\n".to_string()));
    assert!(!daemon.log.contains("listening on"), "served too early");
    daemon.wait_serving();
    wait_health(&daemon, 200, "ok\n", Duration::from_secs(2));
    assert_eq!(daemon.request(b"echo:up").unwrap(), b"up");
}

#[test]
fn healthz_says_failing_while_every_worker_keeps_crashing_then_ok_again() {
    let daemon = start("fault", &["--workers", "1", "--metrics", "127.0.0.1:0"]);
    // Each crash doubles the back-off after the second, so the window in
    // which the only slot keeps failing grows until a check lands in it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = daemon.request(b"segv");
        if daemon.health() == (503, "failing\n".to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never failing:\n{}",
            daemon.log.lines().join("\n")
        );
    }
    daemon.expect_log("back-off after repeated failures");
    // The worker comes back after its back-off: healthy again.
    wait_health(&daemon, 200, "ok\n", Duration::from_secs(20));
    assert_eq!(daemon.request(b"echo:back").unwrap(), b"back");
}

#[test]
fn sigterm_turns_healthz_to_draining_at_once_and_the_drain_delay_still_serves() {
    let mut daemon = start(
        "fault",
        &[
            "--workers",
            "2",
            "--metrics",
            "127.0.0.1:0",
            "--drain-delay",
            "1.5",
        ],
    );
    let addr = daemon.addr;
    let slow = std::thread::spawn(move || request(addr, b"sleep:3000"));
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    daemon.expect_log("stopping gracefully; still accepting for --drain-delay");
    wait_health(&daemon, 503, "draining\n", Duration::from_millis(500));
    // The balancer has not noticed yet: a new client is still served.
    assert_eq!(daemon.request(b"echo:during").unwrap(), b"during");
    assert!(
        signalled.elapsed() < Duration::from_millis(1500),
        "too slow to tell"
    );
    daemon.expect_log("--drain-delay over: port closed");
    assert!(signalled.elapsed() >= Duration::from_millis(1500));
    let refused = TcpStream::connect(addr).map(drop);
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the port is closed after the delay"
    );
    assert_eq!(daemon.health(), (503, "draining\n".to_string()));
    assert_eq!(slow.join().unwrap().unwrap(), b"slept");
    let status = daemon.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(0));
    daemon.expect_log("stopped gracefully: every accepted request was answered");
}

#[test]
fn a_second_sigterm_during_the_drain_delay_ends_it_and_still_answers_every_request() {
    let mut daemon = start(
        "fault",
        &[
            "--workers",
            "1",
            "--metrics",
            "127.0.0.1:0",
            "--drain-delay",
            "30",
        ],
    );
    let addr = daemon.addr;
    let slow = std::thread::spawn(move || request(addr, b"sleep:1500"));
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(libc::SIGTERM);
    daemon.expect_log("stopping gracefully; still accepting for --drain-delay");
    let second = Instant::now();
    daemon.signal(libc::SIGTERM);
    let reply = slow.join().unwrap();
    assert!(!is_reset(&reply), "the accepted request was reset");
    assert_eq!(reply.unwrap(), b"slept");
    daemon.expect_log("SIGTERM again: --drain-delay ended early, port closed");
    let status = daemon.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        second.elapsed() < Duration::from_secs(10),
        "waited for the drain delay"
    );
    daemon.expect_log("stopped gracefully: every accepted request was answered");
    assert!(!daemon.log.contains("stopping now"));
}

#[test]
fn with_nothing_left_to_finish_the_daemon_exits_when_the_drain_delay_ends() {
    let mut daemon = start("echo", &["--workers", "1", "--drain-delay", "0.5"]);
    assert_eq!(daemon.request(b"before").unwrap(), b"before");
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    // Not at the next wake-up (--shutdown-timeout, 30 s): nothing is held.
    let status = daemon.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() >= Duration::from_millis(500));
    daemon.expect_log("stopped gracefully: every accepted request was answered");
}

#[test]
fn a_client_stalled_on_the_metrics_port_does_not_hold_up_health_checks() {
    let daemon = start("echo", &["--workers", "1", "--metrics", "127.0.0.1:0"]);
    // Connected, and never a byte: it is cut off only after 2 s.
    let stalled: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(daemon.metrics_addr()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    assert_eq!(daemon.health(), (200, "ok\n".to_string()));
    assert!(
        // Behind them, it would wait 2 s for each (the scrape timeout).
        asked.elapsed() < Duration::from_millis(1500),
        "the check waited {:?} behind stalled connections",
        asked.elapsed()
    );
    drop(stalled);
}
