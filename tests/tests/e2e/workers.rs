//! Worker processes: how many, and that the work spreads over them.

use gaspard_tests::{connect, handler, pack, read_reply, request, start, try_start_with_env};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn default_worker_count_is_the_available_cpus() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let daemon = start("echo", &[]);
    assert_eq!(daemon.workers().len(), cpus);
    daemon.expect_log(&format!("{cpus} workers"));
}

#[test]
fn workers_flag_sets_the_count() {
    let daemon = start("echo", &["--workers", "3"]);
    assert_eq!(daemon.workers().len(), 3);
}

#[test]
fn workers_count_is_read_from_the_environment_too() {
    let daemon = try_start_with_env("echo", &[], &[("GASPARD_WORKERS", "3")])
        .unwrap_or_else(|(status, log)| panic!("{status:?}: {:?}", log.lines()));
    assert_eq!(daemon.workers().len(), 3);
}

#[test]
fn different_workers_serve_requests() {
    let daemon = start("fault", &["--workers", "2"]);
    let workers = daemon.workers();
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let pid: i32 = String::from_utf8(daemon.request(b"pid").unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            workers.contains(&pid),
            "pid {pid} is not one of {workers:?}"
        );
        served.insert(pid);
    }
    assert_eq!(served.len(), 2, "both workers served: {served:?}");
}

#[test]
fn an_idle_worker_never_waits_behind_a_long_request() {
    let daemon = start("fault", &["--workers", "2"]);
    let addr = daemon.addr;
    let long_done = Arc::new(AtomicBool::new(false));
    let done = long_done.clone();
    let long = std::thread::spawn(move || {
        let reply = request(addr, b"sleep:4000");
        done.store(true, Ordering::SeqCst);
        reply
    });
    // Give the long request time to reach a worker.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        assert_eq!(daemon.request(b"echo:quick").unwrap(), b"quick");
        assert!(
            !long_done.load(Ordering::SeqCst),
            "quick requests were answered while the long one ran"
        );
    }
    assert_eq!(long.join().unwrap().unwrap(), b"slept");
}

#[test]
fn a_queued_request_waits_for_the_first_free_worker_not_behind_a_long_one() {
    queued_requests_behind_busy_workers(&["--workers", "2"], 0);
}

/// Workers that have just served quick requests take several at a time
/// (--worker-credit auto), but never behind a request that runs long.
#[test]
fn after_quick_requests_nothing_is_staged_behind_a_long_one() {
    queued_requests_behind_busy_workers(&["--workers", "2"], 50);
}

/// Quick requests that arrive together with a long one may be staged behind
/// it before it shows it is slow; they are taken back from its worker (it
/// never starts them) and served by the other one, long before the long
/// call ends. (`--timeout` is far away: it is not what moves them.)
#[test]
fn requests_staged_behind_a_call_that_turns_out_slow_are_taken_back() {
    quick_requests_sent_with_a_long_one(&["--workers", "2", "--timeout", "60"]);
}

#[test]
fn requests_staged_behind_a_call_that_turns_out_slow_are_taken_back_over_zmq() {
    quick_requests_sent_with_a_long_one(&["--workers", "2", "--timeout", "60", "--link", "zmq"]);
}

/// With --timeout 0 no deadline would ever move a request staged behind a
/// call that hangs: taking it back is what does.
#[test]
fn without_a_timeout_quick_requests_still_do_not_wait_behind_a_long_call() {
    quick_requests_sent_with_a_long_one(&["--workers", "2", "--timeout", "0"]);
}

/// Under steady load, room freed by the other worker must go to requests
/// stuck behind a slow call before newer ones, or they wait for the whole
/// call. 16 clients keep sending 1 ms requests (so the queue is never empty
/// for long) while one 4 s request runs: none of the quick ones may take
/// anywhere near that long.
#[test]
fn under_steady_load_requests_behind_a_slow_call_move_before_newer_ones() {
    let daemon = start("fault", &["--workers", "2", "--timeout", "0"]);
    let addr = daemon.addr;
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                while !done.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    assert_eq!(request(addr, b"sleep:1").unwrap(), b"slept");
                    slowest = slowest.max(started.elapsed());
                }
                slowest
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(request(addr, b"sleep:4000").unwrap(), b"slept");
    done.store(true, Ordering::Relaxed);
    let slowest = clients
        .into_iter()
        .map(|client| client.join().unwrap())
        .max()
        .unwrap();
    assert!(
        slowest < Duration::from_millis(2000),
        "a quick request waited {slowest:?}, behind the 4 s one"
    );
}

/// Warms the workers up with quick requests, sends a 3 s one and 8 quick
/// ones back to back (so that they reach the daemon in the same moment),
/// and checks that the quick ones are all answered well before the long one.
fn quick_requests_sent_with_a_long_one(args: &[&str]) {
    let daemon = start("fault", args);
    let addr = daemon.addr;
    for _ in 0..20 {
        assert_eq!(request(addr, b"echo:warm").unwrap(), b"warm");
    }
    let mut quick: Vec<_> = (0..8).map(|_| connect(addr).unwrap()).collect();
    let mut long = connect(addr).unwrap();
    long.write_all(&pack(b"sleep:3000")).unwrap();
    for (i, stream) in quick.iter_mut().enumerate() {
        stream
            .write_all(&pack(format!("echo:{i}").as_bytes()))
            .unwrap();
    }
    let started = Instant::now();
    for (i, stream) in quick.iter_mut().enumerate() {
        assert_eq!(read_reply(stream).unwrap(), format!("{i}").as_bytes());
    }
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "a quick request waited behind the long one ({:?})",
        started.elapsed()
    );
    assert_eq!(read_reply(&mut long).unwrap(), b"slept");
}

/// Sends `warm_up` quick requests from a few clients at once, then occupies
/// both workers (4 s and 0.5 s) and queues quick requests: all of them must
/// be answered by the worker that frees first, before the 4 s one.
fn queued_requests_behind_busy_workers(args: &[&str], warm_up: usize) {
    let daemon = start("fault", args);
    let addr = daemon.addr;
    let warmers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..warm_up / 4 {
                    assert_eq!(request(addr, b"echo:warm").unwrap(), b"warm");
                }
            })
        })
        .collect();
    for warmer in warmers {
        warmer.join().unwrap();
    }
    let long_done = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&long_done);
    let long = std::thread::spawn(move || {
        let reply = request(addr, b"sleep:4000");
        done.store(true, Ordering::SeqCst);
        reply
    });
    std::thread::sleep(Duration::from_millis(200));
    let medium = std::thread::spawn(move || request(addr, b"sleep:500"));
    std::thread::sleep(Duration::from_millis(200));
    let quick: Vec<_> = (0..4)
        .map(|i| {
            let done = Arc::clone(&long_done);
            std::thread::spawn(move || {
                let reply = request(addr, format!("echo:{i}").as_bytes());
                (reply, done.load(Ordering::SeqCst))
            })
        })
        .collect();
    for (i, handle) in quick.into_iter().enumerate() {
        let (reply, after_long) = handle.join().unwrap();
        assert_eq!(reply.unwrap(), format!("{i}").as_bytes());
        assert!(!after_long, "request {i} waited behind the long one");
    }
    assert_eq!(medium.join().unwrap().unwrap(), b"slept");
    assert_eq!(long.join().unwrap().unwrap(), b"slept");
}

/// A handler whose init fails if fd 7 is open in its process.
const FD_PROBE: &str = r#"
#include "gaspar.h"
#include <fcntl.h>
#include <stdlib.h>
static int init(const uint8_t *c, size_t n, void **s, const gaspar_host *h) {
    (void)c; (void)n; (void)s;
    if (fcntl(7, F_GETFD) != -1) { gaspar_set_error(h, "fd 7 is open"); return 1; }
    if (getenv("NOTIFY_SOCKET")) { gaspar_set_error(h, "NOTIFY_SOCKET is set"); return 1; }
    return 0;
}
static int handle(void *s, const uint8_t *r, size_t n, const gaspar_host *h) {
    (void)s; (void)r; (void)n; (void)h; return 0;
}
static const gaspar_handler_v1 table = { GASPAR_ABI_VERSION, "fdprobe", init, handle, 0 };
const gaspar_handler_v1 *gaspar_handler_entry(void) { return &table; }
"#;

/// An fd the daemon inherited without close-on-exec (a shell's, a socket
/// systemd passed that it does not use) reaches neither the workers nor
/// the handler they load; the daemon itself still has it.
#[test]
fn workers_and_the_check_child_do_not_inherit_the_daemons_stray_fds() {
    let dir = tempfile::tempdir().unwrap();
    let probe = gaspard_tests::compile_c_library(dir.path(), "fdprobe", FD_PROBE);
    let stray = tempfile::tempfile_in(dir.path()).unwrap();
    let stray_path = std::fs::read_link(format!("/proc/self/fd/{}", stray.as_raw_fd())).unwrap();

    let daemon =
        gaspard_tests::launch_with(&handler("echo"), &["--workers", "2"], &[], |command| {
            gaspard_tests::inherit_fd(command, &stray, 7)
        })
        .unwrap_or_else(|(status, log)| {
            panic!(
                "gaspard did not start ({status:?}):\n{}",
                log.lines().join("\n")
            )
        });
    assert_eq!(daemon.request(b"x").unwrap(), b"x");
    let fd_7 = |pid: i32| std::fs::read_link(format!("/proc/{pid}/fd/7"));
    // The daemon has it: the test did hand it on.
    assert_eq!(fd_7(daemon.pid()).unwrap(), stray_path);
    let workers = daemon.wait_for_workers(2, &[], Duration::from_secs(10));
    for pid in workers {
        assert!(fd_7(pid).is_err(), "worker {pid} has fd 7: {:?}", fd_7(pid));
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert_ne!(target, stray_path, "worker {pid} has it as {:?}", fd.path());
        }
    }

    let mut check = std::process::Command::new(gaspard_tests::gaspard_bin());
    check.arg("--check").arg("--handler").arg(&probe);
    gaspard_tests::inherit_fd(&mut check, &stray, 7);
    // Nor systemd's variables, which are the daemon's alone.
    check.env("NOTIFY_SOCKET", dir.path().join("notify"));
    let output = check.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("\"fdprobe\""),
        "{output:?}"
    );
}
