//! The `gaspard` executable: the daemon, `--check`, `new-handler`,
//! `keygen`, a worker host for a daemon elsewhere (`worker`), and the hidden
//! modes gaspard starts itself (worker, check child) or its packaging runs
//! (`__generate-docs`).

use clap::{CommandFactory, FromArgMatches};
use gaspard::config::{Cli, Config};
use gaspard::daemon::Daemon;
use gaspard::pool::{host, keys};
use gaspard::worker::{self, WorkerArgs};
use gaspard::{check, logging, manual, new_handler};
use std::ffi::OsString;
use std::process::ExitCode;

/// Worker mode: started by the daemon, never by hand.
fn run_worker(args: impl Iterator<Item = OsString>) -> ExitCode {
    logging::init_worker();
    match WorkerArgs::parse(args) {
        Ok(worker_args) => worker::run(worker_args),
        Err(e) => {
            eprintln!("gaspard: {e} (worker mode is started by gaspard itself)");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    // Modes chosen by the first argument, before the daemon's flags.
    let mode = std::env::args_os().nth(1);
    let rest = || std::env::args_os().skip(2);
    match mode.as_ref().and_then(|arg| arg.to_str()) {
        Some(new_handler::ARG) => return new_handler::run(rest()),
        Some(keys::KEYGEN_ARG) => return keys::run_keygen(rest()),
        Some(host::HOST_ARG) => return host::run(rest()),
        Some(check::CHILD_ARG) => return check::run_child(rest()),
        Some(manual::GENERATE_ARG) => return generate_docs(rest().next()),
        Some(worker::WORKER_ARG) => return run_worker(rest()),
        _ => {}
    }

    let matches = Cli::command()
        .version(gaspard::config::version())
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let log_filter = logging::init(cli.log_level);
    // Flags that make no configuration are usage errors, with --check too:
    // it must refuse what the daemon would.
    let config = match Config::from_cli(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gaspard: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        return match check::check(&config) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(reason) => {
                eprintln!("gaspard: {reason}");
                ExitCode::FAILURE
            }
        };
    }
    // Each error's message already says what it is about, its cause included.
    match Daemon::new(config, &log_filter).and_then(Daemon::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gaspard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The hidden `__generate-docs DIR` mode: the man page and completions for
/// packaging (see the README, "Debian package").
fn generate_docs(dir: Option<OsString>) -> ExitCode {
    let Some(dir) = dir else {
        eprintln!("gaspard: usage: gaspard {} DIR", manual::GENERATE_ARG);
        return ExitCode::from(2);
    };
    match manual::generate(dir.as_ref()) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gaspard: writing into {}: {e}", dir.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
