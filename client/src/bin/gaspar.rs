//! `gaspar`: send one request to gaspard (or gaspar) from a shell and write
//! the reply to standard output. `gaspar pack` frames a request for `nc`.

#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use gaspar_client::{Error, Options, Stage, MAX_MESSAGE_LEN};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

/// Exit statuses; clap's usage errors are 2.
const EXIT_OTHER: u8 = 1;
const EXIT_RESET: u8 = 3;
const EXIT_TIMEOUT: u8 = 4;
const EXIT_REFUSED: u8 = 5;

const AFTER_HELP: &str = "\
Examples:
  gaspar 127.0.0.1:10123 hello                   prints the reply to \"hello\"
  gaspar 127.0.0.1:10123 - < job.bin > out.bin   any bytes in, any bytes out
  gaspar -t 2 localhost:10123 \"$msg\" || echo \"failed with status $?\"
  gaspar pack hello | nc -N 127.0.0.1 10123      frame with gaspar, send with nc
  gaspar 127.0.0.1:10123 -- -starts-with-a-dash

Exit status:
  0  a reply arrived (it may be empty) and was written to standard output
     (or as much of it as the reader, such as head, wanted)
  1  any other error: the address does not resolve, a network error, reading
     standard input or writing standard output failed
  2  bad arguments, such as an ADDR without a port number
  3  reset: the daemon reset the connection, the request failed (the handler
     returned an error or crashed, or the request ran past the daemon's
     --timeout or over its --max-request-size; the daemon's log says which)
  4  timeout: no connection within --connect-timeout, or no whole reply
     within --timeout
  5  refused: nothing listens on ADDR

Errors are one line on standard error. The reply is written as it came,
byte for byte, with no newline added.";

const PACK_AFTER_HELP: &str = "\
Examples:
  gaspar pack hello | nc -N 127.0.0.1 10123
  gaspar pack - < job.bin > request.bin
  gaspar pack hello | xxd          00000000: 0000 0005 6865 6c6c 6f    ....hello";

/// Send one request to a gaspar daemon (gaspard or gaspar) and write the
/// reply to standard output.
///
/// The request is MESSAGE, framed as gaspar's protocol wants: its length as
/// 4 bytes, big-endian, then the bytes. The reply is everything the daemon
/// sends before it closes the connection.
#[derive(Parser, Debug)]
#[command(
    name = "gaspar",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    disable_help_subcommand = true,
    override_usage = "gaspar [OPTIONS] <ADDR> <MESSAGE>\n       gaspar pack <MESSAGE>",
    subcommand_help_heading = "Subcommand"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    send: Send,
}

#[derive(Args, Debug)]
struct Send {
    /// The daemon's address, HOST:PORT, such as 127.0.0.1:10123
    #[arg(value_name = "ADDR", required = true, value_parser = address)]
    addr: Option<String>,

    /// The request's bytes; - reads them from standard input
    #[arg(value_name = "MESSAGE", required = true)]
    message: Option<OsString>,

    /// Seconds the whole exchange may take once connected, queueing in the
    /// daemon included; 0 waits as long as it takes
    #[arg(
        short,
        long,
        value_name = "SECS",
        default_value = "60",
        value_parser = seconds
    )]
    timeout: Timeout,

    /// Seconds to wait for the connection; 0 waits as long as it takes
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds)]
    connect_timeout: Timeout,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write MESSAGE framed as a request (length header, then the bytes) to
    /// standard output, for nc or a file
    #[command(after_help = PACK_AFTER_HELP)]
    Pack {
        /// The request's bytes; - reads them from standard input
        #[arg(value_name = "MESSAGE")]
        message: OsString,
    },
}

/// A timeout flag as given (for messages) and as a duration (`None`: no limit).
#[derive(Debug, Clone)]
struct Timeout {
    given: String,
    limit: Option<Duration>,
}

fn seconds(text: &str) -> Result<Timeout, String> {
    let limit = text
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| {
            format!("expected a number of seconds >= 0, such as 2 or 0.5, not {text:?}")
        })?;
    Ok(Timeout {
        given: text.trim().to_string(),
        limit: (!limit.is_zero()).then_some(limit),
    })
}

/// ADDR, split as the standard library resolves it (the port after the last
/// colon), so that one without a port number is a usage error, exit status
/// 2, before any name is looked up.
fn address(text: &str) -> Result<String, String> {
    let Some((_, port)) = text.rsplit_once(':') else {
        return Err("expected HOST:PORT, such as 127.0.0.1:10123: no port".into());
    };
    port.parse::<u16>().map_err(|_| {
        format!("expected HOST:PORT, such as 127.0.0.1:10123: {port:?} is not a port number")
    })?;
    Ok(text.to_string())
}

/// A one-line failure and its exit status.
struct Failure(u8, String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Pack { message }) => pack(&message),
        None => send(cli.send),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(status, message)) => {
            eprintln!("gaspar: {message}");
            ExitCode::from(status)
        }
    }
}

fn send(args: Send) -> Result<(), Failure> {
    let (Some(addr), Some(message)) = (args.addr, args.message) else {
        unreachable!("clap requires ADDR and MESSAGE without a subcommand")
    };
    let message = message_bytes(&message)?;
    let options = Options {
        connect_timeout: args.connect_timeout.limit,
        read_timeout: args.timeout.limit,
    };
    let reply = gaspar_client::request_with(addr.as_str(), &message, &options).map_err(|e| {
        let status = match e {
            Error::Reset { .. } => EXIT_RESET,
            Error::Timeout { .. } => EXIT_TIMEOUT,
            Error::Refused { .. } => EXIT_REFUSED,
            _ => EXIT_OTHER,
        };
        let text = match &e {
            Error::Timeout {
                stage: Stage::Connect,
                ..
            } if args.connect_timeout.limit.is_some() => {
                format!(
                    "{e} within {} s (--connect-timeout)",
                    args.connect_timeout.given
                )
            }
            Error::Timeout { .. } if args.timeout.limit.is_some() => {
                format!("{e} within {} s (--timeout)", args.timeout.given)
            }
            Error::Resolve(_) => format!("{addr}: {e}"),
            _ => e.to_string(),
        };
        Failure(status, text)
    })?;
    write_stdout(&reply)
}

fn pack(message: &OsStr) -> Result<(), Failure> {
    let message = message_bytes(message)?;
    write_stdout(&gaspar_client::pack(&message))
}

/// MESSAGE's bytes, or standard input's for `-`. Arguments are taken as the
/// bytes the shell passed, whatever the locale.
fn message_bytes(message: &OsStr) -> Result<Vec<u8>, Failure> {
    let bytes = if message == "-" {
        let mut bytes = Vec::new();
        io::stdin().lock().read_to_end(&mut bytes).map_err(|e| {
            Failure(
                EXIT_OTHER,
                format!("cannot read the message from standard input: {e}"),
            )
        })?;
        bytes
    } else {
        os_bytes(message)
    };
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(Failure(
            EXIT_OTHER,
            Error::TooLarge { len: bytes.len() }.to_string(),
        ));
    }
    Ok(bytes)
}

#[cfg(unix)]
fn os_bytes(text: &OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    text.as_bytes().to_vec()
}

#[cfg(not(unix))]
fn os_bytes(text: &OsStr) -> Vec<u8> {
    text.to_string_lossy().into_owned().into_bytes()
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        // The reader has what it wanted (`gaspar ... | head -c 10`).
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        result => {
            result.map_err(|e| Failure(EXIT_OTHER, format!("cannot write to standard output: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeouts_are_seconds_and_zero_means_none() {
        assert_eq!(
            seconds("0.5").unwrap().limit,
            Some(Duration::from_millis(500))
        );
        assert_eq!(seconds("2").unwrap().limit, Some(Duration::from_secs(2)));
        assert_eq!(seconds("0").unwrap().limit, None);
        assert!(seconds("-1").is_err());
        assert!(seconds("soon").is_err());
        assert!(seconds("inf").is_err());
    }

    #[test]
    fn addr_and_message_or_the_pack_subcommand() {
        let cli = Cli::try_parse_from(["gaspar", "127.0.0.1:1", "-"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.send.message.unwrap(), "-");
        let cli = Cli::try_parse_from(["gaspar", "pack", "hi"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Pack { message }) if message == "hi"));
        let cli = Cli::try_parse_from(["gaspar", "-t", "0.5", "h:1", "--", "-x"]).unwrap();
        assert_eq!(cli.send.message.unwrap(), "-x");
        assert_eq!(cli.send.timeout.limit, Some(Duration::from_millis(500)));
        assert!(Cli::try_parse_from(["gaspar", "127.0.0.1:1"]).is_err());
        assert!(Cli::try_parse_from(["gaspar", "pack"]).is_err());
        assert!(Cli::try_parse_from(["gaspar"]).is_err());
    }

    #[test]
    fn an_address_needs_a_port_number() {
        assert_eq!(address("localhost:10123").unwrap(), "localhost:10123");
        assert_eq!(address("[::1]:1").unwrap(), "[::1]:1");
        assert!(address("localhost").unwrap_err().ends_with("no port"));
        assert!(address("localhost:x")
            .unwrap_err()
            .ends_with("\"x\" is not a port number"));
        assert!(address("localhost:65536").is_err());
        assert!(address("localhost:").is_err());
    }
}
