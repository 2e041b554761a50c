//! The `gaspard` executable: the daemon, `--check`, and (hidden) worker mode.

use clap::Parser;
use gaspard::config::{Cli, Config};
use gaspard::daemon::Daemon;
use gaspard::worker::{self, WorkerArgs};
use gaspard::{check, logging};
use std::process::ExitCode;

fn main() -> ExitCode {
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
    if cli.check {
        return match check::check(&cli.handler, &cli.handler_config) {
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
    let result = Config::from_cli(&cli)
        .map_err(anyhow::Error::msg)
        .and_then(|config| Daemon::new(config, &log_filter))
        .and_then(Daemon::run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gaspard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
