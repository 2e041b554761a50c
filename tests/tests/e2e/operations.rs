//! Operating gaspard: signals under load, hot reload, scaling, sd_notify,
//! socket activation, privilege drop and metrics.

use gaspard_tests::{
    handler, is_reset, launch, metric, request, start, wait_gone, with_link, Daemon, LOCAL_LINK,
    ZMQ_LINK,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Puts `source` at `dest` atomically, as an operator should (install(1)).
fn install(source: &Path, dest: &Path) {
    let staging = dest.with_extension("new");
    std::fs::copy(source, &staging).unwrap();
    std::fs::rename(&staging, dest).unwrap();
}

/// A daemon serving a handler file the test may replace.
fn start_replaceable(initial: &str, args: &[&str]) -> (Daemon, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libhandler.so");
    install(&handler(initial), &path);
    let daemon = launch(&path, args, &[])
        .unwrap_or_else(|(status, log)| panic!("{status:?}: {}", log.lines().join("\n")));
    (daemon, dir, path)
}

/// One request of a load: when its connection was made, how it ended, and
/// the payload it sent.
struct Sent {
    connected: Instant,
    outcome: Result<Vec<u8>, ErrorKind>,
    body: Vec<u8>,
}

/// Clients sending requests until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    results: Arc<Mutex<Vec<Sent>>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, payload: fn(usize, u64) -> Vec<u8>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|client| {
                let (stop, results) = (Arc::clone(&stop), Arc::clone(&results));
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let body = payload(client, n);
                        let Ok(mut stream) = TcpStream::connect(addr) else {
                            // Refused: the daemon stopped listening.
                            results.lock().unwrap().push(Sent {
                                connected: Instant::now(),
                                outcome: Err(ErrorKind::ConnectionRefused),
                                body,
                            });
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        };
                        let connected = Instant::now();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(30)))
                            .unwrap();
                        let outcome = stream
                            .write_all(&gaspard_tests::pack(&body))
                            .and_then(|()| {
                                let mut reply = Vec::new();
                                stream.read_to_end(&mut reply).map(|_| reply)
                            })
                            .map_err(|e| e.kind());
                        results.lock().unwrap().push(Sent {
                            connected,
                            outcome,
                            body,
                        });
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            results,
        }
    }

    fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        std::mem::take(&mut self.results.lock().unwrap())
    }
}

fn echo_payload(client: usize, n: u64) -> Vec<u8> {
    format!("client {client} request {n}").into_bytes()
}

#[test]
fn sigterm_under_load_answers_every_accepted_request() {
    sigterm_under_load(LOCAL_LINK);
}

#[test]
fn sigterm_under_load_answers_every_accepted_request_over_zmq() {
    sigterm_under_load(ZMQ_LINK);
}

fn sigterm_under_load(link: &[&str]) {
    let mut daemon = start("fault", &with_link(&["--workers", "2"], link));
    let load = Load::start(daemon.addr, 8, |client, n| {
        format!("sleep:{}", 20 + (client as u64 * 7 + n) % 60).into_bytes()
    });
    std::thread::sleep(Duration::from_millis(700));
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("gaspard exits");
    let results = load.finish();
    assert_eq!(status.code(), Some(0));
    let mut answered = 0;
    for Sent {
        connected, outcome, ..
    } in &results
    {
        match outcome {
            Ok(reply) => {
                assert_eq!(reply, b"slept");
                answered += 1;
            }
            // Connections made after the signal may be refused or reset.
            Err(_) if *connected >= signalled => {}
            Err(kind) => panic!("a request accepted before SIGTERM failed: {kind:?}"),
        }
    }
    assert!(answered > 20, "the load did run: {answered} answered");
    daemon.expect_log("stopped gracefully");
}

#[test]
fn sighup_reloads_the_handler_under_load_without_failing_a_request() {
    sighup_reload_under_load(LOCAL_LINK);
}

#[test]
fn sighup_reloads_the_handler_under_load_without_failing_a_request_over_zmq() {
    sighup_reload_under_load(ZMQ_LINK);
}

fn sighup_reload_under_load(link: &[&str]) {
    let (daemon, _dir, path) = start_replaceable("echo", &with_link(&["--workers", "2"], link));
    let old_workers = daemon.workers();
    assert_eq!(daemon.request(b"before").unwrap(), b"before");
    let load = Load::start(daemon.addr, 6, echo_payload);
    std::thread::sleep(Duration::from_millis(300));
    install(&handler("upper"), &path);
    daemon.signal(libc::SIGHUP);
    daemon.expect_log("reload complete: 2 workers serve handler generation 2");
    std::thread::sleep(Duration::from_millis(200));
    let results = load.finish();
    let mut upper = 0;
    for Sent { outcome, body, .. } in &results {
        let reply = outcome.as_ref().expect("no request fails during a reload");
        if reply == body {
            continue; // served by an old worker
        }
        assert_eq!(reply, &body.to_ascii_uppercase());
        upper += 1;
    }
    assert!(upper > 0, "new workers served during the load");
    assert_eq!(daemon.request(b"after").unwrap(), b"AFTER");
    let new_workers = daemon.wait_for_workers(2, &old_workers, Duration::from_secs(10));
    assert!(new_workers.iter().all(|pid| !old_workers.contains(pid)));
}

#[test]
fn a_broken_reload_is_rejected_and_the_old_handler_keeps_serving() {
    broken_reload(LOCAL_LINK);
}

#[test]
fn a_broken_reload_is_rejected_and_the_old_handler_keeps_serving_over_zmq() {
    broken_reload(ZMQ_LINK);
}

fn broken_reload(link: &[&str]) {
    let (daemon, dir, path) = start_replaceable("echo", &with_link(&["--workers", "2"], link));
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"not a shared library").unwrap();
    install(&garbage, &path);
    let workers = daemon.workers();
    daemon.signal(libc::SIGHUP);
    let line = daemon.expect_log("reload rejected");
    assert!(line.contains("cannot load"), "{line}");
    assert!(line.contains("the old handler keeps serving"), "{line}");
    assert_eq!(daemon.request(b"still echo").unwrap(), b"still echo");
    // Once the rejected worker is reaped, only the old ones remain.
    assert_eq!(
        daemon.wait_for_workers(2, &[], Duration::from_secs(10)),
        workers,
        "the old workers were not touched"
    );

    // A worker that dies now restarts from the snapshot it was loaded from,
    // not from the broken file on disk.
    // SAFETY: kill(2) on a worker of the daemon this test started.
    unsafe { libc::kill(workers[0], libc::SIGKILL) };
    daemon.wait_for_workers(2, &workers[..1], Duration::from_secs(30));
    for _ in 0..4 {
        assert_eq!(daemon.request(b"echo").unwrap(), b"echo");
    }
    // Once a good file is in place, the next reload goes through.
    install(&handler("upper"), &path);
    daemon.signal(libc::SIGHUP);
    daemon.expect_log("reload complete");
    assert_eq!(daemon.request(b"fixed").unwrap(), b"FIXED");
}

#[test]
fn a_reload_whose_init_fails_is_rejected_with_the_handlers_reason() {
    reload_whose_init_fails(LOCAL_LINK);
}

#[test]
fn a_reload_whose_init_fails_is_rejected_with_the_handlers_reason_over_zmq() {
    reload_whose_init_fails(ZMQ_LINK);
}

fn reload_whose_init_fails(link: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libhandler.so");
    install(&handler("echo"), &path);
    // The config makes the fault handler's init fail; echo ignores it.
    let args = with_link(&["--workers", "1", "--handler-config", "fail"], link);
    let daemon = launch(&path, &args, &[])
        .unwrap_or_else(|(status, log)| panic!("{status:?}: {}", log.lines().join("\n")));
    install(&handler("fault"), &path);
    daemon.signal(libc::SIGHUP);
    let line = daemon.expect_log("reload rejected");
    assert!(line.contains("init refused by configuration"), "{line}");
    assert_eq!(daemon.request(b"echo").unwrap(), b"echo");
}

#[test]
fn sigttin_and_sigttou_add_and_retire_workers() {
    sigttin_and_sigttou(LOCAL_LINK);
}

#[test]
fn sigttin_and_sigttou_add_and_retire_workers_over_zmq() {
    sigttin_and_sigttou(ZMQ_LINK);
}

fn sigttin_and_sigttou(link: &[&str]) {
    let daemon = start("echo", &with_link(&["--workers", "2"], link));
    daemon.signal(libc::SIGTTIN);
    daemon.wait_for_workers(3, &[], Duration::from_secs(20));
    daemon.expect_log("SIGTTIN: one more worker (3 now)");
    daemon.signal(libc::SIGTTOU);
    daemon.wait_for_workers(2, &[], Duration::from_secs(20));
    daemon.signal(libc::SIGTTOU);
    daemon.wait_for_workers(1, &[], Duration::from_secs(20));
    daemon.signal(libc::SIGTTOU);
    daemon.expect_log("SIGTTOU ignored: one worker is the fewest");
    assert_eq!(daemon.workers().len(), 1);
    assert_eq!(daemon.request(b"one").unwrap(), b"one");
}

/// Messages sent to a NOTIFY_SOCKET, collected in the background.
fn notify_socket(dir: &Path) -> (PathBuf, Arc<Mutex<Vec<String>>>) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let messages = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&messages);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    (path, messages)
}

fn wait_for_message(messages: &Mutex<Vec<String>>, prefix: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<String> = messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.starts_with(prefix))
            .cloned()
            .collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {count} x {prefix:?} in {:?}",
            messages.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sd_notify_reports_ready_reloading_stopping_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, messages) = notify_socket(dir.path());
    let socket = socket.to_str().unwrap().to_string();
    let mut daemon = gaspard_tests::try_start_with_env(
        "echo",
        &["--workers", "2"],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "200000")],
    )
    .unwrap_or_else(|(status, log)| panic!("{status:?}: {}", log.lines().join("\n")));
    let ready = wait_for_message(&messages, "READY=1", 1);
    assert!(ready[0].contains("STATUS=serving on"), "{ready:?}");
    assert!(
        ready[0].contains(&format!("MAINPID={}", daemon.pid())),
        "{ready:?}"
    );
    wait_for_message(&messages, "WATCHDOG=1", 3);

    daemon.signal(libc::SIGHUP);
    let reloading = wait_for_message(&messages, "RELOADING=1", 1);
    assert!(reloading[0].contains("MONOTONIC_USEC="), "{reloading:?}");
    wait_for_message(&messages, "READY=1", 2);

    daemon.signal(libc::SIGTERM);
    daemon
        .wait_exit(Duration::from_secs(30))
        .expect("gaspard exits");
    wait_for_message(&messages, "STOPPING=1", 1);
    // READY is sent with the "listening on" line: both initial workers had
    // reported ready before it (the daemon logs each at debug level).
    let log = daemon.log.lines();
    let listening = log.iter().position(|l| l.contains("listening on")).unwrap();
    let ready_before = log[..listening]
        .iter()
        .filter(|l| l.contains(") is ready"))
        .count();
    assert_eq!(ready_before, 2, "{log:#?}");
}

#[test]
fn socket_activation_serves_on_the_socket_systemd_passes() {
    let Ok(tool) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate is not installed (.ci/run installs it)");
        return;
    };
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let runtime = tempfile::tempdir().unwrap();
    let mut activator = std::process::Command::new(tool)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg(gaspard_tests::gaspard_bin())
        .arg("--handler")
        .arg(handler("upper"))
        .args(["--workers", "1", "--port", "1", "--runtime-dir"])
        .arg(runtime.path())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The activator listens at once; gaspard starts on the first connection
    // and serves it from the passed socket (it was told --port 1, which it
    // could not bind itself).
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        match request(addr, b"activated") {
            Ok(reply) => break reply,
            Err(e) => {
                assert!(Instant::now() < deadline, "never served: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(reply, b"ACTIVATED");
    let daemons = gaspard_tests::children_of(activator.id() as i32);
    let mut gaspard = daemons.clone();
    gaspard.extend(
        daemons
            .iter()
            .flat_map(|&pid| gaspard_tests::children_of(pid)),
    );
    // systemd-socket-activate execs the daemon in its own process.
    // SAFETY: kill(2) on processes this test started.
    unsafe {
        libc::kill(activator.id() as i32, libc::SIGTERM);
    }
    for pid in &daemons {
        // SAFETY: as above.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let _ = activator.wait();
    assert_eq!(
        wait_gone(&gaspard, Duration::from_secs(20)),
        Vec::<i32>::new()
    );
}

pub(crate) fn which(tool: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .ok_or(())
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .unwrap()
}

#[test]
fn user_flag_drops_the_daemon_and_its_workers_to_that_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: dropping privileges needs root (CI runs as root)");
        return;
    }
    let daemon = start("echo", &["--workers", "2", "--user", "nobody"]);
    let nobody = 65534;
    assert_eq!(uid_of(daemon.pid()), nobody);
    for worker in daemon.workers() {
        assert_eq!(uid_of(worker), nobody);
    }
    assert_eq!(daemon.request(b"unprivileged").unwrap(), b"unprivileged");
    daemon.expect_log("running as uid 65534");
}

#[test]
fn the_metrics_endpoint_counts_requests_by_outcome() {
    let daemon = start("fault", &["--workers", "2", "--metrics", "127.0.0.1:0"]);
    let addr = daemon.metrics_addr();
    let before = daemon.scrape();
    assert_eq!(
        metric(&before, "gaspard_requests_total{outcome=\"ok\"}"),
        0.0
    );
    assert_eq!(metric(&before, "gaspard_worker_starts_total"), 2.0);
    assert_eq!(metric(&before, "gaspard_workers_ready"), 2.0);
    for _ in 0..3 {
        assert_eq!(daemon.request(b"echo:x").unwrap(), b"x");
    }
    assert!(is_reset(&daemon.request(b"error:no")));
    assert!(is_reset(&daemon.request(b"segv")));
    daemon.wait_for_workers(2, &[], Duration::from_secs(20));
    let after = daemon.scrape();
    assert_eq!(
        metric(&after, "gaspard_requests_total{outcome=\"ok\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "gaspard_requests_total{outcome=\"handler_error\"}"),
        1.0
    );
    assert_eq!(
        metric(&after, "gaspard_requests_total{outcome=\"worker_lost\"}"),
        1.0
    );
    assert_eq!(
        metric(&after, "gaspard_worker_exits_total{cause=\"SIGSEGV\"}"),
        1.0
    );
    assert_eq!(metric(&after, "gaspard_worker_starts_total"), 3.0);
    assert_eq!(
        metric(&after, "gaspard_request_duration_seconds_count"),
        3.0,
        "answered ones"
    );
    assert_eq!(metric(&after, "gaspard_requests_in_flight"), 0.0);
    // Anything but /metrics is a 404.
    let response = gaspard_tests::http(addr, "GET /other HTTP/1.0\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed (.ci/run installs it)");
        return;
    };
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/systemd");
    let dir = tempfile::tempdir().unwrap();
    for unit in ["gaspard.service", "gaspard.socket"] {
        let text = std::fs::read_to_string(docs.join(unit)).unwrap();
        // verify checks that ExecStart's program exists: point it at the
        // binary this test run built.
        let text = text
            .replace(
                "/usr/local/bin/gaspard",
                gaspard_tests::gaspard_bin().to_str().unwrap(),
            )
            .replace(
                "/usr/local/lib/gaspard/libecho.so",
                handler("echo").to_str().unwrap(),
            );
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let output = std::process::Command::new(analyze)
        .args([
            "verify",
            "--man=no",
            "./gaspard.service",
            "./gaspard.socket",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // Unknown or misspelt settings are only warnings: none may be printed.
    assert!(stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn a_second_sigterm_stops_at_once() {
    let mut daemon = start("fault", &["--workers", "1", "--shutdown-timeout", "60"]);
    let addr = daemon.addr;
    let slow = std::thread::spawn(move || request(addr, b"sleep:20000"));
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(libc::SIGTERM);
    daemon.expect_log("stopping gracefully");
    let second = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(15))
        .expect("gaspard exits");
    // Not the 20 s of the request, nor the 5 s grace of a graceful stop.
    assert!(
        second.elapsed() < Duration::from_secs(4),
        "did not wait for the busy worker"
    );
    assert_eq!(status.code(), Some(0));
    assert!(
        is_reset(&slow.join().unwrap()),
        "the unfinished request is reset"
    );
    daemon.expect_log("again: stopping now");
}

/// A stop that gives up on a request still running (here `--shutdown-timeout`
/// passes) must not leave its worker stuck writing a large reply that nobody
/// will read: the worker stops, and the handler's shutdown still runs.
#[test]
fn a_worker_writing_a_large_reply_as_the_daemon_stops_still_shuts_its_handler_down() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let config = format!("mark-shutdown:{}", marks.display());
    let args = [
        "--workers",
        "1",
        "--shutdown-timeout",
        "1",
        "--handler-config",
        &config,
    ];
    let mut daemon = start("fault", &args);
    let addr = daemon.addr;
    // 2 s in the handler, then 64 MiB: far more than the link holds.
    let late = std::thread::spawn(move || request(addr, b"late:2000:67108864"));
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("gaspard exits");
    assert_eq!(status.code(), Some(0));
    assert!(is_reset(&late.join().unwrap()), "the request is reset");
    let marks = std::fs::read_to_string(&marks).unwrap_or_default();
    assert_eq!(
        marks
            .lines()
            .filter(|line| line.starts_with("shutdown "))
            .count(),
        1,
        "the handler's shutdown ran: {marks:?}"
    );
    // The worker finds the link closed: a stop, not an error.
    let errors: Vec<String> = (daemon.log.lines().into_iter())
        .filter(|line| line.contains("ERROR"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn under_journald_lines_carry_a_priority_and_no_timestamp() {
    let daemon = gaspard_tests::try_start_with_env(
        "fault",
        &["--workers", "1"],
        &[("JOURNAL_STREAM", "8:12345")],
    )
    .unwrap_or_else(|(status, log)| panic!("{status:?}: {}", log.lines().join("\n")));
    let listening = daemon.expect_log("listening on");
    assert!(listening.starts_with("<6>listening on"), "{listening}");
    assert!(is_reset(&daemon.request(b"error:oops")));
    let warning = daemon.expect_log("handler failed: oops");
    assert!(warning.starts_with("<4>client "), "{warning}");
}

#[test]
fn bind_takes_a_host_name_and_serves_on_its_address() {
    let daemon = start("echo", &["--workers", "1", "--bind", "localhost"]);
    assert!(daemon.addr.ip().is_loopback(), "{}", daemon.addr);
    let line = daemon.expect_log("--bind localhost resolves to ");
    assert!(
        line.contains(&daemon.addr.ip().to_string()),
        "{line} vs {}",
        daemon.addr
    );
    assert_eq!(daemon.request(b"by name").unwrap(), b"by name");
}
