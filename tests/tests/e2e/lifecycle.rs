//! Stopping: nothing is left behind.

use gaspard_tests::{start, wait_gone, with_link, LOCAL_LINK, ZMQ_LINK};
use std::time::Duration;

#[test]
fn sigterm_stops_every_worker_and_removes_the_runtime_files() {
    sigterm_stops_every_worker_and_removes(LOCAL_LINK, 0);
}

/// The zmq link's ipc endpoints (the daemon's replies socket, and one per
/// worker) are runtime files too.
#[test]
fn sigterm_stops_every_worker_and_removes_the_runtime_files_over_zmq() {
    sigterm_stops_every_worker_and_removes(ZMQ_LINK, 1 + 3);
}

/// Stops a daemon of 3 workers with SIGTERM: its runtime directory held the
/// handler's snapshot and `zmq_endpoints` ipc files, and is left empty.
fn sigterm_stops_every_worker_and_removes(link: &[&str], zmq_endpoints: usize) {
    let mut daemon = start("echo", &with_link(&["--workers", "3"], link));
    assert_eq!(daemon.request(b"hi").unwrap(), b"hi");
    let workers = daemon.workers();
    assert_eq!(workers.len(), 3);
    let leftovers = daemon.runtime_leftovers();
    let named = |ending: &str| {
        leftovers
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(ending))
            .count()
    };
    assert_eq!(
        (named("handler-1.so"), named(".zmq")),
        (1, zmq_endpoints),
        "the runtime directory is where the test put it: {leftovers:?}"
    );
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("gaspard exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        wait_gone(&workers, Duration::from_secs(5)),
        Vec::<i32>::new()
    );
    assert_eq!(daemon.runtime_leftovers(), Vec::<std::path::PathBuf>::new());
}

#[test]
fn workers_die_with_the_daemon_even_on_kill_9() {
    let mut daemon = start("echo", &["--workers", "2"]);
    let workers = daemon.workers();
    assert_eq!(workers.len(), 2);
    daemon.signal(libc::SIGKILL);
    daemon
        .wait_exit(Duration::from_secs(10))
        .expect("gaspard is killed");
    assert_eq!(
        wait_gone(&workers, Duration::from_secs(10)),
        Vec::<i32>::new()
    );
}

#[test]
fn sigterm_lets_a_running_request_finish() {
    sigterm_lets_a_running_request(LOCAL_LINK);
}

#[test]
fn sigterm_lets_a_running_request_finish_over_zmq() {
    sigterm_lets_a_running_request(ZMQ_LINK);
}

fn sigterm_lets_a_running_request(link: &[&str]) {
    let mut daemon = start("fault", &with_link(&["--workers", "1"], link));
    let addr = daemon.addr;
    let slow = std::thread::spawn(move || gaspard_tests::request(addr, b"sleep:700"));
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal(libc::SIGTERM);
    assert_eq!(slow.join().unwrap().unwrap(), b"slept");
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("gaspard exits");
    assert_eq!(status.code(), Some(0));
    // New connections are refused once stopping.
    assert!(gaspard_tests::request(addr, b"late").is_err());
}
