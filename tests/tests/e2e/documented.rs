//! The log lines docs/reliability.md quotes are the ones gaspard prints: for
//! a few rows that are easy to trigger, the backticked message in the row's
//! "the log says" column is read from the doc and looked for in the log.

use gaspard_tests::{connect, is_reset, raw_exchange, read_reply, start, Daemon};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// The first backticked message in the "the log says" column (the third) of
/// the row of docs/reliability.md whose first column is `row`.
fn documented(row: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reliability.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let line = doc
        .lines()
        .find(|line| line.starts_with(&format!("| {row} |")))
        .unwrap_or_else(|| panic!("reliability.md has no row {row:?}"));
    let column = line
        .split(" | ")
        .nth(2)
        .unwrap_or_else(|| panic!("row {row:?} has no log column: {line}"));
    column
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("row {row:?} quotes no message: {column}"))
        .to_string()
}

/// The literal parts of a documented message, in order: each placeholder
/// (a word in capitals, such as `N` or `MESSAGE`) is replaced by its value in
/// `values`, or else stands for any text.
fn literal_parts(message: &str, values: &[(&str, &str)]) -> Vec<String> {
    let mut parts = vec![String::new()];
    let chars: Vec<char> = message.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let boundary = |at: usize| at >= chars.len() || !chars[at].is_alphanumeric();
        let starts_word = i == 0 || !chars[i - 1].is_alphanumeric();
        let end = (i..chars.len())
            .find(|&j| !chars[j].is_ascii_uppercase())
            .unwrap_or(chars.len());
        if starts_word && end > i && boundary(end) {
            let word: String = chars[i..end].iter().collect();
            match values.iter().find(|(name, _)| *name == word) {
                Some((_, value)) => parts.last_mut().unwrap().push_str(value),
                None => parts.push(String::new()),
            }
            i = end;
        } else {
            parts.last_mut().unwrap().push(chars[i]);
            i += 1;
        }
    }
    parts.retain(|part| !part.is_empty());
    parts
}

fn contains_in_order(line: &str, parts: &[String]) -> bool {
    let mut rest = line;
    for part in parts {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Waits (up to 10 s) for a log line that the documented message of `row`
/// describes, with `values` for its placeholders.
fn expect_documented(daemon: &Daemon, row: &str, values: &[(&str, &str)]) {
    let message = documented(row);
    let parts = literal_parts(&message, values);
    assert!(!parts.is_empty(), "row {row:?}: nothing to look for");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = daemon.log.lines();
        if lines.iter().any(|line| contains_in_order(line, &parts)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reliability.md, row {row:?}, says {message:?}; no log line has {parts:?}:\n{}",
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn placeholders_are_capital_words() {
    assert_eq!(
        literal_parts("client A: handler failed: MESSAGE; connection reset", &[]),
        ["client ", ": handler failed: ", "; connection reset"]
    );
    assert_eq!(
        literal_parts(
            "of N bytes, over the limit of L (--max-request-size)",
            &[("N", "9"), ("L", "5")]
        ),
        ["of 9 bytes, over the limit of 5 (--max-request-size)"]
    );
    assert!(contains_in_order(
        "[x WARN] client 127.0.0.1:5: handler failed: boom; connection reset",
        &literal_parts(
            "client A: handler failed: MESSAGE; connection reset",
            &[("MESSAGE", "boom")]
        )
    ));
    assert!(!contains_in_order(
        "client 127.0.0.1:5: handler failed: other; connection reset",
        &literal_parts(
            "client A: handler failed: MESSAGE; connection reset",
            &[("MESSAGE", "boom")]
        )
    ));
}

// One daemon per row: client warnings are throttled to one line a second, so
// a second row's line could be held back.

#[test]
fn a_handler_error_is_logged_as_documented() {
    let daemon = start("fault", &["--workers", "1"]);
    assert!(is_reset(&daemon.request(b"error:the disk is on fire")));
    expect_documented(
        &daemon,
        "handler returns an error",
        &[("MESSAGE", "the disk is on fire")],
    );
}

#[test]
fn a_handler_panic_is_logged_as_documented() {
    let daemon = start("fault", &["--workers", "1"]);
    assert!(is_reset(&daemon.request(b"panic:oops")));
    expect_documented(&daemon, "handler panics (Rust)", &[("MESSAGE", "oops")]);
}

#[test]
fn a_request_over_the_size_limit_is_logged_as_documented() {
    let daemon = start("echo", &["--workers", "1", "--max-request-size", "1K"]);
    // 4096 bytes announced; none sent.
    assert!(is_reset(&raw_exchange(daemon.addr, &[0, 0, 0x10, 0])));
    expect_documented(
        &daemon,
        "a header announcing more than the limit",
        &[("N", "4096"), ("L", "1024")],
    );
}

#[test]
fn a_stalled_request_is_logged_as_documented() {
    let daemon = start("echo", &["--workers", "1", "--read-timeout", "0.3"]);
    let mut stalled = connect(daemon.addr).unwrap();
    stalled.write_all(&[0, 0, 0, 10, b'p', b'a']).unwrap();
    assert!(is_reset(&read_reply(&mut stalled)));
    expect_documented(
        &daemon,
        "sends part of a request, then stalls (slowloris)",
        &[],
    );
}
