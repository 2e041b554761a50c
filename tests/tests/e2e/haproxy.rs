//! Several daemons behind HAProxy, configured by `docs/haproxy.cfg` (the file
//! docs/deploy.md quotes): a rolling restart under load fails no request, and
//! a daemon killed under load costs at most the connections HAProxy had open
//! to it. Skipped where `haproxy` is not installed (.ci/run installs it).

use gaspard_tests::{handler, launch_activated, request, start, Daemon, Log};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `--drain-delay` for every daemon: fall 2 × inter 500ms in
/// docs/haproxy.cfg, plus a second of margin, as docs/deploy.md says.
const DRAIN_DELAY: &str = "2";
/// `--workers` for every daemon: `maxconn 4` in docs/haproxy.cfg is twice it.
const WORKERS: &str = "2";
/// `maxconn` per server in docs/haproxy.cfg.
const MAXCONN: usize = 4;
/// fall × inter in docs/haproxy.cfg.
const DOWN_AFTER: Duration = Duration::from_millis(2 * 500);

/// Where `haproxy` is: on PATH, or in /usr/sbin (Debian's place, not on a
/// user's PATH).
fn haproxy_bin() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|path| path.is_file())
}

/// A running HAProxy, killed and reaped on drop.
struct Haproxy {
    child: Child,
    /// Its front end, where clients connect.
    addr: SocketAddr,
    stats: PathBuf,
    log: Log,
    _dir: tempfile::TempDir,
}

/// The daemons HAProxy balances over, as the `server` lines name them.
const SERVERS: [&str; 2] = ["a", "b"];

impl Haproxy {
    /// Runs HAProxy on docs/haproxy.cfg, with 127.0.0.1 and the daemons'
    /// ports in place of the documented addresses, and a global section
    /// (which the document leaves to Debian's file) with a stats socket in a
    /// temporary directory and the log on stderr.
    fn start(bin: &Path, daemons: [&Daemon; 2]) -> Haproxy {
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/haproxy.cfg");
        let text = std::fs::read_to_string(doc).unwrap();
        let front = free_port();
        let mut substitutions = vec![(
            "bind 192.0.2.10:10123".to_string(),
            format!("bind 127.0.0.1:{front}"),
        )];
        for (name, (daemon, host)) in SERVERS
            .iter()
            .zip(daemons.iter().zip(["192.0.2.11", "192.0.2.12"]))
        {
            substitutions.push((
                format!("server {name} {host}:10123 check port 9123"),
                format!(
                    "server {name} {} check port {}",
                    daemon.addr,
                    daemon.metrics_addr().port()
                ),
            ));
        }
        let mut config = text;
        for (from, to) in &substitutions {
            assert_eq!(
                config.matches(from.as_str()).count(),
                1,
                "docs/haproxy.cfg no longer has {from:?}"
            );
            config = config.replace(from.as_str(), to);
        }
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("admin.sock");
        let global = format!(
            "global\n    stats socket {} mode 600 level admin\n    log stderr format raw local0 info\n\n",
            stats.display()
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, global + &config).unwrap();
        let mut child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy");
        let log = Log::default();
        log.clone().collect(child.stderr.take().unwrap());
        let haproxy = Haproxy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], front)),
            stats,
            log,
            _dir: dir,
        };
        for server in SERVERS {
            haproxy.wait_status(server, "UP", Duration::from_secs(20));
        }
        haproxy
    }

    /// `show stat` on the stats socket: one map of column to value for
    /// each server of the gaspard backend.
    fn stats(&self) -> Option<Vec<std::collections::HashMap<String, String>>> {
        let mut socket = UnixStream::connect(&self.stats).ok()?;
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.write_all(b"show stat\n").ok()?;
        let mut csv = String::new();
        socket.read_to_string(&mut csv).ok()?;
        let mut lines = csv.lines();
        let header: Vec<String> = lines
            .next()?
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_string)
            .collect();
        Some(
            lines
                .filter(|line| line.starts_with("gaspard,"))
                .map(|line| {
                    header
                        .iter()
                        .cloned()
                        .zip(line.split(',').map(str::to_string))
                        .collect()
                })
                .collect(),
        )
    }

    /// One column of one server's (or `BACKEND`'s) row.
    fn stat(&self, server: &str, column: &str) -> Option<String> {
        self.stats()?
            .into_iter()
            .find(|row| row.get("svname").map(String::as_str) == Some(server))?
            .remove(column)
    }

    /// Waits until HAProxy says `server` is `status` (`UP` or `DOWN`, not in
    /// transition); returns how long that took.
    fn wait_status(&self, server: &str, status: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let now = self.stat(server, "status");
            if now.as_deref() == Some(status) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "HAProxy says server {server} is {now:?}, not {status}:\n{}",
                self.log.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A backend column summed over the servers (retries, redispatches).
    fn backend(&self, column: &str) -> u64 {
        self.stat("BACKEND", column)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a daemon of the deployment: echo, on `port` (0: a free one) and
/// `metrics` (likewise), with the drain delay that fits the checks.
fn daemon(port: u16, metrics: u16) -> Daemon {
    daemon_of("echo", port, metrics)
}

/// Like [`daemon`], with another handler.
fn daemon_of(handler: &str, port: u16, metrics: u16) -> Daemon {
    let port = port.to_string();
    let metrics = format!("127.0.0.1:{metrics}");
    start(
        handler,
        &[
            "--port",
            &port,
            "--workers",
            WORKERS,
            "--metrics",
            &metrics,
            "--drain-delay",
            DRAIN_DELAY,
        ],
    )
}

/// Clients sending one-shot echo requests through HAProxy until told to
/// stop (or a cap), checking every reply.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tally: Arc<Mutex<Tally>>,
}

#[derive(Default, Debug, Clone)]
struct Tally {
    ok: u64,
    /// Requests whose reply was missing or wrong, with when and how they
    /// ended. Through HAProxy a reset from gaspard reaches the client as a
    /// clean close with no reply (docs/deploy.md).
    failed: Vec<(Instant, String)>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..clients)
            .map(|client| {
                let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
                std::thread::spawn(move || {
                    for n in 0..100_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let body = format!("client {client} request {n}").into_bytes();
                        let outcome = request(addr, &body);
                        let mut tally = tally.lock().unwrap();
                        match outcome {
                            Ok(reply) if reply == body => tally.ok += 1,
                            Ok(reply) => tally.failed.push((
                                Instant::now(),
                                format!("{} bytes, not the {} sent", reply.len(), body.len()),
                            )),
                            Err(e) => tally.failed.push((Instant::now(), e.to_string())),
                        }
                        drop(tally);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            tally,
        }
    }

    fn ok(&self) -> u64 {
        self.tally.lock().unwrap().ok
    }

    /// Waits until `n` more requests have been answered, so that the load
    /// is known to run.
    fn wait_answered(&self, n: u64) {
        let target = self.ok() + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ok() < target {
            assert!(Instant::now() < deadline, "the load does not run");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let tally = self.tally.lock().unwrap().clone();
        tally
    }
}

/// Two daemons behind HAProxy, with the load running through it and
/// answered; `None` (having said so) where haproxy is not installed.
fn two_daemons_under_load() -> Option<([Daemon; 2], Haproxy, Load)> {
    let Some(bin) = haproxy_bin() else {
        eprintln!("skipped: haproxy not installed (.ci/run installs it)");
        return None;
    };
    let daemons = [daemon(0, 0), daemon(0, 0)];
    let haproxy = Haproxy::start(&bin, [&daemons[0], &daemons[1]]);
    let load = Load::start(haproxy.addr, 4);
    load.wait_answered(200);
    Some((daemons, haproxy, load))
}

#[test]
fn a_rolling_restart_behind_haproxy_fails_no_request() {
    let Some((mut daemons, haproxy, load)) = two_daemons_under_load() else {
        return;
    };
    let started = Instant::now();
    for (slot, server) in daemons.iter_mut().zip(SERVERS) {
        // What `systemctl restart` does: SIGTERM, wait for the exit, start.
        let (port, metrics) = (slot.addr.port(), slot.metrics_addr().port());
        let signalled = Instant::now();
        slot.signal(libc::SIGTERM);
        let down = haproxy.wait_status(server, "DOWN", Duration::from_secs(10));
        // The drain delay, then what it still held: echo requests, done at
        // once. Not --shutdown-timeout (30 s), which is for stuck requests.
        let status = slot.wait_exit(Duration::from_secs(12)).unwrap_or_else(|| {
            panic!(
                "gaspard did not exit within 10 s of its --drain-delay {DRAIN_DELAY} s:\n{}",
                slot.log.lines().join("\n")
            )
        });
        let stopped = signalled.elapsed();
        assert_eq!(status.code(), Some(0));
        slot.expect_log("stopped gracefully: every accepted request was answered");
        *slot = daemon(port, metrics);
        let up = haproxy.wait_status(server, "UP", Duration::from_secs(20));
        eprintln!(
            "server {server}: marked down {down:?} after SIGTERM, exited after {stopped:?}, \
             up again {up:?} after its restart"
        );
        load.wait_answered(200);
    }
    let restart = started.elapsed();
    let tally = load.finish();
    let (retries, redispatches) = (haproxy.backend("wretr"), haproxy.backend("wredis"));
    eprintln!(
        "rolling restart of 2 daemons in {restart:?}: {} requests answered and checked, {} failed; \
         HAProxy retried {retries} connections, redispatched {redispatches}",
        tally.ok,
        tally.failed.len()
    );
    assert!(
        tally.failed.is_empty(),
        "requests failed: {:?}\nHAProxy:\n{}",
        tally.failed.iter().map(|(_, why)| why).collect::<Vec<_>>(),
        haproxy.log.lines().join("\n")
    );
    assert!(tally.ok > 1000, "the load ran: {}", tally.ok);
    stop(&daemons);
}

/// SIGTERM to every daemon at once, so that their drain delays pass
/// together as the guards wait for them.
fn stop(daemons: &[Daemon]) {
    for daemon in daemons {
        daemon.signal(libc::SIGTERM);
    }
}

#[test]
fn a_daemon_killed_behind_haproxy_costs_at_most_the_connections_it_held() {
    let Some((mut daemons, haproxy, load)) = two_daemons_under_load() else {
        return;
    };
    let workers = daemons[0].workers();
    let killed = Instant::now();
    daemons[0].signal(libc::SIGKILL);
    let down = haproxy.wait_status("a", "DOWN", Duration::from_secs(10));
    assert!(daemons[0].wait_exit(Duration::from_secs(10)).is_some());
    assert_eq!(
        gaspard_tests::wait_gone(&workers, Duration::from_secs(10)),
        Vec::<i32>::new(),
        "the workers die with the daemon"
    );
    load.wait_answered(500);
    let tally = load.finish();
    let failed = tally.failed.len();
    let last_failure = tally
        .failed
        .iter()
        .map(|(at, _)| at.saturating_duration_since(killed))
        .max();
    eprintln!(
        "kill -9 of one of 2 daemons: HAProxy marked it down after {down:?} (fall x inter = \
         {DOWN_AFTER:?}); {} requests answered and checked, {failed} failed (maxconn {MAXCONN}) \
         {:?}, the last {last_failure:?} after the kill; HAProxy redispatched {} connections",
        tally.ok,
        tally.failed.iter().map(|(_, why)| why).collect::<Vec<_>>(),
        haproxy.backend("wredis")
    );
    assert!(
        down < DOWN_AFTER + Duration::from_secs(2),
        "marked down only after {down:?}"
    );
    assert!(
        failed <= MAXCONN,
        "{failed} requests failed, more than the {MAXCONN} connections HAProxy may hold to a \
         server: {:?}",
        tally.failed.iter().map(|(_, why)| why).collect::<Vec<_>>()
    );
    // Every failure is one HAProxy had passed to the daemon before it died:
    // none once HAProxy knows it is down.
    assert!(
        last_failure.unwrap_or_default() < down,
        "a request failed {last_failure:?} after the kill, HAProxy marked the daemon down after \
         {down:?}"
    );
    assert!(
        haproxy.log.contains("gaspard/a is DOWN"),
        "{}",
        haproxy.log.lines().join("\n")
    );
    stop(&daemons[1..]);
}

/// HAProxy in TCP mode closes the client's side cleanly when the server
/// resets: a request gaspard failed reaches the client as an empty reply,
/// not as the reset a direct client sees. docs/deploy.md says so.
#[test]
fn through_haproxy_a_failed_request_reads_as_an_empty_reply() {
    let Some(bin) = haproxy_bin() else {
        eprintln!("skipped: haproxy not installed (.ci/run installs it)");
        return;
    };
    let daemons = [daemon_of("fault", 0, 0), daemon_of("fault", 0, 0)];
    let haproxy = Haproxy::start(&bin, [&daemons[0], &daemons[1]]);
    assert_eq!(request(haproxy.addr, b"echo:fine").unwrap(), b"fine");
    assert!(gaspard_tests::is_reset(
        &daemons[0].request(b"error:direct")
    ));
    let failed = request(haproxy.addr, b"error:proxied");
    assert_eq!(
        failed.as_deref().map_err(|e| e.kind()),
        Ok(&b""[..]),
        "HAProxy passed the reset on (update docs/deploy.md)"
    );
    stop(&daemons);
}

/// With socket activation the client port outlives the daemon, as
/// `gaspard.socket` holds it: restarting one daemon behind HAProxy fails no
/// request, and a connection made while no gaspard runs waits and is served.
#[test]
fn a_restart_behind_a_held_socket_fails_no_request() {
    let Some(bin) = haproxy_bin() else {
        eprintln!("skipped: haproxy not installed (.ci/run installs it)");
        return;
    };
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let activated = |metrics: u16| {
        let metrics = format!("127.0.0.1:{metrics}");
        let args = [
            "--workers",
            WORKERS,
            "--metrics",
            &metrics,
            "--drain-delay",
            DRAIN_DELAY,
        ];
        launch_activated(&handler("echo"), &socket, &args)
            .unwrap_or_else(|(status, log)| panic!("{status:?}: {}", log.lines().join("\n")))
    };
    let mut daemons = [activated(0), daemon(0, 0)];
    daemons[0].expect_log("using the socket systemd passed");
    let haproxy = Haproxy::start(&bin, [&daemons[0], &daemons[1]]);
    let load = Load::start(haproxy.addr, 4);
    load.wait_answered(200);

    let (addr, metrics) = (daemons[0].addr, daemons[0].metrics_addr().port());
    let signalled = Instant::now();
    daemons[0].signal(libc::SIGTERM);
    let down = haproxy.wait_status("a", "DOWN", Duration::from_secs(10));
    let status = daemons[0]
        .wait_exit(Duration::from_secs(12))
        .unwrap_or_else(|| {
            panic!(
                "gaspard did not exit within 10 s of its --drain-delay {DRAIN_DELAY} s:\n{}",
                daemons[0].log.lines().join("\n")
            )
        });
    let stopped = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    // No gaspard runs now, but the port is open: this client waits in the
    // backlog for the next one.
    let waiting = std::thread::spawn(move || {
        let sent = Instant::now();
        (request(addr, b"while restarting"), sent.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    daemons[0] = activated(metrics);
    let (reply, waited) = waiting.join().unwrap();
    assert_eq!(reply.unwrap(), b"while restarting");
    let up = haproxy.wait_status("a", "UP", Duration::from_secs(20));
    load.wait_answered(200);
    let tally = load.finish();
    eprintln!(
        "socket-activated restart: marked down {down:?} after SIGTERM, exited after {stopped:?}; \
         a connection made while no gaspard ran was answered after {waited:?}; up again {up:?} \
         after the restart; {} requests answered and checked, {} failed; HAProxy retried {} \
         connections",
        tally.ok,
        tally.failed.len(),
        haproxy.backend("wretr")
    );
    assert!(
        tally.failed.is_empty(),
        "requests failed: {:?}",
        tally.failed.iter().map(|(_, why)| why).collect::<Vec<_>>()
    );
    stop(&daemons);
}

/// docs/deploy.md quotes docs/haproxy.cfg, the file these tests run, as it
/// is (less its opening comment).
#[test]
fn the_deploy_guide_quotes_the_tested_configuration() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let file = std::fs::read_to_string(docs.join("haproxy.cfg")).unwrap();
    let config: String = file
        .lines()
        .skip_while(|line| line.starts_with('#') || line.is_empty())
        .map(|line| format!("{line}\n"))
        .collect();
    let guide = std::fs::read_to_string(docs.join("deploy.md")).unwrap();
    assert!(
        guide.contains(&format!("```haproxy\n{config}```")),
        "docs/deploy.md does not quote docs/haproxy.cfg as it is:\n{config}"
    );
}
