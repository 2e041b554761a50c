//! gaspar-bench end to end: the real binary against its own baseline server
//! (started as a child process on a free port), and against small servers
//! written here that misbehave on purpose. 127.0.0.1 only; every run is
//! bounded in requests and time, and every child is killed when its guard
//! drops, even when an assertion fails.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gaspar-bench");

/// How long one gaspar-bench run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// A running `gaspar-bench serve-baseline`, killed on drop.
struct Baseline {
    child: Child,
    addr: String,
}

impl Baseline {
    fn start(extra: &[&str]) -> Baseline {
        let mut child = Command::new(BIN)
            .args(["serve-baseline", "--port", "0", "--bind", "127.0.0.1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start serve-baseline");
        let stderr = child.stderr.take().expect("piped stderr");
        // The guard exists before anything can fail.
        let mut baseline = Baseline {
            child,
            addr: String::new(),
        };
        let mut line = String::new();
        BufReader::new(stderr)
            .read_line(&mut line)
            .expect("read serve-baseline's first line");
        baseline.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        baseline
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a gaspar-bench run printed, and how it exited.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }

    fn assert_success(&self) -> &Run {
        assert!(
            self.status.success(),
            "gaspar-bench failed ({:?}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs gaspar-bench to the end (killing it past [`RUN_LIMIT`]).
fn bench(args: &[&str]) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gaspar-bench");
    let collect = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        })
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for gaspar-bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gaspar-bench {args:?} ran past {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn errors_of(report: &Value, kind: &str) -> u64 {
    report["errors_by_kind"][kind]
        .as_u64()
        .unwrap_or_else(|| panic!("no count for {kind}: {report}"))
}

#[test]
fn one_request_per_connection_with_checked_replies() {
    let server = Baseline::start(&[]);
    let run = bench(&[
        &server.addr,
        "-n",
        "2000",
        "-c",
        "8",
        "--check",
        "--size",
        "100",
    ]);
    run.assert_success();
    assert!(run.stdout.contains("2000 ok, 0 failed"), "{}", run.stdout);
    assert!(run.stdout.contains("a new connection per request"));
    assert!(run.stdout.contains("errors       none"));
    assert!(run.stdout.contains("% of one core"));
}

#[test]
fn persistent_pipelined_requests_with_checked_replies() {
    let server = Baseline::start(&[]);
    let run = bench(&[
        &server.addr,
        "-n",
        "2000",
        "-c",
        "8",
        "--persistent",
        "--pipeline",
        "8",
        "--check",
    ]);
    run.assert_success();
    assert!(run.stdout.contains("2000 ok, 0 failed"), "{}", run.stdout);
    assert!(run.stdout.contains("8 in flight, window 128"));
}

#[test]
fn json_reports_parse_and_add_up() {
    let server = Baseline::start(&[]);
    for extra in [&[][..], &["--persistent", "--pipeline", "8"][..]] {
        let mut args = vec![
            server.addr.as_str(),
            "-n",
            "2000",
            "-c",
            "8",
            "--check",
            "--json",
        ];
        args.extend_from_slice(extra);
        let run = bench(&args);
        run.assert_success();
        let report = run.json();
        assert_eq!(report["requests"], 2000, "{report}");
        assert_eq!(report["ok"], 2000);
        assert_eq!(report["errors"], 0);
        assert_eq!(report["payload_bytes"], 16);
        // Request and reply payloads of every request.
        assert_eq!(report["payload_bytes_total"], 2000 * 32);
        let latency = &report["latency_us"];
        let p50 = latency["p50"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 <= latency["p99"].as_f64().unwrap());
        assert!(latency["p99_9"].as_f64().unwrap() <= latency["max"].as_f64().unwrap());
        assert!(report["requests_per_sec"].as_f64().unwrap() > 0.0);
        assert!(report["cpu"]["percent_of_one_core"].as_f64().unwrap() >= 0.0);
        if extra.is_empty() {
            assert_eq!(report["mode"], "oneshot");
            assert_eq!(report["window"], Value::Null);
        } else {
            assert_eq!(report["mode"], "persistent");
            assert_eq!(report["window"], 128);
            assert_eq!(report["pipeline"], 8);
        }
    }
}

#[test]
fn the_pipeline_is_capped_at_the_servers_window() {
    let server = Baseline::start(&["--window", "4"]);
    let run = bench(&[
        &server.addr,
        "-n",
        "500",
        "-c",
        "2",
        "--persistent",
        "--pipeline",
        "16",
        "--check",
        "--json",
    ]);
    let report = run.assert_success().json();
    assert_eq!(report["window"], 4);
    assert_eq!(report["pipeline"], 4);
    assert_eq!(report["ok"], 500);
}

#[test]
fn large_payloads_survive_partial_reads_and_writes() {
    let server = Baseline::start(&[]);
    for extra in [&[][..], &["--persistent", "--pipeline", "3"][..]] {
        let mut args = vec![
            server.addr.as_str(),
            "-n",
            "24",
            "-c",
            "4",
            "--size",
            "3M",
            "--check",
            "--json",
        ];
        args.extend_from_slice(extra);
        let report = bench(&args).assert_success().json();
        assert_eq!(report["ok"], 24, "{report}");
        assert_eq!(report["payload_bytes_total"], 24 * 2 * 3 * 1024 * 1024);
    }
    // Bodies of other sizes on the same server: the buffers the earlier ones
    // left are reused where they fit, and replies are still exactly echoes.
    for size in ["100K", "5M", "70K", "2M"] {
        let report = bench(&[
            &server.addr,
            "-n",
            "12",
            "-c",
            "4",
            "--size",
            size,
            "--check",
            "--json",
        ])
        .assert_success()
        .json();
        assert_eq!(report["ok"], 12, "{size}: {report}");
    }
}

#[test]
fn the_spin_pool_answers_as_libspin_does() {
    let server = Baseline::start(&["--spin", "2"]);
    let dir = std::env::temp_dir().join(format!("gaspar-bench-spin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.txt");
    std::fs::write(&good, b"50").unwrap();
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, b"50 ms").unwrap();
    let run = |file: &std::path::Path| {
        bench(&[
            &server.addr,
            "-n",
            "40",
            "-c",
            "8",
            "--payload-file",
            file.to_str().unwrap(),
            "--expect",
            "ok",
            "--json",
        ])
    };
    let report = run(&good).assert_success().json();
    assert_eq!(report["ok"], 40, "{report}");
    // A request libspin.so would refuse is reset, as gaspard fails it.
    let failed = run(&bad);
    assert_eq!(failed.status.code(), Some(3), "{}", failed.stderr);
    assert_eq!(errors_of(&failed.json(), "reset"), 40);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fixed_expected_replies_from_a_string_or_a_file() {
    let server = Baseline::start(&[]);
    let dir = std::env::temp_dir().join(format!("gaspar-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("payload.bin");
    std::fs::write(&file, b"\x00\x01binary\xff payload").unwrap();
    let file = file.to_str().unwrap();
    let run = bench(&[
        &server.addr,
        "-n",
        "100",
        "-c",
        "2",
        "--payload-file",
        file,
        "--expect-file",
        file,
        "--json",
    ]);
    assert_eq!(run.assert_success().json()["ok"], 100);

    // An echo of "abcd..." is not "ok": every reply is wrong, and the exit
    // status says some requests failed.
    let run = bench(&[
        &server.addr,
        "-n",
        "100",
        "-c",
        "2",
        "--expect",
        "ok",
        "--json",
    ]);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    let report = run.json();
    assert_eq!(errors_of(&report, "wrong_reply"), 100);
    assert_eq!(report["ok"], 0);
    assert_eq!(report["latency_us"], Value::Null);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_timed_run_counts_only_after_the_warmup() {
    let server = Baseline::start(&[]);
    let run = bench(&[
        &server.addr,
        "-d",
        "0.5",
        "--warmup",
        "0.3",
        "-c",
        "4",
        "--check",
        "--json",
    ]);
    let report = run.assert_success().json();
    assert_eq!(report["duration_s"], 0.5);
    assert_eq!(report["warmup_s"], 0.3);
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
    assert!(report["cpu"]["wall_s"].as_f64().unwrap() >= 0.8);
    assert_eq!(report["errors"], 0);
}

#[test]
fn nothing_listening_fails_at_once_with_one_line() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let run = bench(&[&addr, "-n", "10"]);
    assert_eq!(run.status.code(), Some(1));
    assert!(run.stderr.contains("cannot connect to"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stdout.is_empty());
}

/// A server on a free port, each connection handled in turn by `serve` on a
/// thread of this test (left running when the test ends).
fn fake_server(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            serve(stream);
        }
    });
    addr
}

#[test]
fn a_server_without_the_extension_is_reported_as_such() {
    // What a v1 server does with 0xFFFFFFFF: over the limit, reset. Closing
    // with the magic still unread makes the kernel send RST.
    let addr = fake_server(|mut stream| {
        let mut header = [0; 4];
        let _ = stream.read_exact(&mut header);
    });
    let addr = addr.to_string();
    let run = bench(&[&addr, "-n", "10", "--persistent"]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("does not support the persistent extension (GSP2)"),
        "{}",
        run.stderr
    );
}

#[test]
fn resets_are_counted_as_failed_requests() {
    // Reads the header only and closes: the unread payload turns the close
    // into a reset, as gaspard's failed requests end.
    let addr = fake_server(|mut stream| {
        let mut header = [0; 4];
        let _ = stream.read_exact(&mut header);
    });
    let addr = addr.to_string();
    let run = bench(&[&addr, "-n", "50", "-c", "2", "--size", "100", "--json"]);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["requests"], 50);
    assert_eq!(errors_of(&report, "reset"), 50, "{report}");
}

#[test]
fn gsp2_statuses_are_counted_by_kind() {
    // Answers GSP2 with statuses 0, 1, 2, 3, 4, 9 in turn.
    let addr = fake_server(|mut stream| {
        let mut preamble = [0; 8];
        if stream.read_exact(&mut preamble).is_err() {
            return;
        }
        assert_eq!(&preamble, b"\xff\xff\xff\xffGSP2");
        stream.write_all(b"GSP2\0\0\0\x08").unwrap();
        for status in [0u8, 1, 2, 3, 4, 9].into_iter().cycle() {
            let mut header = [0; 4];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let len = u32::from_be_bytes(header) as usize;
            if len == 0 {
                return;
            }
            let mut payload = vec![0; len];
            stream.read_exact(&mut payload).unwrap();
            let reply: &[u8] = if status == 0 { &payload } else { b"no luck" };
            let mut frame = vec![status];
            frame.extend_from_slice(&(reply.len() as u32).to_be_bytes());
            frame.extend_from_slice(reply);
            stream.write_all(&frame).unwrap();
        }
    });
    let addr = addr.to_string();
    let run = bench(&[
        &addr,
        "-n",
        "60",
        "-c",
        "1",
        "--persistent",
        "--pipeline",
        "4",
        "--check",
        "--json",
    ]);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["ok"], 10, "{report}");
    for kind in [
        "handler_error",
        "server_timeout",
        "overloaded",
        "worker_lost",
        "bad_status",
    ] {
        assert_eq!(errors_of(&report, kind), 10, "{kind}: {report}");
    }
    assert_eq!(
        report["error_samples"]["handler_error"],
        "handler error: no luck"
    );
}

#[test]
fn help_shows_examples() {
    let run = bench(&["--help"]);
    run.assert_success();
    assert!(run.stdout.contains("Examples:"));
    assert!(run.stdout.contains("serve-baseline"));
    assert!(run.stdout.contains("--pipeline"));
}

#[test]
fn a_server_that_never_answers_times_out() {
    // Takes every byte and never answers, until the client gives up.
    let silent = fake_server(|mut stream| {
        let _ = stream.read_to_end(&mut Vec::new());
    });
    let silent = silent.to_string();
    let started = Instant::now();
    let run = bench(&[&silent, "-n", "4", "-c", "2", "--timeout", "0.3", "--json"]);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    assert_eq!(errors_of(&run.json(), "timeout"), 4);
    assert!(started.elapsed() < Duration::from_secs(20));

    // The same in GSP2, once the handshake is done: what was in flight on
    // the connection times out with its oldest request.
    let silent = fake_server(|mut stream| {
        let mut preamble = [0; 8];
        if stream.read_exact(&mut preamble).is_ok() {
            let _ = stream.write_all(b"GSP2\0\0\0\x10");
            let mut rest = Vec::new();
            // The preflight ends with a zero-length request: close on it.
            let _ = (&mut stream).take(4).read_to_end(&mut rest);
            if rest != [0; 4] {
                let _ = stream.read_to_end(&mut rest);
            }
        }
    });
    let silent = silent.to_string();
    let run = bench(&[
        &silent,
        "-n",
        "6",
        "-c",
        "1",
        "--persistent",
        "--pipeline",
        "3",
        "--timeout",
        "0.3",
        "--json",
    ]);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    let report = run.json();
    assert_eq!(errors_of(&report, "timeout"), 6, "{report}");
    assert_eq!(report["requests"], 6);
}
