//! The `gaspard` executable: the daemon, `--check`, and (hidden) worker and
//! check-child modes.

use clap::Parser;
use gaspard::config::{Cli, Config};
use gaspard::daemon::Daemon;
use gaspard::worker::{self, WorkerArgs};
use gaspard::{check, logging, manual};
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == check::CHILD_ARG)
    {
        return check::run_child(std::env::args_os().skip(2));
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == manual::GENERATE_ARG)
    {
        return generate_docs(std::env::args_os().nth(2));
    }
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|arg| arg == worker::WORKER_ARG) {
        logging::init_worker();
        return match WorkerArgs::parse(args) {
            Ok(worker_args) => worker::run(worker_args),
            Err(e) => {
                eprintln!("gaspard: {e} (worker mode is started by gaspard itself)");
                ExitCode::from(2)
            }
        };
    }

    let cli = Cli::parse();
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
    match serve(config, &log_filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gaspard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The hidden `__generate-docs DIR` mode: the man page and completions for
/// packaging (see the README, "Debian package").
fn generate_docs(dir: Option<std::ffi::OsString>) -> ExitCode {
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

/// Runs the daemon until it stops. Each error's message already says what
/// it is about, its cause included.
fn serve(config: Config, log_filter: &str) -> anyhow::Result<()> {
    Daemon::new(config, log_filter)?.run()?;
    Ok(())
}
