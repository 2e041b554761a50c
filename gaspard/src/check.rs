//! `gaspard --check`: load and validate the handler, say what was found in
//! one line, and exit, like `nginx -t`.
//!
//! The handler is loaded in a child process, gaspard re-executed with the
//! hidden [`CHILD_ARG`]: its constructors and init run arbitrary code, and
//! one that calls `exit(0)` or crashes must still be reported, in a line
//! and a failing exit status, which only a process watching from outside
//! can do. The child writes how far it got to a pipe.

use crate::config::Config;
use crate::plugin::Plugin;
use crate::worker::{clip, inherited};
// The handler config travels in the environment, as a worker's does, rather
// than on the command line, which `ps` shows to everyone.
use crate::workers::args::CONFIG_ENV;
use crate::workers::describe_exit;
use gaspard_handler_abi::ABI_VERSION;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

/// The argument that selects the check child's mode.
pub const CHILD_ARG: &str = "__check";

/// The child's report is cut to this many bytes, so that it fits the pipe
/// whole and the child never waits for the parent to read it.
const MAX_REPORT: usize = 4096;

/// What the child reports once the handler's init succeeded, before its
/// shutdown runs; followed by the handler's name.
const READY: &str = "ready ";
/// What the child reports when the handler is refused; followed by why.
const REFUSED: &str = "refused ";

/// Why `--check` failed. Each message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// `--user` or `--group` names nobody; worded as the daemon says it.
    #[error("{0}")]
    Privileges(#[from] crate::privileges::PrivilegeError),
    /// A `--pool-key` or `--pool-authorized` file the daemon could not use.
    #[error("{0}")]
    PoolKey(#[from] crate::pool::keys::KeyError),
    #[error("handler {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The `.so` is missing but cargo built an `.rlib` next to where it
    /// would be: a crate without `crate-type = ["cdylib"]`.
    #[error(
        "handler {path}: cannot open: {source} (only {rlib} was built: build it as a cdylib: crate-type = [\"cdylib\"] in Cargo.toml)"
    )]
    OpenRlib {
        path: PathBuf,
        source: std::io::Error,
        rlib: String,
    },
    #[error("cannot start a process to load the handler in: {0}")]
    Spawn(#[source] std::io::Error),
    /// Refused by a check in `plugin.rs`; the reason names the file.
    #[error("{0}")]
    Refused(String),
    #[error("handler {path}: init exited with status {code} before the handler was ready")]
    Exited { path: PathBuf, code: i32 },
    #[error("handler {path}: killed by {signal} while loading, before the handler was ready")]
    Killed { path: PathBuf, signal: String },
    #[error("handler {path}: init succeeded, but then its shutdown {how}")]
    Shutdown { path: PathBuf, how: String },
}

/// Checks what the daemon would check at start without side effects: the
/// `--user` and `--group` names, the worker pool's key files, then the
/// handler: loads it in a child
/// process, runs its init with the handler config, and shuts it down again.
/// Returns the report for stdout. The flags themselves are validated by
/// building `config`.
pub fn check(config: &Config) -> Result<String, CheckError> {
    crate::privileges::look_up(config.user.as_deref(), config.group.as_deref())?;
    if let Some((key, authorized)) = config.pool.as_ref().and_then(|pool| pool.curve.as_ref()) {
        crate::pool::keys::read_pair(key)?;
        crate::pool::keys::read_public(authorized)?;
    }
    let loaded = check_handler(&config.handler, &config.handler_config)?;
    Ok(format!(
        "handler {}: ok: {:?} speaks handler ABI version {ABI_VERSION}, init succeeded",
        loaded.path.display(),
        loaded.name
    ))
}

/// A handler that loaded in a child process: its path (absolute, not
/// resolved) and the name it reports.
#[derive(Debug, Clone)]
pub struct Checked {
    pub path: PathBuf,
    pub name: String,
}

/// Loads `handler` in a child process, runs its init with `config`, and
/// shuts it down again: what `--check` does for the handler, and what a
/// worker host does before it starts its workers.
pub fn check_handler(handler: &Path, config: &str) -> Result<Checked, CheckError> {
    // Absolute but not resolved, as the daemon names it.
    let path = std::path::absolute(handler)
        .and_then(|path| std::fs::metadata(&path).map(|_| path))
        .map_err(|source| match rlib_instead(handler) {
            Some(rlib) => CheckError::OpenRlib {
                path: handler.to_path_buf(),
                source,
                rlib,
            },
            None => CheckError::Open {
                path: handler.to_path_buf(),
                source,
            },
        })?;
    let (report, status) = load_in_child(&path, config).map_err(CheckError::Spawn)?;
    if let Some(name) = report.strip_prefix(READY) {
        return if status.success() {
            Ok(Checked {
                name: name.to_string(),
                path,
            })
        } else {
            Err(CheckError::Shutdown {
                path,
                how: describe_exit(&status),
            })
        };
    }
    if let Some(reason) = report.strip_prefix(REFUSED) {
        return Err(CheckError::Refused(reason.to_string()));
    }
    // No report: the child ended while loading, whatever its status.
    Err(match (status.code(), status.signal()) {
        (Some(code), _) => CheckError::Exited { path, code },
        (None, signal) => CheckError::Killed {
            path,
            signal: signal.map_or_else(|| status.to_string(), signal_name),
        },
    })
}

/// For a missing `DIR/libNAME.so`: the name of `DIR/libNAME.rlib` if that
/// exists, which is what cargo builds for a crate that is not a cdylib.
fn rlib_instead(handler: &Path) -> Option<String> {
    if handler.extension()? != "so" {
        return None;
    }
    let rlib = handler.with_extension("rlib");
    rlib.is_file()
        .then(|| {
            rlib.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .flatten()
}

/// Starts the child on `path` and waits for it; returns its report (empty
/// if it made none) and how it ended.
fn load_in_child(path: &Path, config: &str) -> std::io::Result<(String, ExitStatus)> {
    let (from_child, to_child) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Inherited by the child, the only process this one starts.
    fcntl(to_child.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    let mut command = Command::new(std::env::current_exe()?);
    crate::notify::forget_daemon_env(&mut command);
    let spawned = command
        .arg(CHILD_ARG)
        .arg(to_child.as_raw_fd().to_string())
        .arg(path)
        .env(CONFIG_ENV, config)
        .stdin(Stdio::null())
        .spawn();
    drop(to_child);
    let status = spawned?.wait()?;
    // Read only after the exit, without blocking: a process the handler
    // started may still hold the pipe open, and the report is in it whole.
    fcntl(from_child.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let mut report = Vec::new();
    // An error (WouldBlock) keeps what was read before it.
    let _ = File::from(from_child).read_to_end(&mut report);
    Ok((String::from_utf8_lossy(&report).into_owned(), status))
}

/// The check child's main function, for the arguments after [`CHILD_ARG`]:
/// the report fd and the handler's path. Loads the handler, reports, then
/// lets the handler shut down.
pub fn run_child(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let fd = args
        .next()
        .and_then(|fd| fd.to_str()?.parse::<RawFd>().ok());
    let (Some(fd), Some(path), None) = (fd, args.next(), args.next()) else {
        eprintln!("gaspard: check mode is started by gaspard --check itself");
        return ExitCode::from(2);
    };
    crate::worker::close_inherited_fds(&[fd]);
    // A pipe: a child started by hand with a wrong number must not write
    // into a file.
    let report = inherited(fd, "report", nix::sys::stat::SFlag::S_IFIFO);
    let Ok(mut report) = report.map(File::from) else {
        eprintln!("gaspard: fd {fd} is not the pipe that gaspard --check passes");
        return ExitCode::from(2);
    };
    let config = std::env::var(CONFIG_ENV).unwrap_or_default();
    match Plugin::load(Path::new(&path), &config) {
        Ok(plugin) => {
            // A parent that is gone has nobody to tell: ignore write errors.
            let _ =
                report.write_all(clip(&format!("{READY}{}", plugin.name()), MAX_REPORT).as_bytes());
            drop(report);
            drop(plugin);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = report.write_all(clip(&format!("{REFUSED}{e}"), MAX_REPORT).as_bytes());
            ExitCode::FAILURE
        }
    }
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_string())
}
