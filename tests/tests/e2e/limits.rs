//! Every limit a request passes: each triggers, logs, and leaves the daemon
//! serving everyone else.

use gaspard_tests::{
    connect, is_reset, pack, read_reply, request, start, with_link, LOCAL_LINK, ZMQ_LINK,
};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Closes a connection with a reset, the way a client that gives up does.
fn abort(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

#[test]
fn a_client_that_stalls_mid_request_is_dropped_at_the_read_timeout() {
    let daemon = start("echo", &["--workers", "1", "--read-timeout", "0.3"]);
    let mut stalled = connect(daemon.addr).unwrap();
    stalled.write_all(&[0, 0, 0, 10, b'p', b'a']).unwrap();
    let result = read_reply(&mut stalled);
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log("did not send its whole request within --read-timeout");
    assert_eq!(daemon.request(b"fine").unwrap(), b"fine");
}

#[test]
fn ten_thousand_stalled_clients_do_not_stop_the_daemon_serving_others() {
    const STALLED: usize = 10_000;
    let daemon = start(
        "echo",
        &[
            "--workers",
            "2",
            "--read-timeout",
            "2",
            "--max-connections",
            "12000",
        ],
    );
    let mut stalled = Vec::with_capacity(STALLED);
    for i in 0..STALLED {
        let mut stream = TcpStream::connect(daemon.addr).unwrap();
        // Half of them send part of a header, half part of a body.
        let partial: &[u8] = if i % 2 == 0 {
            &[0, 0]
        } else {
            &[0, 0, 0, 9, b'x']
        };
        stream.write_all(partial).unwrap();
        stalled.push(stream);
    }
    // While all of them hang on, others are served.
    for i in 0..20 {
        let payload = format!("served {i}");
        assert_eq!(
            daemon.request(payload.as_bytes()).unwrap(),
            payload.as_bytes()
        );
    }
    // Then the stalled ones are dropped with a reset, every one of them.
    let mut reset = 0;
    for mut stream in stalled {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        if is_reset(&read_reply(&mut stream)) {
            reset += 1;
        }
    }
    assert_eq!(reset, STALLED);
    assert_eq!(daemon.request(b"after").unwrap(), b"after");
}

#[test]
fn past_max_connections_accept_pauses_until_one_closes() {
    let daemon = start("echo", &["--workers", "1", "--max-connections", "3"]);
    let idle: Vec<TcpStream> = (0..3).map(|_| connect(daemon.addr).unwrap()).collect();
    daemon.expect_log("3 connections open (--max-connections); accept paused");
    // The kernel completes the handshake; the daemon does not read it yet.
    let addr = daemon.addr;
    let waiting = std::thread::spawn(move || request(addr, b"patience"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "served while at --max-connections");
    drop(idle);
    assert_eq!(waiting.join().unwrap().unwrap(), b"patience");
}

/// How many times a throttled line's event happened, from its log lines:
/// (plain lines, summaries, the events the summaries counted).
fn throttled(lines: &[String], message: &str) -> (usize, usize, u64) {
    let (mut plain, mut summaries, mut held) = (0, 0, 0);
    for line in lines.iter().filter(|line| line.contains(message)) {
        // "MESSAGE (N more like it in the last S s)"
        let count = line
            .rsplit_once(" (")
            .and_then(|(_, tail)| tail.split_once(" more like it in the last "))
            .map(|(n, _)| n.parse::<u64>().expect("a count"));
        match count {
            Some(n) => {
                summaries += 1;
                held += n;
            }
            None => plain += 1,
        }
    }
    (plain, summaries, held)
}

#[test]
fn the_accept_pause_line_is_throttled_under_a_flood_at_max_connections() {
    const CLIENTS: usize = 6;
    const FLOOD: Duration = Duration::from_secs(3);
    const MAX_PER_CLIENT: usize = 10_000;
    const PAUSED: &str = "2 connections open (--max-connections); accept paused until one closes";
    let daemon = start("echo", &["--workers", "1", "--max-connections", "2"]);
    let addr = daemon.addr;
    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            std::thread::spawn(move || {
                let mut sent = 0;
                while sent < MAX_PER_CLIENT && start.elapsed() < FLOOD {
                    let payload = format!("{client}:{sent}");
                    let reply = request(addr, payload.as_bytes()).expect("served");
                    assert_eq!(reply, payload.as_bytes());
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let sent: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    // The last summary is due a second (the Throttle's window) after the
    // line before it.
    std::thread::sleep(Duration::from_millis(1300));
    let lines = daemon.log.lines();
    let (plain, summaries, held) = throttled(&lines, PAUSED);
    let log = || {
        // The first few: a test that fails because every line got through
        // would print thousands.
        let paused: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(PAUSED))
            .take(8)
            .collect();
        format!("{sent} requests; {plain} lines, {summaries} summaries of {held}: {paused:#?}")
    };
    assert!(plain >= 1, "{}", log());
    // One line a second: the first, then a summary at most each second of
    // the flood and one after it.
    assert!(plain + summaries <= 5, "{}", log());
    assert!(
        held > 0,
        "no summary counted the lines held back: {}",
        log()
    );
    // Each pause but the first follows a close, so there are no more than
    // requests; and the flood did pause accept again and again.
    let paused = plain as u64 + held;
    assert!(
        paused > plain as u64 && paused <= sent as u64 + 1,
        "{}",
        log()
    );
    assert!(
        paused >= 20,
        "the flood hardly reached the limit: {}",
        log()
    );
}

#[test]
fn a_full_queue_refuses_new_requests_at_once() {
    let daemon = start("fault", &["--workers", "1", "--max-queue", "1"]);
    let addr = daemon.addr;
    let running = std::thread::spawn(move || request(addr, b"sleep:1500"));
    std::thread::sleep(Duration::from_millis(300));
    let queued = std::thread::spawn(move || request(addr, b"echo:queued"));
    std::thread::sleep(Duration::from_millis(300));
    let refused = daemon.request(b"echo:refused");
    assert!(is_reset(&refused), "{refused:?}");
    assert!(
        !running.is_finished(),
        "the refusal did not wait for the worker"
    );
    daemon.expect_log("queue is full (1 requests waiting, --max-queue)");
    assert_eq!(running.join().unwrap().unwrap(), b"slept");
    assert_eq!(queued.join().unwrap().unwrap(), b"queued");
}

#[test]
fn a_client_that_leaves_while_queued_costs_nothing() {
    let daemon = start("fault", &["--workers", "1"]);
    let worker = daemon.workers();
    let addr = daemon.addr;
    let running = std::thread::spawn(move || request(addr, b"sleep:800"));
    std::thread::sleep(Duration::from_millis(200));
    // This request would kill the worker if it ever ran.
    let mut leaver = connect(daemon.addr).unwrap();
    leaver.write_all(&pack(b"exit:9")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    abort(leaver);
    assert_eq!(running.join().unwrap().unwrap(), b"slept");
    assert_eq!(daemon.request(b"echo:next").unwrap(), b"next");
    assert_eq!(daemon.workers(), worker, "the queued exit:9 never ran");
    assert!(!daemon.log.contains("exited with status 9"));
}

#[test]
fn a_client_that_leaves_while_running_has_its_reply_discarded() {
    let daemon = start("fault", &["--workers", "1"]);
    let mut leaver = connect(daemon.addr).unwrap();
    leaver.write_all(&pack(b"sleep:300")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    abort(leaver);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(daemon.request(b"echo:next").unwrap(), b"next");
}

#[test]
fn max_requests_recycles_workers_without_failing_a_request() {
    max_requests_recycles_workers(LOCAL_LINK);
}

#[test]
fn max_requests_recycles_workers_without_failing_a_request_over_zmq() {
    max_requests_recycles_workers(ZMQ_LINK);
}

fn max_requests_recycles_workers(link: &[&str]) {
    let daemon = start(
        "fault",
        &with_link(&["--workers", "1", "--max-requests", "3"], link),
    );
    let mut pids = Vec::new();
    for _ in 0..9 {
        let reply = daemon
            .request(b"pid")
            .expect("no request fails while recycling");
        pids.push(String::from_utf8(reply).unwrap());
    }
    // Three requests per worker: pids change exactly every third request.
    for chunk in pids.chunks(3) {
        assert!(chunk.iter().all(|pid| pid == &chunk[0]), "{pids:?}");
    }
    assert_ne!(pids[0], pids[3]);
    assert_ne!(pids[3], pids[6]);
    daemon.expect_log("recycled after reaching --max-requests");
}

#[test]
fn a_handler_that_crashes_on_every_request_backs_off_instead_of_forking_wildly() {
    let daemon = start("fault", &["--workers", "1"]);
    for _ in 0..3 {
        let result = daemon.request(b"segv");
        assert!(is_reset(&result), "{result:?}");
    }
    // The worker is backing off now: even a harmless request is refused at
    // once instead of queueing behind a handler that keeps crashing.
    let probe = daemon.request(b"echo:probe");
    assert!(is_reset(&probe), "{probe:?}");
    daemon.expect_log("restarting it in 100 ms (back-off after repeated failures)");
    // Once the restart is due the handler serves again, and a served
    // request forgets the back-off.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match daemon.request(b"echo:healthy") {
            Ok(reply) => {
                assert_eq!(reply, b"healthy");
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("never served again: {e}"),
        }
    }
    let deaths = || {
        daemon
            .log
            .lines()
            .into_iter()
            .filter(|line| line.contains("was killed by SIGSEGV;"))
            .collect::<Vec<_>>()
    };
    let before = deaths().len();
    assert!(is_reset(&daemon.request(b"segv")));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while deaths().len() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the last crash was not logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = deaths().pop().unwrap();
    assert!(
        last.ends_with("restarting it"),
        "no back-off after a served request: {last}"
    );
}
