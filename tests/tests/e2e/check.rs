//! Refusing what is not a usable handler: `--check`, and the same at start-up.

use gaspard_tests::{compile_c_library, handler, launch, run_gaspard, run_gaspard_with_env};
use std::path::{Path, PathBuf};

/// A real shared library that is not a gaspard handler: the C library this
/// test process has loaded.
fn libc_path() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.contains("/libc.so") || path.contains("/libc-"))
        .map(PathBuf::from)
        .expect("libc is mapped")
}

fn check(path: &Path, extra: &[&str]) -> (Option<std::process::ExitStatus>, String, String) {
    let mut args = vec![
        "--check".into(),
        "--handler".into(),
        path.as_os_str().to_owned(),
    ];
    args.extend(extra.iter().map(Into::into));
    run_gaspard(&args)
}

/// Starts the daemon proper on a handler that must be refused.
fn start_refused(path: &Path, extra: &[&str]) -> String {
    let mut args: Vec<std::ffi::OsString> = vec!["--handler".into(), path.into()];
    args.extend(["--port", "0", "--workers", "2"].iter().map(Into::into));
    args.extend(extra.iter().map(Into::into));
    let (status, _, stderr) = run_gaspard(&args);
    let status = status.expect("gaspard exits by itself instead of serving");
    assert!(!status.success(), "refused handler, yet exit {status:?}");
    assert_eq!(
        status.code(),
        Some(1),
        "an exit code, not a crash: {status:?}"
    );
    stderr
}

#[test]
fn check_accepts_a_good_handler_and_says_what_it_found() {
    for name in ["echo", "echo_c"] {
        let path = handler(name);
        let (status, stdout, stderr) = check(&path, &[]);
        assert!(status.unwrap().success(), "{stderr}");
        assert!(stdout.contains(&path.display().to_string()), "{stdout}");
        assert!(stdout.contains("ok"), "{stdout}");
        assert!(stdout.contains("handler ABI version 1"), "{stdout}");
    }
}

#[test]
fn check_refuses_a_library_that_is_not_a_handler() {
    let libc = libc_path();
    let (status, _, stderr) = check(&libc, &[]);
    assert_eq!(status.unwrap().code(), Some(1));
    assert!(stderr.contains("not a gaspard handler"), "{stderr}");
    assert!(
        stderr.contains(&libc.display().to_string()) || stderr.contains("libc"),
        "{stderr}"
    );
}

#[test]
fn check_refuses_a_missing_file_and_a_file_that_is_not_a_library() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.so");
    let (status, _, stderr) = check(&missing, &[]);
    assert_eq!(status.unwrap().code(), Some(1));
    assert!(stderr.contains("nowhere.so"), "{stderr}");
    assert!(stderr.to_lowercase().contains("no such file"), "{stderr}");

    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"this is not an ELF file").unwrap();
    let (status, _, stderr) = check(&garbage, &[]);
    assert_eq!(status.unwrap().code(), Some(1));
    assert!(stderr.contains("garbage.so: cannot load"), "{stderr}");
}

#[test]
fn check_runs_init_with_the_handler_config() {
    let path = handler("fault");
    let (status, _, stderr) = check(&path, &["--handler-config", "fail"]);
    assert_eq!(status.unwrap().code(), Some(1));
    assert!(
        stderr.contains("init failed: init refused by configuration"),
        "{stderr}"
    );
}

const WRONG_VERSION: &str = r#"
#include "gaspar.h"
static int handle(void *s, const uint8_t *r, size_t n, const gaspar_host *h) {
    (void)s; (void)r; (void)n; (void)h; return 0;
}
static const gaspar_handler_v1 table = { 7, "future", 0, handle, 0 };
const gaspar_handler_v1 *gaspar_handler_entry(void) { return &table; }
"#;

#[test]
fn a_handler_of_another_abi_version_is_refused_with_both_versions_named() {
    let dir = tempfile::tempdir().unwrap();
    let lib = compile_c_library(dir.path(), "future", WRONG_VERSION);
    let (status, _, stderr) = check(&lib, &[]);
    assert_eq!(status.unwrap().code(), Some(1));
    assert!(stderr.contains("handler ABI version 7"), "{stderr}");
    assert!(stderr.contains("speaks version 1"), "{stderr}");
    let stderr = start_refused(&lib, &[]);
    assert!(stderr.contains("libfuture.so"), "{stderr}");
    assert!(stderr.contains("handler ABI version 7"), "{stderr}");
}

#[test]
fn the_daemon_refuses_bad_handlers_at_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.so");
    let stderr = start_refused(&missing, &[]);
    assert!(stderr.contains("missing.so"), "{stderr}");

    let stderr = start_refused(&libc_path(), &[]);
    let fatal: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("gaspard: "))
        .collect();
    assert_eq!(fatal.len(), 1, "one fatal line: {stderr}");
    assert!(fatal[0].contains("not a gaspard handler"), "{stderr}");
}

#[test]
fn a_failing_or_crashing_init_stops_the_daemon_instead_of_looping() {
    let fault = handler("fault");
    let stderr = start_refused(&fault, &["--handler-config", "fail"]);
    assert!(
        stderr.contains("init failed: init refused by configuration (fail)"),
        "{stderr}"
    );
    let stderr = start_refused(&fault, &["--handler-config", "panic"]);
    assert!(
        stderr.contains("init panicked by configuration"),
        "{stderr}"
    );
    let stderr = start_refused(&fault, &["--handler-config", "segv"]);
    assert!(stderr.contains("SIGSEGV"), "{stderr}");
    assert!(stderr.contains("libfault.so"), "{stderr}");
}

/// A handler whose handle function calls a function no library defines:
/// it links (shared libraries may leave symbols to be found at load), and
/// only a lazy load would let it get as far as a request.
const UNDEFINED_SYMBOL: &str = r#"
#include "gaspar.h"
extern void gaspard_test_missing_symbol(void);
static int handle(void *s, const uint8_t *r, size_t n, const gaspar_host *h) {
    (void)s; (void)r; (void)n; (void)h;
    gaspard_test_missing_symbol();
    return GASPAR_OK;
}
static const gaspar_handler_v1 table = { GASPAR_ABI_VERSION, "missing", 0, handle, 0 };
const gaspar_handler_v1 *gaspar_handler_entry(void) { return &table; }
"#;

#[test]
fn check_refuses_a_handler_with_an_undefined_symbol_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let lib = compile_c_library(dir.path(), "missing", UNDEFINED_SYMBOL);
    let (status, stdout, stderr) = check(&lib, &[]);
    assert_eq!(status.unwrap().code(), Some(1), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert_eq!(
        lines[0],
        format!(
            "gaspard: handler {}: cannot load: undefined symbol: gaspard_test_missing_symbol",
            lib.display()
        )
    );
}

#[test]
fn a_reload_to_a_handler_with_an_undefined_symbol_is_rejected_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let broken = compile_c_library(dir.path(), "missing", UNDEFINED_SYMBOL);
    let path = dir.path().join("libhandler.so");
    std::fs::copy(handler("echo"), &path).unwrap();
    let daemon = launch(&path, &["--workers", "1"], &[])
        .unwrap_or_else(|(status, log)| panic!("{status:?}: {}", log.lines().join("\n")));
    // Replaced atomically, as an operator deploys.
    let staging = dir.path().join("libhandler.new");
    std::fs::copy(&broken, &staging).unwrap();
    std::fs::rename(&staging, &path).unwrap();
    daemon.signal(libc::SIGHUP);
    let line = daemon.expect_log("reload rejected");
    assert!(
        line.contains("undefined symbol: gaspard_test_missing_symbol"),
        "{line}"
    );
    assert!(line.contains("the old handler keeps serving"), "{line}");
    assert_eq!(daemon.request(b"still echo").unwrap(), b"still echo");
}

/// The one line a refused `--check` prints, after checking that it failed
/// with status 1 and printed nothing else.
fn refusal(status: Option<std::process::ExitStatus>, stdout: &str, stderr: &str) -> String {
    let status = status.expect("--check exits by itself");
    assert_eq!(status.code(), Some(1), "{status:?}: {stdout}\n{stderr}");
    assert_eq!(stdout, "", "no report on stdout");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    lines[0].to_string()
}

#[test]
fn check_fails_and_says_so_when_init_exits_whatever_the_status() {
    let path = handler("fault");
    for code in [0, 7] {
        let config = format!("exit:{code}");
        let (status, stdout, stderr) = check(&path, &["--handler-config", &config]);
        assert_eq!(
            refusal(status, &stdout, &stderr),
            format!(
                "gaspard: handler {}: init exited with status {code} before the handler was ready",
                path.display()
            )
        );
    }
}

#[test]
fn check_survives_a_crash_in_init_and_names_the_signal() {
    let path = handler("fault");
    let (status, stdout, stderr) = check(&path, &["--handler-config", "segv"]);
    assert_eq!(
        refusal(status, &stdout, &stderr),
        format!(
            "gaspard: handler {}: killed by SIGSEGV while loading, before the handler was ready",
            path.display()
        )
    );
}

#[test]
fn check_fails_when_shutdown_does_not_end_well() {
    let path = handler("fault");
    let (status, stdout, stderr) = check(&path, &["--handler-config", "shutdown-exit:5"]);
    assert_eq!(
        refusal(status, &stdout, &stderr),
        format!(
            "gaspard: handler {}: init succeeded, but then its shutdown exited with status 5",
            path.display()
        )
    );
}

/// The refusal messages in docs/handler-abi.md's table, each with its
/// placeholders (REASON, NAME, N, SIGNAL) turned into `*`.
pub(crate) fn documented_refusals() -> Vec<String> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/handler-abi.md"),
    )
    .unwrap();
    let table = doc
        .split("| problem | message |")
        .nth(1)
        .expect("handler-abi.md has the refusal table");
    table
        .lines()
        .skip(2)
        .take_while(|row| row.starts_with('|'))
        .filter_map(|row| row.rsplit('|').nth(1))
        .flat_map(|column| column.split('`').skip(1).step_by(2))
        .map(placeholders_as_stars)
        .collect()
}

fn placeholders_as_stars(message: &str) -> String {
    let mut pattern = String::new();
    let mut word = String::new();
    for c in message.chars().map(Some).chain([None]) {
        if let Some(c) = c.filter(|c| c.is_ascii_alphanumeric() || *c == '_') {
            word.push(c);
            continue;
        }
        let placeholder = ["REASON", "NAME", "N", "SIGNAL"].contains(&word.as_str());
        pattern.push_str(if placeholder { "*" } else { &word });
        word.clear();
        pattern.extend(c);
    }
    pattern
}

/// Whether `text` matches `pattern`, where `*` is any text.
pub(crate) fn matches(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => text.strip_prefix(head).is_some_and(|rest| {
            (0..=rest.len())
                .filter(|&at| rest.is_char_boundary(at))
                .any(|at| matches(tail, &rest[at..]))
        }),
    }
}

const NULL_ENTRY: &str = r#"
#include "gaspar.h"
const gaspar_handler_v1 *gaspar_handler_entry(void) { return 0; }
"#;

const NO_HANDLE: &str = r#"
#include "gaspar.h"
static const gaspar_handler_v1 table = { GASPAR_ABI_VERSION, "headless", 0, 0, 0 };
const gaspar_handler_v1 *gaspar_handler_entry(void) { return &table; }
"#;

#[test]
fn every_check_refusal_is_worded_as_documented() {
    let documented = documented_refusals();
    assert!(documented.len() >= 10, "{documented:?}");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"this is not an ELF file").unwrap();
    let fault = handler("fault");
    let cases = [
        (dir.path().join("nowhere.so"), ""),
        (garbage, ""),
        (
            compile_c_library(dir.path(), "missing", UNDEFINED_SYMBOL),
            "",
        ),
        (libc_path(), ""),
        (compile_c_library(dir.path(), "null", NULL_ENTRY), ""),
        (compile_c_library(dir.path(), "future", WRONG_VERSION), ""),
        (compile_c_library(dir.path(), "headless", NO_HANDLE), ""),
        (fault.clone(), "fail"),
        (fault.clone(), "exit:3"),
        (fault.clone(), "segv"),
        (fault, "shutdown-exit:4"),
    ];
    for (path, config) in cases {
        let (status, stdout, stderr) = check(&path, &["--handler-config", config]);
        let line = refusal(status, &stdout, &stderr);
        let prefix = format!("gaspard: handler {}: ", path.display());
        let message = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
        assert!(
            documented.iter().any(|pattern| matches(pattern, message)),
            "{message:?} is not in handler-abi.md's table: {documented:#?}"
        );
    }
}

#[test]
fn check_names_a_symlinked_handler_as_given_like_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("current.so");
    std::os::unix::fs::symlink(handler("echo"), &link).unwrap();
    let (status, stdout, stderr) = check(&link, &[]);
    assert!(status.unwrap().success(), "{stderr}");
    assert!(
        stdout.starts_with(&format!("handler {}: ok: ", link.display())),
        "{stdout}"
    );
}

#[test]
fn gaspard_check_in_the_environment_takes_the_usual_spellings() {
    let echo = handler("echo");
    let args = ["--handler".into(), echo.as_os_str().to_owned()];
    for on in ["1", "yes", "ON", "true"] {
        let (status, stdout, stderr) = run_gaspard_with_env(&args, &[("GASPARD_CHECK", on)]);
        assert_eq!(status.unwrap().code(), Some(0), "{on}: {stderr}");
        assert!(stdout.contains("ok"), "{on}: {stdout}");
    }
    let (status, stdout, stderr) = run_gaspard_with_env(&args, &[("GASPARD_CHECK", "maybe")]);
    assert_eq!(status.unwrap().code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(
            "invalid value 'maybe' for '--check': expected 1, true, yes, on or 0, false, no, off"
        ),
        "{stderr}"
    );
}

#[test]
fn check_refuses_the_flags_the_daemon_refuses_with_the_same_message() {
    let echo = handler("echo");
    let cases: [&[&str]; 5] = [
        &["--max-request-size", "5G"],
        &["--workers", "100000"],
        &["--timeout=-1"],
        &["--group", "nogroup"],
        &["--bind", "no-such-host.invalid"],
    ];
    for flags in cases {
        let mut daemon: Vec<std::ffi::OsString> = vec!["--handler".into(), echo.as_os_str().into()];
        daemon.extend(["--port", "0"].iter().chain(flags).map(Into::into));
        let (status, _, refused) = run_gaspard(&daemon);
        assert_eq!(status.unwrap().code(), Some(2), "{flags:?}: {refused}");
        assert!(refused.starts_with("gaspard: --"), "{flags:?}: {refused}");

        let (status, stdout, stderr) = check(&echo, flags);
        assert_eq!(
            status.unwrap().code(),
            Some(2),
            "{flags:?}: {stdout}{stderr}"
        );
        assert_eq!(stderr, refused, "{flags:?}");
        assert!(!stdout.contains("ok"), "{flags:?}: {stdout}");
    }
}

#[test]
fn check_refuses_an_unknown_user_or_group_as_the_daemon_does() {
    let echo = handler("echo");
    let cases: [&[&str]; 2] = [
        &["--user", "no-such-gaspard-user"],
        &["--user", "root", "--group", "no-such-gaspard-group"],
    ];
    for flags in cases {
        let mut daemon: Vec<std::ffi::OsString> = vec!["--handler".into(), echo.as_os_str().into()];
        daemon.extend(["--port", "0"].iter().chain(flags).map(Into::into));
        let (status, _, stderr) = run_gaspard(&daemon);
        assert_eq!(status.unwrap().code(), Some(1), "{flags:?}: {stderr}");
        let refused: Vec<&str> = stderr
            .lines()
            .filter(|line| line.starts_with("gaspard: "))
            .collect();
        assert_eq!(refused.len(), 1, "{flags:?}: {stderr}");
        assert!(refused[0].contains(": no such "), "{flags:?}: {stderr}");

        let (status, stdout, stderr) = check(&echo, flags);
        assert_eq!(
            status.unwrap().code(),
            Some(1),
            "{flags:?}: {stdout}{stderr}"
        );
        assert_eq!(stderr, refused[0], "{flags:?}");
        assert!(stdout.is_empty(), "{flags:?}: {stdout}");
    }
}
