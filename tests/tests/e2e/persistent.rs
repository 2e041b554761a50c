//! The persistent, pipelined extension: negotiated by a preamble that no v1
//! request can start with; replies in order, each with a status.

use gaspard_tests::{connect, is_reset, metric, raw_exchange, start};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const PREAMBLE: [u8; 8] = [0xff, 0xff, 0xff, 0xff, b'G', b'S', b'P', b'2'];

/// A test client for the extension.
struct Session {
    stream: TcpStream,
    window: u32,
}

impl Session {
    fn open(addr: SocketAddr) -> Session {
        Session::handshake(connect(addr).unwrap())
    }

    /// With a small receive buffer, so that the kernel cannot soak up many
    /// replies for a client that does not read (loopback buffers autotune
    /// to tens of MiB).
    fn open_small_buffer(addr: SocketAddr) -> Session {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.connect(&addr.into()).unwrap();
        Session::handshake(socket.into())
    }

    fn handshake(mut stream: TcpStream) -> Session {
        stream.write_all(&PREAMBLE).unwrap();
        let mut ack = [0; 8];
        stream.read_exact(&mut ack).unwrap();
        assert_eq!(&ack[..4], b"GSP2");
        let window = u32::from_be_bytes(ack[4..].try_into().unwrap());
        Session { stream, window }
    }

    fn send(&mut self, payload: &[u8]) {
        self.stream
            .write_all(&gaspard_tests::pack(payload))
            .unwrap();
    }

    fn reply(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0; 5];
        self.stream.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).unwrap();
        (head[0], body)
    }

    /// Says goodbye; the server closes cleanly once all is answered.
    fn finish(mut self) {
        self.stream.write_all(&[0, 0, 0, 0]).unwrap();
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing after the last reply: {rest:?}");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order_with_statuses() {
    let daemon = start("fault", &["--workers", "2", "--timeout", "1"]);
    let mut session = Session::open(daemon.addr);
    assert_eq!(session.window, 128);
    let requests: [&[u8]; 7] = [
        b"echo:first",
        b"sleep:100", // slower than what follows: order must still hold
        b"error:bad input",
        b"echo:",
        b"segv",
        b"sleep:5000",
        b"echo:last",
    ];
    for request in requests {
        session.send(request);
    }
    assert_eq!(session.reply(), (0, b"first".to_vec()));
    assert_eq!(session.reply(), (0, b"slept".to_vec()));
    assert_eq!(session.reply(), (1, b"bad input".to_vec()));
    assert_eq!(session.reply(), (0, Vec::new()));
    let (status, message) = session.reply();
    assert_eq!(
        (status, String::from_utf8_lossy(&message).as_ref()),
        (4, "its worker was killed by SIGSEGV")
    );
    let (status, message) = session.reply();
    assert_eq!(
        (status, String::from_utf8_lossy(&message).as_ref()),
        (2, "request ran past --timeout")
    );
    assert_eq!(session.reply(), (0, b"last".to_vec()));
    session.finish();
}

/// With one worker holding four requests at a time, the one it runs when it
/// dies fails; the ones staged behind it never started, and are answered by
/// its replacement rather than failed with it.
#[test]
fn requests_staged_behind_a_crash_or_a_timeout_are_served_by_the_next_worker() {
    let daemon = start(
        "fault",
        &["--workers", "1", "--worker-credit", "4", "--timeout", "1"],
    );
    let mut session = Session::open(daemon.addr);
    for request in [&b"segv"[..], b"echo:a", b"echo:b", b"sleep:5000", b"echo:c"] {
        session.send(request);
    }
    let (status, message) = session.reply();
    assert_eq!(
        (status, String::from_utf8_lossy(&message).as_ref()),
        (4, "its worker was killed by SIGSEGV")
    );
    assert_eq!(session.reply(), (0, b"a".to_vec()));
    assert_eq!(session.reply(), (0, b"b".to_vec()));
    let (status, message) = session.reply();
    assert_eq!(
        (status, String::from_utf8_lossy(&message).as_ref()),
        (2, "request ran past --timeout")
    );
    assert_eq!(session.reply(), (0, b"c".to_vec()));
    session.finish();
}

/// Replies to quick calls leave the worker in batches; those it finished
/// before it crashed, not yet announced when it died (it was running the
/// next request it had), are delivered, not failed with it: it wrote them
/// to its reply ring before it claimed the next request.
#[test]
fn replies_finished_before_a_crash_are_delivered_with_the_batch_unsent() {
    let daemon = start("fault", &["--workers", "1", "--worker-credit", "8"]);
    let mut session = Session::open(daemon.addr);
    // While it sleeps, the rest waits in its read buffer: after the sleep,
    // a and b are quick calls with more to run, so they wait unannounced.
    for request in [&b"sleep:100"[..], b"echo:a", b"echo:b", b"segv", b"echo:c"] {
        session.send(request);
    }
    assert_eq!(session.reply(), (0, b"slept".to_vec()));
    assert_eq!(session.reply(), (0, b"a".to_vec()));
    assert_eq!(session.reply(), (0, b"b".to_vec()));
    let (status, message) = session.reply();
    assert_eq!(
        (status, String::from_utf8_lossy(&message).as_ref()),
        (4, "its worker was killed by SIGSEGV")
    );
    assert_eq!(session.reply(), (0, b"c".to_vec()));
    session.finish();
    daemon.expect_log("was killed by SIGSEGV; 1 requests failed");
}

/// A worker killed in the middle of writing a large reply: that request
/// fails, and the ones staged behind it still go to the next worker.
#[test]
fn a_reply_cut_short_by_a_kill_fails_only_its_own_request() {
    // A reply larger than the worker's reply area (as large as a request,
    // here 1 MiB) takes the link's socket, where it can be cut short.
    let args = [
        "--workers",
        "1",
        "--worker-credit",
        "4",
        "--max-request-size",
        "1M",
    ];
    let daemon = start("fault", &args);
    let worker = daemon.workers()[0];
    let mut session = Session::open(daemon.addr);
    for request in [&b"big:20000000"[..], b"echo:a", b"echo:b"] {
        session.send(request);
    }
    // Once the worker has them, the daemon stops reading: the worker blocks
    // halfway through writing its reply.
    std::thread::sleep(Duration::from_millis(50));
    daemon.signal(libc::SIGSTOP);
    let wchan = format!("/proc/{worker}/wchan");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&wchan).is_ok_and(|w| w.contains("sock")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never blocked writing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the worker of the daemon this test started.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal(libc::SIGCONT);
    let (status, message) = session.reply();
    assert_eq!(
        (status, String::from_utf8_lossy(&message).as_ref()),
        (4, "its worker was killed by SIGKILL")
    );
    assert_eq!(session.reply(), (0, b"a".to_vec()));
    assert_eq!(session.reply(), (0, b"b".to_vec()));
    session.finish();
}

/// A worker told to stop (SIGTERM from outside) finishes the request it
/// runs and starts none of those staged behind it: they go to its
/// replacement instead of failing.
#[test]
fn a_worker_stopped_between_requests_hands_back_the_staged_ones() {
    let daemon = start("fault", &["--workers", "1", "--worker-credit", "4"]);
    let worker = daemon.workers()[0];
    let mut session = Session::open(daemon.addr);
    for request in [&b"sleep:500"[..], b"echo:a", b"echo:b"] {
        session.send(request);
    }
    std::thread::sleep(Duration::from_millis(150));
    // SAFETY: kill(2) on the worker of the daemon this test started.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGTERM) }, 0);
    assert_eq!(session.reply(), (0, b"slept".to_vec()));
    assert_eq!(session.reply(), (0, b"a".to_vec()));
    assert_eq!(session.reply(), (0, b"b".to_vec()));
    session.finish();
    daemon.expect_log("exited with status 0; 0 requests failed");
}

#[test]
fn a_thousand_pipelined_requests_flow_through_the_window() {
    let daemon = start("echo", &["--workers", "2"]);
    let session = Session::open(daemon.addr);
    let mut reader = Session {
        stream: session.stream.try_clone().unwrap(),
        window: session.window,
    };
    // The writer runs far past the window; the server must pause reading
    // and resume as replies leave, without deadlock.
    let mut writer = session;
    let sender = std::thread::spawn(move || {
        for i in 0..1000 {
            writer.send(format!("request {i} {}", "p".repeat(i % 300)).as_bytes());
        }
        writer
    });
    for i in 0..1000 {
        let expected = format!("request {i} {}", "p".repeat(i % 300));
        assert_eq!(reader.reply(), (0, expected.into_bytes()), "reply {i}");
    }
    sender.join().unwrap().finish();
}

#[test]
fn large_replies_and_a_v1_client_side_by_side() {
    let daemon = start("echo", &["--workers", "2"]);
    let mut session = Session::open(daemon.addr);
    let big: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
    session.send(&big);
    session.send(b"small");
    // A plain v1 client is served as always meanwhile.
    assert_eq!(
        daemon.request(b"v1 still works").unwrap(),
        b"v1 still works"
    );
    let (status, reply) = session.reply();
    assert_eq!(status, 0);
    assert!(reply == big, "3 MiB reply intact");
    assert_eq!(session.reply(), (0, b"small".to_vec()));
    session.finish();
}

#[test]
fn overload_is_a_status_not_a_reset() {
    let daemon = start("fault", &["--workers", "1", "--max-queue", "1"]);
    let mut session = Session::open(daemon.addr);
    session.send(b"sleep:300"); // runs
    session.send(b"echo:queued"); // waits
    session.send(b"echo:refused"); // over --max-queue
    assert_eq!(session.reply(), (0, b"slept".to_vec()));
    assert_eq!(session.reply(), (0, b"queued".to_vec()));
    let (status, message) = session.reply();
    assert_eq!(status, 3);
    assert!(String::from_utf8_lossy(&message).contains("queue is full"));
    session.finish();
}

#[test]
fn a_client_leaving_mid_session_costs_nothing() {
    let daemon = start("fault", &["--workers", "1"]);
    let worker = daemon.workers();
    let mut session = Session::open(daemon.addr);
    session.send(b"sleep:200");
    session.send(b"exit:9"); // would kill the worker if it ever ran
    std::thread::sleep(Duration::from_millis(50));
    socket2::SockRef::from(&session.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(session);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.request(b"echo:next").unwrap(), b"next");
    assert_eq!(daemon.workers(), worker);
}

#[test]
fn the_escape_length_without_the_preamble_is_reset() {
    let daemon = start("echo", &["--workers", "1"]);
    let result = raw_exchange(
        daemon.addr,
        &[0xff, 0xff, 0xff, 0xff, b'n', b'o', b'p', b'e'],
    );
    assert!(is_reset(&result), "{result:?}");
    daemon.expect_log("sent 0xFFFFFFFF but not the extension preamble");
}

#[test]
fn an_idle_session_is_closed_after_the_read_timeout() {
    let daemon = start("echo", &["--workers", "1", "--read-timeout", "0.3"]);
    let mut session = Session::open(daemon.addr);
    session.send(b"one");
    assert_eq!(session.reply(), (0, b"one".to_vec()));
    let mut rest = Vec::new();
    // A clean close (FIN), not a reset: nothing was lost.
    session.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_client_that_does_not_read_makes_gaspard_hold_at_most_a_window_of_replies() {
    let daemon = start("fault", &["--workers", "2", "--metrics", "127.0.0.1:0"]);
    let mut session = Session::open_small_buffer(daemon.addr);
    // 64 KiB replies, so they do not all fit in the socket buffers.
    for _ in 0..400 {
        session.send(b"big:65536");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let answered = || metric(&daemon.scrape(), "gaspard_requests_total{outcome=\"ok\"}");
    let held = answered();
    // What the kernel's buffers took, plus one window held by gaspard.
    assert!(
        held < 400.0,
        "gaspard ran all {held} requests for a client that reads nothing"
    );
    for i in 0..400 {
        let (status, reply) = session.reply();
        assert_eq!((status, reply.len()), (0, 65536), "reply {i}");
    }
    assert_eq!(answered(), 400.0);
    session.finish();
}

#[test]
fn a_session_that_does_not_take_its_replies_is_reset_at_the_read_timeout() {
    let daemon = start("fault", &["--workers", "2", "--read-timeout", "0.5"]);
    let mut session = Session::open_small_buffer(daemon.addr);
    for _ in 0..300 {
        session.send(b"big:65536");
    }
    std::thread::sleep(Duration::from_millis(2500));
    // What the kernel buffered still arrives; then the reset.
    let mut received = 0;
    let mut head = [0; 5];
    let error = loop {
        if let Err(e) = session.stream.read_exact(&mut head) {
            break e;
        }
        let mut body = vec![0; 65536];
        if let Err(e) = session.stream.read_exact(&mut body) {
            break e;
        }
        received += 1;
    };
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    assert!(received < 300, "{received} replies");
    daemon.expect_log("did not take its replies within --read-timeout");
}

#[test]
fn a_graceful_stop_answers_sessions_then_closes_them_cleanly() {
    let mut daemon = start("fault", &["--workers", "1", "--shutdown-timeout", "20"]);
    let mut idle = Session::open(daemon.addr);
    idle.send(b"echo:one");
    assert_eq!(idle.reply(), (0, b"one".to_vec()));
    let mut busy = Session::open(daemon.addr);
    busy.send(b"sleep:500");
    std::thread::sleep(Duration::from_millis(100));
    let signalled = std::time::Instant::now();
    daemon.signal(libc::SIGTERM);
    // The busy session gets its reply, then a clean close; so does the idle one.
    assert_eq!(busy.reply(), (0, b"slept".to_vec()));
    for session in [&mut idle, &mut busy] {
        let mut rest = Vec::new();
        session
            .stream
            .read_to_end(&mut rest)
            .expect("a clean close, not a reset");
        assert!(rest.is_empty());
    }
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("gaspard exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "idle sessions did not hold the stop until --shutdown-timeout"
    );
}

#[test]
fn a_session_opened_after_sigterm_takes_no_new_requests() {
    let mut daemon = start("fault", &["--workers", "1", "--shutdown-timeout", "20"]);
    // Connected before the stop, extension negotiated after it.
    let stream = connect(daemon.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal(libc::SIGTERM);
    daemon.expect_log("stopping gracefully");
    let mut session = Session::handshake(stream);
    // It takes no request: right after the acknowledgement, a clean close.
    let mut rest = Vec::new();
    session
        .stream
        .read_to_end(&mut rest)
        .expect("a clean close, not a reset");
    assert!(rest.is_empty(), "{rest:?}");
    let status = daemon
        .wait_exit(Duration::from_secs(15))
        .expect("gaspard exits");
    assert_eq!(status.code(), Some(0));
}
