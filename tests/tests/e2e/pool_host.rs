//! The worker host (`gaspard worker --connect`) against a fake daemon: a zmq
//! ROUTER socket in the test, on a random 127.0.0.1 port, speaking the pool
//! protocol by hand (encoded here from the format described in
//! `gaspard/src/pool/protocol.rs`, not with gaspard's own code, so that a
//! change of the wire format on one side only fails these tests).

// Links the libzmq with CURVE that the zmq crate's calls resolve to.
use libzmq_curve as _;

use gaspard_tests::{children_of, handler, run_gaspard, wait_gone, WorkerHost};
use std::path::Path;

use std::time::{Duration, Instant};

/// Long enough for a host to check its handler and start its workers on a
/// busy machine; only a failing test waits this long.
const START: Duration = Duration::from_secs(60);
/// Long enough for anything the host does at once.
const SOON: Duration = Duration::from_secs(20);
/// The name libfault.so reports.
const HANDLER_NAME: &str = "fault-handler";

/// A message from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FromHost {
    Hello {
        protocol: u16,
        abi: u32,
        credit: u32,
        handler: String,
    },
    Credit {
        credit: u32,
        ready: u32,
    },
    Reply {
        id: u64,
        body: Vec<u8>,
    },
    Failed {
        id: u64,
        lost: bool,
        reason: String,
    },
    Heartbeat,
    Leaving,
}

/// A message to the host.
enum ToHost<'a> {
    Welcome { heartbeat_ms: u32, timeout_ms: u32 },
    Refused(&'a str),
    Request { id: u64, payload: &'a [u8] },
    Heartbeat,
    Unknown,
}

fn le<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    bytes[at..at + N].try_into().expect("a field of the head")
}

/// Decodes a host's frames (after the routing id); panics on anything the
/// format does not allow, which fails the test.
fn decode(frames: &[Vec<u8>]) -> FromHost {
    let head = &frames[0];
    let body = frames.get(1);
    let text = || String::from_utf8_lossy(body.expect("a body")).into_owned();
    let expect_len = |len: usize| assert_eq!(head.len(), len, "head of {frames:?}");
    let message = match head[0] {
        1 => {
            expect_len(11);
            FromHost::Hello {
                protocol: u16::from_le_bytes(le(head, 1)),
                abi: u32::from_le_bytes(le(head, 3)),
                credit: u32::from_le_bytes(le(head, 7)),
                handler: text(),
            }
        }
        2 => {
            expect_len(9);
            FromHost::Credit {
                credit: u32::from_le_bytes(le(head, 1)),
                ready: u32::from_le_bytes(le(head, 5)),
            }
        }
        3 => {
            expect_len(13);
            FromHost::Reply {
                id: u64::from_le_bytes(le(head, 1)),
                body: body.expect("a reply body").clone(),
            }
        }
        4 => {
            expect_len(10);
            FromHost::Failed {
                id: u64::from_le_bytes(le(head, 1)),
                lost: head[9] != 0,
                reason: text(),
            }
        }
        5 => {
            expect_len(1);
            FromHost::Heartbeat
        }
        6 => {
            expect_len(1);
            FromHost::Leaving
        }
        other => panic!("message type {other} from the host: {frames:?}"),
    };
    if matches!(
        message,
        FromHost::Heartbeat | FromHost::Leaving | FromHost::Credit { .. }
    ) {
        assert_eq!(body, None, "{frames:?}");
    } else {
        assert_eq!(frames.len(), 2, "{frames:?}");
    }
    message
}

fn encode(message: ToHost) -> Vec<Vec<u8>> {
    match message {
        ToHost::Welcome {
            heartbeat_ms,
            timeout_ms,
        } => {
            let mut head = vec![11];
            head.extend_from_slice(&heartbeat_ms.to_le_bytes());
            head.extend_from_slice(&timeout_ms.to_le_bytes());
            vec![head]
        }
        ToHost::Refused(reason) => vec![vec![12], reason.as_bytes().to_vec()],
        ToHost::Request { id, payload } => {
            let mut head = vec![13];
            head.extend_from_slice(&id.to_le_bytes());
            vec![head, payload.to_vec()]
        }
        ToHost::Heartbeat => vec![vec![5]],
        ToHost::Unknown => vec![vec![14]],
    }
}

/// The daemon's side: a ROUTER socket bound on a random loopback port.
struct FakeDaemon {
    router: zmq::Socket,
    endpoint: String,
    /// Everything received so far: the sender's routing id and the message.
    seen: Vec<(Vec<u8>, FromHost)>,
    // Last: its sockets close first.
    _context: zmq::Context,
}

impl FakeDaemon {
    fn bind() -> FakeDaemon {
        FakeDaemon::bind_with(|_| {})
    }

    /// `prepare` sets options (CURVE) before the socket binds.
    fn bind_with(prepare: impl FnOnce(&zmq::Socket)) -> FakeDaemon {
        let context = zmq::Context::new();
        let router = context.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.set_router_mandatory(true).unwrap();
        prepare(&router);
        router.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = router.get_last_endpoint().unwrap().unwrap();
        FakeDaemon {
            router,
            endpoint,
            seen: Vec::new(),
            _context: context,
        }
    }

    /// The next message from any host within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<(Vec<u8>, FromHost)> {
        let millis = i64::try_from(timeout.as_millis()).unwrap();
        if self.router.poll(zmq::POLLIN, millis).unwrap() == 0 {
            return None;
        }
        let mut frames = self.router.recv_multipart(0).unwrap();
        let peer = frames.remove(0);
        let message = decode(&frames);
        self.seen.push((peer.clone(), message.clone()));
        Some((peer, message))
    }

    /// Waits up to `timeout` for a message that `wanted` picks, skipping
    /// (and keeping in `seen`) the others; `None` if none came.
    fn wait_for(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&FromHost) -> bool,
    ) -> Option<(Vec<u8>, FromHost)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.recv(left) {
                Some((peer, message)) if wanted(&message) => return Some((peer, message)),
                Some(_) => {}
                None => return None,
            }
        }
    }

    /// Like [`Self::wait_for`], failing the test (with the host's log) if
    /// nothing came.
    fn expect(
        &mut self,
        host: &WorkerHost,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&FromHost) -> bool,
    ) -> (Vec<u8>, FromHost) {
        self.wait_for(timeout, wanted).unwrap_or_else(|| {
            panic!(
                "no {what} from the host; received {:?}\nhost log:\n{}",
                self.seen,
                host.log.lines().join("\n")
            )
        })
    }

    fn send(&self, peer: &[u8], message: ToHost) {
        let mut frames = vec![peer.to_vec()];
        frames.extend(encode(message));
        // ROUTER_MANDATORY: an error if that session is gone.
        self.router
            .send_multipart(frames, 0)
            .expect("the host's session is still there");
    }

    /// Sends request `id` with payload `echo:BYTES` to `peer` and checks that
    /// the reply is exactly BYTES; returns the session it came from.
    fn expect_echo(&mut self, host: &WorkerHost, peer: &[u8], id: u64, bytes: &[u8]) -> Vec<u8> {
        let payload = [&b"echo:"[..], bytes].concat();
        self.send(
            peer,
            ToHost::Request {
                id,
                payload: &payload,
            },
        );
        let (from, reply) = self.expect(
            host,
            &format!("Reply {id}"),
            SOON,
            |m| matches!(m, FromHost::Reply { id: got, .. } if *got == id),
        );
        let body = bytes.to_vec();
        assert_eq!(reply, FromHost::Reply { id, body });
        from
    }

    /// Waits for a Hello and welcomes its sender: its routing id.
    fn accept(&mut self, host: &WorkerHost, heartbeat_ms: u32) -> Vec<u8> {
        let (peer, hello) = self.expect(host, "Hello", START, |m| {
            matches!(m, FromHost::Hello { .. })
        });
        let FromHost::Hello { handler, .. } = &hello else {
            unreachable!()
        };
        assert_eq!(handler, HANDLER_NAME, "{hello:?}");
        self.send(
            &peer,
            ToHost::Welcome {
                heartbeat_ms,
                timeout_ms: 0,
            },
        );
        host.expect_log("joined the daemon at");
        peer
    }
}

/// Whether `pid` is in nanosleep (the fault handler's `sleep:MS`), rather
/// than waiting for a request.
fn sleeping(pid: i32) -> bool {
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    // x86_64's nanosleep and clock_nanosleep, where wchan says nothing.
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    wchan.contains("nanosleep") || syscall.starts_with("35 ") || syscall.starts_with("230 ")
}

#[test]
fn a_host_says_hello_runs_requests_and_reports_a_lost_worker_exactly() {
    let mut daemon = FakeDaemon::bind();
    let host = WorkerHost::start(
        &daemon.endpoint,
        "fault",
        &["--workers", "1", "--credit-per-worker", "2"],
    );
    let (peer, hello) = daemon.expect(&host, "Hello", START, |m| {
        matches!(m, FromHost::Hello { .. })
    });
    assert_eq!(
        hello,
        FromHost::Hello {
            protocol: 1,
            abi: gaspard_handler_abi::ABI_VERSION,
            credit: 2,
            handler: HANDLER_NAME.into(),
        }
    );
    daemon.send(
        &peer,
        ToHost::Welcome {
            heartbeat_ms: 60_000,
            timeout_ms: 0,
        },
    );

    // The exact bytes, any bytes.
    daemon.expect_echo(&host, &peer, 41, b"\x00\xffbytes\r\n");
    // A handler's error is not a lost worker.
    daemon.send(
        &peer,
        ToHost::Request {
            id: 42,
            payload: b"error:no such thing",
        },
    );
    let (_, failed) = daemon.expect(&host, "Failed 42", SOON, |m| {
        matches!(m, FromHost::Failed { id: 42, .. })
    });
    let FromHost::Failed { lost, reason, .. } = failed else {
        unreachable!()
    };
    assert!(!lost && reason.contains("no such thing"), "{reason}");

    // The one worker runs 43; 44 waits behind it. Killed mid-request, the
    // worker costs 43 only: 44 never started, and is run by its successor.
    let [worker] = host.workers(1)[..] else {
        unreachable!()
    };
    daemon.send(
        &peer,
        ToHost::Request {
            id: 43,
            payload: b"sleep:60000",
        },
    );
    daemon.send(
        &peer,
        ToHost::Request {
            id: 44,
            payload: b"echo:after",
        },
    );
    // 43 is running once its worker sleeps in the handler.
    let deadline = Instant::now() + SOON;
    while !sleeping(worker) {
        assert!(Instant::now() < deadline, "worker {worker} never slept");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on the host's worker.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    let (_, failed) = daemon.expect(&host, "Failed 43", SOON, |m| {
        matches!(m, FromHost::Failed { .. })
    });
    let FromHost::Failed { id, lost, reason } = failed else {
        unreachable!()
    };
    assert_eq!((id, lost), (43, true), "{reason}");
    assert!(reason.contains("SIGKILL"), "{reason}");
    daemon.expect(&host, "Reply 44", SOON, |m| {
        matches!(m, FromHost::Reply { id: 44, .. })
    });
    // Its credit came back with its successor: a Credit for one ready worker
    // after the death (the Hello said one was ready: this one is news).
    if !daemon.seen.iter().any(|(_, m)| {
        *m == FromHost::Credit {
            credit: 2,
            ready: 1,
        }
    }) {
        daemon.expect(&host, "Credit back to 2", SOON, |m| {
            *m == FromHost::Credit {
                credit: 2,
                ready: 1,
            }
        });
    }
    let failures: Vec<_> = daemon
        .seen
        .iter()
        .filter(|(_, m)| matches!(m, FromHost::Failed { lost: true, .. }))
        .collect();
    assert_eq!(failures.len(), 1, "{:?}", daemon.seen);
    assert!(
        daemon.seen.iter().all(|(from, _)| *from == peer),
        "one session: {:?}",
        daemon.seen
    );
}

#[test]
fn a_silent_or_forgetful_daemon_gets_a_new_session_and_no_stale_reply() {
    let mut daemon = FakeDaemon::bind();
    let host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "1"]);
    let first = daemon.accept(&host, 1000);
    // Held when the daemon falls silent: the daemon fails it, so its reply
    // must never come, in this session or the next.
    daemon.send(
        &first,
        ToHost::Request {
            id: 7,
            payload: b"sleep:6000",
        },
    );
    // No word to the host: after three heartbeats it starts a new session,
    // on a new socket.
    let (second, _) = daemon.expect(&host, "a second Hello", SOON, |m| {
        matches!(m, FromHost::Hello { .. })
    });
    assert_ne!(second, first, "a new session has a new routing id");
    host.expect_log("the session is lost");
    daemon.send(
        &second,
        ToHost::Welcome {
            heartbeat_ms: 60_000,
            timeout_ms: 0,
        },
    );
    // One worker: this runs after request 7 has ended, so that 7's reply,
    // were it sent, would come before this one.
    daemon.expect_echo(&host, &second, 8, b"second");
    // (It ends after the first session is lost.)
    assert!(
        !daemon.seen.iter().any(|(from, m)| *from != first
            && matches!(
                m,
                FromHost::Reply { id: 7, .. } | FromHost::Failed { id: 7, .. }
            )),
        "{:?}",
        daemon.seen
    );

    // The daemon forgot the host (it restarted): a new session at once,
    // long before a heartbeat of a minute could run out.
    daemon.send(&second, ToHost::Unknown);
    let (third, _) = daemon.expect(&host, "a third Hello", SOON, |m| {
        matches!(m, FromHost::Hello { .. })
    });
    assert!(third != first && third != second, "a new routing id");
    daemon.send(
        &third,
        ToHost::Welcome {
            heartbeat_ms: 60_000,
            timeout_ms: 0,
        },
    );
    assert_eq!(daemon.expect_echo(&host, &third, 9, b"third"), third);
}

#[test]
fn a_host_answers_heartbeats_and_a_garbled_message_starts_a_new_session() {
    let mut daemon = FakeDaemon::bind();
    let host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "1"]);
    // Long enough that the test answers each heartbeat in time however
    // busy the machine is.
    let first = daemon.accept(&host, 1000);
    // It keeps the session up: heartbeats come while the daemon answers.
    for _ in 0..3 {
        daemon.expect(&host, "Heartbeat", SOON, |m| *m == FromHost::Heartbeat);
        daemon.send(&first, ToHost::Heartbeat);
    }
    daemon.send(
        &first,
        ToHost::Welcome {
            heartbeat_ms: 60_000,
            timeout_ms: 0,
        },
    );
    // A message that does not parse (a type no daemon sends).
    daemon
        .router
        .send_multipart([first.clone(), vec![99]], 0)
        .unwrap();
    let (second, _) = daemon.expect(&host, "a new Hello", SOON, |m| {
        matches!(m, FromHost::Hello { .. })
    });
    assert_ne!(second, first);
    host.expect_log("does not parse");
}

#[test]
fn sigterm_says_leaving_finishes_what_it_holds_and_exits_cleanly() {
    let mut daemon = FakeDaemon::bind();
    let mut host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "2"]);
    let peer = daemon.accept(&host, 60_000);
    let workers = host.workers(2);
    daemon.send(
        &peer,
        ToHost::Request {
            id: 1,
            payload: b"sleep:1500",
        },
    );
    // Held: a worker runs it.
    let deadline = Instant::now() + SOON;
    while !workers.iter().any(|&worker| sleeping(worker)) {
        assert!(Instant::now() < deadline, "no worker ran request 1");
        std::thread::sleep(Duration::from_millis(5));
    }
    host.signal(libc::SIGTERM);
    daemon.expect(&host, "Leaving", SOON, |m| *m == FromHost::Leaving);
    let (_, reply) = daemon.expect(&host, "Reply 1", SOON, |m| {
        matches!(m, FromHost::Reply { id: 1, .. })
    });
    assert_eq!(
        reply,
        FromHost::Reply {
            id: 1,
            body: b"slept".to_vec()
        }
    );
    let status = host
        .wait_exit(SOON)
        .unwrap_or_else(|| panic!("the host did not stop:\n{}", host.log.lines().join("\n")));
    assert_eq!(status.code(), Some(0), "{}", host.log.lines().join("\n"));
    assert_eq!(wait_gone(&workers, SOON), Vec::<i32>::new());
    assert_eq!(host.runtime_leftovers(), Vec::<std::path::PathBuf>::new());
    // Leaving came before the reply: nothing was sent after it but answers.
    let leaving = daemon
        .seen
        .iter()
        .position(|(_, m)| *m == FromHost::Leaving)
        .unwrap();
    assert!(daemon.seen[leaving..].iter().all(|(_, m)| matches!(
        m,
        FromHost::Leaving | FromHost::Reply { .. } | FromHost::Heartbeat
    )));
}

#[test]
fn a_second_sigterm_stops_at_once_and_fails_what_it_held() {
    let mut daemon = FakeDaemon::bind();
    let mut host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "1"]);
    let peer = daemon.accept(&host, 60_000);
    let workers = host.workers(1);
    daemon.send(
        &peer,
        ToHost::Request {
            id: 3,
            payload: b"sleep:60000",
        },
    );
    let deadline = Instant::now() + SOON;
    while !sleeping(workers[0]) {
        assert!(Instant::now() < deadline, "no worker ran request 3");
        std::thread::sleep(Duration::from_millis(10));
    }
    host.signal(libc::SIGTERM);
    daemon.expect(&host, "Leaving", SOON, |m| *m == FromHost::Leaving);
    host.signal(libc::SIGTERM);
    // The daemon hears at once that its request is lost.
    let (_, failed) = daemon.expect(&host, "Failed 3", SOON, |m| {
        matches!(m, FromHost::Failed { .. })
    });
    assert!(
        matches!(
            failed,
            FromHost::Failed {
                id: 3,
                lost: true,
                ..
            }
        ),
        "{failed:?}"
    );
    let status = host.wait_exit(SOON).expect("the host stops");
    assert_eq!(status.code(), Some(0), "{}", host.log.lines().join("\n"));
    assert_eq!(wait_gone(&workers, SOON), Vec::<i32>::new());
}

#[test]
fn the_daemons_timeout_is_enforced_by_the_host() {
    let mut daemon = FakeDaemon::bind();
    let host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "1"]);
    let (peer, _) = daemon.expect(&host, "Hello", START, |m| {
        matches!(m, FromHost::Hello { .. })
    });
    daemon.send(
        &peer,
        ToHost::Welcome {
            heartbeat_ms: 60_000,
            timeout_ms: 300,
        },
    );
    host.expect_log("joined the daemon at");
    daemon.send(
        &peer,
        ToHost::Request {
            id: 11,
            payload: b"sleep:60000",
        },
    );
    let (_, failed) = daemon.expect(&host, "Failed 11", SOON, |m| {
        matches!(m, FromHost::Failed { .. })
    });
    let FromHost::Failed { id, lost, reason } = failed else {
        unreachable!()
    };
    assert_eq!((id, lost), (11, true), "{reason}");
    assert!(reason.contains("--timeout"), "{reason}");
    // Its worker was killed and another took its place.
    daemon.expect_echo(&host, &peer, 12, b"next");
}

#[test]
fn sighup_reloads_the_hosts_workers_and_it_keeps_serving() {
    let mut daemon = FakeDaemon::bind();
    let host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "1"]);
    let peer = daemon.accept(&host, 60_000);
    let before = host.workers(1);
    host.signal(libc::SIGHUP);
    host.expect_log("reload complete");
    let deadline = Instant::now() + SOON;
    while children_of(host.pid()) == before || children_of(host.pid()).len() != 1 {
        assert!(Instant::now() < deadline, "the old worker is still there");
        std::thread::sleep(Duration::from_millis(10));
    }
    let from = daemon.expect_echo(&host, &peer, 21, b"reloaded");
    assert_eq!(from, peer, "the same session");
}

#[test]
fn a_refused_host_exits_with_the_reason() {
    let mut daemon = FakeDaemon::bind();
    let mut host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "1"]);
    let (peer, _) = daemon.expect(&host, "Hello", START, |m| {
        matches!(m, FromHost::Hello { .. })
    });
    daemon.send(&peer, ToHost::Refused("handler ABI 99 is not spoken here"));
    let status = host.wait_exit(SOON).expect("the refused host exits");
    assert_eq!(status.code(), Some(1));
    host.expect_log("handler ABI 99 is not spoken here");
    assert_eq!(host.runtime_leftovers(), Vec::<std::path::PathBuf>::new());
}

/// The secret key in a `gaspard keygen` secret file.
fn secret_key(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let key = text
        .lines()
        .find_map(|line| line.strip_prefix("secret-key = "))
        .expect("a secret-key line");
    zmq::z85_decode(key.trim()).unwrap()
}

fn keygen(dir: &Path, name: &str) -> (String, String) {
    let prefix = dir.join(name);
    let (status, out, err) = run_gaspard(&[std::ffi::OsStr::new("keygen"), prefix.as_os_str()]);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{out}{err}");
    let with = |extension: &str| format!("{}{extension}", prefix.display());
    (with(".key"), with(".pub"))
}

#[test]
fn with_curve_keys_only_the_right_daemon_hears_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon_secret, daemon_public) = keygen(dir.path(), "daemon");
    let (host_secret, _) = keygen(dir.path(), "host");
    let (_, impostor_public) = keygen(dir.path(), "impostor");
    let secret = secret_key(Path::new(&daemon_secret));
    let curve_server = |router: &zmq::Socket| {
        router.set_curve_server(true).unwrap();
        router.set_curve_secretkey(&secret).unwrap();
    };

    let mut daemon = FakeDaemon::bind_with(curve_server);
    {
        let host = WorkerHost::start(
            &daemon.endpoint,
            "fault",
            &[
                "--workers",
                "1",
                "--key",
                &host_secret,
                "--server-key",
                &daemon_public,
            ],
        );
        let peer = daemon.accept(&host, 60_000);
        daemon.expect_echo(&host, &peer, 5, b"sealed");
    }

    // A host that expects another daemon's key never completes the
    // handshake: nothing it sends reaches this daemon.
    let mut daemon = FakeDaemon::bind_with(curve_server);
    let host = WorkerHost::start(
        &daemon.endpoint,
        "fault",
        &[
            "--workers",
            "1",
            "--key",
            &host_secret,
            "--server-key",
            &impostor_public,
        ],
    );
    host.expect_log("connecting to the daemon at");
    // Several sessions' worth: it tries again every few seconds.
    assert_eq!(
        daemon.recv(Duration::from_secs(8)),
        None,
        "{:?}",
        daemon.seen
    );

    // And a host without keys cannot talk to a CURVE daemon either.
    drop(host);
    let host = WorkerHost::start(&daemon.endpoint, "fault", &["--workers", "1"]);
    host.expect_log("connecting to the daemon at");
    assert_eq!(
        daemon.recv(Duration::from_secs(4)),
        None,
        "{:?}",
        daemon.seen
    );
}

#[test]
fn bad_flags_and_a_handler_that_does_not_load_are_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, _) = keygen(dir.path(), "host");
    let fault = handler("fault");
    let fault = fault.to_str().unwrap();
    let (status, _, err) = run_gaspard(&[
        "worker",
        "--connect",
        "tcp://127.0.0.1:1",
        "--handler",
        fault,
        "--key",
        &secret,
    ]);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.contains("--key and --server-key"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let (status, _, err) = run_gaspard(&["worker", "--connect", "127.0.0.1:1", "--handler", fault]);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.contains("tcp://HOST:PORT"), "{err}");

    let missing = dir.path().join("libmissing.so");
    let (status, _, err) = run_gaspard(&[
        std::ffi::OsStr::new("worker"),
        "--connect".as_ref(),
        "tcp://127.0.0.1:1".as_ref(),
        "--handler".as_ref(),
        missing.as_os_str(),
    ]);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(err.contains("cannot open"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A handler whose init fails: its reason, one line, exit 1.
    let (status, _, err) = run_gaspard(&[
        "worker",
        "--connect",
        "tcp://127.0.0.1:1",
        "--handler",
        fault,
        "--handler-config",
        "fail",
    ]);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(err.contains("init refused by configuration"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let (status, out, _) = run_gaspard(&["worker", "--help"]);
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    for flag in [
        "--connect",
        "--handler",
        "--workers",
        "--key",
        "--server-key",
    ] {
        assert!(out.contains(flag), "{flag} in\n{out}");
    }
}
