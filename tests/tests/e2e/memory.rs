//! The budget of bytes held for clients (--max-buffered): clients that send
//! large bodies and never take their replies, or send them slowly, cannot
//! make the daemon hold more than its budget, and a well-behaved client is
//! served throughout.
//!
//! Run with `-- --nocapture` to see the figures (docs/reliability.md).

use gaspard_tests::{connect, metric, pack, request, start};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const BUDGET_MIB: u64 = 96;
const BODY: usize = 16 << 20;
const HOGS: usize = 64;
const SLOW: usize = 64;
const RUN: Duration = Duration::from_secs(8);

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn clients_that_never_read_or_send_slowly_cannot_grow_the_daemon_past_its_budget() {
    let budget = format!("{BUDGET_MIB}M");
    let daemon = start(
        "echo",
        &[
            "--workers",
            "2",
            "--max-buffered",
            &budget,
            "--read-timeout",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = daemon.addr;
    let base_kib = rss_kib(daemon.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let frame = Arc::new(pack(&vec![7u8; BODY]));
    let mut clients = Vec::new();

    // Send 16 MiB each, and never read the reply.
    for _ in 0..HOGS {
        let (frame, stop) = (Arc::clone(&frame), Arc::clone(&stop));
        clients.push(thread::spawn(move || {
            let Ok(mut stream) = connect(addr) else {
                return;
            };
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let mut sent = 0;
            while sent < frame.len() && !stop.load(Ordering::Relaxed) {
                match stream.write(&frame[sent..]) {
                    Ok(0) => return,
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return, // dropped by the daemon
                }
            }
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    // Announce 16 MiB, then send it a kilobyte at a time.
    for _ in 0..SLOW {
        let stop = Arc::clone(&stop);
        clients.push(thread::spawn(move || {
            let Ok(mut stream) = connect(addr) else {
                return;
            };
            if stream.write_all(&(BODY as u32).to_be_bytes()).is_err() {
                return;
            }
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            while !stop.load(Ordering::Relaxed) {
                match stream.write(&[1u8; 1024]) {
                    Ok(_) => thread::sleep(Duration::from_millis(20)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }));
    }

    // A well-behaved client, and the daemon's memory, throughout.
    let started = Instant::now();
    let (mut served, mut slowest) = (0, Duration::ZERO);
    let (mut max_kib, mut max_held) = (base_kib, 0.0f64);
    while started.elapsed() < RUN {
        let asked = Instant::now();
        let reply = request(addr, b"still there?");
        assert_eq!(
            reply.as_deref().ok(),
            Some(&b"still there?"[..]),
            "the well-behaved client at {:?}: {reply:?}",
            started.elapsed()
        );
        served += 1;
        slowest = slowest.max(asked.elapsed());
        max_kib = max_kib.max(rss_kib(daemon.pid()));
        max_held = max_held.max(metric(&daemon.scrape(), "gaspard_bytes_held"));
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }

    let grown_mib = (max_kib.saturating_sub(base_kib)) / 1024;
    println!(
        "budget {BUDGET_MIB} MiB: daemon RSS {} MiB at start, {} MiB at most (+{grown_mib} MiB); \
         at most {:.1} MiB held; well-behaved client: {served} requests, slowest {slowest:?}",
        base_kib / 1024,
        max_kib / 1024,
        max_held / f64::from(1 << 20),
    );
    let budget_bytes = (BUDGET_MIB << 20) as f64;
    assert!(
        max_held > budget_bytes / 2.0,
        "the clients put the budget under pressure: {max_held}"
    );
    assert!(max_held <= budget_bytes, "held {max_held} bytes");
    // The budget plus what it does not count: a reply being read from each
    // of the two workers, buffers, the allocator's slack.
    assert!(
        grown_mib <= BUDGET_MIB + 48,
        "the daemon grew by {grown_mib} MiB"
    );
    // Nobody got a short reply either: a client still connected reads a reset
    // or nothing, never a clean end before its reply.
    let mut probe = connect(addr).unwrap();
    probe.write_all(&pack(b"done")).unwrap();
    let mut reply = Vec::new();
    probe.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"done");
}
