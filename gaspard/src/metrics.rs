//! Counters an operator can scrape (`--metrics ADDR`), in the Prometheus /
//! OpenMetrics text format, and the tiny HTTP exchange that serves them
//! (on the metrics endpoint's own thread, `scrape.rs`).

use crate::health::Health;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// How a request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are conventionally snake_case
pub(crate) enum Outcome {
    /// The reply was written in full.
    ok,
    /// A zero-length request, closed without a reply.
    empty,
    /// The handler reported an error (or panicked).
    handler_error,
    /// The worker died while holding it, or could not be sent to.
    worker_lost,
    /// It ran past --timeout.
    timeout,
    /// Refused at once: queue full, or no worker can run it.
    refused,
    /// The client broke the protocol or a limit (size, read timeout).
    bad_request,
    /// The client went away first.
    client_gone,
}

/// How many [`Outcome`]s there are (the index of `Metrics::outcome_counters`).
/// The match names each one, so that a new outcome fails to build until it
/// is counted here, rather than index past the array.
const OUTCOMES: usize = match Outcome::ok {
    Outcome::ok
    | Outcome::empty
    | Outcome::handler_error
    | Outcome::worker_lost
    | Outcome::timeout
    | Outcome::refused
    | Outcome::bad_request
    | Outcome::client_gone => 8,
};

/// Why a connection was reset at accept, before any byte of it was read.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum Refusal {
    /// Its source address is not in --allow.
    not_allowed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: Refusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: String,
}

pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    /// Each outcome's counter in `requests`, once first used: the family's
    /// lookup (a lock and a hash) once per outcome, not once per request.
    outcome_counters: [std::sync::OnceLock<Counter>; OUTCOMES],
    pub(crate) in_flight: Gauge,
    pub(crate) queued: Gauge,
    pub(crate) connections: Gauge,
    connections_refused: Family<RefusalLabel, Counter>,
    pub(crate) workers_ready: Gauge,
    pub(crate) worker_starts: Counter,
    /// Bytes of requests and replies held for clients (--max-buffered).
    pub(crate) bytes_held: Gauge,
    /// Time spent holding more than --max-buffered.
    pub(crate) over_budget_seconds: Counter<f64, AtomicU64>,
    worker_exits: Family<CauseLabel, Counter>,
    /// Workers ready, by how they are reached (local, zmq, remote).
    workers_by_kind: Family<KindLabel, Gauge>,
    /// Worker hosts connected (--pool-listen).
    pub(crate) pool_hosts: Gauge,
    /// Worker hosts given up on, by cause.
    pool_hosts_lost: Family<CauseLabel, Counter>,
    /// From the whole request being read to its reply being ready.
    pub(crate) latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("gaspard");
        let requests = Family::<OutcomeLabel, Counter>::default();
        registry.register("requests", "Requests by how they ended", requests.clone());
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests held by workers",
            in_flight.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "requests_queued",
            "Requests waiting for a worker",
            queued.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open",
            connections.clone(),
        );
        let connections_refused = Family::<RefusalLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Client connections reset at accept, by reason (not_allowed: source address not in --allow)",
            connections_refused.clone(),
        );
        let workers_ready = Gauge::default();
        registry.register(
            "workers_ready",
            "Workers ready to serve",
            workers_ready.clone(),
        );
        let worker_starts = Counter::default();
        registry.register(
            "worker_starts",
            "Worker processes started",
            worker_starts.clone(),
        );
        let bytes_held = Gauge::default();
        registry.register(
            "bytes_held",
            "Bytes of requests and replies held for clients (--max-buffered)",
            bytes_held.clone(),
        );
        let over_budget_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "over_budget_seconds",
            "Time spent holding more than --max-buffered, accept paused",
            over_budget_seconds.clone(),
        );
        let worker_exits = Family::<CauseLabel, Counter>::default();
        registry.register(
            "worker_exits",
            "Worker processes gone, by cause (signal, exit status, or a planned stop)",
            worker_exits.clone(),
        );
        let workers_by_kind = Family::<KindLabel, Gauge>::default();
        registry.register(
            "workers_ready_by_kind",
            "Workers ready to serve, by link: local, zmq (--link zmq), remote (on worker hosts)",
            workers_by_kind.clone(),
        );
        let pool_hosts = Gauge::default();
        registry.register(
            "pool_hosts",
            "Worker hosts connected (--pool-listen)",
            pool_hosts.clone(),
        );
        let pool_hosts_lost = Family::<CauseLabel, Counter>::default();
        registry.register(
            "pool_hosts_lost",
            "Worker hosts given up on, by cause (heartbeat: nothing heard for --pool-heartbeat-timeout; unreachable; protocol: a message broke the rules), their requests failed",
            pool_hosts_lost.clone(),
        );
        // 50 µs doubling 21 times: the last bucket is 50 µs × 2^21 ≈ 104.9 s
        // (about 1.75 minutes); slower requests count in +Inf only.
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 22));
        registry.register(
            "request_duration_seconds",
            "Time from a whole request read to its reply ready (queue and handler), answered requests",
            latency.clone(),
        );
        Metrics {
            registry,
            requests,
            outcome_counters: Default::default(),
            in_flight,
            queued,
            connections,
            connections_refused,
            workers_ready,
            worker_starts,
            bytes_held,
            over_budget_seconds,
            worker_exits,
            workers_by_kind,
            pool_hosts,
            pool_hosts_lost,
            latency,
        }
    }
}

impl Metrics {
    pub(crate) fn request_ended(&self, outcome: Outcome) {
        self.outcome_counters[outcome as usize]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&OutcomeLabel { outcome })
                    .clone()
            })
            .inc();
    }

    /// A connection reset at accept.
    pub(crate) fn connection_refused(&self, reason: Refusal) {
        self.connections_refused
            .get_or_create(&RefusalLabel { reason })
            .inc();
    }

    /// A request answered: the time from its whole request read to its reply.
    pub(crate) fn observe_latency(&self, received: std::time::Instant, now: std::time::Instant) {
        self.latency
            .observe(now.saturating_duration_since(received).as_secs_f64());
    }

    /// How many workers reached by `kind` (local, zmq, remote) are ready.
    pub(crate) fn set_workers_ready(&self, kind: &'static str, ready: usize) {
        self.workers_by_kind
            .get_or_create(&KindLabel { kind })
            .set(ready as i64);
    }

    /// A worker host given up on: `cause` is heartbeat, unreachable or protocol.
    pub(crate) fn pool_host_lost(&self, cause: &str) {
        self.pool_hosts_lost
            .get_or_create(&CauseLabel {
                cause: cause.to_string(),
            })
            .inc();
    }

    /// `cause`: a signal name, `exit_N`, or `stopped` for a planned stop.
    pub(crate) fn worker_exited(&self, cause: &str) {
        self.worker_exits
            .get_or_create(&CauseLabel {
                cause: cause.to_string(),
            })
            .inc();
    }

    /// The exposition text.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The most bytes of an HTTP request the metrics endpoint reads.
pub(crate) const MAX_HTTP_REQUEST: usize = 8 * 1024;

/// Answers one HTTP request for the metrics endpoint: `Some(response)` once
/// the request head is complete, `None` while more is needed. `GET /metrics`
/// (or `/`) gets the exposition text, `GET /healthz` the [`Health`] the loop
/// published last (200 or 503, a one-word body); `HEAD` answers as `GET`
/// without the body. Every response closes the connection and must not be
/// cached.
pub(crate) fn http_response(
    request: &[u8],
    metrics: impl FnOnce() -> String,
    health: impl FnOnce() -> Health,
) -> Option<Vec<u8>> {
    let head_end = request.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&request[..head_end]);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(),
        ),
        ("GET" | "HEAD", "/healthz") => {
            let health = health();
            (health.status(), "text/plain", health.body().to_string())
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_exposition() {
        let metrics = Metrics::default();
        metrics.request_ended(Outcome::ok);
        metrics.request_ended(Outcome::ok);
        metrics.request_ended(Outcome::handler_error);
        metrics.worker_exited("SIGSEGV");
        metrics.connection_refused(Refusal::not_allowed);
        metrics.latency.observe(0.001);
        let text = metrics.encode();
        assert!(
            text.contains("gaspard_requests_total{outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gaspard_requests_total{outcome=\"handler_error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gaspard_worker_exits_total{cause=\"SIGSEGV\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gaspard_connections_refused_total{reason=\"not_allowed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gaspard_request_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn http_waits_for_the_whole_head_and_routes_by_path() {
        let up = || Health::Ok;
        assert!(http_response(b"GET /metrics HTTP/1.1\r\n", String::new, up).is_none());
        let ok = http_response(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            || "m 1\n".into(),
            up,
        )
        .unwrap();
        let ok = String::from_utf8(ok).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(ok.contains("Content-Length: 4\r\n"));
        assert!(ok.ends_with("\r\n\r\nm 1\n"));
        let missing = http_response(b"GET /nope HTTP/1.0\r\n\r\n", String::new, up).unwrap();
        assert!(missing.starts_with(b"HTTP/1.1 404"));
    }

    #[test]
    fn healthz_says_the_published_health_and_is_never_cached() {
        let never = || -> String { panic!("a health check must not encode the metrics") };
        let ok = http_response(b"GET /healthz HTTP/1.0\r\n\r\n", never, || Health::Ok).unwrap();
        let ok = String::from_utf8(ok).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nCache-Control: no-store\r\n"), "{ok}");
        assert!(ok.contains("\r\nConnection: close\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        let draining = http_response(
            b"GET /healthz?x=1 HTTP/1.1\r\nHost: gaspard\r\n\r\n",
            never,
            || Health::Draining,
        )
        .unwrap();
        let draining = String::from_utf8(draining).unwrap();
        assert!(draining.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(draining.ends_with("\r\n\r\ndraining\n"), "{draining}");
        // HEAD: the same head, Content-Length included, and no body.
        let head = http_response(b"HEAD /healthz HTTP/1.1\r\nHost: g\r\n\r\n", never, || {
            Health::Starting
        })
        .unwrap();
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("Content-Length: 9\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        let options = http_response(b"OPTIONS / HTTP/1.0\r\n\r\n", never, || Health::Ok).unwrap();
        assert!(options.starts_with(b"HTTP/1.1 405 "));
    }
}
