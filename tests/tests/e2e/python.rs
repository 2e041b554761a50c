//! Python handlers: `libgaspar_python.so` serving Python modules that each
//! test writes into a temporary directory, found through PYTHONPATH.

use gaspard_tests::{handler, is_reset, launch, run_gaspard_with_env, Daemon};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A directory of Python modules, removed with it.
struct App {
    dir: tempfile::TempDir,
}

impl App {
    fn new(modules: &[(&str, &str)]) -> App {
        let app = App {
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        for (name, source) in modules {
            app.write(name, source);
        }
        app
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, module: &str) -> PathBuf {
        self.path().join(format!("{module}.py"))
    }

    /// Writes `module.py`, replacing it whole (as an editor saving it does).
    fn write(&self, module: &str, source: &str) {
        let staging = self.path().join(format!("{module}.py.new"));
        std::fs::write(&staging, source).unwrap();
        std::fs::rename(&staging, self.file(module)).unwrap();
    }

    /// The environment a daemon or `--check` needs to find these modules:
    /// PYTHONPATH, no virtual environment a developer may have active, and
    /// no PYTHONDONTWRITEBYTECODE from the test's own environment, so that
    /// the tests see whether the bridge writes bytecode caches itself
    /// (CPython takes an empty variable for an unset one).
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PYTHONPATH", self.path().display().to_string()),
            ("VIRTUAL_ENV", String::new()),
            ("PYTHONDONTWRITEBYTECODE", String::new()),
        ]
    }

    /// Starts gaspard with the Python bridge on `config`.
    fn start(&self, config: &str, args: &[&str]) -> Daemon {
        self.start_with(config, args, &self.env())
    }

    fn start_with(&self, config: &str, args: &[&str], env: &[(&'static str, String)]) -> Daemon {
        let mut all = vec!["--handler-config", config];
        all.extend_from_slice(args);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        launch(&handler("gaspar_python"), &all, &env)
            .unwrap_or_else(|(status, log)| panic!("{status:?}:\n{}", log.lines().join("\n")))
    }

    /// Runs `gaspard --check` on `config`: (exit code, stdout, stderr).
    fn check(&self, config: &str) -> (Option<i32>, String, String) {
        self.check_with(config, self.env())
    }

    fn check_with(
        &self,
        config: &str,
        env: Vec<(&'static str, String)>,
    ) -> (Option<i32>, String, String) {
        let bridge = handler("gaspar_python");
        let args: Vec<&std::ffi::OsStr> = vec![
            "--check".as_ref(),
            "--handler".as_ref(),
            bridge.as_os_str(),
            "--handler-config".as_ref(),
            config.as_ref(),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, stdout, stderr) = run_gaspard_with_env(&args, &env);
        (status.and_then(|s| s.code()), stdout, stderr)
    }
}

/// Whether the process `pid` has libpython mapped.
fn maps_libpython(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .contains("libpython")
}

/// Asks until the daemon answers (a worker backing off refuses meanwhile).
fn request_until_served(daemon: &Daemon, payload: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match daemon.request(payload) {
            Ok(reply) => return reply,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("never served: {e}\n{}", daemon.log.lines().join("\n")),
        }
    }
}

/// gaspar's README example, as it was written for gaspar:
///
/// ```python
/// >>> def echo(message): return message
/// >>> consumer = gaspar.Consumer(handler=echo)
/// ```
const GASPAR_README_ECHO: &str = "def echo(message): return message\n";

#[test]
fn gaspars_readme_echo_serves_unchanged_and_python_runs_only_in_the_workers() {
    let app = App::new(&[("echo_app", GASPAR_README_ECHO)]);
    let daemon = app.start("echo_app:echo", &["--workers", "2"]);
    assert_eq!(daemon.request(b"hello").unwrap(), b"hello");
    let binary: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    assert_eq!(daemon.request(&binary).unwrap(), binary);
    // The interpreter starts in each worker, after exec; never in the daemon.
    let workers = daemon.workers();
    assert_eq!(workers.len(), 2);
    assert!(
        workers.iter().all(|&pid| maps_libpython(pid)),
        "{workers:?}"
    );
    assert!(!maps_libpython(daemon.pid()));
    // No bytecode cache is written next to the module.
    assert!(!app.path().join("__pycache__").exists());
}

#[test]
fn a_reply_may_be_bytes_bytearray_memoryview_or_str_as_utf8() {
    let app = App::new(&[(
        "replies",
        r#"
import array

REPLIES = {
    b"bytes": b"raw \x00 bytes",
    b"bytearray": bytearray(b"a bytearray"),
    b"memoryview": memoryview(b"xx a view")[3:],
    b"array": array.array("B", [104, 105]),
    b"str": "h\u00e9llo \u2603",
    b"empty": b"",
    b"none": None,
    b"int": 5,
    b"surrogate": "\udc80",
}

def reply(request):
    return REPLIES[request]
"#,
    )]);
    let daemon = app.start("replies:reply", &["--workers", "1"]);
    let served: [(&[u8], &[u8]); 6] = [
        (b"bytes", b"raw \x00 bytes"),
        (b"bytearray", b"a bytearray"),
        (b"memoryview", b"a view"),
        (b"array", b"hi"),
        (b"str", "héllo ☃".as_bytes()),
        (b"empty", b""),
    ];
    for (request, reply) in served {
        assert_eq!(daemon.request(request).unwrap(), reply, "{request:?}");
    }
    for (request, log) in [
        (&b"none"[..], "replies:reply returned None: return bytes"),
        (b"int", "replies:reply returned an int: return bytes"),
        (
            b"surrogate",
            "replies:reply returned a str that is not valid UTF-8: UnicodeEncodeError",
        ),
    ] {
        let result = daemon.request(request);
        assert!(is_reset(&result), "{request:?}: {result:?}");
        daemon.expect_log(log);
    }
}

#[test]
fn c_extension_modules_of_the_standard_library_import() {
    let app = App::new(&[(
        "native",
        r#"
import _ctypes, _decimal, _json, ctypes, decimal, hashlib, json, zlib

def handle(request):
    return json.dumps({
        "double": str(decimal.Decimal(request.decode()) * 2),
        "crc32": zlib.crc32(request),
        "sha256": hashlib.sha256(request).hexdigest()[:16],
        "c_decimal": decimal.Decimal is _decimal.Decimal,
        "c_json": json.encoder.c_make_encoder is not None,
    }, sort_keys=True).encode()
"#,
    )]);
    let daemon = app.start("native:handle", &["--workers", "1"]);
    assert_eq!(
        daemon.request(b"21.5").unwrap(),
        br#"{"c_decimal": true, "c_json": true, "crc32": 58437022, "double": "43.0", "sha256": "a20fa123d4d89777"}"#
    );
}

/// The interpreter the bridge is built against, which makes the venv.
const PYTHON: &str = "/usr/bin/python3.11";

/// Runs a set-up command quietly; its output if it fails.
fn run(program: &Path, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .env_remove("PYTHONPATH")
        .env_remove("VIRTUAL_ENV")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn a_package_pip_installed_in_the_virtual_environment_imports() {
    let app = App::new(&[(
        "uses_six",
        r#"
import sys
import six

def handle(request):
    return "|".join([six.__version__, six.__file__, sys.prefix, six.ensure_text(request)]).encode()
"#,
    )]);
    let venv = app.path().join("venv");
    let made = run(
        Path::new(PYTHON),
        &["-m", "venv", &venv.display().to_string()],
    )
    .and_then(|()| {
        let pip = venv.join("bin/pip");
        run(
            &pip,
            &[
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "six==1.16.0",
            ],
        )
    });
    if let Err(e) = made {
        eprintln!("skipped: cannot make a virtual environment with six in it: {e}");
        return;
    }
    let mut env = app.env();
    env.retain(|(key, _)| *key != "VIRTUAL_ENV");
    env.push(("VIRTUAL_ENV", venv.display().to_string()));
    let daemon = app.start_with("uses_six:handle", &["--workers", "1"], &env);
    let reply = String::from_utf8(daemon.request(b"from the venv").unwrap()).unwrap();
    // six from the venv's site-packages (Debian may have its own in
    // dist-packages), and sys.prefix the venv, as under its bin/python.
    let site = venv.join("lib/python3.11/site-packages/six.py");
    assert_eq!(
        reply,
        format!("1.16.0|{}|{}|from the venv", site.display(), venv.display())
    );
}

const FAILING: &str = r#"
import os

def handle(request):
    if request == b"raise":
        raise ValueError("refused " + request.decode())
    if request == b"interrupt":
        raise KeyboardInterrupt
    if request == b"exit":
        raise SystemExit(7)
    return str(os.getpid()).encode()
"#;

#[test]
fn an_exception_resets_the_request_logs_its_traceback_and_the_worker_serves_on() {
    let app = App::new(&[("failing", FAILING)]);
    let daemon = app.start("failing:handle", &["--workers", "1"]);
    let pid = daemon.workers()[0];
    assert_eq!(daemon.request(b"pid").unwrap(), pid.to_string().as_bytes());

    let result = daemon.request(b"raise");
    assert!(is_reset(&result), "{result:?}");
    let file = app.file("failing");
    let line = daemon.expect_log("handler failed: failing:handle raised");
    assert!(
        line.ends_with(&format!(
            "handler failed: failing:handle raised ValueError: refused raise (at {}:6 in handle); connection reset",
            file.display()
        )),
        "{line}"
    );
    daemon.expect_log(&format!(
        "worker pid {pid}: failing:handle raised ValueError: refused raise"
    ));
    daemon.expect_log("  | Traceback (most recent call last):");
    daemon.expect_log(&format!(
        "  |   File \"{}\", line 6, in handle",
        file.display()
    ));
    daemon.expect_log("  | ValueError: refused raise");
    // The same worker serves the next request.
    assert_eq!(daemon.request(b"pid").unwrap(), pid.to_string().as_bytes());

    // KeyboardInterrupt is an exception like any other here.
    assert!(is_reset(&daemon.request(b"interrupt")));
    daemon.expect_log("handler failed: failing:handle raised KeyboardInterrupt");
    assert_eq!(daemon.request(b"pid").unwrap(), pid.to_string().as_bytes());
    assert_eq!(daemon.workers(), [pid]);
}

#[test]
fn system_exit_ends_the_worker_with_its_status_and_a_new_one_serves() {
    let app = App::new(&[("failing", FAILING)]);
    let daemon = app.start("failing:handle", &["--workers", "1"]);
    let pid = daemon.workers()[0];
    let result = daemon.request(b"exit");
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log(&format!(
        "worker pid {pid}: failing:handle raised SystemExit: 7 (at {}:10 in handle): the worker exits with status 7",
        app.file("failing").display()
    ));
    daemon.expect_log("its worker exited with status 7; connection reset");
    let new = daemon.wait_for_workers(1, &[pid], Duration::from_secs(20))[0];
    assert_eq!(
        request_until_served(&daemon, b"pid"),
        new.to_string().as_bytes()
    );
}

#[test]
fn hooks_get_the_rest_of_the_config_and_a_failing_init_backs_off() {
    let app = App::new(&[(
        "hooked",
        r#"
import os

CONFIG = None

def gaspard_init(config):
    global CONFIG
    marker, _ = config.split(" ", 1)
    if os.path.exists(marker):
        raise RuntimeError("refusing to start: " + marker + " exists")
    CONFIG = config

def gaspard_shutdown():
    with open(CONFIG.split(" ", 1)[1], "a") as log:
        log.write("shutdown %d\n" % os.getpid())

def handle(request):
    return CONFIG.encode()
"#,
    )]);
    let marker = app.path().join("marker");
    let stopped = app.path().join("stopped.log");
    let rest = format!("{} {}", marker.display(), stopped.display());
    let config = format!("hooked:handle   {rest}");
    let mut daemon = app.start(&config, &["--workers", "1"]);
    assert_eq!(daemon.request(b"config").unwrap(), rest.as_bytes());
    let pid = daemon.workers()[0];

    // Now init raises: the worker that replaces a killed one cannot start,
    // the log says why, and the restarts back off.
    std::fs::write(&marker, b"").unwrap();
    // SAFETY: kill(2) on a worker of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let line = daemon.expect_log("could not start");
    assert!(
        line.ends_with(&format!(
            "init failed: hooked.gaspard_init raised RuntimeError: refusing to start: {} exists (at {}:10 in gaspard_init)",
            marker.display(),
            app.file("hooked").display()
        )),
        "{line}"
    );
    daemon.expect_log("(back-off after repeated failures)");
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(request_until_served(&daemon, b"config"), rest.as_bytes());

    // A graceful stop runs the shutdown hook of the worker serving.
    let pid = daemon.workers()[0];
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(20)).is_some());
    assert_eq!(
        std::fs::read_to_string(&stopped).unwrap(),
        format!("shutdown {pid}\n")
    );
}

#[test]
fn check_imports_the_module_and_reports_a_syntax_error_in_one_line() {
    let app = App::new(&[
        ("good", GASPAR_README_ECHO),
        ("broken", "def f(request):\n    return request +\n"),
    ]);
    let bridge = handler("gaspar_python");
    let (code, stdout, stderr) = app.check("good:echo");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "handler {}: ok: \"gaspar-python\" speaks handler ABI version 1, init succeeded",
            bridge.display()
        )
    );

    let (code, stdout, stderr) = app.check("broken:f");
    assert_eq!(code, Some(1));
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!(
            "gaspard: handler {}: init failed: cannot import broken: SyntaxError: invalid syntax ({}, line 2)",
            bridge.display(),
            app.file("broken").display()
        )
    );

    let (code, _, stderr) = app.check("good:missing");
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        format!(
            "gaspard: handler {}: init failed: module good ({}) defines no missing",
            bridge.display(),
            app.file("good").display()
        )
    );

    // A VIRTUAL_ENV that is no venv is named, not silently ignored.
    let mut env = app.env();
    env.retain(|(key, _)| *key != "VIRTUAL_ENV");
    env.push(("VIRTUAL_ENV", app.path().display().to_string()));
    let (code, _, stderr) = app.check_with("good:echo", env);
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        format!(
            "gaspard: handler {}: init failed: VIRTUAL_ENV={dir}: not a virtual environment ({dir}/bin/python is missing; make one with python3.11 -m venv)",
            bridge.display(),
            dir = app.path().display()
        )
    );

    let (code, _, stderr) = app.check("good");
    assert_eq!(code, Some(1));
    assert!(
        stderr.ends_with("init failed: handler config \"good\" does not start with MODULE:FUNCTION (e.g. 'myapp.handlers:resize')"),
        "{stderr}"
    );
}

#[test]
fn a_reload_runs_the_edited_module() {
    let app = App::new(&[("live", "def handle(request):\n    return b'one'\n")]);
    let daemon = app.start("live:handle", &["--workers", "2"]);
    assert_eq!(daemon.request(b"x").unwrap(), b"one");
    let old = daemon.workers();
    // The same size and modification time, as an edit within the same
    // second (or a copy that keeps times) gives: a bytecode cache, checked
    // by those two, would be taken for fresh.
    let modified = std::fs::metadata(app.file("live"))
        .and_then(|m| m.modified())
        .unwrap();
    app.write("live", "def handle(request):\n    return b'two'\n");
    std::fs::File::options()
        .write(true)
        .open(app.file("live"))
        .and_then(|file| file.set_modified(modified))
        .unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.expect_log("reload complete");
    daemon.wait_for_workers(2, &old, Duration::from_secs(20));
    for _ in 0..4 {
        assert_eq!(daemon.request(b"x").unwrap(), b"two");
    }
}
