//! Large bodies in the workers' shared body areas (gaspard/src/workers/
//! areas.rs): exact bytes, what a crash costs, which process maps which
//! area, and that an area gives its memory back.

use gaspard_tests::{is_reset, request, start, Daemon};
use std::time::{Duration, Instant};

/// A body whose bytes say where they are and which request they belong to.
fn body(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn large_bodies_cross_whole_and_a_crash_costs_exactly_its_request() {
    // Credit 4: requests are staged in a worker's area behind the one it
    // runs, so a crash finds some there, which must go to another worker.
    let daemon = start("fault", &["--workers", "2", "--worker-credit", "4"]);
    let addr = daemon.addr;
    let clients: Vec<_> = (0..6u64)
        .map(|client| {
            std::thread::spawn(move || {
                let mut outcomes = (0, 0);
                for i in 0..12u64 {
                    let len = [20_000, 200_000, 1 << 20, 3 << 20][(client + i) as usize % 4];
                    let crash = client == 0 && i % 4 == 1;
                    let mut payload = if crash {
                        b"segv:".to_vec()
                    } else {
                        b"echo:".to_vec()
                    };
                    let sent = body(client * 100 + i, len);
                    payload.extend_from_slice(&sent);
                    let reply = request(addr, &payload);
                    if crash {
                        assert!(is_reset(&reply), "a crashed request is reset: {reply:?}");
                        outcomes.1 += 1;
                    } else {
                        let reply = reply.unwrap_or_else(|e| panic!("client {client} #{i}: {e}"));
                        assert!(
                            reply == sent,
                            "client {client} #{i}: {len} bytes came back changed"
                        );
                        outcomes.0 += 1;
                    }
                }
                outcomes
            })
        })
        .collect();
    let (mut echoed, mut crashed) = (0, 0);
    for client in clients {
        let (e, c) = client.join().unwrap();
        echoed += e;
        crashed += c;
    }
    assert_eq!((echoed, crashed), (69, 3));
    // Each crash cost its own request and no other: one failed per death.
    let deaths = || {
        let lines = daemon.log.lines().into_iter();
        lines
            .filter(|line| line.contains(") was killed by SIGSEGV;"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while deaths().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let deaths = deaths();
    assert_eq!(deaths.len(), 3, "{deaths:?}");
    assert!(
        deaths
            .iter()
            .all(|line| line.contains("; 1 requests failed")),
        "{deaths:?}"
    );
}

/// The inodes of the claims memfds (which hold the areas) `pid` maps, and
/// the KiB of each resident there.
fn claims_mappings(pid: i32) -> Vec<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut found = Vec::new();
    let mut current: Option<u64> = None;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 6 && fields[0].contains('-') {
            current = (fields[5] == "/memfd:gaspard-claims").then(|| fields[4].parse().unwrap());
        } else if let (Some(inode), Some(["Rss:", kib, "kB"])) = (current, fields.get(..3)) {
            let kib: u64 = kib.parse().unwrap();
            // A worker maps its request area read-only: one file, three
            // mappings. Summed per file.
            match found.iter_mut().find(|(seen, _)| *seen == inode) {
                Some((_, total)) => *total += kib,
                None => found.push((inode, kib)),
            }
        }
    }
    found
}

#[test]
fn each_worker_maps_its_own_areas_and_no_other() {
    let daemon = start("echo", &["--workers", "3"]);
    let reply = request(daemon.addr, &body(1, 1 << 20)).unwrap();
    assert!(reply == body(1, 1 << 20));
    let daemon_maps: Vec<u64> = claims_mappings(daemon.pid()).iter().map(|m| m.0).collect();
    assert_eq!(
        daemon_maps.len(),
        3,
        "one per worker in the daemon: {daemon_maps:?}"
    );
    let mut seen = Vec::new();
    for worker in daemon.workers() {
        let maps = claims_mappings(worker);
        assert_eq!(maps.len(), 1, "worker {worker} maps {maps:?}");
        assert!(daemon_maps.contains(&maps[0].0));
        assert!(
            !seen.contains(&maps[0].0),
            "two workers share {}",
            maps[0].0
        );
        seen.push(maps[0].0);
        // And holds no fd to any other worker's (or its own: it is mapped).
        for fd in std::fs::read_dir(format!("/proc/{worker}/fd")).unwrap() {
            let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
            assert!(
                !target.to_string_lossy().contains("gaspard-claims"),
                "{target:?}"
            );
        }
    }
}

#[test]
fn an_area_gives_its_memory_back_once_idle() {
    let daemon = start("echo", &["--workers", "1"]);
    let sent = body(7, 16 << 20);
    let reply = request(daemon.addr, &sent).unwrap();
    assert!(reply == sent, "16 MiB came back changed");
    let worker = daemon.workers()[0];
    let resident = |pid| claims_mappings(pid).iter().map(|m| m.1).sum::<u64>();
    // Both areas held the 16 MiB: the daemon wrote the request there and
    // wrote the reply to the client from there.
    assert!(
        resident(daemon.pid()) >= 16 << 10,
        "{} KiB",
        resident(daemon.pid())
    );
    assert!(resident(worker) >= 16 << 10, "{} KiB", resident(worker));
    // Each area keeps 1 MiB; the words and the reply ring are 132 KiB.
    let small = 2 * 1024 + 132;
    let deadline = Instant::now() + Duration::from_secs(10);
    while resident(daemon.pid()) > small || resident(worker) > small {
        assert!(
            Instant::now() < deadline,
            "still {} KiB in the daemon, {} KiB in the worker",
            resident(daemon.pid()),
            resident(worker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the areas still work.
    let again = body(8, 4 << 20);
    assert!(request(daemon.addr, &again).unwrap() == again);
}

#[test]
fn a_worker_kept_busy_with_small_requests_still_gives_its_reply_area_back() {
    let daemon = start("echo", &["--workers", "1"]);
    let sent = body(9, 16 << 20);
    assert!(request(daemon.addr, &sent).unwrap() == sent);
    let worker = daemon.workers()[0];
    let resident = |pid| claims_mappings(pid).iter().map(|m| m.1).sum::<u64>();
    assert!(resident(worker) >= 16 << 10, "{} KiB", resident(worker));
    // Small requests more often than the worker's wait for one times out:
    // it is never idle, but its reply area has been empty all along.
    let small = 2 * 1024 + 132;
    let deadline = Instant::now() + Duration::from_secs(10);
    while resident(worker) > small {
        assert!(
            Instant::now() < deadline,
            "still {} KiB in the worker",
            resident(worker)
        );
        for _ in 0..5 {
            assert_eq!(request(daemon.addr, b"tick").unwrap(), b"tick");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `big:N`'s reply: N bytes of a repeating `0123456789`.
fn repeating(len: usize) -> Vec<u8> {
    b"0123456789".iter().copied().cycle().take(len).collect()
}

/// Opens a connection asking for `big:len` and reads the reply's first
/// byte: the daemon holds the rest (in the worker's reply area).
fn begin_big_reply(addr: std::net::SocketAddr, len: usize) -> std::net::TcpStream {
    begin_reply(addr, &format!("big:{len}"))
}

/// Reads the rest of a reply begun by [`begin_reply`]: it must be the
/// rest of `len` repeating bytes, none of them changed (to the `X` the test
/// handlers scribble).
fn expect_rest_of_reply(stream: &mut std::net::TcpStream, len: usize) {
    let rest = gaspard_tests::read_reply(stream).unwrap();
    assert!(
        rest == repeating(len)[1..],
        "{} bytes came, {} of them X",
        rest.len(),
        rest.iter().filter(|&&b| b == b'X').count()
    );
}

/// Sends `payload`, whose reply is a repeating `0123456789`, and reads the
/// reply's first byte only.
fn begin_reply(addr: std::net::SocketAddr, payload: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut stream = gaspard_tests::connect(addr).unwrap();
    stream
        .write_all(&gaspard_tests::pack(payload.as_bytes()))
        .unwrap();
    let mut first = [0; 1];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(first, *b"0");
    stream
}

/// The mappings of the claims memfd's body areas in `pid` that it may
/// write. (The areas lie past its first pages, at offset 0, which a worker
/// writes: its claims and its reply ring.)
fn writable_areas(pid: i32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(5) == Some(&"/memfd:gaspard-claims")
                && fields[1].starts_with("rw")
                && fields[2] != "00000000"
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn a_reply_held_for_a_slow_client_turns_read_only_in_an_idle_worker() {
    let daemon = start("fault", &["--workers", "1"]);
    let worker = daemon.workers()[0];
    // More than the sockets take: most of it stays held in the area.
    let len = 24 << 20;
    let mut slow = begin_big_reply(daemon.addr, len);
    let in_area: u64 = claims_mappings(worker).iter().map(|(_, kib)| kib).sum();
    assert!(in_area >= 16 << 10, "{in_area} KiB in the worker's areas");
    // No next call comes to make the reply's pages read-only: waiting for
    // one (250 ms at a time) does.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !writable_areas(worker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(writable_areas(worker), Vec::<String>::new());
    expect_rest_of_reply(&mut slow, len);
}

#[test]
fn a_reply_in_the_area_is_written_whole_after_its_worker_is_gone() {
    let daemon = start("fault", &["--workers", "1"]);
    let worker = daemon.workers()[0];
    let len = 40 << 20;
    let mut stream = begin_big_reply(daemon.addr, len);
    // SAFETY: kill(2) on the daemon's worker, alive until reaped.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    let next = daemon.wait_for_workers(1, &[worker], Duration::from_secs(10));
    // The new worker's replies do not disturb the old one's.
    let again = body(3, 8 << 20);
    let mut with_echo = b"echo:".to_vec();
    with_echo.extend_from_slice(&again);
    assert!(request(daemon.addr, &with_echo).unwrap() == again);
    expect_rest_of_reply(&mut stream, len);
    assert_eq!(daemon.workers(), next);
}

#[test]
fn a_client_that_leaves_mid_reply_gives_the_reply_area_back() {
    let daemon = start("fault", &["--workers", "1"]);
    let worker = daemon.workers()[0];
    let len = 40 << 20;
    drop(begin_big_reply(daemon.addr, len));
    // Another reply as large: the area has room for it only if the first
    // was given back (else it takes the socket, and the area stays full).
    let reply = request(daemon.addr, format!("big:{len}").as_bytes()).unwrap();
    assert!(reply == repeating(len));
    let resident = |pid| claims_mappings(pid).iter().map(|m| m.1).sum::<u64>();
    let small = 2 * 1024 + 132;
    let deadline = Instant::now() + Duration::from_secs(10);
    while resident(worker) > small || resident(daemon.pid()) > small {
        assert!(
            Instant::now() < deadline,
            "still {} KiB in the worker, {} KiB in the daemon",
            resident(worker),
            resident(daemon.pid())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(daemon.workers(), vec![worker]);
}

#[test]
fn a_reply_held_from_a_dead_worker_keeps_only_its_own_pages() {
    held_reply_keeps_only_its_own_pages(|_, worker| {
        // SAFETY: kill(2) on the daemon's worker, alive until reaped.
        unsafe { libc::kill(worker, libc::SIGKILL) };
    });
}

#[test]
fn a_reply_held_from_a_worker_replaced_by_a_reload_keeps_only_its_own_pages() {
    // The old worker is retired, not lost: its link is closed when it holds
    // no request, before it exits.
    held_reply_keeps_only_its_own_pages(|daemon, _| daemon.signal(libc::SIGHUP));
}

/// With one worker whose two areas hold 16 MiB of pages each, a client
/// slow to take a 16 MiB reply holds it in the reply area when `end` makes
/// the worker go: the daemon keeps little more than that reply's pages of
/// the worker's claims memfd, not all of them until the client is done.
fn held_reply_keeps_only_its_own_pages(end: impl Fn(&Daemon, i32)) {
    let daemon = start("fault", &["--workers", "1"]);
    let worker = daemon.workers()[0];
    // Both areas of the worker take 16 MiB of pages (the most a request
    // body copied into its area may be, with the command)...
    let mut with_echo = b"echo:".to_vec();
    with_echo.extend_from_slice(&body(4, (16 << 20) - 5));
    assert_eq!(
        request(daemon.addr, &with_echo).unwrap().len(),
        (16 << 20) - 5
    );
    // ...then the slow client's reply is held in the reply area.
    let mut slow = begin_big_reply(daemon.addr, 16 << 20);
    end(&daemon, worker);
    // Its replacement is the daemon's only child: the worker was reaped.
    daemon.wait_for_workers(1, &[worker], Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    let resident: u64 = claims_mappings(daemon.pid()).iter().map(|m| m.1).sum();
    assert!(
        resident < 24 << 10,
        "{resident} KiB kept for a 16 MiB reply: {:?}",
        claims_mappings(daemon.pid())
    );
    // The pages given back were around the held reply, not under it.
    expect_rest_of_reply(&mut slow, 16 << 20);
}

/// The bytes of the claims memfd `pid` maps, all its mappings together.
fn claims_size(pid: i32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|line| line.contains("/memfd:gaspard-claims"))
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?)
        })
        .sum()
}

#[test]
fn a_worker_added_by_sigttin_gets_areas_sized_for_the_new_count() {
    // A quarter of 64 MiB over one worker's two areas: 8 MiB each; over
    // two workers', 4 MiB each. The claims words and reply ring: 132 KiB.
    let daemon = start("echo", &["--workers", "1", "--max-buffered", "64M"]);
    let first = daemon.workers()[0];
    assert_eq!(claims_size(first), (132 << 10) + (16 << 20));
    daemon.signal(libc::SIGTTIN);
    let both = daemon.wait_for_workers(2, &[], Duration::from_secs(10));
    let second = *both.iter().find(|&&pid| pid != first).unwrap();
    // Until it has exec'd, the child still maps what the daemon maps.
    let deadline = Instant::now() + Duration::from_secs(10);
    while claims_mappings(second).len() != 1 {
        assert!(Instant::now() < deadline, "{:?}", claims_mappings(second));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(claims_size(second), (132 << 10) + (8 << 20));
    // Both serve large bodies whole.
    for seed in 0..4 {
        let sent = body(seed, 3 << 20);
        assert!(request(daemon.addr, &sent).unwrap() == sent);
    }
}

#[test]
fn a_slow_client_holding_the_reply_area_leaves_it_intact_and_others_served() {
    use std::io::Read;
    // A quarter of 96 MiB for one worker's two areas: 12 MiB each.
    let daemon = start("fault", &["--workers", "1", "--max-buffered", "96M"]);
    // More than the sockets' buffers take: most of it stays in the area.
    let held_len = 10 << 20;
    let expected = request(daemon.addr, format!("big:{held_len}").as_bytes()).unwrap();
    // A client that takes the first byte of its reply, then stops reading:
    // the rest stays in the worker's reply area, held for it.
    let mut slow = begin_big_reply(daemon.addr, held_len);
    // Replies that do not fit beside it take the socket pair, and nothing
    // the worker writes meanwhile lands on the held bytes.
    for seed in 0..4 {
        let sent = body(20 + seed, 4 << 20);
        let mut with_echo = b"echo:".to_vec();
        with_echo.extend_from_slice(&sent);
        assert!(
            request(daemon.addr, &with_echo).unwrap() == sent,
            "echo {seed}"
        );
    }
    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() + 1, held_len);
    assert!(
        rest[..] == expected[1..],
        "the held reply changed under its client"
    );
}

/// A handler that answers `bN` with N bytes of a repeating `0123456789` and
/// `oN E` by asking for an N-byte reply buffer and writing N + E bytes into
/// it: an overrun, as a buggy C handler makes one.
const SCRIBBLER: &str = r#"
#include "gaspar.h"
#include <stdlib.h>
#include <string.h>
static int handle(void *s, const uint8_t *r, size_t n, const gaspar_host *h) {
    char text[64];
    size_t k = n < 63 ? n : 63;
    (void)s;
    memcpy(text, r, k);
    text[k] = 0;
    char *end;
    unsigned long len = strtoul(text + 1, &end, 10);
    unsigned long extra = strtoul(end, NULL, 10);
    volatile uint8_t *out = h->reply_buffer(h->ctx, len);
    if (!out) return GASPAR_ERROR;
    if (text[0] == 'b') {
        for (unsigned long i = 0; i < len; i++) out[i] = '0' + i % 10;
    } else {
        for (unsigned long i = 0; i < len + extra; i++) out[i] = 'X';
    }
    return GASPAR_OK;
}
static const gaspar_handler_v1 table = { GASPAR_ABI_VERSION, "scribbler", 0, handle, 0 };
const gaspar_handler_v1 *gaspar_handler_entry(void) { return &table; }
"#;

#[test]
fn a_handler_writing_past_its_reply_buffer_faults_and_leaves_a_held_reply_intact() {
    let dir = tempfile::tempdir().unwrap();
    let library = gaspard_tests::compile_c_library(dir.path(), "scribbler", SCRIBBLER);
    // A quarter of 192 MiB over one worker's two areas: 24 MiB each.
    let daemon =
        gaspard_tests::launch(&library, &["--workers", "1", "--max-buffered", "192M"], &[])
            .unwrap_or_else(|(_, log)| panic!("{}", log.lines().join("\n")));
    let worker = daemon.workers()[0];
    // 8 MiB at the area's start, held for a client that reads one byte (the
    // sockets take a few MiB of it, the rest stays in the area)...
    let mut first = slow_reply(daemon.addr, 8 << 20);
    // ...and 14 MiB after it, held the same way...
    let held_len = 14 << 20;
    let mut slow = slow_reply(daemon.addr, held_len);
    // ...then the first is read and given back.
    expect_rest_of_reply(&mut first, 8 << 20);
    // A 4 MiB buffer does not fit after the held reply: it begins the next
    // lap, just before it. Writing 14 MiB past its end would run over the
    // held reply's bytes that have not left yet; the pages past the buffer
    // are read-only in the worker, so the handler faults at the first one.
    let overrun = request(daemon.addr, b"o4194304 14680064");
    assert!(
        is_reset(&overrun),
        "the overrunning request: {:?}",
        overrun.map(|reply| reply.len())
    );
    daemon.wait_for_workers(1, &[worker], Duration::from_secs(10));
    let log = daemon.log.lines().join("\n");
    assert!(log.contains("SIGSEGV"), "{log}");
    // The held reply arrives whole and unchanged.
    expect_rest_of_reply(&mut slow, held_len);
}

/// A handler that keeps a pointer to its last reply buffer and writes
/// through it in its shutdown: a use after the call, which must not reach
/// a reply the daemon still holds.
const KEEPER: &str = r#"
#include "gaspar.h"
#include <stdlib.h>
#include <string.h>
static volatile uint8_t *kept;
static unsigned long kept_len;
static int handle(void *s, const uint8_t *r, size_t n, const gaspar_host *h) {
    char text[64];
    size_t k = n < 63 ? n : 63;
    (void)s;
    memcpy(text, r, k);
    text[k] = 0;
    unsigned long len = strtoul(text + 1, NULL, 10);
    volatile uint8_t *out = h->reply_buffer(h->ctx, len);
    if (!out) return GASPAR_ERROR;
    for (unsigned long i = 0; i < len; i++) out[i] = '0' + i % 10;
    kept = out;
    kept_len = len;
    return GASPAR_OK;
}
static void shutdown(void *s) {
    (void)s;
    for (unsigned long i = 0; kept && i < kept_len; i++) kept[i] = 'X';
}
static const gaspar_handler_v1 table = { GASPAR_ABI_VERSION, "keeper", 0, handle, shutdown };
const gaspar_handler_v1 *gaspar_handler_entry(void) { return &table; }
"#;

#[test]
fn a_handler_shutdown_writing_to_its_last_reply_faults_while_the_reply_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let library = gaspard_tests::compile_c_library(dir.path(), "keeper", KEEPER);
    // One request per worker: it stops, and its handler's shutdown runs,
    // while a slow client still holds that request's reply.
    let daemon = gaspard_tests::launch(&library, &["--workers", "1", "--max-requests", "1"], &[])
        .unwrap_or_else(|(_, log)| panic!("{}", log.lines().join("\n")));
    let worker = daemon.workers()[0];
    let len = 24 << 20;
    let mut slow = begin_reply(daemon.addr, &format!("b{len}"));
    daemon.wait_for_workers(1, &[worker], Duration::from_secs(10));
    daemon.expect_log("recycled after reaching --max-requests, and was killed by SIGSEGV");
    expect_rest_of_reply(&mut slow, len);
}

/// Asks the scribbler for `len` bytes and reads the first.
fn slow_reply(addr: std::net::SocketAddr, len: usize) -> std::net::TcpStream {
    begin_reply(addr, &format!("b{len}"))
}

#[test]
fn a_client_stalling_mid_body_read_in_place_holds_up_nobody_and_gives_its_place_back() {
    use std::io::{Read, Write};
    // A quarter of 96 MiB for one worker's two areas: 12 MiB each.
    let daemon = start(
        "echo",
        &[
            "--workers",
            "1",
            "--max-buffered",
            "96M",
            "--read-timeout",
            "2",
        ],
    );
    // Announces 8 MiB, sends 3 and stops: read into the request area as it
    // comes, it holds most of the area.
    let mut stalled = gaspard_tests::connect(daemon.addr).unwrap();
    stalled.write_all(&(8u32 << 20).to_be_bytes()).unwrap();
    stalled.write_all(&body(30, 3 << 20)).unwrap();
    let resident = |pid| claims_mappings(pid).iter().map(|m| m.1).sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(5);
    while resident(daemon.pid()) < 3 << 10 {
        assert!(Instant::now() < deadline, "{} KiB", resident(daemon.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Others are served whole meanwhile, in the room left or in memory of
    // their own.
    for seed in 0..6 {
        let sent = body(40 + seed, 3 << 20);
        assert!(request(daemon.addr, &sent).unwrap() == sent, "echo {seed}");
    }
    // Cut off by --read-timeout...
    let mut rest = Vec::new();
    assert!(stalled.read_to_end(&mut rest).is_err() || rest.is_empty());
    daemon.expect_log("did not send its whole request within --read-timeout");
    // ...its place is given back, and the area shrinks once idle.
    let small = 2 * 1024 + 132;
    let deadline = Instant::now() + Duration::from_secs(10);
    while resident(daemon.pid()) > small {
        assert!(
            Instant::now() < deadline,
            "still {} KiB in the daemon",
            resident(daemon.pid())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
