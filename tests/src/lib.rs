//! The integration-test harness: builds the workspace once, starts the real
//! `gaspard` binary with real handler plugins on a random port, and talks to
//! it over real TCP. Every process a test starts is stopped when its guard
//! drops, even when an assertion fails.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use gaspar_protocol::request as pack;

/// How long a daemon may take to start serving before a test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding `gaspard` and the handler libraries, built once per
/// test run. `cargo test` alone does not build cdylib outputs or binaries of
/// other packages, so the harness runs `cargo build` itself.
pub fn artifacts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // The test executable lives in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable is in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("profile dir has a parent");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut build = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        build
            .args(["build", "--workspace", "--quiet", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace failed");
        profile_dir
    })
}

/// The daemon arguments of the default link between the daemon and its
/// workers (a socket pair and a pipe each): none.
pub const LOCAL_LINK: &[&str] = &[];
/// The daemon arguments of gaspar's libzmq PUSH/PULL link.
pub const ZMQ_LINK: &[&str] = &["--link", "zmq"];

/// `args` and then `link`: the arguments of a scenario that runs over each
/// link ([`LOCAL_LINK`], [`ZMQ_LINK`]).
pub fn with_link<'a>(args: &[&'a str], link: &[&'a str]) -> Vec<&'a str> {
    [args, link].concat()
}

/// The `gaspard` executable.
pub fn gaspard_bin() -> PathBuf {
    artifacts().join("gaspard")
}

/// A handler library by name: `handler("echo")` is `libecho.so`.
pub fn handler(name: &str) -> PathBuf {
    let path = artifacts().join(format!("lib{name}.so"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Lines a process wrote to stderr, collected by a thread.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    /// Collects the lines of `stream` (another process's stderr, say) until
    /// it ends.
    pub fn collect(self, stream: impl Read + Send + 'static) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("GASPARD_TEST_ECHO_LOG").is_some() {
                    eprintln!("{line}");
                }
                let (lines, changed) = &*self.0;
                lines.lock().unwrap().push(line);
                changed.notify_all();
            }
        })
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Whether some line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|line| line.contains(needle))
    }

    /// Waits until a line contains `needle`; returns it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.0;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(line) = guard.iter().find(|line| line.contains(needle)) {
                return Some(line.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}

/// A running daemon, stopped (and reaped) on drop.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub log: Log,
    /// The private runtime directory's parent, a fresh temporary directory.
    pub runtime_parent: tempfile::TempDir,
    log_thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts `gaspard` with `args` (plus `--port 0` unless `args` has a
/// `--port`, and a private runtime directory). Fails the test if it does not
/// start serving.
pub fn start(handler_name: &str, args: &[&str]) -> Daemon {
    try_start(handler_name, args).unwrap_or_else(|(status, log)| {
        panic!(
            "gaspard did not start ({status:?}):\n{}",
            log.lines().join("\n")
        )
    })
}

/// Like [`start`], but returns the exit status and log if it does not serve.
pub fn try_start(handler_name: &str, args: &[&str]) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    try_start_with_env(handler_name, args, &[])
}

/// Like [`try_start`], with extra environment variables for the daemon.
pub fn try_start_with_env(
    handler_name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    launch(&handler(handler_name), args, env)
}

/// Starts `gaspard` on the handler file at `handler_path`.
pub fn launch(
    handler_path: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    launch_with(handler_path, args, env, |_| {})
}

/// Like [`launch`], with `prepare` given the command before it is spawned
/// (to hand the daemon an extra fd, say).
pub fn launch_with(
    handler_path: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    prepare: impl FnOnce(&mut Command),
) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    spawn(handler_path, args, env, prepare, LISTENING)
}

/// Starts `gaspard` with `handler_name` and `args`, which must include
/// `--metrics`, and returns as soon as the metrics endpoint is up, before
/// the daemon serves: `addr` is unknown (unspecified) until
/// [`Daemon::wait_serving`].
pub fn start_unready(handler_name: &str, args: &[&str]) -> Daemon {
    spawn(&handler(handler_name), args, &[], |_| {}, METRICS_UP).unwrap_or_else(|(status, log)| {
        panic!(
            "gaspard did not start ({status:?}):\n{}",
            log.lines().join("\n")
        )
    })
}

/// The log line that says the daemon serves, with its address after it.
const LISTENING: &str = "listening on ";
/// The log line that says the metrics endpoint is up.
const METRICS_UP: &str = "serving metrics on http://";

/// The address in a `listening on ADDR …` line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    line.split(LISTENING)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
}

/// Starts `gaspard` as systemd does with socket activation: `listener` as
/// fd 3, `LISTEN_FDS=1`, and `LISTEN_PID` its own pid (a shell sets it, then
/// execs gaspard). The caller keeps `listener` open, so its port stays open
/// between one daemon and the next, as `gaspard.socket` keeps it.
pub fn launch_activated(
    handler_path: &Path,
    listener: &std::net::TcpListener,
    args: &[&str],
) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\""])
        .arg(gaspard_bin());
    spawn_from(
        command,
        handler_path,
        args,
        &[("LISTEN_FDS", "1")],
        |command| inherit_fd(command, listener, 3),
        LISTENING,
    )
}

/// Starts `gaspard` through `wrapper`, a command that ends by running the
/// program named in its last argument with the arguments that follow (such
/// as `ip netns exec NAME`): gaspard's path and arguments are appended.
pub fn launch_wrapped(
    mut wrapper: Command,
    handler_path: &Path,
    args: &[&str],
) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    wrapper.arg(gaspard_bin());
    spawn_from(wrapper, handler_path, args, &[], |_| {}, LISTENING)
}

fn spawn(
    handler_path: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    prepare: impl FnOnce(&mut Command),
    until: &str,
) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    spawn_from(
        Command::new(gaspard_bin()),
        handler_path,
        args,
        env,
        prepare,
        until,
    )
}

/// Starts `command` (gaspard, or what execs it) with gaspard's arguments
/// after its own.
fn spawn_from(
    mut command: Command,
    handler_path: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    prepare: impl FnOnce(&mut Command),
    until: &str,
) -> Result<Daemon, (Option<ExitStatus>, Log)> {
    let runtime_parent = tempfile::tempdir().expect("temporary directory");
    // Like /tmp, so that a daemon that drops privileges (--user) can still
    // create its own private directory inside.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            runtime_parent.path(),
            std::fs::Permissions::from_mode(0o1777),
        )
        .expect("chmod the runtime parent");
    }
    command.arg("--handler").arg(handler_path);
    // A free port, unless the test names one (to start a daemon again where
    // a stopped one served, say).
    if !args.contains(&"--port") {
        command.args(["--port", "0"]);
    }
    command.args(["--log-level", "debug"]);
    // A private runtime directory, unless the test names one.
    if !args.contains(&"--runtime-dir") {
        command.arg("--runtime-dir").arg(runtime_parent.path());
    }
    command
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    prepare(&mut command);
    let mut child = command.spawn().expect("start gaspard");
    let log = Log::default();
    let log_thread = log.clone().collect(child.stderr.take().unwrap());
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(line) = log.wait_for(until, Duration::from_millis(50)) {
            let addr = if until == LISTENING {
                listening_addr(&line)
            } else {
                Some(SocketAddr::from(([0, 0, 0, 0], 0)))
            };
            // The guard first, so that a failed test still stops the daemon.
            let mut daemon = Daemon {
                child,
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                log,
                runtime_parent,
                log_thread: Some(log_thread),
            };
            daemon.addr = addr.unwrap_or_else(|| panic!("no address in {line:?}"));
            return Ok(daemon);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = log_thread.join();
            return Err((Some(status), log));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err((None, log));
        }
    }
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The daemon's worker processes (its live children).
    pub fn workers(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Waits until the daemon has `n` live workers, all different from `not`.
    pub fn wait_for_workers(&self, n: usize, not: &[i32], timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let workers = self.workers();
            if workers.len() == n && workers.iter().all(|pid| !not.contains(pid)) {
                return workers;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} workers, have {workers:?}\n{}",
                self.log.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the daemon to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for gaspard") {
                if let Some(thread) = self.log_thread.take() {
                    let _ = thread.join();
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to 10 s) for a log line containing `needle`; fails the test
    /// with the whole log if none comes.
    pub fn expect_log(&self, needle: &str) -> String {
        self.log
            .wait_for(needle, Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!(
                    "no log line contains {needle:?}:\n{}",
                    self.log.lines().join("\n")
                )
            })
    }

    /// The address of the metrics endpoint (started with `--metrics ADDR`),
    /// from the log line that announces it.
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self.expect_log(METRICS_UP);
        line.split("http://")
            .nth(1)
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Scrapes the metrics endpoint: the whole HTTP response.
    pub fn scrape(&self) -> String {
        let request = "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n";
        let response = http(self.metrics_addr(), request);
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        response
    }

    /// Waits (up to a minute) until the daemon serves, and sets `addr`: for
    /// a daemon from [`start_unready`].
    pub fn wait_serving(&mut self) {
        let line = self
            .log
            .wait_for(LISTENING, START_TIMEOUT)
            .unwrap_or_else(|| panic!("never served:\n{}", self.log.lines().join("\n")));
        self.addr = listening_addr(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
    }

    /// Asks the health endpoint (`GET /healthz` over HTTP/1.1 with a Host
    /// header, as a load balancer does): the status code and the body.
    pub fn health(&self) -> (u16, String) {
        let response = http(
            self.metrics_addr(),
            "GET /healthz HTTP/1.1\r\nHost: gaspard\r\n\r\n",
        );
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {response:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status code in {response:?}"));
        (status, body.to_string())
    }

    /// Sends one request and reads the reply.
    pub fn request(&self, payload: &[u8]) -> io::Result<Vec<u8>> {
        request(self.addr, payload)
    }

    /// The files and directories left in the runtime directory's parent.
    pub fn runtime_leftovers(&self) -> Vec<PathBuf> {
        walk(self.runtime_parent.path())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            found.extend(walk(&path));
            found.push(path);
        }
    }
    found
}

/// Sends `request` as it is to an HTTP server at `addr` and reads the whole
/// response, until the server closes.
pub fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = connect(addr).expect("connect to the HTTP endpoint");
    stream
        .write_all(request.as_bytes())
        .expect("send the HTTP request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the HTTP response");
    response
}

/// Sends one gaspar request and reads the reply until the server closes.
/// A reset comes back as `ErrorKind::ConnectionReset`.
pub fn request(addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = connect(addr)?;
    stream.write_all(&pack(payload)).map_err(torn_down)?;
    read_reply(&mut stream)
}

/// A server that resets the connection while the client is still sending
/// makes the send fail with EPIPE, ECONNRESET or ENOTCONN, depending on
/// timing; all of them are the reset that marks a failed request.
fn torn_down(error: io::Error) -> io::Error {
    match error.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected
        | io::ErrorKind::ConnectionReset => io::Error::new(io::ErrorKind::ConnectionReset, error),
        _ => error,
    }
}

/// A connection with a generous read timeout, so a hang fails the test
/// instead of stalling it.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(stream)
}

/// Reads until the server closes the connection.
pub fn read_reply(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(reply)
}

/// Sends raw bytes (no framing added), half-closes, and reads the reply.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = connect(addr)?;
    stream.write_all(bytes).map_err(torn_down)?;
    stream.shutdown(Shutdown::Write).map_err(torn_down)?;
    read_reply(&mut stream)
}

/// An address where connections are refused, held for the guard's life.
pub struct RefusingPort {
    // Bound but not listening: connects are refused, and no other test's
    // daemon (--port 0) can be given the port meanwhile.
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

/// A port nothing listens on, reserved so that it stays that way.
pub fn refusing_port() -> RefusingPort {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind a port");
    let addr = socket
        .local_addr()
        .expect("its address")
        .as_socket()
        .expect("an inet address");
    RefusingPort {
        _socket: socket,
        addr,
    }
}

/// One sample from a scrape, such as `gaspard_requests_total{outcome="ok"}`;
/// 0 if absent.
pub fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether `result` is the reset that marks a failed request.
pub fn is_reset(result: &io::Result<Vec<u8>>) -> bool {
    matches!(result, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
}

/// Live (not zombie) processes whose parent is `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut children = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((state, ppid)) = proc_state(child) {
            if ppid == pid && state != 'Z' && state != 'X' {
                children.push(child);
            }
        }
    }
    children.sort_unstable();
    children
}

/// A process's state letter and parent pid, from /proc/PID/stat.
pub fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The CPU time `pid` has used so far (user + system), in clock ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command: state is field 3; utime and stime are 14 and 15.
    let mut fields = stat[stat.rfind(')')? + 2..].split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn is_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Waits until none of `pids` is alive; returns those still alive at the timeout.
pub fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&pid| is_alive(pid)).collect();
        if alive.is_empty() || Instant::now() > deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Compiles a C source into a shared library in `dir`, with gaspar.h on the
/// include path: for handlers that exist only to be refused.
pub fn compile_c_library(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let lib = dir.join(format!("lib{name}.so"));
    std::fs::write(&src, source).expect("write C source");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../handler-abi/include");
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg("-I")
        .arg(include)
        .arg(&src)
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "compiling {name}.c failed");
    lib
}

/// Makes `command`'s process start with `file` open as `fd`, without
/// close-on-exec: a descriptor it inherited but does not know of, like a
/// shell's fd 3.
pub fn inherit_fd(command: &mut Command, file: &impl std::os::fd::AsRawFd, fd: i32) {
    use std::os::unix::process::CommandExt;
    let from = file.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe, and touch only fds of
    // the forked child; `from` is open in it (the parent holds `file`).
    unsafe {
        command.pre_exec(move || {
            let done = if from == fd {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, fd)
            };
            if done == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `gaspard` with `args` until it exits (killing it after a minute, so
/// a daemon that unexpectedly serves fails the test instead of hanging it).
/// Returns (status, stdout, stderr); the status is `None` if it was killed.
pub fn run_gaspard<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Option<ExitStatus>, String, String) {
    run_gaspard_with_env(args, &[])
}

/// Like [`run_gaspard`], with extra environment variables.
pub fn run_gaspard_with_env<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
) -> (Option<ExitStatus>, String, String) {
    let mut child = Command::new(gaspard_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gaspard");
    let out = Log::default();
    let err = Log::default();
    let out_thread = out.clone().collect(child.stdout.take().unwrap());
    let err_thread = err.clone().collect(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for gaspard") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = out_thread.join();
    let _ = err_thread.join();
    (status, out.lines().join("\n"), err.lines().join("\n"))
}

/// How long a worker host may take to check its handler and start its
/// workers on a busy machine; only a failing test waits this long.
const HOST_START: Duration = Duration::from_secs(60);

/// A worker host process (`gaspard worker --connect`), killed with its
/// workers when dropped.
pub struct WorkerHost {
    child: Child,
    pub log: Log,
    runtime_parent: tempfile::TempDir,
}

impl WorkerHost {
    /// Starts `gaspard worker --connect ENDPOINT --handler libNAME.so ARGS`,
    /// logging at debug level into [`Self::log`], in a runtime directory of
    /// its own.
    pub fn start(endpoint: &str, handler_name: &str, args: &[&str]) -> WorkerHost {
        WorkerHost::start_with(Command::new(gaspard_bin()), endpoint, handler_name, args)
    }

    /// Like [`Self::start`], through `command`: gaspard itself, or a command
    /// that runs it (`ip netns exec NS gaspard`).
    pub fn start_with(
        mut command: Command,
        endpoint: &str,
        handler_name: &str,
        args: &[&str],
    ) -> WorkerHost {
        let runtime_parent = tempfile::tempdir().expect("temporary directory");
        let mut child = command
            .args(["worker", "--connect", endpoint, "--handler"])
            .arg(handler(handler_name))
            .args(["--log-level", "debug", "--runtime-dir"])
            .arg(runtime_parent.path())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gaspard worker");
        let log = Log::default();
        log.clone().collect(child.stderr.take().unwrap());
        WorkerHost {
            child,
            log,
            runtime_parent,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Its worker processes, once there are exactly `n` (fails the test if
    /// that takes longer than a start may).
    pub fn workers(&self, n: usize) -> Vec<i32> {
        let deadline = Instant::now() + HOST_START;
        loop {
            let workers = children_of(self.pid());
            if workers.len() == n {
                return workers;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} workers, have {workers:?}\n{}",
                self.log.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 20 s) for a log line containing `needle`.
    pub fn expect_log(&self, needle: &str) -> String {
        self.log
            .wait_for(needle, Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!(
                    "no log line contains {needle:?}:\n{}",
                    self.log.lines().join("\n")
                )
            })
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the host") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What is left in its runtime directory's parent.
    pub fn runtime_leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.runtime_parent.path())
            .expect("read the runtime parent")
            .flatten()
            .map(|entry| entry.path())
            .collect()
    }
}

impl Drop for WorkerHost {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let workers = children_of(self.pid());
            for &worker in &workers {
                // SAFETY: kill(2) on a worker of our child.
                unsafe { libc::kill(worker, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            wait_gone(&workers, Duration::from_secs(5));
        }
    }
}
