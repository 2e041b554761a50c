//! Stopping: nothing is left behind.

use gaspard_tests::{start, wait_gone};
use std::time::Duration;

#[test]
fn sigterm_stops_every_worker_and_removes_the_runtime_files() {
    let mut daemon = start("echo", &["--workers", "3"]);
    assert_eq!(daemon.request(b"hi").unwrap(), b"hi");
    let workers = daemon.workers();
    assert_eq!(workers.len(), 3);
    let leftovers = daemon.runtime_leftovers();
    assert!(
        leftovers
            .iter()
            .any(|p| p.to_string_lossy().ends_with("handler-1.so")),
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
    let mut daemon = start("fault", &["--workers", "1"]);
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
