//! Worker pools over 127.0.0.1: a daemon with `--pool-listen` and worker
//! hosts (`gaspard worker --connect`) as separate processes.

use gaspard_tests::{
    children_of, cpu_ticks, gaspard_bin, handler, is_alive, is_reset, metric, proc_state, request,
    start, wait_gone, Daemon, WorkerHost,
};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The endpoint a daemon's pool listens on, from its log.
fn pool_endpoint(daemon: &Daemon) -> String {
    let line = daemon.expect_log("worker pool: hosts may join on ");
    line.split("join on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no endpoint in {line:?}"))
        .to_string()
}

/// Waits (up to 20 s) until every one of `pids` runs a request (a spinning
/// worker is running or runnable; an idle one sleeps in read).
fn wait_running(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    // Runnable is not enough (a worker woken to look for a stop is, for a
    // moment): each must also have spent CPU time since the first look.
    let first: Vec<u64> = pids
        .iter()
        .map(|&pid| cpu_ticks(pid).unwrap_or(0))
        .collect();
    let spinning = |(&pid, &before): (&i32, &u64)| {
        proc_state(pid).is_some_and(|(state, _)| state == 'R')
            && cpu_ticks(pid).is_some_and(|now| now >= before + 3)
    };
    while !pids.iter().zip(&first).all(spinning) {
        assert!(
            Instant::now() < deadline,
            "{pids:?} never all ran a request"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to 20 s) until the daemon has logged `n` hosts joining.
fn wait_joined(daemon: &Daemon, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while joined(daemon) < n {
        assert!(
            Instant::now() < deadline,
            "{n} hosts never joined:\n{}",
            daemon.log.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon with no local workers, serving through worker hosts only, with
/// its metrics endpoint.
fn pool_daemon_with_metrics(handler: &str) -> Daemon {
    start(
        handler,
        &[
            "--workers",
            "0",
            "--pool-listen",
            "tcp://127.0.0.1:*",
            "--metrics",
            "127.0.0.1:0",
        ],
    )
}

fn joined(daemon: &Daemon) -> usize {
    daemon
        .log
        .lines()
        .iter()
        .filter(|line| line.contains("worker pool: host") && line.contains("joined"))
        .count()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spin(
    addr: std::net::SocketAddr,
    micros: u64,
) -> std::thread::JoinHandle<std::io::Result<Vec<u8>>> {
    std::thread::spawn(move || request(addr, micros.to_string().as_bytes()))
}

#[test]
fn a_daemon_without_workers_of_its_own_serves_through_a_worker_host() {
    let daemon = start(
        "echo",
        &["--workers", "0", "--pool-listen", "tcp://127.0.0.1:*"],
    );
    let endpoint = pool_endpoint(&daemon);
    // No host yet: refused at once, not left to hang.
    assert!(
        is_reset(&daemon.request(b"early")),
        "refused without a host"
    );
    let host = WorkerHost::start(&endpoint, "echo", &["--workers", "2"]);
    wait_joined(&daemon, 1);
    let line = daemon.expect_log("joined");
    assert!(
        line.contains("handler \"echo") && line.contains("ABI 1"),
        "{line}"
    );
    for i in 0..50u32 {
        let payload = format!("request {i} {}", "x".repeat(i as usize * 1000));
        assert_eq!(
            daemon.request(payload.as_bytes()).unwrap(),
            payload.as_bytes()
        );
    }
    // 1 MiB each way crosses the pool too.
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(daemon.request(&big).unwrap(), big);
    drop(host);
}

#[test]
fn a_remote_worker_killed_costs_exactly_its_request_and_is_replaced() {
    let daemon = start(
        "spin",
        &["--workers", "0", "--pool-listen", "tcp://127.0.0.1:*"],
    );
    let host = WorkerHost::start(&pool_endpoint(&daemon), "spin", &["--workers", "2"]);
    wait_joined(&daemon, 1);
    let workers = host.workers(2);
    // Credit: wait until both workers are ready (a short request each).
    assert_eq!(daemon.request(b"1000").unwrap(), b"ok");
    let long = [spin(daemon.addr, 3_000_000), spin(daemon.addr, 3_000_000)];
    // Both run, one on each worker: kill one.
    wait_running(&workers);
    // SAFETY: a pid of a worker process this test's host started.
    unsafe { libc::kill(workers[0], libc::SIGKILL) };
    let results: Vec<_> = long.into_iter().map(|t| t.join().unwrap()).collect();
    let resets = results.iter().filter(|r| is_reset(r)).count();
    let ok = results
        .iter()
        .filter(|r| matches!(r, Ok(reply) if reply == b"ok"))
        .count();
    assert_eq!(
        (resets, ok),
        (1, 1),
        "exactly the killed worker's request: {results:?}"
    );
    // Replaced on the host; the pool serves on.
    let replaced = host.workers(2);
    assert!(!replaced.contains(&workers[0]), "{replaced:?}");
    for _ in 0..4 {
        assert_eq!(daemon.request(b"1000").unwrap(), b"ok");
    }
}

#[test]
fn a_killed_worker_host_costs_its_requests_within_the_heartbeat_timeout() {
    let daemon = start(
        "spin",
        &[
            "--workers",
            "1",
            "--pool-listen",
            "tcp://127.0.0.1:*",
            "--pool-heartbeat-timeout",
            "1",
        ],
    );
    let host = WorkerHost::start(&pool_endpoint(&daemon), "spin", &["--workers", "2"]);
    wait_joined(&daemon, 1);
    // Three long requests: the local worker takes one (its credit is 1
    // until it has timed a call), the host the other two.
    let long: Vec<_> = (0..3).map(|_| spin(daemon.addr, 4_000_000)).collect();
    let workers = host.workers(2);
    wait_running(&workers);
    // SAFETY: the host process this test started.
    unsafe { libc::kill(host.pid(), libc::SIGKILL) };
    let killed = Instant::now();
    // On one machine its connection closes with it: the daemon finds it
    // gone at the next heartbeat it sends (a third of the timeout), else
    // after the timeout.
    let line = daemon.expect_log("requests it held failed");
    let noticed = killed.elapsed();
    assert!(
        noticed < Duration::from_secs(10),
        "noticed after {noticed:?}"
    );
    assert!(line.contains("worker host 127.0.0.1 lost: "), "{line}");
    assert!(line.contains("; 2 requests it held failed"), "{line}");
    assert!(
        wait_gone(&workers, Duration::from_secs(5)).is_empty(),
        "workers die with their host"
    );
    let results: Vec<_> = long.into_iter().map(|t| t.join().unwrap()).collect();
    let resets = results.iter().filter(|r| is_reset(r)).count();
    let ok = results
        .iter()
        .filter(|r| matches!(r, Ok(reply) if reply == b"ok"))
        .count();
    assert_eq!((resets, ok), (2, 1), "{results:?}");
    // The daemon serves on with what is left.
    assert_eq!(daemon.request(b"1000").unwrap(), b"ok");
}

#[test]
fn worker_hosts_rejoin_a_restarted_daemon_by_themselves() {
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let args = [
        "--workers",
        "0",
        "--pool-listen",
        &endpoint,
        "--pool-heartbeat-timeout",
        "1",
    ];
    let mut daemon = start("echo", &args);
    let host = WorkerHost::start(&endpoint, "echo", &["--workers", "1"]);
    wait_joined(&daemon, 1);
    assert_eq!(daemon.request(b"before").unwrap(), b"before");
    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    let daemon = start("echo", &args);
    wait_joined(&daemon, 1);
    assert_eq!(daemon.request(b"after").unwrap(), b"after");
    assert!(is_alive(host.pid()), "the same host, not a new one");
}

/// `gaspard keygen` into `dir`: the secret and public files of `name`.
fn keygen(dir: &Path, name: &str) -> (String, String) {
    let prefix = dir.join(name);
    let status = Command::new(gaspard_bin())
        .arg("keygen")
        .arg(&prefix)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let with = |extension: &str| format!("{}.{extension}", prefix.display());
    (with("key"), with("pub"))
}

#[test]
fn with_curve_only_authorized_hosts_join_and_a_refused_key_is_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon_key, daemon_pub) = keygen(dir.path(), "daemon");
    let (good_key, good_pub) = keygen(dir.path(), "good");
    let (bad_key, bad_pub) = keygen(dir.path(), "bad");
    let authorized = dir.path().join("authorized");
    std::fs::write(
        &authorized,
        format!(
            "# the workers\n{}",
            std::fs::read_to_string(&good_pub).unwrap()
        ),
    )
    .unwrap();
    let daemon = start(
        "echo",
        &[
            "--workers",
            "0",
            // Not loopback-only: CURVE makes it acceptable.
            "--pool-listen",
            "tcp://127.0.0.1:*",
            "--pool-key",
            &daemon_key,
            "--pool-authorized",
            authorized.to_str().unwrap(),
        ],
    );
    let endpoint = pool_endpoint(&daemon);
    let bad = WorkerHost::start(
        &endpoint,
        "echo",
        &[
            "--workers",
            "1",
            "--key",
            &bad_key,
            "--server-key",
            &daemon_pub,
        ],
    );
    let bad_public = std::fs::read_to_string(&bad_pub).unwrap();
    let bad_public = bad_public.split_whitespace().next().unwrap();
    let refused = daemon.expect_log("is not in --pool-authorized");
    assert!(refused.contains(bad_public), "{refused}");
    // Its key never gets it a request: with no other host, refused.
    assert!(is_reset(&daemon.request(b"nobody")));
    assert_eq!(joined(&daemon), 0);

    let _good = WorkerHost::start(
        &endpoint,
        "echo",
        &[
            "--workers",
            "1",
            "--key",
            &good_key,
            "--server-key",
            &daemon_pub,
        ],
    );
    wait_joined(&daemon, 1);
    assert_eq!(daemon.request(b"sealed").unwrap(), b"sealed");
    // Logged once, however often the refused host tries again.
    std::thread::sleep(Duration::from_secs(2));
    let times = daemon
        .log
        .lines()
        .iter()
        .filter(|line| line.contains("is not in --pool-authorized"))
        .count();
    assert_eq!(times, 1);
    assert!(
        !bad.log.lines().iter().any(|line| line.contains("joined")),
        "the refused host never joined"
    );
}

#[test]
fn the_pools_flags_and_key_files_are_checked_before_anything_is_served() {
    // `gaspard --check` with these flags: its exit status and stderr.
    let check = |flags: &[&str]| {
        let echo = handler("echo");
        let args = [&["--handler", echo.to_str().unwrap(), "--check"], flags].concat();
        let (status, _out, err) = gaspard_tests::run_gaspard(&args);
        (status.and_then(|s| s.code()), err)
    };
    let (code, err) = check(&["--pool-listen", "tcp://0.0.0.0:10124"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--pool-insecure"), "{err}");
    let (code, err) = check(&["--workers", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--workers 0 needs --pool-listen"), "{err}");

    // The key files are read as the daemon would.
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path(), "daemon");
    let authorized = dir.path().join("authorized");
    std::fs::write(&authorized, "not-a-key\n").unwrap();
    let with_keys = [
        "--pool-listen",
        "tcp://0.0.0.0:10124",
        "--pool-key",
        &key,
        "--pool-authorized",
        authorized.to_str().unwrap(),
    ];
    let (code, err) = check(&with_keys);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("authorized, line 1"), "{err}");
    std::fs::copy(&public, &authorized).unwrap();
    let (code, err) = check(&with_keys);
    assert_eq!(code, Some(0), "{err}");
}

/// Two network namespaces joined by a veth pair, on addresses of
/// 192.0.2.0/24 (TEST-NET-1) that exist only inside them; deleted on drop.
struct Network {
    daemon_ns: String,
    host_ns: String,
}

const DAEMON_ADDRESS: &str = "192.0.2.1";

/// iproute2's `ip`, which a user's PATH may lack (Debian puts it in /usr/sbin).
fn ip() -> Command {
    let path = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .unwrap_or("ip");
    Command::new(path)
}

impl Network {
    /// `None` (and why) where namespaces cannot be made: not root, no `ip`.
    fn create() -> Result<Network, String> {
        let tag = std::process::id();
        let network = Network {
            daemon_ns: format!("gsp-d-{tag}"),
            host_ns: format!("gsp-h-{tag}"),
        };
        let (d, h) = (network.daemon_ns.as_str(), network.host_ns.as_str());
        let veth_d = format!("gd{tag}");
        let veth_h = format!("gh{tag}");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", d],
            vec!["netns", "add", h],
            vec![
                "link", "add", &veth_d, "netns", d, "type", "veth", "peer", "name", &veth_h,
                "netns", h,
            ],
            vec!["-n", d, "addr", "add", "192.0.2.1/24", "dev", &veth_d],
            vec!["-n", h, "addr", "add", "192.0.2.2/24", "dev", &veth_h],
            vec!["-n", d, "link", "set", &veth_d, "up"],
            vec!["-n", h, "link", "set", &veth_h, "up"],
            vec!["-n", d, "link", "set", "lo", "up"],
            vec!["-n", h, "link", "set", "lo", "up"],
        ];
        for step in steps {
            let output = ip()
                .args(&step)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    step.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
        Ok(network)
    }

    /// A command that runs the program it is given inside namespace `ns`.
    fn exec_in(ns: &str) -> Command {
        let mut command = ip();
        command.args(["netns", "exec", ns]);
        command
    }

    /// Cuts (`false`) or restores the link, on the daemon's side.
    fn set_link(&self, up: bool) {
        let veth = format!("gd{}", std::process::id());
        let state = if up { "up" } else { "down" };
        let status = ip()
            .args(["-n", &self.daemon_ns, "link", "set", &veth, state])
            .status()
            .unwrap();
        assert!(status.success(), "ip link set {veth} {state}");
    }

    /// Sends `payload` to `addr` from inside the daemon's namespace (a
    /// thread of this test enters it, alone).
    fn request(
        &self,
        addr: std::net::SocketAddr,
        payload: Vec<u8>,
    ) -> std::thread::JoinHandle<std::io::Result<Vec<u8>>> {
        let path = format!("/var/run/netns/{}", self.daemon_ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an fd this thread owns; it changes this
            // thread's network namespace only (CLONE_NEWNET).
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            request(addr, &payload)
        })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in [&self.daemon_ns, &self.host_ns] {
            let _ = ip().args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn across_a_real_network_a_cut_link_costs_the_held_requests_and_the_host_rejoins() {
    let network = match Network::create() {
        Ok(network) => network,
        Err(why) => {
            println!("skipped: cannot make network namespaces ({why})");
            return;
        }
    };
    let pool = format!(
        "tcp://{DAEMON_ADDRESS}:{}",
        20_000 + std::process::id() % 20_000
    );
    let daemon = gaspard_tests::launch_wrapped(
        Network::exec_in(&network.daemon_ns),
        &handler("spin"),
        &[
            "--workers",
            "0",
            "--pool-listen",
            &pool,
            // Not loopback: inside the namespaces only, for the test.
            "--pool-insecure",
            "--pool-heartbeat-timeout",
            "1",
        ],
    )
    .unwrap_or_else(|(status, log)| panic!("{status:?}\n{}", log.lines().join("\n")));
    let mut in_host_ns = Network::exec_in(&network.host_ns);
    in_host_ns.arg(gaspard_bin());
    let host = WorkerHost::start_with(in_host_ns, &pool, "spin", &["--workers", "2"]);
    wait_joined(&daemon, 1);
    let addr = daemon.addr;
    assert_eq!(
        network
            .request(addr, b"1000".to_vec())
            .join()
            .unwrap()
            .unwrap(),
        b"ok"
    );

    // Under load, the link goes down: what the host holds is reset within
    // the heartbeat timeout, never left hanging.
    // (6 s each: a request not reset would come back "ok".)
    let held: Vec<_> = (0..4)
        .map(|_| network.request(addr, b"6000000".to_vec()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    network.set_link(false);
    let cut = Instant::now();
    let results: Vec<_> = held.into_iter().map(|t| t.join().unwrap()).collect();
    let waited = cut.elapsed();
    assert!(results.iter().all(is_reset), "{results:?}");
    assert!(waited < Duration::from_secs(5), "reset after {waited:?}");
    daemon.expect_log("lost: nothing heard from it");

    // The link comes back: the host joins again, by itself.
    network.set_link(true);
    wait_joined(&daemon, 2);
    assert_eq!(
        network
            .request(addr, b"1000".to_vec())
            .join()
            .unwrap()
            .unwrap(),
        b"ok"
    );
    assert!(is_alive(host.pid()), "the same host process rejoined");
}

/// A request on its own thread, whose result is awaited for at most `limit`.
fn within(
    addr: std::net::SocketAddr,
    payload: &'static [u8],
) -> std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(request(addr, payload));
    });
    rx
}

/// A daemon served by one host with room for one request (`--workers 1
/// --credit-per-worker 1`), that host running a spin of `held_micros`, and a
/// second request waiting in the daemon's queue behind it: (daemon, host,
/// the held request, the queued one).
#[allow(clippy::type_complexity)]
fn one_held_one_queued(
    held_micros: &'static [u8],
) -> (
    Daemon,
    WorkerHost,
    std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
) {
    let daemon = start(
        "spin",
        &[
            "--workers",
            "0",
            "--pool-listen",
            "tcp://127.0.0.1:*",
            "--pool-heartbeat-timeout",
            "1",
        ],
    );
    let host = WorkerHost::start(
        &pool_endpoint(&daemon),
        "spin",
        &["--workers", "1", "--credit-per-worker", "1"],
    );
    wait_joined(&daemon, 1);
    assert_eq!(daemon.request(b"1000").unwrap(), b"ok");
    let held = within(daemon.addr, held_micros);
    wait_running(&host.workers(1));
    // The host's credit (1) is used: this one waits in the daemon's queue.
    let queued = within(daemon.addr, b"1000");
    std::thread::sleep(Duration::from_millis(300));
    (daemon, host, held, queued)
}

#[test]
fn queued_requests_are_reset_when_the_last_host_is_lost() {
    let (daemon, host, held, queued) = one_held_one_queued(b"3000000");
    let workers = children_of(host.pid());
    // SAFETY: the host process this test started.
    unsafe { libc::kill(host.pid(), libc::SIGKILL) };
    daemon.expect_log("requests it held failed");
    assert!(is_reset(
        &held.recv_timeout(Duration::from_secs(15)).unwrap()
    ));
    wait_gone(&workers, Duration::from_secs(5));
    let answer = queued.recv_timeout(Duration::from_secs(15));
    assert!(
        answer.as_ref().is_ok_and(is_reset),
        "the queued request, 15 s after the last host was lost: {answer:?}"
    );
}

#[test]
fn queued_requests_are_reset_when_the_last_host_leaves() {
    let (_daemon, mut host, held, queued) = one_held_one_queued(b"1000000");
    host.signal(libc::SIGTERM);
    assert_eq!(
        held.recv_timeout(Duration::from_secs(15)).unwrap().unwrap(),
        b"ok"
    );
    assert!(host.wait_exit(Duration::from_secs(15)).is_some());
    let answer = queued.recv_timeout(Duration::from_secs(15));
    assert!(
        answer.as_ref().is_ok_and(is_reset),
        "the queued request, 15 s after the last host left: {answer:?}"
    );
}

#[test]
fn sighup_with_workers_0_starts_no_local_worker() {
    let daemon = start(
        "echo",
        &["--workers", "0", "--pool-listen", "tcp://127.0.0.1:*"],
    );
    daemon.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        daemon.workers(),
        Vec::<i32>::new(),
        "--workers 0, after SIGHUP"
    );
}

#[test]
fn local_workers_failing_do_not_refuse_what_a_host_can_serve() {
    let daemon = start(
        "echo",
        &["--workers", "1", "--pool-listen", "tcp://127.0.0.1:*"],
    );
    let _host = WorkerHost::start(&pool_endpoint(&daemon), "echo", &["--workers", "2"]);
    wait_joined(&daemon, 1);
    assert_eq!(daemon.request(b"warm").unwrap(), b"warm");
    // The local worker dies six times without serving: it backs off (1.6 s).
    let mut last = daemon.wait_for_workers(1, &[], Duration::from_secs(10));
    for _ in 0..6 {
        // SAFETY: a worker of the daemon this test started.
        unsafe { libc::kill(last[0], libc::SIGKILL) };
        last = daemon.wait_for_workers(1, &last, Duration::from_secs(30));
    }
    unsafe { libc::kill(last[0], libc::SIGKILL) };
    daemon.wait_for_workers(0, &[], Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));
    // The host has two ready workers all along.
    let answer = daemon.request(b"served elsewhere");
    assert_eq!(answer.unwrap(), b"served elsewhere");
}

/// A fake worker host: says Hello with `credit`, then heartbeats; to each
/// request it answers `answer` (a message's frames), or nothing if `None`.
/// Runs until `stop` is set; returns how many requests it got.
fn fake_host(
    endpoint: String,
    credit: u32,
    answer: Option<Vec<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let context = zmq::Context::new();
        let dealer = context.socket(zmq::DEALER).unwrap();
        dealer.set_linger(0).unwrap();
        dealer.connect(&endpoint).unwrap();
        let mut head = vec![1u8];
        head.extend_from_slice(&1u16.to_le_bytes());
        head.extend_from_slice(&gaspard_handler_abi::ABI_VERSION.to_le_bytes());
        head.extend_from_slice(&credit.to_le_bytes());
        dealer
            .send_multipart([head, b"echo-handler".to_vec()], 0)
            .unwrap();
        let mut requests = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if dealer.poll(zmq::POLLIN, 200).unwrap() > 0 {
                let frames = dealer.recv_multipart(0).unwrap();
                if frames[0][0] == 13 {
                    requests += 1;
                    if let Some(answer) = &answer {
                        dealer.send_multipart(answer, 0).unwrap();
                    }
                }
            }
            dealer.send(&[5u8][..], 0).unwrap();
        }
        requests
    })
}

#[test]
fn a_host_that_never_answers_cannot_hold_a_request_forever() {
    let daemon = start(
        "echo",
        &[
            "--workers",
            "0",
            "--timeout",
            "1",
            "--pool-listen",
            "tcp://127.0.0.1:*",
        ],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host = fake_host(pool_endpoint(&daemon), 1, None, stop.clone());
    wait_joined(&daemon, 1);
    let answer = within(daemon.addr, b"anyone there?");
    // --timeout 1 s, --pool-heartbeat-timeout 3 s: 20 s is far past both.
    let result = answer.recv_timeout(Duration::from_secs(20));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = host.join().unwrap();
    assert_eq!(sent, 1, "the request went to the silent host");
    assert!(
        result.as_ref().is_ok_and(is_reset),
        "a request held by a host that heartbeats but never answers, 20 s on (--timeout 1): {result:?}"
    );
    daemon.expect_log("past --timeout and its heartbeat timeout");
}

#[test]
fn a_host_leaving_gracefully_under_load_costs_no_request() {
    let daemon = start(
        "echo",
        &["--workers", "0", "--pool-listen", "tcp://127.0.0.1:*"],
    );
    let endpoint = pool_endpoint(&daemon);
    let mut leaving = WorkerHost::start(&endpoint, "echo", &["--workers", "2"]);
    let _staying = WorkerHost::start(&endpoint, "echo", &["--workers", "2"]);
    wait_joined(&daemon, 2);
    std::thread::sleep(Duration::from_millis(500));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = daemon.addr;
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match request(addr, b"ping") {
                        Ok(reply) if reply == b"ping" => ok += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    leaving.signal(libc::SIGTERM);
    assert!(leaving.wait_exit(Duration::from_secs(15)).is_some());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for client in clients {
        let (o, f) = client.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    let resets: Vec<String> = daemon
        .log
        .lines()
        .into_iter()
        .filter(|l| l.contains("reset") || l.contains("stopping"))
        .collect();
    assert!(
        failed.is_empty(),
        "{ok} served, {} failed while a host left gracefully: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(3)],
        resets.join("\n")
    );
}

#[test]
fn a_host_running_another_handler_is_refused() {
    let daemon = start(
        "echo",
        &["--workers", "0", "--pool-listen", "tcp://127.0.0.1:*"],
    );
    let _host = WorkerHost::start(&pool_endpoint(&daemon), "upper", &["--workers", "1"]);
    std::thread::sleep(Duration::from_secs(3));
    daemon.expect_log("it runs handler \"upper-handler\", this daemon runs \"echo-handler\"");
    let reply = daemon.request(b"hello");
    assert!(
        is_reset(&reply),
        "a daemon serving \"echo\" answered through a host running another handler: {reply:?}"
    );
}

#[test]
fn unauthorized_peers_with_fresh_keys_cannot_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon_key, daemon_pub) = keygen(dir.path(), "daemon");
    let (_, host_pub) = keygen(dir.path(), "host");
    let daemon = start(
        "echo",
        &[
            "--workers",
            "1",
            "--pool-listen",
            "tcp://127.0.0.1:*",
            "--pool-key",
            &daemon_key,
            "--pool-authorized",
            &host_pub,
        ],
    );
    let endpoint = pool_endpoint(&daemon);
    let server = std::fs::read_to_string(&daemon_pub).unwrap();
    let server = zmq::z85_decode(server.split_whitespace().next().unwrap()).unwrap();
    let context = zmq::Context::new();
    let mut sockets = Vec::new();
    for _ in 0..200 {
        let pair = zmq::CurveKeyPair::new().unwrap();
        let socket = context.socket(zmq::DEALER).unwrap();
        socket.set_linger(0).unwrap();
        socket.set_curve_serverkey(&server).unwrap();
        socket.set_curve_publickey(&pair.public_key).unwrap();
        socket.set_curve_secretkey(&pair.secret_key).unwrap();
        socket.connect(&endpoint).unwrap();
        sockets.push(socket);
    }
    std::thread::sleep(Duration::from_secs(3));
    let refused = daemon
        .log
        .lines()
        .iter()
        .filter(|l| l.contains("not in --pool-authorized"))
        .count();
    assert!(
        refused <= 10,
        "{refused} warning lines from 200 unauthorized connection attempts"
    );
}

#[test]
fn the_build_under_test_has_curve_from_its_own_libzmq() {
    // Built by libzmq-curve with libsodium, not a system package: the pool
    // tests with keys above run on this build.
    let (status, out, err) = gaspard_tests::run_gaspard(&["--version"]);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{err}");
    assert!(
        out.contains("libzmq 4.3.4, CURVE on, built with libsodium"),
        "{out}"
    );
    // Linked in, not loaded from a system package (Debian's libzmq5 or
    // libsodium23): a fresh machine needs neither, nor their -dev packages.
    let ldd = std::process::Command::new("ldd")
        .arg(gaspard_bin())
        .output()
        .expect("ldd (libc-bin) runs");
    let libraries = String::from_utf8_lossy(&ldd.stdout);
    assert!(ldd.status.success(), "{libraries}");
    assert!(
        !libraries.contains("libzmq") && !libraries.contains("libsodium"),
        "{libraries}"
    );
}

#[test]
fn a_host_that_sends_garbage_is_dropped_and_its_request_reset() {
    let daemon = pool_daemon_with_metrics("echo");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // An unknown message type where a reply should be.
    let garbage = vec![vec![99u8, 1, 2, 3]];
    let host = fake_host(pool_endpoint(&daemon), 1, Some(garbage), stop.clone());
    wait_joined(&daemon, 1);
    let result = within(daemon.addr, b"a request").recv_timeout(Duration::from_secs(20));
    let line = daemon.expect_log("requests it held failed");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(host.join().unwrap(), 1, "the request went to the host");
    assert!(
        result.as_ref().is_ok_and(is_reset),
        "the request the garbling host held: {result:?}"
    );
    assert!(
        line.contains("it sent a message that does not parse"),
        "{line}"
    );
    assert!(line.contains("; 1 requests it held failed"), "{line}");
    let scrape = daemon.scrape();
    let lost = scrape
        .lines()
        .find(|l| l.starts_with("gaspard_pool_hosts_lost_total{cause=\"protocol\"}"))
        .unwrap_or_else(|| panic!("{scrape}"));
    assert!(lost.ends_with(" 1"), "{lost}");
}

#[test]
fn a_host_that_leaves_with_a_request_is_no_longer_counted_once_it_is_answered() {
    let daemon = pool_daemon_with_metrics("fault");
    let endpoint = pool_endpoint(&daemon);
    let mut leaving = WorkerHost::start(&endpoint, "fault", &["--workers", "1"]);
    wait_joined(&daemon, 1);
    // The only host takes the slow request, then another host joins.
    let slow = within(daemon.addr, b"sleep:1500");
    std::thread::sleep(Duration::from_millis(300));
    let _staying = WorkerHost::start(&endpoint, "fault", &["--workers", "1"]);
    wait_joined(&daemon, 2);
    std::thread::sleep(Duration::from_millis(300));
    let hosts = |daemon: &Daemon| metric(&daemon.scrape(), "gaspard_pool_hosts ");
    assert_eq!(hosts(&daemon), 2.0);
    // It leaves holding the request: it is forgotten when its reply comes,
    // and the gauges say so although no other host's news follows.
    leaving.signal(libc::SIGTERM);
    let reply = slow.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(reply.unwrap(), b"slept");
    assert!(leaving.wait_exit(Duration::from_secs(15)).is_some());
    std::thread::sleep(Duration::from_millis(300));
    let scrape = daemon.scrape();
    assert_eq!(metric(&scrape, "gaspard_pool_hosts "), 1.0, "{scrape}");
    assert_eq!(metric(&scrape, "gaspard_workers_ready "), 1.0, "{scrape}");
}
