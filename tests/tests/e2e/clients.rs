//! The clients against the real daemon: the `gaspar` command (built from the
//! `gaspar-client` crate, whose library has its own tests in
//! client/tests/daemon.rs) and the Python module in clients/python, blocking
//! and asyncio. Every client maps the protocol's outcomes to the same exit
//! statuses here: 0 reply, 3 reset, 4 timeout, 5 refused.

use gaspard_tests::{artifacts, raw_exchange, start};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const REPLY: i32 = 0;
const RESET: i32 = 3;
const TIMEOUT: i32 = 4;
const REFUSED: i32 = 5;

/// The Python client's directory, put on PYTHONPATH: the tests import the
/// module from its source, without installing anything.
fn python_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

/// Sends the message on standard input to the Python client and exits as
/// `gaspar` does. Arguments: sync|async, address, timeout in seconds.
const PYTHON_CLIENT: &str = r#"
import asyncio, sys
import gaspar_client as client

mode, address, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
message = sys.stdin.buffer.read()
try:
    if mode == "sync":
        reply = client.request(address, message, timeout=timeout)
    else:
        reply = asyncio.run(client.request_async(address, message, timeout=timeout))
except client.Reset as e:
    assert isinstance(e, ConnectionResetError) and e.address == address, repr(e)
    print(e, file=sys.stderr)
    sys.exit(3)
except client.Timeout as e:
    assert isinstance(e, TimeoutError) and e.stage == "reply", repr(e)
    print(e, file=sys.stderr)
    sys.exit(4)
except client.Refused as e:
    assert isinstance(e, ConnectionRefusedError), repr(e)
    print(e, file=sys.stderr)
    sys.exit(5)
assert type(reply) is bytes, type(reply)
sys.stdout.buffer.write(reply)
"#;

#[derive(Debug, Clone, Copy)]
enum Client {
    /// `gaspar -t SECS ADDR -`, the message on standard input.
    Command,
    /// `gaspar_client.request`.
    Python,
    /// `gaspar_client.request_async`.
    PythonAsync,
}

const CLIENTS: [Client; 3] = [Client::Command, Client::Python, Client::PythonAsync];

fn gaspar_bin() -> PathBuf {
    let path = artifacts().join("gaspar");
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Runs `command` with `stdin` fed from a thread (so a large message cannot
/// deadlock against a large reply) and returns its output.
fn run(mut command: Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let mut pipe = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        // A client that fails early may not read it all.
        let _ = pipe.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    output
}

fn python(args: &[&str], stdin: &[u8]) -> Output {
    let mut command = Command::new("python3");
    command
        .env("PYTHONPATH", python_path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(args);
    run(command, stdin)
}

fn gaspar(args: &[&str], stdin: &[u8]) -> Output {
    let mut command = Command::new(gaspar_bin());
    command.args(args);
    run(command, stdin)
}

/// Sends `message` to `addr` with `client`, waiting at most `timeout` seconds
/// for the reply.
fn send(client: Client, addr: SocketAddr, message: &[u8], timeout: &str) -> Output {
    let addr = addr.to_string();
    match client {
        Client::Command => gaspar(&["--timeout", timeout, &addr, "-"], message),
        Client::Python => python(&["-c", PYTHON_CLIENT, "sync", &addr, timeout], message),
        Client::PythonAsync => python(&["-c", PYTHON_CLIENT, "async", &addr, timeout], message),
    }
}

/// Asserts the exit status and exact standard output, and that a failure
/// says so in one line.
fn expect(client: Client, output: &Output, status: i32, stdout: &[u8]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(status),
        "{client:?}: {output:?}\n{stderr}"
    );
    assert!(
        output.stdout == stdout,
        "{client:?}: {} bytes on stdout instead of {}: {:?}",
        output.stdout.len(),
        stdout.len(),
        String::from_utf8_lossy(&output.stdout[..output.stdout.len().min(200)])
    );
    if status == REPLY {
        assert_eq!(stderr, "", "{client:?}");
    } else {
        assert_eq!(stderr.lines().count(), 1, "{client:?}: {stderr}");
    }
}

/// Deterministic bytes covering every value, so a shifted or truncated reply shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn every_client_prints_the_reply_bytes() {
    let daemon = start("echo", &["--workers", "1"]);
    for client in CLIENTS {
        let output = send(client, daemon.addr, b"hello", "10");
        expect(client, &output, REPLY, b"hello");
    }
    // The message as an argument, as in `gaspar 127.0.0.1:10123 hello`.
    let output = gaspar(&[&daemon.addr.to_string(), "hello, gaspard"], b"");
    expect(Client::Command, &output, REPLY, b"hello, gaspard");
}

#[test]
fn every_client_round_trips_binary_payloads() {
    let daemon = start("echo", &["--workers", "2"]);
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let with_newlines = b"\n\r\n\0\xff line\n".to_vec();
    for payload in [every_byte, with_newlines, pattern(3 << 20)] {
        for client in CLIENTS {
            let output = send(client, daemon.addr, &payload, "30");
            expect(client, &output, REPLY, &payload);
        }
    }
}

#[test]
fn every_client_exits_0_with_no_bytes_on_an_empty_reply() {
    let daemon = start("fault", &["--workers", "1"]);
    for client in CLIENTS {
        expect(
            client,
            &send(client, daemon.addr, b"echo:", "10"),
            REPLY,
            b"",
        );
        // A message of length zero is closed without a reply.
        expect(client, &send(client, daemon.addr, b"", "10"), REPLY, b"");
    }
}

#[test]
fn every_client_reports_a_handler_error_with_the_reset_status() {
    let daemon = start("fault", &["--workers", "1"]);
    for client in CLIENTS {
        let output = send(client, daemon.addr, b"error:the disk is on fire", "10");
        expect(client, &output, RESET, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{} reset the connection", daemon.addr)),
            "{client:?}: {stderr}"
        );
    }
    daemon.expect_log("handler failed: the disk is on fire");
    // A request over --max-request-size is reset just the same.
    let daemon = start("echo", &["--workers", "1", "--max-request-size", "1K"]);
    for client in CLIENTS {
        let output = send(client, daemon.addr, &pattern(4 << 20), "10");
        expect(client, &output, RESET, b"");
    }
}

#[test]
fn every_client_reports_a_refused_port_with_its_own_status() {
    let port = gaspard_tests::refusing_port();
    let addr = port.addr;
    for client in CLIENTS {
        let output = send(client, addr, b"hello", "10");
        expect(client, &output, REFUSED, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("refused"), "{client:?}: {stderr}");
    }
}

#[test]
fn every_client_times_out_on_a_slow_request() {
    let daemon = start("fault", &["--workers", "1"]);
    for client in CLIENTS {
        let started = Instant::now();
        let output = send(client, daemon.addr, b"sleep:3000", "0.5");
        let took = started.elapsed();
        expect(client, &output, TIMEOUT, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("timed out"), "{client:?}: {stderr}");
        // Not the 3 s the handler sleeps (python3's start-up included).
        assert!(took >= Duration::from_millis(500), "{client:?}: {took:?}");
        assert!(took < Duration::from_millis(2500), "{client:?}: {took:?}");
    }
}

#[test]
fn gaspar_messages_name_the_flag_that_ran_out() {
    let daemon = start("fault", &["--workers", "1"]);
    let output = gaspar(&["-t", "0.3", &daemon.addr.to_string(), "sleep:2000"], b"");
    expect(Client::Command, &output, TIMEOUT, b"");
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        format!(
            "gaspar: timed out waiting for the reply from {} within 0.3 s (--timeout)\n",
            daemon.addr
        )
    );
    let port = gaspard_tests::refusing_port();
    let output = gaspar(&[&port.addr.to_string(), "x"], b"");
    assert_eq!(output.status.code(), Some(REFUSED));
    // An address without a port number is a usage error (client/tests/cli.rs).
    let output = gaspar(&["no-port-here", "x"], b"");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("'no-port-here' for '<ADDR>': expected HOST:PORT"),
        "{output:?}"
    );
}

#[test]
fn gaspar_pack_writes_a_request_the_daemon_answers() {
    let daemon = start("upper", &["--workers", "1"]);
    let output = gaspar(&["pack", "hello"], b"");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(output.stdout, b"\0\0\0\x05hello");
    assert_eq!(raw_exchange(daemon.addr, &output.stdout).unwrap(), b"HELLO");

    let payload = pattern(300);
    let output = gaspar(&["pack", "-"], &payload);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(output.stdout[..4], [0, 0, 1, 0x2c]);
    assert_eq!(output.stdout[4..], payload[..]);

    // The shell pipeline docs/clients.md shows, with nc where there is one,
    // and with bash's /dev/tcp, which is always there.
    let port = daemon.addr.port();
    let mut scripts = vec![format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; \"$0\" pack 'shout, gaspard' >&3; cat <&3"
    )];
    if Command::new("nc").arg("-h").output().is_ok() {
        scripts.push(format!(
            "\"$0\" pack 'shout, gaspard' | nc -N 127.0.0.1 {port} || \"$0\" pack 'shout, gaspard' | nc -q 1 127.0.0.1 {port}"
        ));
    }
    for script in scripts {
        let output = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .arg(gaspar_bin())
            .output()
            .unwrap();
        assert!(output.status.success(), "{script}: {output:?}");
        assert_eq!(output.stdout, b"SHOUT, GASPARD", "{script}: {output:?}");
    }
}

#[test]
fn gaspar_help_shows_examples_and_the_exit_statuses() {
    let output = gaspar(&["--help"], b"");
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "gaspar [OPTIONS] <ADDR> <MESSAGE>",
        "gaspar pack <MESSAGE>",
        "gaspar 127.0.0.1:10123 hello",
        "gaspar pack hello | nc -N 127.0.0.1 10123",
        "3  reset",
        "4  timeout",
        "5  refused",
    ] {
        assert!(help.contains(needle), "{needle:?} not in:\n{help}");
    }
    let output = gaspar(&["127.0.0.1:1"], b"");
    assert_eq!(
        output.status.code(),
        Some(2),
        "a missing MESSAGE is a usage error"
    );
    let output = gaspar(&["--timeout", "soon", "127.0.0.1:1", "x"], b"");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn python_request_and_pack_take_gaspars_arguments() {
    let daemon = start("echo", &["--workers", "1"]);
    let script = r#"
import sys
import gaspar_client
from gaspar_client import pack, request

port = int(sys.argv[1])
assert pack(b"hello") == b"\x00\x00\x00\x05hello", pack(b"hello")
assert pack(bytearray(b"\xff" * 300))[:4] == b"\x00\x00\x01\x2c"
assert pack("\u00e9") == b"\x00\x00\x00\x02\xc3\xa9"
assert pack(b"") == b"\x00\x00\x00\x00"
replies = [
    request("127.0.0.1:%d" % port, b"hello"),
    request(("127.0.0.1", port), "hello"),
    request("127.0.0.1:%d" % port, memoryview(b"hello")),
    request("127.0.0.1:%d" % port, b"hello", timeout=None, connect_timeout=None),
]
assert replies == [b"hello"] * 4, replies
for bad in ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"]:
    try:
        request(bad, b"x")
    except ValueError:
        pass
    else:
        raise AssertionError(bad)
assert issubclass(gaspar_client.Reset, gaspar_client.Error)
assert issubclass(gaspar_client.Error, OSError)
sys.stdout.write("ok")
"#;
    let port = daemon.addr.port().to_string();
    let output = python(&["-c", script, &port], b"");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"ok");
}
