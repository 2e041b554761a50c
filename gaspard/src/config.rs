//! Command-line flags and `GASPARD_*` environment variables, turned into one
//! validated [`Config`].

use clap::{ArgAction, Parser};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

/// Why the flags do not make a configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("--workers {0} is more than the {MAX_WORKERS} supported")]
    TooManyWorkers(usize),
    #[error("--workers 0 needs --pool-listen: someone must do the work")]
    NoWorkers,
    #[error(
        "--workers {0} with --link zmq: at most {MAX_ZMQ_WORKERS} (a libzmq context has 1023 \
         sockets, one per worker, and a reload runs old and new workers side by side)"
    )]
    TooManyZmqWorkers(usize),
    #[error("--pool-listen {0}: expected tcp://ADDRESS:PORT")]
    PoolEndpoint(String),
    #[error(
        "--pool-listen {0} is not a loopback address: give --pool-key and \
         --pool-authorized (CURVE), or --pool-insecure to accept anyone who can reach it"
    )]
    PoolInsecure(String),
    #[error("--{flag} must be a number of seconds >= 0, not {value}")]
    Seconds { flag: &'static str, value: f64 },
    #[error("--max-request-size {0} exceeds the protocol's limit of {limit} bytes", limit = gaspar_protocol::MAX_PAYLOAD)]
    RequestSize(u64),
    #[error(
        "--group {0} needs --user: changing the group alone would leave gaspard running as root"
    )]
    GroupWithoutUser(String),
    #[error("--bind {host}: cannot resolve it: {reason}")]
    Resolve { host: String, reason: String },
    #[error("--bind {0}: the name has no address")]
    NoAddress(String),
    #[error("expected 1, true, yes, on or 0, false, no, off (any case), not {0:?}")]
    Switch(String),
    #[error("expected auto or a number from 1 to 64, not {0:?}")]
    Credit(String),
    #[error("expected an IPv4 or IPv6 address, optionally /PREFIX, not {0:?}")]
    Cidr(String),
    /// Refused rather than masked: `10.0.0.1/8` is more likely a typo for
    /// `/32` than a wish to let in 16 million addresses.
    #[error("{text} has bits set past /{prefix}: did you mean {network}/{prefix}?")]
    CidrHostBits {
        text: String,
        network: IpAddr,
        prefix: u8,
    },
}

/// The most --workers: half the worker slots the daemon has room for, since
/// a reload runs old and new workers side by side.
pub const MAX_WORKERS: usize = 32_767;

/// The most --workers with --link zmq: a libzmq context has 1023 sockets by
/// default, one PUSH per worker, twice as many during a reload.
pub const MAX_ZMQ_WORKERS: usize = 500;

/// The worker pool's flags, checked (the key files are read at start).
#[derive(Debug, Clone)]
pub struct PoolFlags {
    /// A `tcp://` endpoint.
    pub listen: String,
    /// --pool-key and --pool-authorized: CURVE.
    pub curve: Option<(PathBuf, PathBuf)>,
    pub heartbeat_timeout: Duration,
    /// --pool-max-reply.
    pub max_reply: u64,
}

/// How workers are linked to the daemon (--link).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkKind {
    /// A socket pair and a reply pipe per worker (`workers/link.rs`).
    Local,
    /// libzmq PUSH/PULL over ipc://, as gaspar did (`workers/zmq_link.rs`).
    Zmq,
}

/// How many requests a worker may hold at once (--worker-credit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    /// Always at most this many (1: strictly one at a time).
    Fixed(usize),
    /// As many as it can run in about 2 ms, judged by its recent handler
    /// times, none staged behind a call that has run that long, and no
    /// large body staged at all (see the dispatcher).
    Auto,
}

/// What `gaspard --version` prints: the version, and the libzmq that the
/// zmq links use, with whether it has CURVE (encrypted worker pools).
pub fn version() -> String {
    let (major, minor, patch) = zmq::version();
    let curve = if zmq::has("curve") == Some(true) {
        "CURVE on"
    } else {
        "no CURVE"
    };
    let built = if libzmq_curve::BUILT_HERE {
        "built with libsodium"
    } else {
        "zmq-sys's own build"
    };
    format!(
        "{} (libzmq {major}.{minor}.{patch}, {curve}, {built})",
        env!("CARGO_PKG_VERSION")
    )
}

/// Serve a handler plugin on a TCP port, spreading requests over worker processes.
///
/// Requests are a 4-byte big-endian length followed by that many bytes; the
/// reply is the handler's bytes followed by a clean close. A failed request
/// ends with a connection reset and a log line that says why.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "gaspard",
    version,
    after_help = "Example:\n  gaspard --handler target/release/libecho.so --port 10123\n  \
                  printf '\\0\\0\\0\\5hello' | nc 127.0.0.1 10123\n\n\
                  To start writing a handler: gaspard new-handler NAME [--lang rust|c] \
                  (see gaspard new-handler --help)"
)]
pub struct Cli {
    /// The handler plugin: a shared library exporting `gaspar_handler_entry`.
    #[arg(long, env = "GASPARD_HANDLER", value_name = "PATH")]
    pub handler: PathBuf,

    /// TCP port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "GASPARD_PORT", default_value_t = 10123)]
    pub port: u16,

    /// Address or host name to listen on; a name is resolved at start, and
    /// the first of its addresses is used. Exposing the port beyond this host
    /// is a deliberate choice.
    #[arg(
        long,
        env = "GASPARD_BIND",
        default_value = "127.0.0.1",
        value_name = "ADDR|HOST"
    )]
    pub bind: String,

    /// Accept clients only from these addresses (ADDR or ADDR/PREFIX, IPv4 or
    /// IPv6; repeat the flag or separate with commas). Others are reset at
    /// accept, before any byte is read [default: any address].
    #[arg(
        long,
        env = "GASPARD_ALLOW",
        value_name = "CIDR[,CIDR...]",
        value_delimiter = ','
    )]
    pub allow: Vec<Cidr>,

    /// Number of worker processes [default: the CPUs available to gaspard].
    /// 0 (with --pool-listen): every request is served by worker hosts.
    #[arg(long, env = "GASPARD_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// A string passed to the handler's init in every worker.
    #[arg(
        long,
        env = "GASPARD_HANDLER_CONFIG",
        default_value = "",
        value_name = "STRING"
    )]
    pub handler_config: String,

    /// Log level: error, warn, info, debug, trace [default: RUST_LOG, else info].
    #[arg(long, env = "GASPARD_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,

    /// Load and validate the handler, print what was found, and exit (like `nginx -t`).
    #[arg(long, env = "GASPARD_CHECK", action = ArgAction::SetTrue, value_parser = parse_switch)]
    pub check: bool,

    /// Largest request accepted, in bytes (suffixes K, M, G); a larger announced
    /// length is reset before anything is allocated.
    #[arg(long, env = "GASPARD_MAX_REQUEST_SIZE", default_value = DEFAULT_MAX_REQUEST_SIZE, value_parser = parse_size, value_name = "BYTES")]
    pub max_request_size: u64,

    /// Seconds a request may run in a worker before it is failed and the worker
    /// replaced (0: no limit). Also how long workers may take to load the
    /// handler at start-up or on reload.
    #[arg(
        long,
        env = "GASPARD_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECS"
    )]
    pub timeout: f64,

    /// Seconds a client has to send its whole request, and to take its whole
    /// reply, before it is dropped (0: no limit).
    #[arg(
        long,
        env = "GASPARD_READ_TIMEOUT",
        default_value_t = 60.0,
        value_name = "SECS"
    )]
    pub read_timeout: f64,

    /// Most client connections open at once; past it, accept pauses.
    #[arg(
        long,
        env = "GASPARD_MAX_CONNECTIONS",
        default_value_t = 16384,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// Most bytes held for clients at once: request bodies being read or
    /// waiting for their reply, and replies not yet taken (suffixes K, M, G).
    /// Over it, bodies that need more than one read wait and accept pauses
    /// until it falls back; a client that does not take its reply is dropped
    /// at --read-timeout as always.
    #[arg(long, env = "GASPARD_MAX_BUFFERED", default_value = DEFAULT_MAX_BUFFERED, value_parser = parse_size, value_name = "BYTES")]
    pub max_buffered: u64,

    /// Most requests waiting for a worker; past it, new requests are reset at once.
    #[arg(
        long,
        env = "GASPARD_MAX_QUEUE",
        default_value_t = 4096,
        value_name = "N"
    )]
    pub max_queue: usize,

    /// Replace a worker after it has served this many requests (0: never), for
    /// handlers that leak.
    #[arg(
        long,
        env = "GASPARD_MAX_REQUESTS",
        default_value_t = 0,
        value_name = "N"
    )]
    pub max_requests: u64,

    /// Add a random 0..=N to each worker's --max-requests, so workers do not
    /// all restart at once.
    #[arg(
        long,
        env = "GASPARD_MAX_REQUESTS_JITTER",
        default_value_t = 0,
        value_name = "N"
    )]
    pub max_requests_jitter: u64,

    /// Requests a worker may hold at once: `auto` stages more behind the
    /// request a busy worker runs only while its handler calls are quick (up
    /// to about 2 ms of them), so the worker does not idle for the round trip
    /// to the daemon, and takes them back if the call turns out slow (a
    /// request with a body of 16 KiB or more is never staged); a number N
    /// (1 to 64) fixes it. 1 is strictly one at a time.
    #[arg(long, env = "GASPARD_WORKER_CREDIT", default_value = "auto", value_name = "auto|N",
          value_parser = parse_credit)]
    pub worker_credit: Credit,

    /// How workers are linked to the daemon: `local` (a socket pair and a
    /// pipe per worker, the fastest) or `zmq` (gaspar's libzmq PUSH/PULL,
    /// over ipc:// endpoints in the runtime directory, whose path must then
    /// be at most 60 bytes).
    #[arg(long, env = "GASPARD_LINK", value_enum, default_value_t = LinkKind::Local)]
    pub link: LinkKind,

    /// Accept worker hosts (`gaspard worker --connect`) on this zmq endpoint,
    /// e.g. tcp://0.0.0.0:10124; their workers serve beside the local ones.
    /// Without --pool-key only a loopback address is accepted, unless
    /// --pool-insecure is given.
    #[arg(long, env = "GASPARD_POOL_LISTEN", value_name = "tcp://ADDR:PORT")]
    pub pool_listen: Option<String>,

    /// The daemon's CURVE key pair (`gaspard keygen PREFIX` writes
    /// PREFIX.key): worker hosts must know its public half (--server-key).
    #[arg(
        long,
        env = "GASPARD_POOL_KEY",
        value_name = "FILE",
        requires = "pool_authorized"
    )]
    pub pool_key: Option<PathBuf>,

    /// The worker hosts' public keys that may join, one per line (`#`
    /// comments), like ssh's authorized_keys.
    #[arg(
        long,
        env = "GASPARD_POOL_AUTHORIZED",
        value_name = "FILE",
        requires = "pool_key"
    )]
    pub pool_authorized: Option<PathBuf>,

    /// Let --pool-listen take a non-loopback address without CURVE: anyone
    /// who can reach the port can join and see requests.
    #[arg(long, env = "GASPARD_POOL_INSECURE", value_parser = parse_switch, default_value = "false",
          num_args = 0..=1, default_missing_value = "true")]
    pub pool_insecure: bool,

    /// The largest message a worker host may send (a reply, suffixes K, M,
    /// G): a host that sends more is cut off. It also bounds what a peer
    /// that is no host can make the daemon hold while it connects.
    #[arg(long, env = "GASPARD_POOL_MAX_REPLY", default_value = "64M", value_parser = parse_size, value_name = "BYTES")]
    pub pool_max_reply: u64,

    /// Seconds without a word from a worker host before it is given up on
    /// (and the requests it held fail); heartbeats go both ways three times
    /// as often.
    #[arg(
        long,
        env = "GASPARD_POOL_HEARTBEAT_TIMEOUT",
        default_value_t = 3.0,
        value_name = "SECONDS"
    )]
    pub pool_heartbeat_timeout: f64,

    /// Length of the kernel's queue of connections not yet accepted.
    #[arg(
        long,
        env = "GASPARD_BACKLOG",
        default_value_t = 4096,
        value_name = "N"
    )]
    pub backlog: i32,

    /// Seconds a graceful stop waits for accepted requests before giving up on
    /// them, counted from when the port closes (after --drain-delay).
    #[arg(
        long,
        env = "GASPARD_SHUTDOWN_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECS"
    )]
    pub shutdown_timeout: f64,

    /// Seconds to keep accepting after SIGTERM/SIGINT while `/healthz` already
    /// says 503 `draining`, so that a load balancer notices and stops sending
    /// before the port closes: at least the time its health check takes to
    /// mark gaspard down (interval times failures needed). 0, the default,
    /// for gaspard alone: the port closes at once. A second signal ends the
    /// delay early, still gracefully.
    #[arg(
        long,
        env = "GASPARD_DRAIN_DELAY",
        default_value_t = 0.0,
        value_name = "SECS"
    )]
    pub drain_delay: f64,

    /// After binding the port, run the daemon and its workers as this user.
    #[arg(long, env = "GASPARD_USER", value_name = "USER")]
    pub user: Option<String>,

    /// With --user: run as this group instead of the user's own. Refused
    /// without --user, which would leave gaspard running as root.
    #[arg(long, env = "GASPARD_GROUP", value_name = "GROUP")]
    pub group: Option<String>,

    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9123).
    #[arg(long, env = "GASPARD_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Directory for the workers' private copies of the handler [default: $RUNTIME_DIRECTORY, else a new temporary one].
    #[arg(long, env = "GASPARD_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

pub use gaspar_protocol::parse_size;

/// --max-request-size when not given (also what a worker host sizes its
/// workers' body areas for).
pub const DEFAULT_MAX_REQUEST_SIZE: &str = "64M";
/// --max-buffered when not given (likewise).
pub const DEFAULT_MAX_BUFFERED: &str = "1G";

/// A size flag's default, in bytes.
pub fn default_size(text: &str) -> usize {
    let bytes = parse_size(text).expect("a default size parses");
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Everything the daemon needs, validated: `--check` builds it too, so that
/// it refuses what the daemon would.
#[derive(Debug, Clone)]
pub struct Config {
    pub handler: PathBuf,
    pub handler_config: String,
    pub listen: SocketAddr,
    /// The clients' addresses that may connect; empty: any.
    pub allow: Vec<Cidr>,
    pub workers: usize,
    pub max_request_size: u32,
    /// `None`: requests may run forever.
    pub timeout: Option<Duration>,
    /// `None`: clients may take forever to send a request or take a reply.
    pub read_timeout: Option<Duration>,
    pub max_connections: usize,
    pub max_buffered: usize,
    pub max_queue: usize,
    /// `None`: workers are never recycled.
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    pub worker_credit: Credit,
    pub link: LinkKind,
    /// --pool-listen and its settings: `None`, no worker hosts.
    pub pool: Option<PoolFlags>,
    pub backlog: i32,
    pub shutdown_timeout: Duration,
    /// How long a graceful stop keeps accepting before it drains.
    pub drain_delay: Duration,
    pub runtime_dir: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub metrics: Option<SocketAddr>,
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let seconds = |flag: &'static str, value: f64| {
            Duration::try_from_secs_f64(value).map_err(|_| ConfigError::Seconds { flag, value })
        };
        // Changing the group alone takes root (CAP_SETGID), and keeps it: a
        // drop that is no drop at all. Refused rather than done quietly.
        if let (Some(group), None) = (&cli.group, &cli.user) {
            return Err(ConfigError::GroupWithoutUser(group.clone()));
        }
        let timeout = seconds("timeout", cli.timeout)?;
        let read_timeout = seconds("read-timeout", cli.read_timeout)?;
        // The frame header is 32 bits, and its all-ones value announces the
        // persistent extension rather than a request.
        let protocol_limit = gaspar_protocol::MAX_PAYLOAD;
        let max_request_size = u32::try_from(cli.max_request_size)
            .ok()
            .filter(|&size| u64::from(size) <= protocol_limit)
            .ok_or(ConfigError::RequestSize(cli.max_request_size))?;
        // Half the slots: a reload runs old and new workers side by side.
        let workers = cli.workers.unwrap_or_else(default_workers);
        if workers > MAX_WORKERS {
            return Err(ConfigError::TooManyWorkers(workers));
        }
        let pool = pool_flags(
            cli,
            seconds("pool-heartbeat-timeout", cli.pool_heartbeat_timeout)?,
        )?;
        if workers == 0 && pool.is_none() {
            return Err(ConfigError::NoWorkers);
        }
        if cli.link == LinkKind::Zmq && workers > MAX_ZMQ_WORKERS {
            return Err(ConfigError::TooManyZmqWorkers(workers));
        }
        Ok(Config {
            handler: cli.handler.clone(),
            handler_config: cli.handler_config.clone(),
            listen: resolve_bind(&cli.bind, cli.port)?,
            allow: cli.allow.clone(),
            workers,
            max_request_size,
            timeout: (!timeout.is_zero()).then_some(timeout),
            read_timeout: (!read_timeout.is_zero()).then_some(read_timeout),
            max_connections: cli.max_connections.max(1),
            max_buffered: usize::try_from(cli.max_buffered).unwrap_or(usize::MAX),
            max_queue: cli.max_queue,
            max_requests: (cli.max_requests > 0).then_some(cli.max_requests),
            max_requests_jitter: cli.max_requests_jitter,
            worker_credit: cli.worker_credit,
            link: cli.link,
            pool,
            backlog: cli.backlog.max(1),
            shutdown_timeout: seconds("shutdown-timeout", cli.shutdown_timeout)?,
            drain_delay: seconds("drain-delay", cli.drain_delay)?,
            runtime_dir: cli
                .runtime_dir
                .clone()
                .or_else(runtime_directory_from_systemd),
            user: cli.user.clone(),
            group: cli.group.clone(),
            metrics: cli.metrics,
        })
    }
}

/// The longest --pool-heartbeat-timeout taken (longer is this).
const MAX_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The pool's flags, checked: a `tcp://` endpoint, loopback unless CURVE or
/// --pool-insecure.
fn pool_flags(cli: &Cli, heartbeat_timeout: Duration) -> Result<Option<PoolFlags>, ConfigError> {
    let Some(listen) = &cli.pool_listen else {
        return Ok(None);
    };
    let host = crate::pool::endpoint_host(listen)
        .ok_or_else(|| ConfigError::PoolEndpoint(listen.clone()))?;
    let curve = cli.pool_key.clone().zip(cli.pool_authorized.clone());
    if curve.is_none() && !crate::pool::is_loopback(host) && !cli.pool_insecure {
        return Err(ConfigError::PoolInsecure(listen.clone()));
    }
    // libzmq binds interfaces and addresses, not names.
    let listen = if host == "localhost" {
        listen.replacen("localhost", "127.0.0.1", 1)
    } else {
        listen.clone()
    };
    Ok(Some(PoolFlags {
        listen,
        curve,
        heartbeat_timeout: heartbeat_timeout
            .clamp(Duration::from_millis(30), MAX_HEARTBEAT_TIMEOUT),
        max_reply: cli.pool_max_reply,
    }))
}

/// `--bind`: an IP address (IPv6 with or without brackets), or a host name
/// resolved now, once. A name with several addresses (`localhost` may be
/// 127.0.0.1 and ::1) gets the first, in the resolver's order of preference
/// (`/etc/gai.conf`), and the log says which of them.
fn resolve_bind(host: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| ConfigError::Resolve {
            host: host.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    let (chosen, note) = first_address(host, &addrs)?;
    log::info!("{note}");
    Ok(chosen)
}

/// The address a name's `addrs` give, and the log line that says so.
fn first_address(host: &str, addrs: &[SocketAddr]) -> Result<(SocketAddr, String), ConfigError> {
    let (&chosen, rest) = addrs
        .split_first()
        .ok_or_else(|| ConfigError::NoAddress(host.to_string()))?;
    let note = if rest.is_empty() {
        format!("--bind {host} resolves to {}", chosen.ip())
    } else {
        let all: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
        format!(
            "--bind {host} resolves to {}: binding the first, {}",
            all.join(", "),
            chosen.ip()
        )
    };
    Ok((chosen, note))
}

/// The value of an on/off flag set by its environment variable
/// (`GASPARD_CHECK=1`). clap's plain `bool` takes only `true` and `false`;
/// this takes the usual spellings, and names them when refusing another.
fn parse_switch(text: &str) -> Result<bool, ConfigError> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Switch(text.to_string())),
    }
}

/// `--worker-credit`: `auto`, or a number from 1 to 64.
fn parse_credit(text: &str) -> Result<Credit, ConfigError> {
    if text == "auto" {
        return Ok(Credit::Auto);
    }
    match text.parse::<usize>() {
        Ok(n @ 1..=64) => Ok(Credit::Fixed(n)),
        _ => Err(ConfigError::Credit(text.to_string())),
    }
}

/// A block of addresses, `ADDR/PREFIX` (an `--allow` entry). The protocol
/// has no authentication, so this is how an operator says who may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// With every bit past the prefix zero.
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `addr` is in the block. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, how a dual-stack socket sees IPv4 clients) is
    /// matched as the IPv4 address it is.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, addr.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(addr)) => {
                u32::from(addr) & mask_v4(self.prefix) == u32::from(network)
            }
            (IpAddr::V6(network), IpAddr::V6(addr)) => {
                u128::from(addr) & mask_v6(self.prefix) == u128::from(network)
            }
            _ => false,
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl std::str::FromStr for Cidr {
    type Err = ConfigError;

    /// `ADDR` (one address: /32 or /128) or `ADDR/PREFIX`.
    fn from_str(text: &str) -> Result<Cidr, ConfigError> {
        let bad = || ConfigError::Cidr(text.to_string());
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            // Digits only: `u8::from_str` would take "+8".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= bits)
                .ok_or_else(bad)?,
            Some(_) => return Err(bad()),
        };
        let (network, prefix) = match addr {
            IpAddr::V4(v4) => (IpAddr::V4((u32::from(v4) & mask_v4(prefix)).into()), prefix),
            // A block of IPv4-mapped addresses is that IPv4 block, as
            // peers are matched (see `contains`).
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => {
                    let prefix = prefix - 96;
                    (IpAddr::V4((u32::from(v4) & mask_v4(prefix)).into()), prefix)
                }
                _ => (
                    IpAddr::V6((u128::from(v6) & mask_v6(prefix)).into()),
                    prefix,
                ),
            },
        };
        if network != addr.to_canonical() {
            return Err(ConfigError::CidrHostBits {
                text: text.to_string(),
                network,
                prefix,
            });
        }
        Ok(Cidr { network, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// systemd's `$RUNTIME_DIRECTORY` (the first, if RuntimeDirectory= names several).
fn runtime_directory_from_systemd() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = dirs.to_str()?.split(':').next()?;
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// The CPUs this process may run on (affinity and cgroup quota included).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_timeout_means_none_and_size_must_fit_the_header() {
        let cli = Cli::parse_from(["gaspard", "--handler", "x.so", "--timeout", "0"]);
        let config = Config::from_cli(&cli).unwrap();
        assert_eq!(config.timeout, None);
        assert_eq!(config.listen.to_string(), "127.0.0.1:10123");
        let cli = Cli::parse_from(["gaspard", "--handler", "x.so", "--max-request-size", "5G"]);
        assert!(Config::from_cli(&cli)
            .unwrap_err()
            .to_string()
            .contains("--max-request-size 5368709120 exceeds"));
    }

    fn cidr(text: &str) -> Result<Cidr, ConfigError> {
        text.parse()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn drain_delay_is_zero_unless_set_and_never_negative() {
        let parse = |args: &[&str]| {
            let cli = Cli::parse_from([&["gaspard", "--handler", "x.so"], args].concat());
            Config::from_cli(&cli)
        };
        assert_eq!(parse(&[]).unwrap().drain_delay, Duration::ZERO);
        assert_eq!(
            parse(&["--drain-delay", "2.5"]).unwrap().drain_delay,
            Duration::from_millis(2500)
        );
        assert_eq!(
            parse(&["--drain-delay=-1"]).unwrap_err(),
            ConfigError::Seconds {
                flag: "drain-delay",
                value: -1.0
            }
        );
    }

    #[test]
    fn a_cidr_is_an_address_with_an_optional_prefix() {
        assert_eq!(cidr("10.1.0.0/16").unwrap().to_string(), "10.1.0.0/16");
        assert_eq!(cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(cidr("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(cidr("::1").unwrap().to_string(), "::1/128");
        assert_eq!(cidr("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").unwrap().to_string(), "::/0");
        // A block of IPv4-mapped addresses is the IPv4 block.
        assert_eq!(
            cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0",
            "localhost",
            "10.0.0.0 /8",
            "[::1]",
        ] {
            assert_eq!(
                cidr(bad),
                Err(ConfigError::Cidr(bad.to_string())),
                "{bad:?}"
            );
        }
        let typo = cidr("10.0.0.1/8").unwrap_err();
        assert_eq!(
            typo.to_string(),
            "10.0.0.1/8 has bits set past /8: did you mean 10.0.0.0/8?"
        );
        assert!(cidr("2001:db8::1/32").is_err());
    }

    #[test]
    fn a_cidr_contains_the_addresses_under_its_prefix() {
        let block = cidr("10.1.0.0/16").unwrap();
        assert!(block.contains(ip("10.1.0.0")));
        assert!(block.contains(ip("10.1.255.255")));
        assert!(!block.contains(ip("10.2.0.0")));
        assert!(!block.contains(ip("10.0.255.255")));
        let one = cidr("127.0.0.2").unwrap();
        assert!(one.contains(ip("127.0.0.2")));
        assert!(!one.contains(ip("127.0.0.1")));
        assert!(cidr("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        let v6 = cidr("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(
            !v6.contains(ip("10.1.0.1")),
            "no IPv4 address is in an IPv6 block"
        );
        assert!(
            !block.contains(ip("::a01:1")),
            "nor an IPv4-compatible IPv6 one in an IPv4 block"
        );
        assert!(cidr("::/0").unwrap().contains(ip("::1")));
        assert!(!cidr("::/0").unwrap().contains(ip("127.0.0.1")));
    }

    #[test]
    fn an_ipv4_mapped_peer_is_matched_as_ipv4() {
        assert!(cidr("10.1.0.0/16").unwrap().contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.1.0.0/16").unwrap().contains(ip("::ffff:10.2.2.3")));
        assert!(cidr("::ffff:10.1.0.0/112")
            .unwrap()
            .contains(ip("10.1.2.3")));
        assert!(cidr("::ffff:10.1.0.0/112")
            .unwrap()
            .contains(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn allow_takes_repeated_flags_and_comma_lists() {
        let allow = |args: &[&str]| {
            Cli::try_parse_from([&["gaspard", "--handler", "x.so"], args].concat())
                .map(|cli| cli.allow.iter().map(Cidr::to_string).collect::<Vec<_>>())
        };
        assert_eq!(allow(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(
            allow(&["--allow", "10.0.0.0/8,::1", "--allow", "192.0.2.1"]).unwrap(),
            ["10.0.0.0/8", "::1/128", "192.0.2.1/32"]
        );
        let error = allow(&["--allow", "10.0.0.0/8,nonsense"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("not \"nonsense\""), "{error}");
        let config = Config::from_cli(&Cli::parse_from([
            "gaspard",
            "--handler",
            "x.so",
            "--allow",
            "127.0.0.2/32",
        ]))
        .unwrap();
        assert_eq!(config.allow, [cidr("127.0.0.2/32").unwrap()]);
    }

    /// What clap makes of an on/off flag's environment variable: the
    /// value goes through the flag's value parser, tried here directly
    /// (setting variables in a multi-threaded test process is not safe).
    #[test]
    fn a_switch_takes_the_usual_spellings_and_names_them_when_refusing() {
        let mut command = <Cli as clap::CommandFactory>::command();
        command.build();
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_id() == "check")
            .unwrap();
        use clap::builder::TypedValueParser;
        fn parse(
            parser: &impl TypedValueParser<Value = bool>,
            command: &clap::Command,
            arg: &clap::Arg,
            value: &str,
        ) -> Result<bool, String> {
            parser
                .parse_ref(command, Some(arg), std::ffi::OsStr::new(value))
                .map_err(|e| e.to_string())
        }
        let switch = &parse_switch;
        for on in ["1", "true", "yes", "on", "TRUE", "Yes", "ON"] {
            assert_eq!(parse(switch, &command, arg, on), Ok(true), "{on:?}");
        }
        for off in ["0", "false", "no", "off", "False", "NO", "Off"] {
            assert_eq!(parse(switch, &command, arg, off), Ok(false), "{off:?}");
        }
        for bad in ["maybe", "2", ""] {
            let error = parse(switch, &command, arg, bad).unwrap_err();
            assert!(error.contains("--check"), "{bad:?}: {error}");
            assert!(error.contains("1, true, yes, on"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn bind_takes_an_address_or_a_name_resolved_to_its_first_address() {
        let listen = |bind: &str| {
            let cli = Cli::parse_from([
                "gaspard",
                "--handler",
                "x.so",
                "--port",
                "9",
                "--bind",
                bind,
            ]);
            Config::from_cli(&cli).map(|config| config.listen.to_string())
        };
        assert_eq!(listen("127.0.0.1").unwrap(), "127.0.0.1:9");
        assert_eq!(listen("0.0.0.0").unwrap(), "0.0.0.0:9");
        assert_eq!(listen("::1").unwrap(), "[::1]:9");
        assert_eq!(listen("[::1]").unwrap(), "[::1]:9");
        let local = listen("localhost").unwrap().parse::<SocketAddr>().unwrap();
        assert!(local.ip().is_loopback(), "{local}");
        assert_eq!(local.port(), 9);
        let error = listen("no-such-host.invalid").unwrap_err().to_string();
        assert!(
            error.starts_with("--bind no-such-host.invalid: cannot resolve it: "),
            "{error}"
        );

        let v4: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(
            first_address("localhost", &[v6, v4]).unwrap(),
            (
                v6,
                "--bind localhost resolves to ::1, 127.0.0.1: binding the first, ::1".to_string()
            )
        );
        assert_eq!(
            first_address("localhost", &[v4]).unwrap().1,
            "--bind localhost resolves to 127.0.0.1"
        );
        assert_eq!(
            first_address("nothing", &[]).unwrap_err().to_string(),
            "--bind nothing: the name has no address"
        );
    }

    #[test]
    fn group_is_refused_without_user() {
        let config = |args: &[&str]| {
            let cli = Cli::parse_from([&["gaspard", "--handler", "x.so"], args].concat());
            Config::from_cli(&cli).map_err(|e| e.to_string())
        };
        assert_eq!(
            config(&["--group", "nogroup"]).unwrap_err(),
            "--group nogroup needs --user: changing the group alone would leave gaspard running as root"
        );
        let both = config(&["--user", "nobody", "--group", "nogroup"]).unwrap();
        assert_eq!(both.user.as_deref(), Some("nobody"));
        assert_eq!(both.group.as_deref(), Some("nogroup"));
        assert_eq!(config(&["--user", "nobody"]).unwrap().group, None);
    }

    #[test]
    fn worker_credit_is_auto_by_default_or_a_number_from_1_to_64() {
        let credit = |args: &[&str]| {
            Cli::try_parse_from([&["gaspard", "--handler", "x.so"], args].concat())
                .map(|cli| cli.worker_credit)
        };
        assert_eq!(credit(&[]).unwrap(), Credit::Auto);
        assert_eq!(credit(&["--worker-credit", "auto"]).unwrap(), Credit::Auto);
        assert_eq!(credit(&["--worker-credit", "1"]).unwrap(), Credit::Fixed(1));
        assert_eq!(
            credit(&["--worker-credit", "64"]).unwrap(),
            Credit::Fixed(64)
        );
        for bad in ["0", "65", "-1", "two", ""] {
            assert!(credit(&["--worker-credit", bad]).is_err(), "{bad:?}");
        }
    }
}
