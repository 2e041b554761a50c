//! The library against the real daemon: the real `gaspard` binary and real
//! handler plugins, started by the workspace's test harness, on 127.0.0.1.
//! (The `gaspar` command and the Python client are tested the same way in
//! tests/tests/e2e/clients.rs.)

use gaspar_client::{request, request_with, Error, Options, Stage};
use gaspard_tests::start;
use std::time::{Duration, Instant};

/// Deterministic bytes covering every value, so a shifted or truncated reply shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn the_reply_is_the_handlers_bytes() {
    let daemon = start("echo", &["--workers", "1"]);
    assert_eq!(request(daemon.addr, "hello").unwrap(), b"hello");
    // gaspar's call shape: a "host:port" string.
    let addr = format!("127.0.0.1:{}", daemon.addr.port());
    assert_eq!(request(addr.as_str(), b"by name").unwrap(), b"by name");
    let every_byte: Vec<u8> = (0..=255u8).rev().collect();
    assert_eq!(request(daemon.addr, &every_byte).unwrap(), every_byte);
    for len in [1, 65_535, 65_536, 65_537, 5 << 20] {
        let payload = pattern(len);
        let reply = request(daemon.addr, &payload).unwrap();
        assert!(reply == payload, "{len} bytes: got {}", reply.len());
    }
}

#[test]
fn an_empty_message_and_an_empty_reply_are_both_an_empty_vec() {
    let daemon = start("fault", &["--workers", "1"]);
    assert_eq!(request(daemon.addr, b"").unwrap(), b"");
    assert_eq!(request(daemon.addr, b"echo:").unwrap(), b"");
    assert_eq!(request(daemon.addr, b"echo:x").unwrap(), b"x");
}

#[test]
fn a_handler_error_is_a_reset() {
    let daemon = start("fault", &["--workers", "1"]);
    let error = request(daemon.addr, b"error:the disk is on fire").unwrap_err();
    assert!(
        matches!(error, Error::Reset { addr } if addr == daemon.addr),
        "{error:?}"
    );
    daemon.expect_log("handler failed: the disk is on fire");
    let error = request(daemon.addr, b"panic:oops").unwrap_err();
    assert!(matches!(error, Error::Reset { .. }), "{error:?}");
    assert_eq!(
        request(daemon.addr, b"echo:still here").unwrap(),
        b"still here"
    );
}

#[test]
fn a_request_over_the_daemons_size_limit_is_a_reset() {
    let daemon = start("echo", &["--workers", "1", "--max-request-size", "1K"]);
    // The daemon resets on the header; the client may still be sending.
    for len in [1025, 8 << 20] {
        let error = request(daemon.addr, pattern(len)).unwrap_err();
        assert!(matches!(error, Error::Reset { .. }), "{len}: {error:?}");
    }
    assert_eq!(request(daemon.addr, [b'k'; 1024]).unwrap(), [b'k'; 1024]);
}

#[test]
fn a_slow_request_times_out_at_the_read_timeout() {
    let daemon = start("fault", &["--workers", "2"]);
    let options = Options {
        read_timeout: Some(Duration::from_millis(500)),
        ..Options::default()
    };
    let started = Instant::now();
    let error = request_with(daemon.addr, b"sleep:3000", &options).unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(error, Error::Timeout { addr, stage: Stage::Reply } if addr == daemon.addr),
        "{error:?}"
    );
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    // The other worker serves meanwhile, under the same options.
    assert_eq!(
        request_with(daemon.addr, b"echo:quick", &options).unwrap(),
        b"quick"
    );
}

#[test]
fn a_port_nothing_listens_on_is_refused() {
    let port = gaspard_tests::refusing_port();
    let addr = port.addr;
    let error = request(addr, b"hello").unwrap_err();
    assert!(
        matches!(error, Error::Refused { addr: a } if a == addr),
        "{error:?}"
    );
}

// The persistent, pipelined extension (GSP2) through `Connection`.

mod persistent {
    use super::pattern;
    use gaspar_client::{Connection, Error, Options, Stage, Status};
    use gaspard_tests::start;
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    fn open(addr: std::net::SocketAddr) -> Connection {
        Connection::open(addr, &Options::default()).unwrap()
    }

    /// The status and message of a failed request.
    fn failure(result: Result<Vec<u8>, Error>) -> (Status, String) {
        match result {
            Err(Error::Failed {
                status, message, ..
            }) => (status, message),
            other => panic!("expected Error::Failed, got {other:?}"),
        }
    }

    #[test]
    fn round_trips_on_one_connection() {
        let daemon = start("echo", &["--workers", "2"]);
        let mut connection = open(daemon.addr);
        assert_eq!(connection.window(), 128);
        assert_eq!(connection.addr(), daemon.addr);
        assert_eq!(connection.request("hello").unwrap(), b"hello");
        let every_byte: Vec<u8> = (0..=255u8).rev().collect();
        assert_eq!(connection.request(&every_byte).unwrap(), every_byte);
        for len in [1, 65_535, 65_536, 65_537, 5 << 20] {
            let payload = pattern(len);
            let reply = connection.request(&payload).unwrap();
            assert!(reply == payload, "{len} bytes: got {}", reply.len());
        }
        // An empty message never reaches the daemon, as in v1.
        assert_eq!(connection.request("").unwrap(), b"");
        assert_eq!(connection.request("after").unwrap(), b"after");
        connection.close().unwrap();
    }

    #[test]
    fn five_hundred_pipelined_requests_come_back_in_order() {
        let daemon = start("echo", &["--workers", "2"]);
        let mut connection = open(daemon.addr);
        let messages: Vec<Vec<u8>> = (0..500)
            .map(|i| {
                let mut message = format!("request {i} ").into_bytes();
                message.extend(pattern(i * 37 % 5000));
                message
            })
            .collect();
        let started = Instant::now();
        let replies = connection.pipeline(&messages);
        let took = started.elapsed();
        assert_eq!(replies.len(), 500);
        for (i, (message, reply)) in messages.iter().zip(replies).enumerate() {
            let reply = reply.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert!(reply == *message, "reply {i} is not request {i}'s");
        }
        eprintln!("500 pipelined requests in {took:?}");

        // The same by hand: send up to the window, then receive.
        let window = connection.window();
        let mut next_reply = 0;
        for (i, message) in messages.iter().enumerate() {
            if connection.outstanding() == window {
                assert!(matches!(
                    connection.send(message),
                    Err(Error::WindowFull { window: w, .. }) if w == window
                ));
                assert_eq!(connection.recv().unwrap(), messages[next_reply]);
                next_reply += 1;
            }
            connection
                .send(message)
                .unwrap_or_else(|e| panic!("send {i}: {e}"));
        }
        while next_reply < messages.len() {
            assert_eq!(connection.recv().unwrap(), messages[next_reply]);
            next_reply += 1;
        }
        assert_eq!(connection.outstanding(), 0);
        connection.close().unwrap();
    }

    #[test]
    fn a_handler_error_is_failed_with_its_message_and_the_connection_goes_on() {
        let daemon = start("fault", &["--workers", "1"]);
        let mut connection = open(daemon.addr);
        let error = connection.request("error:the disk is on fire").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{}: the request failed: handler error: the disk is on fire",
                daemon.addr
            )
        );
        assert_eq!(
            failure(Err(error)),
            (Status::HandlerError, "the disk is on fire".to_string())
        );
        assert_eq!(
            connection.request("echo:still here").unwrap(),
            b"still here"
        );
        let (status, message) = failure(connection.request("panic:oops"));
        assert_eq!(status, Status::HandlerError);
        assert!(message.contains("oops"), "{message}");
        assert_eq!(connection.request("echo:and here").unwrap(), b"and here");
        // In a pipeline: only the failing request fails.
        let results = connection.pipeline(["echo:1", "error:two", "echo:3"]);
        assert_eq!(results[0].as_deref().unwrap(), b"1");
        assert!(matches!(
            &results[1],
            Err(Error::Failed { status: Status::HandlerError, message, .. }) if message == "two"
        ));
        assert_eq!(results[2].as_deref().unwrap(), b"3");
        assert!(!connection.is_closed());
        connection.close().unwrap();
    }

    #[test]
    fn a_worker_crash_is_worker_lost() {
        let daemon = start("fault", &["--workers", "2"]);
        let mut connection = open(daemon.addr);
        let (status, message) = failure(connection.request("segv"));
        assert_eq!(status, Status::WorkerLost);
        assert_eq!(message, "its worker was killed by SIGSEGV");
        assert_eq!(status.code(), 4);
        // The daemon replaces the worker; the connection is still good.
        assert_eq!(connection.request("echo:after").unwrap(), b"after");
        connection.close().unwrap();
    }

    #[test]
    fn a_request_past_the_daemons_timeout_is_a_timeout_status() {
        // Not much shorter: a loaded machine (the whole suite on 2 cores)
        // can delay even an echo by a good fraction of a second.
        let daemon = start("fault", &["--workers", "2", "--timeout", "1.5"]);
        let mut connection = open(daemon.addr);
        let started = Instant::now();
        connection.send("sleep:6000").unwrap();
        connection.send("echo:behind it").unwrap();
        let (status, message) = failure(connection.recv());
        let took = started.elapsed();
        assert_eq!(status, Status::Timeout);
        assert_eq!(message, "request ran past --timeout");
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        assert!(
            took < Duration::from_millis(5500),
            "not the 6 s sleep: {took:?}"
        );
        // Replies stay in order: the quick one waited for the slow one.
        assert_eq!(connection.recv().unwrap(), b"behind it");
        assert_eq!(connection.request("echo:next").unwrap(), b"next");
        connection.close().unwrap();
    }

    #[test]
    fn a_full_queue_is_overloaded() {
        let daemon = start("fault", &["--workers", "1", "--max-queue", "1"]);
        let mut connection = open(daemon.addr);
        let results = connection.pipeline(["sleep:300", "echo:queued", "echo:refused"]);
        assert_eq!(results[0].as_deref().unwrap(), b"slept");
        assert_eq!(results[1].as_deref().unwrap(), b"queued");
        let (status, message) = failure(results.into_iter().nth(2).unwrap());
        assert_eq!(status, Status::Overloaded);
        assert!(message.contains("queue is full"), "{message}");
        connection.close().unwrap();
    }

    #[test]
    fn the_clients_own_timeout_ends_the_connection() {
        let daemon = start("fault", &["--workers", "2"]);
        let options = Options {
            read_timeout: Some(Duration::from_millis(500)),
            ..Options::default()
        };
        let mut connection = Connection::open(daemon.addr, &options).unwrap();
        let started = Instant::now();
        let error = connection.request("sleep:3000").unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(error, Error::Timeout { addr, stage: Stage::Reply } if addr == daemon.addr),
            "{error:?}"
        );
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(
            took < Duration::from_millis(2500),
            "not the 3 s sleep: {took:?}"
        );
        assert!(connection.is_closed());
        assert!(matches!(
            connection.request("echo:x"),
            Err(Error::Closed { .. })
        ));
        // The other worker serves a new connection meanwhile.
        let mut again = Connection::open(daemon.addr, &options).unwrap();
        assert_eq!(again.request("echo:quick").unwrap(), b"quick");
        again.close().unwrap();
    }

    #[test]
    fn a_request_over_the_size_limit_resets_the_session() {
        let daemon = start("echo", &["--workers", "1", "--max-request-size", "1K"]);
        let mut connection = open(daemon.addr);
        assert_eq!(connection.request([b'k'; 1024]).unwrap(), [b'k'; 1024]);
        let error = connection.request(pattern(1025)).unwrap_err();
        assert!(matches!(error, Error::Reset { .. }), "{error:?}");
        assert!(connection.is_closed());
        daemon.expect_log("over the limit");
    }

    #[test]
    fn an_idle_session_closed_by_the_daemon_is_noticed_before_sending() {
        let daemon = start("echo", &["--workers", "1", "--read-timeout", "0.3"]);
        let mut connection = open(daemon.addr);
        assert_eq!(connection.request("one").unwrap(), b"one");
        std::thread::sleep(Duration::from_millis(800));
        let error = connection.request("two").unwrap_err();
        assert!(matches!(error, Error::Closed { .. }), "{error:?}");
        // Nothing was lost: "two" goes on a new connection.
        let mut connection = open(daemon.addr);
        assert_eq!(connection.request("two").unwrap(), b"two");
    }

    #[test]
    fn close_waits_for_what_is_outstanding() {
        let daemon = start("fault", &["--workers", "1"]);
        let mut connection = open(daemon.addr);
        connection.send("sleep:200").unwrap();
        connection.send("error:thrown away").unwrap();
        let started = Instant::now();
        connection.close().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        // Every request ran to its end.
        assert_eq!(super::request(daemon.addr, "echo:v1").unwrap(), b"v1");
    }

    #[test]
    fn a_server_without_the_extension_is_not_supported() {
        // Like gaspar, or a gaspard from before the extension: the preamble
        // is an oversized v1 request, and the connection is reset.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut header = [0; 4];
            stream.read_exact(&mut header).unwrap();
            assert_eq!(header, [0xff; 4]);
            // Closing with "GSP2" unread makes the kernel send a reset.
            while stream.peek(&mut [0; 4]).unwrap() < 4 {}
        });
        let error = Connection::open(addr, &Options::default()).unwrap_err();
        assert!(
            matches!(error, Error::NotSupported { addr: a } if a == addr),
            "{error:?}"
        );
        server.join().unwrap();

        // One that reads the preamble and closes.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.read_exact(&mut [0; 8]).unwrap();
        });
        let error = Connection::open(addr, &Options::default()).unwrap_err();
        assert!(matches!(error, Error::NotSupported { .. }), "{error:?}");
        server.join().unwrap();
    }
}
