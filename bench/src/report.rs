//! What a run found, for people (text, and a progress line on a terminal)
//! and for scripts (one JSON object).

use crate::load::{Amount, ErrorKind, Expectation, Mode, Outcome, Plan, Snapshot};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Runs shorter than this get no progress line.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// The figures a report gives, computed once for both formats.
struct Figures {
    requests: u64,
    errors: u64,
    requests_per_sec: f64,
    mb_per_sec: f64,
    /// p50, p90, p99, p99.9, max and mean, in nanoseconds; `None` if no
    /// request succeeded.
    latency: Option<[f64; 6]>,
    cpu_percent: f64,
    /// Pipeline depth in use, with --persistent.
    pipeline: Option<usize>,
}

fn figures(plan: &Plan, outcome: &Outcome) -> Figures {
    let stats = &outcome.stats;
    let secs = outcome.elapsed.as_secs_f64();
    let per_sec = |count: f64| if secs > 0.0 { count / secs } else { 0.0 };
    let h = &stats.latency;
    let latency = (stats.ok > 0)
        .then(|| [50.0, 90.0, 99.0, 99.9].map(|q| h.value_at_quantile(q / 100.0) as f64));
    let latency =
        latency.map(|[p50, p90, p99, p999]| [p50, p90, p99, p999, h.max() as f64, h.mean()]);
    Figures {
        requests: stats.ok + stats.error_total(),
        errors: stats.error_total(),
        requests_per_sec: per_sec(stats.ok as f64),
        mb_per_sec: per_sec(stats.bytes as f64) / 1e6,
        latency,
        cpu_percent: outcome.cpu.percent_of_one_core(outcome.wall),
        pipeline: match plan.mode {
            Mode::OneShot => None,
            Mode::Persistent { pipeline } => {
                Some(pipeline.min(outcome.window.unwrap_or(u32::MAX) as usize))
            }
        },
    }
}

/// The report for people.
pub fn text(plan: &Plan, outcome: &Outcome) -> String {
    let f = figures(plan, outcome);
    let stats = &outcome.stats;
    let mut out = format!("gaspar-bench {}\n", plan.addr_text);
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "  {label:<12} {text}");
    };

    let mode = match (plan.mode, f.pipeline, outcome.window) {
        (Mode::Persistent { pipeline }, Some(depth), Some(window)) => {
            let capped = if depth < pipeline {
                format!(" (--pipeline {pipeline} capped at the server's window)")
            } else {
                String::new()
            };
            format!("one persistent connection each, {depth} in flight{capped}, window {window}")
        }
        _ => "a new connection per request".to_string(),
    };
    let amount = match plan.amount {
        Amount::Requests(n) => count(n, "request"),
        Amount::Duration(d) => format!("{} s", secs(d)),
    };
    let warmup = if plan.warmup.is_zero() {
        String::new()
    } else {
        format!(" after {} s of warm-up", secs(plan.warmup))
    };
    let check = match plan.expectation {
        Expectation::None => "",
        Expectation::Echo => ", replies checked against the payload",
        Expectation::Fixed(_) => ", replies checked against the expected reply",
    };
    line(
        "load",
        format!(
            "{} on {}, {mode}, {}-byte payload, {amount}{warmup}{check}",
            count(plan.connections as u64, "connection"),
            count(plan.threads as u64, "thread"),
            plan.payload_len()
        ),
    );
    line(
        "requests",
        format!(
            "{} ok, {} failed, in {:.2} s",
            stats.ok,
            f.errors,
            outcome.elapsed.as_secs_f64()
        ),
    );
    line(
        "throughput",
        format!(
            "{:.0} requests/s, {:.2} MB/s (request + reply payloads)",
            f.requests_per_sec, f.mb_per_sec
        ),
    );
    line(
        "latency",
        match f.latency {
            Some([p50, p90, p99, p999, max, _]) => format!(
                "p50 {}, p90 {}, p99 {}, p99.9 {}, max {}",
                nanos(p50),
                nanos(p90),
                nanos(p99),
                nanos(p999),
                nanos(max)
            ),
            None => "none: no request succeeded".to_string(),
        },
    );
    let kinds: Vec<_> = ErrorKind::ALL
        .into_iter()
        .filter(|&kind| stats.errors_of(kind) > 0)
        .collect();
    if kinds.is_empty() {
        line("errors", "none".to_string());
    } else {
        let counts: Vec<_> = kinds
            .iter()
            .map(|&kind| format!("{} {}", kind.name(), stats.errors_of(kind)))
            .collect();
        line("errors", counts.join(", "));
        for kind in kinds {
            if let Some(sample) = stats.sample_of(kind) {
                line("", format!("{}: {sample}", kind.name()));
            }
        }
    }
    let cpu = &outcome.cpu;
    line(
        "own CPU",
        format!(
            "{:.2} s (user {:.2} s, system {:.2} s) in {} s: {:.0}% of one core",
            cpu.total().as_secs_f64(),
            cpu.user.as_secs_f64(),
            cpu.system.as_secs_f64(),
            secs(outcome.wall),
            f.cpu_percent
        ),
    );
    out
}

/// The report for scripts: one JSON object.
pub fn json(plan: &Plan, outcome: &Outcome) -> String {
    #[derive(Serialize)]
    struct Latency {
        p50: f64,
        p90: f64,
        p99: f64,
        p99_9: f64,
        max: f64,
        mean: f64,
    }
    #[derive(Serialize)]
    struct Cpu {
        user_s: f64,
        system_s: f64,
        wall_s: f64,
        percent_of_one_core: f64,
    }
    #[derive(Serialize)]
    struct Report<'a> {
        addr: &'a str,
        mode: &'static str,
        connections: usize,
        threads: usize,
        pipeline: Option<usize>,
        window: Option<u32>,
        payload_bytes: usize,
        check: &'static str,
        warmup_s: f64,
        duration_s: f64,
        requests: u64,
        ok: u64,
        errors: u64,
        errors_by_kind: BTreeMap<&'static str, u64>,
        error_samples: BTreeMap<&'static str, &'a str>,
        requests_per_sec: f64,
        mb_per_sec: f64,
        payload_bytes_total: u64,
        latency_us: Option<Latency>,
        cpu: Cpu,
    }
    let f = figures(plan, outcome);
    let stats = &outcome.stats;
    // Microseconds, to the nanosecond.
    let us = |ns: f64| ns.round() / 1e3;
    let report = Report {
        addr: &plan.addr_text,
        mode: match plan.mode {
            Mode::OneShot => "oneshot",
            Mode::Persistent { .. } => "persistent",
        },
        connections: plan.connections,
        threads: plan.threads,
        pipeline: f.pipeline,
        window: outcome.window,
        payload_bytes: plan.payload_len(),
        check: match plan.expectation {
            Expectation::None => "none",
            Expectation::Echo => "echo",
            Expectation::Fixed(_) => "fixed",
        },
        warmup_s: plan.warmup.as_secs_f64(),
        duration_s: outcome.elapsed.as_secs_f64(),
        requests: f.requests,
        ok: stats.ok,
        errors: f.errors,
        errors_by_kind: ErrorKind::ALL
            .into_iter()
            .map(|kind| (kind.name(), stats.errors_of(kind)))
            .collect(),
        error_samples: ErrorKind::ALL
            .into_iter()
            .filter_map(|kind| Some((kind.name(), stats.sample_of(kind)?)))
            .collect(),
        requests_per_sec: f.requests_per_sec,
        mb_per_sec: f.mb_per_sec,
        payload_bytes_total: stats.bytes,
        latency_us: f.latency.map(|[p50, p90, p99, p99_9, max, mean]| Latency {
            p50: us(p50),
            p90: us(p90),
            p99: us(p99),
            p99_9: us(p99_9),
            max: us(max),
            mean: us(mean),
        }),
        cpu: Cpu {
            user_s: outcome.cpu.user.as_secs_f64(),
            system_s: outcome.cpu.system.as_secs_f64(),
            wall_s: outcome.wall.as_secs_f64(),
            percent_of_one_core: f.cpu_percent,
        },
    };
    serde_json::to_string(&report).expect("a report serializes")
}

/// A line on standard error, rewritten in place, for runs long enough to
/// wonder about; only when standard error is a terminal.
pub struct Progress {
    enabled: bool,
    amount: Amount,
    warmup: Duration,
    shown: bool,
    /// The previous reading, for the current rate.
    last: Option<(Instant, u64)>,
}

impl Progress {
    pub fn new(plan: &Plan) -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            amount: plan.amount,
            warmup: plan.warmup,
            shown: false,
            last: None,
        }
    }

    pub fn show(&mut self, snapshot: &Snapshot) {
        let now = Instant::now();
        let last = self.last.replace((now, snapshot.ok));
        if !self.enabled || snapshot.since_start < PROGRESS_AFTER {
            return;
        }
        let rate = match last {
            Some((then, ok)) if now > then => {
                snapshot.ok.saturating_sub(ok) as f64 / (now - then).as_secs_f64()
            }
            _ => 0.0,
        };
        let so_far = if snapshot.warming_up {
            format!(
                "warm-up {:.1}/{} s",
                snapshot.since_start.as_secs_f64(),
                secs(self.warmup)
            )
        } else {
            let measured = snapshot.since_start.saturating_sub(self.warmup);
            match self.amount {
                Amount::Duration(d) => format!("{:.1}/{} s", measured.as_secs_f64(), secs(d)),
                Amount::Requests(n) => {
                    format!("{}/{n} requests", snapshot.ok + snapshot.errors)
                }
            }
        };
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r{so_far}: {} ok, {} failed, {rate:.0} requests/s\x1b[K",
            snapshot.ok, snapshot.errors
        );
        let _ = stderr.flush();
        self.shown = true;
    }

    /// Erases the line before the report is printed.
    pub fn clear(&mut self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.shown = false;
        }
    }
}

/// "1 thread", "2 threads".
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Seconds, with no more digits than help reading them.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 100.0 || s.fract() == 0.0 {
        format!("{s:.0}")
    } else if s >= 10.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.2}")
    }
}

/// A latency in nanoseconds, in the unit that reads best.
fn nanos(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_read_in_their_unit() {
        assert_eq!(nanos(850.0), "850 ns");
        assert_eq!(nanos(38_250.0), "38.2 µs");
        assert_eq!(nanos(1_234_567.0), "1.23 ms");
        assert_eq!(nanos(2.5e9), "2.50 s");
    }

    #[test]
    fn seconds_drop_needless_digits() {
        assert_eq!(secs(Duration::from_secs(5)), "5");
        assert_eq!(secs(Duration::from_millis(500)), "0.50");
        assert_eq!(secs(Duration::from_millis(12_340)), "12.3");
    }
}
