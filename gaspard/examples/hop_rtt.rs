//! How much the hop to a worker costs by itself: 16-byte ping-pongs between
//! two processes over zmq PUSH/PULL on ipc (what gaspard uses), against a
//! Unix socketpair between two threads (the floor a direct transport would
//! have). Used by docs/benchmarks.md, "Where the time goes".
//!
//!     cargo run --release -p gaspard --example hop_rtt

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

const ROUND_TRIPS: usize = 20_000;
const CHILD_ARG: &str = "--echo-child";

fn main() {
    let dir = std::env::args().nth(2).map(std::path::PathBuf::from);
    if std::env::args().nth(1).as_deref() == Some(CHILD_ARG) {
        return zmq_echo_child(&dir.expect("the parent passes the directory"));
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    report(
        "zmq PUSH/PULL over ipc, two processes",
        zmq_round_trips(dir.path()),
    );
    report("Unix socketpair, two threads", socketpair_round_trips());
}

fn endpoint(dir: &std::path::Path, name: &str) -> String {
    format!("ipc://{}/{name}.ipc", dir.display())
}

fn zmq_echo_child(dir: &std::path::Path) {
    let ctx = zmq::Context::new();
    let pull = ctx.socket(zmq::PULL).unwrap();
    pull.bind(&endpoint(dir, "ping")).unwrap();
    let push = ctx.socket(zmq::PUSH).unwrap();
    push.connect(&endpoint(dir, "pong")).unwrap();
    push.send("ready", 0).unwrap();
    for _ in 0..ROUND_TRIPS {
        let message = pull.recv_bytes(0).unwrap();
        push.send(message, 0).unwrap();
    }
}

fn zmq_round_trips(dir: &std::path::Path) -> Vec<u64> {
    let ctx = zmq::Context::new();
    let pull = ctx.socket(zmq::PULL).unwrap();
    pull.bind(&endpoint(dir, "pong")).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg(CHILD_ARG)
        .arg(dir)
        .spawn()
        .unwrap();
    pull.recv_bytes(0).unwrap();
    let push = ctx.socket(zmq::PUSH).unwrap();
    push.connect(&endpoint(dir, "ping")).unwrap();
    let times = (0..ROUND_TRIPS)
        .map(|_| {
            let start = Instant::now();
            push.send(&b"0123456789abcdef"[..], 0).unwrap();
            pull.recv_bytes(0).unwrap();
            start.elapsed().as_nanos() as u64
        })
        .collect();
    child.wait().unwrap();
    times
}

fn socketpair_round_trips() -> Vec<u64> {
    let (mut near, mut far) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..ROUND_TRIPS {
            let n = far.read(&mut buf).unwrap();
            far.write_all(&buf[..n]).unwrap();
        }
    });
    let mut buf = [0u8; 64];
    let times = (0..ROUND_TRIPS)
        .map(|_| {
            let start = Instant::now();
            near.write_all(b"0123456789abcdef").unwrap();
            near.read_exact(&mut buf[..16]).unwrap();
            start.elapsed().as_nanos() as u64
        })
        .collect();
    echo.join().unwrap();
    times
}

fn report(what: &str, mut nanos: Vec<u64>) {
    nanos.sort_unstable();
    let at = |q: f64| nanos[((nanos.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "{what}: round trip p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        at(0.5),
        at(0.9),
        at(0.99)
    );
}
