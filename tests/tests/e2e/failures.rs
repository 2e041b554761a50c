//! Failed requests end with a reset and a log line; the daemon keeps serving.

use gaspard_tests::{is_reset, start, with_link, LOCAL_LINK, ZMQ_LINK};
use std::time::Duration;

#[test]
fn a_handler_error_resets_the_connection_and_logs_why() {
    handler_errors(LOCAL_LINK);
}

#[test]
fn a_handler_error_resets_the_connection_and_logs_why_over_zmq() {
    handler_errors(ZMQ_LINK);
}

fn handler_errors(link: &[&str]) {
    let daemon = start("fault", &with_link(&["--workers", "1"], link));
    let result = daemon.request(b"error:the disk is on fire");
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log("handler failed: the disk is on fire");
    assert_eq!(daemon.request(b"echo:still here").unwrap(), b"still here");
}

#[test]
fn a_handler_panic_is_an_error_not_a_crash() {
    let daemon = start("fault", &["--workers", "1"]);
    let worker = daemon.workers();
    let result = daemon.request(b"panic:oops");
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log("handler panicked: oops");
    assert_eq!(daemon.workers(), worker, "the worker survived the panic");
}

#[test]
fn a_crashing_worker_fails_its_request_and_is_replaced() {
    crashing_workers(LOCAL_LINK);
}

#[test]
fn a_crashing_worker_fails_its_request_and_is_replaced_over_zmq() {
    crashing_workers(ZMQ_LINK);
}

fn crashing_workers(link: &[&str]) {
    let daemon = start("fault", &with_link(&["--workers", "2"], link));
    let before = daemon.workers();
    for crash in [&b"segv"[..], b"abort", b"exit:7"] {
        let result = daemon.request(crash);
        assert!(
            is_reset(&result),
            "{:?}: {result:?}",
            String::from_utf8_lossy(crash)
        );
    }
    let after = daemon.wait_for_workers(2, &[], Duration::from_secs(30));
    assert_ne!(
        before, after,
        "crashed workers were replaced by new processes"
    );
    daemon.expect_log("was killed by SIGSEGV");
    daemon.expect_log("was killed by SIGABRT");
    daemon.expect_log("exited with status 7");
    assert_eq!(daemon.request(b"echo:alive").unwrap(), b"alive");
    // A crash is told once, with its cause: a request sent to the dead
    // worker before its death was read is not an error of its own.
    let lines = daemon.log.lines();
    assert!(
        !lines.iter().any(|l| l.contains("cannot send requests")),
        "{lines:#?}"
    );
}

#[test]
fn a_request_past_the_timeout_is_reset_and_its_worker_replaced() {
    requests_past_the_timeout(LOCAL_LINK);
}

#[test]
fn a_request_past_the_timeout_is_reset_and_its_worker_replaced_over_zmq() {
    requests_past_the_timeout(ZMQ_LINK);
}

fn requests_past_the_timeout(link: &[&str]) {
    let daemon = start(
        "fault",
        &with_link(&["--workers", "1", "--timeout", "0.5"], link),
    );
    let before = daemon.workers();
    let result = daemon.request(b"sleep:30000");
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log("ran past --timeout");
    daemon.wait_for_workers(1, &before, Duration::from_secs(30));
    assert_eq!(daemon.request(b"echo:next").unwrap(), b"next");
    // Its death tells its cause and counts the request it failed.
    daemon.expect_log(
        "was killed because a request ran past --timeout; 1 requests failed; restarting it",
    );
}

#[test]
fn a_worker_killed_from_outside_is_replaced() {
    workers_killed_from_outside(LOCAL_LINK);
}

#[test]
fn a_worker_killed_from_outside_is_replaced_over_zmq() {
    workers_killed_from_outside(ZMQ_LINK);
}

fn workers_killed_from_outside(link: &[&str]) {
    let daemon = start("echo", &with_link(&["--workers", "2"], link));
    let before = daemon.workers();
    // SAFETY: kill(2) on a worker of the daemon this test started.
    unsafe { libc::kill(before[0], libc::SIGKILL) };
    let after = daemon.wait_for_workers(2, &before[..1], Duration::from_secs(30));
    assert!(after.contains(&before[1]), "the other worker was untouched");
    for _ in 0..4 {
        assert_eq!(daemon.request(b"x").unwrap(), b"x");
    }
}
