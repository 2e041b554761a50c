//! Chaos: workers killed at random under steady load. Every request ends with
//! its correct reply or a reset, none hangs, and the daemon recovers.
//!
//! Run with `-- --nocapture` to see the figures (docs/reliability.md).

use gaspard_tests::{connect, pack, read_reply, start, with_link, LOCAL_LINK, ZMQ_LINK};
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 16;
const CHAOS: Duration = Duration::from_secs(4);
const TIMEOUT_SECS: u64 = 5;

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    reset: AtomicU64,
    wrong: AtomicU64,
    hung: AtomicU64,
    slowest_ms: AtomicU64,
}

/// xorshift: enough randomness for picking victims and payloads.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn one_request(addr: std::net::SocketAddr, payload: &[u8], expected: &[u8], tally: &Tally) {
    let started = Instant::now();
    tally.sent.fetch_add(1, Ordering::Relaxed);
    let outcome = connect(addr).and_then(|mut stream| {
        stream.set_read_timeout(Some(Duration::from_secs(TIMEOUT_SECS + 10)))?;
        stream.write_all(&pack(payload))?;
        read_reply(&mut stream)
    });
    match outcome {
        Ok(reply) if reply == expected => tally.answered.fetch_add(1, Ordering::Relaxed),
        Ok(_) => tally.wrong.fetch_add(1, Ordering::Relaxed),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            tally.hung.fetch_add(1, Ordering::Relaxed)
        }
        Err(_) => tally.reset.fetch_add(1, Ordering::Relaxed),
    };
    let ms = started.elapsed().as_millis() as u64;
    tally.slowest_ms.fetch_max(ms, Ordering::Relaxed);
}

#[test]
fn killing_random_workers_under_load_loses_and_hangs_nothing() {
    killing_random_workers_under_load(LOCAL_LINK);
}

#[test]
fn killing_random_workers_under_load_loses_and_hangs_nothing_over_zmq() {
    killing_random_workers_under_load(ZMQ_LINK);
}

fn killing_random_workers_under_load(link: &[&str]) {
    let timeout = TIMEOUT_SECS.to_string();
    let daemon = start(
        "fault",
        &with_link(&["--workers", "2", "--timeout", &timeout], link),
    );
    let addr = daemon.addr;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));

    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (client as u64 + 1);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if n % 5 == 0 {
                        // Some requests hold their worker a while, so that
                        // kills land on requests in flight.
                        one_request(addr, b"sleep:20", b"slept", &tally);
                    } else {
                        let len = (next_random(&mut seed) % 4096) as usize;
                        let body = format!("{client}-{n}-{}", "z".repeat(len));
                        let payload = format!("echo:{body}");
                        one_request(addr, payload.as_bytes(), body.as_bytes(), &tally);
                    }
                }
            })
        })
        .collect();

    let mut seed = 0x2545_f491_4f6c_dd1d;
    let mut killed = 0;
    let chaos_end = Instant::now() + CHAOS;
    while Instant::now() < chaos_end {
        let workers = daemon.workers();
        if !workers.is_empty() {
            let victim = workers[(next_random(&mut seed) % workers.len() as u64) as usize];
            // SAFETY: kill(2) on a worker of the daemon this test started.
            if unsafe { libc::kill(victim, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20 + next_random(&mut seed) % 40));
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }

    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    println!(
        "chaos: {} s, {CLIENTS} clients, {killed} workers killed: sent {}, answered {}, reset {}, \
         wrong {}, hung {}, slowest {} ms",
        CHAOS.as_secs(),
        get(&tally.sent),
        get(&tally.answered),
        get(&tally.reset),
        get(&tally.wrong),
        get(&tally.hung),
        get(&tally.slowest_ms),
    );
    assert_eq!(get(&tally.hung), 0, "requests hung");
    // A killed worker's link just ends: what it sent is read, the request it
    // ran fails, the ones staged behind it go to another worker. A link
    // taken for broken would fail every request its worker held.
    for broken in ["sent garbage", "link broke"] {
        assert!(
            !daemon.log.contains(broken),
            "a killed worker's link was taken for broken:\n{}",
            daemon.log.lines().join("\n")
        );
    }
    assert_eq!(get(&tally.wrong), 0, "requests got a wrong reply");
    assert_eq!(
        get(&tally.sent),
        get(&tally.answered) + get(&tally.reset),
        "every request ended with its reply or a reset"
    );
    assert!(get(&tally.answered) > 0, "nothing was answered at all");
    assert!(
        get(&tally.reset) > 0,
        "the chaos hit no request: the test proves nothing"
    );
    assert!(
        get(&tally.slowest_ms) <= TIMEOUT_SECS * 1000 + 2000,
        "a request took longer than --timeout"
    );

    // Afterwards: the full worker count, serving.
    daemon.wait_for_workers(2, &[], Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut served = 0;
    while served < 20 {
        match daemon.request(b"echo:after") {
            Ok(reply) => {
                assert_eq!(reply, b"after");
                served += 1;
            }
            Err(_) => {
                assert!(Instant::now() < deadline, "not serving after the chaos");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert_eq!(daemon.workers().len(), 2);
}
