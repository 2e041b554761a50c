//! The command line: flags, help text, and their validation into a
//! [`load::Plan`] or the baseline server's options.

use crate::baseline;
use crate::frame;
use crate::load::{Amount, Expectation, Mode, Plan};
use clap::{ArgGroup, Args, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const AFTER_HELP: &str = "\
Examples:
  # 64 clients for 5 s, a new connection per request, 16-byte payloads
  gaspar-bench 127.0.0.1:10123 -c 64 -d 5 --size 16

  # The same load against the baseline: the protocol's limit on this machine
  gaspar-bench serve-baseline --port 10124 &
  gaspar-bench 127.0.0.1:10124 -c 64 -d 5 --size 16

  # 100000 requests from 8 persistent connections, 16 in flight on each
  gaspar-bench 127.0.0.1:10123 -c 8 -n 100000 --persistent --pipeline 16

  # Check every reply: echo handlers (--check), or a fixed answer (spin)
  gaspar-bench 127.0.0.1:10123 -c 8 -n 2000 --size 1M --check
  gaspar-bench 127.0.0.1:10123 -c 2 -d 10 --payload-file job.bin --expect ok

  # One JSON object on standard output, for scripts
  gaspar-bench 127.0.0.1:10123 -c 16 -d 3 --warmup 1 --json | jq .requests_per_sec

What is measured:
  Latency runs from connect (one request per connection) or from the send
  (--persistent) to the last byte of the reply, for successful requests.
  requests/s and MB/s count successful requests only; MB/s counts request and
  reply payloads (1 MB = 10^6 bytes), not headers. With -d, requests still in
  flight when the time is up are neither counted nor errors. The CPU line is
  the generator's own user + system time: near 100% per thread means it may be
  the bottleneck rather than the server.

Errors, by kind:
  refused        nothing listens on ADDR
  reset          the server reset the connection (a failed request in v1)
  timeout        no whole reply within --timeout
  wrong_reply    the reply differs from --check / --expect / --expect-file
  handler_error, server_timeout, overloaded, worker_lost, bad_status
                 --persistent: the reply's status (1, 2, 3, 4, other)
  protocol       --persistent: the server broke the extension's framing
  other          any other network error (its message is shown)

Exit status:
  0  the run completed and every request succeeded
  1  the run could not be made: the address does not resolve, nothing listens
     on it, the server does not speak --persistent's extension, ...
  2  bad arguments
  3  the run completed but some requests failed (the report says which)";

/// A load generator for gaspard and gaspar.
///
/// Drives CONNS virtual clients, each sending one request after another over
/// gaspar's protocol (a new connection per request, as gaspar clients do, or
/// one persistent connection with --persistent), for -n requests in all or
/// for -d seconds, and reports throughput, latency percentiles and errors.
#[derive(Parser, Debug)]
#[command(
    name = "gaspar-bench",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    disable_help_subcommand = true,
    override_usage = "gaspar-bench [OPTIONS] <ADDR> (-n REQUESTS | -d SECS)\n       \
                      gaspar-bench serve-baseline [--port N] [--bind ADDR] [--spin N]",
    subcommand_help_heading = "Subcommand"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("amount").required(true).args(["requests", "duration"])))]
#[command(group(ArgGroup::new("expectation").args(["check", "expect", "expect_file"])))]
struct RunArgs {
    /// The server's address, HOST:PORT, such as 127.0.0.1:10123
    #[arg(value_name = "ADDR", required = true)]
    addr: Option<String>,

    /// Concurrent virtual clients, each doing one request after another
    #[arg(
        short = 'c',
        long = "connections",
        value_name = "CONNS",
        default_value = "1"
    )]
    connections: NonZeroUsize,

    /// Requests to make in all (not counting --warmup)
    #[arg(short = 'n', long, value_name = "REQUESTS", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,

    /// Seconds to run for (not counting --warmup), such as 5 or 0.5
    #[arg(short = 'd', long, value_name = "SECS", value_parser = positive_seconds)]
    duration: Option<Duration>,

    /// Payload bytes per request (suffixes K, M, G); 0 sends an empty request,
    /// which gaspard closes without calling the handler
    #[arg(long, value_name = "BYTES", default_value = "16", value_parser = gaspar_protocol::parse_size)]
    size: u64,

    /// Send this file's bytes as every request's payload (instead of --size)
    #[arg(long, value_name = "PATH", conflicts_with = "size")]
    payload_file: Option<PathBuf>,

    /// Keep one connection per client and send requests over it, with the
    /// GSP2 extension (persistent connections, statuses, pipelining)
    #[arg(long)]
    persistent: bool,

    /// With --persistent: requests each client keeps in flight, at most the
    /// window the server announces
    #[arg(long, value_name = "K", default_value = "1", requires = "persistent")]
    pipeline: NonZeroUsize,

    /// Count a reply that differs from the request's payload as an error
    /// (for echo handlers)
    #[arg(long)]
    check: bool,

    /// Count a reply other than STRING as an error (for handlers with a fixed
    /// answer, such as spin's "ok")
    #[arg(long, value_name = "STRING")]
    expect: Option<String>,

    /// Count a reply other than this file's bytes as an error
    #[arg(long, value_name = "PATH")]
    expect_file: Option<PathBuf>,

    /// Seconds a request may take before it counts as a timeout (from connect,
    /// or from the send with --persistent)
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = positive_seconds)]
    timeout: Duration,

    /// Threads driving the clients, each with its own event loop
    /// [default: CONNS or the number of CPUs, whichever is less]
    #[arg(long, value_name = "N")]
    threads: Option<NonZeroUsize>,

    /// Seconds of load before measuring starts; their requests are not counted
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = seconds)]
    warmup: Duration,

    /// Print one JSON object on standard output instead of the text report
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve gaspar's protocol (and GSP2) in-process, echoing each request's
    /// payload, on one thread: the fastest server the protocol allows, to
    /// compare a gaspard run with
    #[command(after_help = SERVE_AFTER_HELP)]
    ServeBaseline {
        /// Port to listen on; 0 picks a free one (the address is printed)
        #[arg(long, value_name = "N", default_value = "10124")]
        port: u16,

        /// Address to listen on
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
        bind: IpAddr,

        /// With GSP2: requests a client may have outstanding on a connection
        #[arg(long, value_name = "N", default_value = "128", value_parser = clap::value_parser!(u32).range(1..))]
        window: u32,

        /// Instead of echoing, do what libspin.so does (spin on the CPU for
        /// the microseconds the request gives in ASCII, reply `ok`) on a pool
        /// of N threads, each accepting and answering its own connections
        /// (v1 only)
        #[arg(long, value_name = "N")]
        spin: Option<NonZeroUsize>,
    },
}

const SERVE_AFTER_HELP: &str = "\
It prints `listening on ADDR` on standard error once it accepts connections,
and serves until killed. Requests over 64 MiB are reset, as gaspard does by
default. It has no read timeout and does not drain bytes sent after a v1
request: it is a yardstick, not a server to deploy.

Examples:
  gaspar-bench serve-baseline --port 0

  # The in-process limit for gaspard --handler libspin.so --workers 2
  gaspar-bench serve-baseline --port 10124 --spin 2 &
  echo -n 1000 > spin.txt
  gaspar-bench 127.0.0.1:10124 -c 8 -d 5 --payload-file spin.txt --expect ok";

/// What the command line asks for.
pub enum Action {
    Run { plan: Plan, json: bool },
    Serve(baseline::Options),
}

/// Why the command line cannot be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{addr}: not an address of the form HOST:PORT ({source})")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: the name resolves to no address")]
    NoAddress { addr: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a payload of {0} bytes is more than a request can announce ({max})", max = frame::MAX_PAYLOAD)]
    PayloadTooLarge(u64),
    #[error("--persistent needs a payload of at least one byte: an empty request ends a persistent connection")]
    EmptyPersistent,
}

impl Cli {
    /// The action asked for, validated; reads the payload and expected files.
    pub fn action(self) -> Result<Action, CliError> {
        match self.command {
            Some(Command::ServeBaseline {
                port,
                bind,
                window,
                spin,
            }) => Ok(Action::Serve(baseline::Options {
                listen: SocketAddr::new(bind, port),
                window,
                spin_threads: spin.map(NonZeroUsize::get),
            })),
            None => {
                let json = self.run.json;
                Ok(Action::Run {
                    plan: self.run.plan()?,
                    json,
                })
            }
        }
    }
}

impl RunArgs {
    fn plan(self) -> Result<Plan, CliError> {
        let addr_text = self.addr.expect("clap requires ADDR without a subcommand");
        let addr = addr_text
            .to_socket_addrs()
            .map_err(|source| CliError::Resolve {
                addr: addr_text.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| CliError::NoAddress {
                addr: addr_text.clone(),
            })?;

        let payload = match &self.payload_file {
            Some(path) => read(path)?,
            None => {
                if self.size > frame::MAX_PAYLOAD {
                    return Err(CliError::PayloadTooLarge(self.size));
                }
                pattern(self.size as usize)
            }
        };
        if payload.len() as u64 > frame::MAX_PAYLOAD {
            return Err(CliError::PayloadTooLarge(payload.len() as u64));
        }
        if self.persistent && payload.is_empty() {
            return Err(CliError::EmptyPersistent);
        }

        let expectation = if self.check {
            Expectation::Echo
        } else if let Some(text) = self.expect {
            Expectation::Fixed(Arc::from(text.into_bytes()))
        } else if let Some(path) = &self.expect_file {
            Expectation::Fixed(Arc::from(read(path)?))
        } else {
            Expectation::None
        };

        let connections = self.connections.get();
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        // A thread with no client would only add noise.
        let threads = self
            .threads
            .map_or(cpus, NonZeroUsize::get)
            .min(connections);

        let amount = match (self.requests, self.duration) {
            (Some(n), _) => Amount::Requests(n),
            (None, Some(duration)) => Amount::Duration(duration),
            (None, None) => unreachable!("clap requires -n or -d"),
        };
        let mode = if self.persistent {
            Mode::Persistent {
                pipeline: self.pipeline.get(),
            }
        } else {
            Mode::OneShot
        };
        Ok(Plan::new(
            addr,
            addr_text,
            connections,
            threads,
            amount,
            payload,
            expectation,
            mode,
            self.timeout,
            self.warmup,
        ))
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::Read {
        path: path.clone(),
        source,
    })
}

/// A payload of `len` printable bytes, varied so that it compresses like text
/// rather than like zeros.
fn pattern(len: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    ALPHABET.iter().copied().cycle().take(len).collect()
}

fn seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("expected a number of seconds >= 0, such as 5 or 0.5, not {text:?}"))
}

fn positive_seconds(text: &str) -> Result<Duration, String> {
    match seconds(text)? {
        zero if zero.is_zero() => Err("expected a number of seconds > 0".into()),
        secs => Ok(secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gaspar-bench").chain(args.iter().copied()))
    }

    #[test]
    fn seconds_may_be_fractional_but_durations_not_zero() {
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        assert!(seconds("-1").is_err());
        assert!(positive_seconds("0").is_err());
    }

    #[test]
    fn a_run_needs_an_address_and_exactly_one_amount() {
        assert!(parse(&["127.0.0.1:1", "-n", "10"]).is_ok());
        assert!(parse(&["127.0.0.1:1", "-d", "1"]).is_ok());
        assert!(parse(&["127.0.0.1:1"]).is_err());
        assert!(parse(&["127.0.0.1:1", "-n", "10", "-d", "1"]).is_err());
        assert!(parse(&["-n", "10"]).is_err());
        assert!(parse(&["127.0.0.1:1", "-n", "0"]).is_err());
    }

    #[test]
    fn flags_that_cannot_go_together_are_refused() {
        let base = ["127.0.0.1:1", "-n", "10"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        assert!(with(&["--pipeline", "4"]).is_err(), "needs --persistent");
        assert!(with(&["--persistent", "--pipeline", "4"]).is_ok());
        assert!(with(&["--check", "--expect", "ok"]).is_err());
        assert!(with(&["--size", "8", "--payload-file", "x"]).is_err());
    }

    #[test]
    fn serve_baseline_is_a_subcommand_with_defaults() {
        let cli = parse(&["serve-baseline", "--port", "0"]).unwrap();
        let Ok(Action::Serve(options)) = cli.action() else {
            panic!("not serve-baseline")
        };
        assert_eq!(options.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(options.window, 128);
        assert_eq!(options.spin_threads, None);
        let cli = parse(&["serve-baseline", "--spin", "2"]).unwrap();
        let Ok(Action::Serve(options)) = cli.action() else {
            panic!("not serve-baseline")
        };
        assert_eq!(options.spin_threads, Some(2));
        assert!(parse(&["serve-baseline", "--spin", "0"]).is_err());
    }

    #[test]
    fn threads_default_to_at_most_one_per_connection() {
        let cli = parse(&["127.0.0.1:1", "-n", "10", "-c", "1", "--threads", "8"]).unwrap();
        let Ok(Action::Run { plan, .. }) = cli.action() else {
            panic!("not a run")
        };
        assert_eq!(plan.threads, 1);
        assert_eq!(plan.payload_len(), 16);
    }

    #[test]
    fn persistent_runs_need_a_payload() {
        let cli = parse(&["127.0.0.1:1", "-n", "1", "--persistent", "--size", "0"]).unwrap();
        assert!(matches!(cli.action(), Err(CliError::EmptyPersistent)));
    }
}
