//! `gaspar-bench`: a load generator for gaspard (and gaspar), and the
//! baseline server its figures are compared with. `gaspar-bench --help`
//! says how to use it.
//!
//! One concern per module: `cli` (flags), `load` (the threads and virtual
//! clients), `baseline` (serve-baseline), `report` (text, JSON, progress),
//! `frame` (the bytes on the wire), `cpu` (what the generator itself used),
//! `limits` (the open-file limit).

#![forbid(unsafe_code)]

mod baseline;
mod cli;
mod cpu;
/// The wire format, shared with gaspard and gaspar-client.
use gaspar_protocol as frame;
mod limits;
mod load;
mod report;

use clap::Parser;
use std::io::{self, Write};
use std::process::ExitCode;

/// The run completed but some requests failed (clap uses 2 for bad usage).
const EXIT_FAILED_REQUESTS: u8 = 3;

/// Why gaspar-bench could not do what it was asked.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    #[error(transparent)]
    Load(#[from] load::LoadError),
    #[error("serve-baseline: {0}")]
    Serve(io::Error),
    #[error("cannot write the report: {0}")]
    Output(io::Error),
}

fn main() -> ExitCode {
    match run(cli::Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("gaspar-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> Result<ExitCode, Error> {
    match cli.action()? {
        cli::Action::Serve(options) => {
            baseline::serve(&options).map_err(Error::Serve)?;
            Ok(ExitCode::SUCCESS)
        }
        cli::Action::Run { plan, json } => {
            let mut progress = report::Progress::new(&plan);
            let outcome = load::run(&plan, |snapshot| progress.show(snapshot))?;
            progress.clear();
            let text = if json {
                report::json(&plan, &outcome) + "\n"
            } else {
                report::text(&plan, &outcome)
            };
            match io::stdout().lock().write_all(text.as_bytes()) {
                // A reader that stopped early (head) is not a failure.
                Err(error) if error.kind() != io::ErrorKind::BrokenPipe => {
                    return Err(Error::Output(error))
                }
                _ => {}
            }
            Ok(if outcome.stats.error_total() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED_REQUESTS)
            })
        }
    }
}
