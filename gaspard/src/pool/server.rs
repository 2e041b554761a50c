//! The daemon's side of a worker pool: a zmq ROUTER on `--pool-listen`
//! that worker hosts connect to, one DEALER each (see `pool/mod.rs`).
//!
//! It knows hosts by their zmq routing id and turns what they send into
//! [`PoolEvent`]s for the workers part, which gives each host a slot of its
//! own in the dispatcher (one endpoint with the credit the host gives):
//! which host holds which request is the dispatcher's, as for local workers.
//!
//! Liveness: both sides send a heartbeat every third of
//! `--pool-heartbeat-timeout`; a host not heard from for that long is lost,
//! and so are the requests it held. Routing ids are never reused by libzmq,
//! so a host that comes back (a reconnect after a cut) is a new peer: what
//! it still sends of its old session is answered with `Unknown` and
//! dropped, and it says Hello again.
//!
//! Security: with `--pool-key`, the socket is a CURVE server and a ZAP
//! handler (a REP socket on `inproc://zeromq.zap.01`, answered by the loop)
//! lets in only the keys of `--pool-authorized`; a refused key is logged
//! once. Everything a host sends is untrusted: a message that does not
//! parse loses that host.

use super::keys::{self, Key, KeyPair};
use super::protocol::{self, ProtocolError, ToDaemon, ToHost};
use std::collections::{HashMap, HashSet};
use std::io;
use std::time::{Duration, Instant};

/// A worker host, as zmq knows it: its routing id.
pub(crate) type HostId = Vec<u8>;

/// The most worker hosts at once: each has a slot, which every dispatch
/// looks at.
const MAX_HOSTS: usize = 1024;
/// The most refused keys remembered (logged once each while remembered).
const MAX_REFUSED: usize = 4096;

/// The ZAP endpoint libzmq asks for authentication.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// What the daemon is told of the pool.
#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    /// `--pool-listen`, a `tcp://` endpoint.
    pub(crate) listen: String,
    /// `--pool-key` and `--pool-authorized`: CURVE, or `None` (plain TCP).
    pub(crate) curve: Option<(KeyPair, Vec<Key>)>,
    /// `--pool-heartbeat-timeout`.
    pub(crate) heartbeat_timeout: Duration,
    /// `--timeout`, which hosts enforce on their workers.
    pub(crate) request_timeout: Option<Duration>,
    /// The name the daemon's handler reports: a host must run the same.
    pub(crate) handler: String,
    /// --pool-max-reply: the largest message a host may send.
    pub(crate) max_message: u64,
}

/// Why the pool's socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("--pool-listen {endpoint}: {source}")]
    Bind {
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    #[error("worker pool socket: {what}: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: zmq::Error,
    },
    #[error("--pool-key needs a gaspard whose libzmq has CURVE (see gaspard --version)")]
    NoCurve,
}

fn socket_err(what: &'static str) -> impl FnOnce(zmq::Error) -> PoolError {
    move |source| PoolError::Socket { what, source }
}

/// What happened in the pool, for the workers part.
#[derive(Debug)]
pub(crate) enum PoolEvent {
    /// A host said Hello and was welcomed: give it a slot.
    Joined {
        host: HostId,
        credit: u32,
    },
    Credit {
        slot: usize,
        credit: u32,
    },
    Reply {
        slot: usize,
        id: u64,
        micros: u32,
        body: Vec<u8>,
    },
    Failed {
        slot: usize,
        id: u64,
        lost: bool,
        reason: String,
    },
    /// It takes nothing more; it answers what it holds.
    Leaving {
        slot: usize,
    },
    /// It is gone (silent, unreachable, or it broke the protocol): what it
    /// held is lost. `cause` names which, for the metrics.
    Lost {
        slot: usize,
        cause: &'static str,
        why: String,
    },
}

struct Host {
    /// Its slot, once the workers part gave it one.
    slot: Option<usize>,
    address: String,
    last_heard: Instant,
    ready: u32,
    /// How many requests it said it can hold.
    credit: u32,
    /// It said Leaving: it takes nothing more.
    leaving: bool,
}

pub(crate) struct PoolServer {
    router: zmq::Socket,
    zap: Option<zmq::Socket>,
    authorized: HashSet<Key>,
    /// Keys refused, so that each is logged once (at most [`MAX_REFUSED`]
    /// remembered: fresh keys cost nothing to make).
    refused: HashSet<Key>,
    /// Refused keys' lines, one a second at most (throttled).
    refusals: crate::logging::Throttle,
    hosts: HashMap<HostId, Host>,
    heartbeat: Duration,
    timeout: Duration,
    request_timeout: Option<Duration>,
    handler: String,
    next_heartbeat: Instant,
    events: Vec<PoolEvent>,
    endpoint: String,
    // Last: dropped after the sockets.
    _context: zmq::Context,
}

impl PoolServer {
    /// Binds `--pool-listen` (and, with CURVE, the ZAP handler first).
    pub(crate) fn bind(config: &PoolConfig) -> Result<PoolServer, PoolError> {
        let context = zmq::Context::new();
        let router = context.socket(zmq::ROUTER).map_err(socket_err("ROUTER"))?;
        router.set_linger(0).map_err(socket_err("linger"))?;
        // A send to a host that is gone fails instead of vanishing.
        router
            .set_router_mandatory(true)
            .map_err(socket_err("ROUTER_MANDATORY"))?;
        // libzmq takes a frame of whatever size a peer announces, even before
        // its CURVE handshake is over: this bounds it.
        router
            .set_maxmsgsize(i64::try_from(config.max_message).unwrap_or(i64::MAX))
            .map_err(socket_err("MAXMSGSIZE"))?;
        router.set_ipv6(true).map_err(socket_err("IPv6"))?;
        let mut zap = None;
        let mut authorized = HashSet::new();
        if let Some((pair, keys)) = &config.curve {
            if zmq::has("curve") != Some(true) {
                return Err(PoolError::NoCurve);
            }
            let handler = context.socket(zmq::REP).map_err(socket_err("ZAP"))?;
            handler.set_linger(0).map_err(socket_err("ZAP linger"))?;
            handler
                .bind(ZAP_ENDPOINT)
                .map_err(socket_err("binding the ZAP handler"))?;
            zap = Some(handler);
            authorized.extend(keys.iter().copied());
            router
                .set_curve_server(true)
                .map_err(socket_err("CURVE server"))?;
            router
                .set_curve_secretkey(&pair.secret)
                .map_err(socket_err("CURVE secret key"))?;
            router
                .set_zap_domain("gaspard")
                .map_err(socket_err("ZAP domain"))?;
        }
        router
            .bind(&config.listen)
            .map_err(|source| PoolError::Bind {
                endpoint: config.listen.clone(),
                source,
            })?;
        // The port actually bound (`:0` picks one), for the log.
        let endpoint = router
            .get_last_endpoint()
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| config.listen.clone());
        let heartbeat = config.heartbeat_timeout / 3;
        Ok(PoolServer {
            router,
            zap,
            authorized,
            refused: HashSet::new(),
            refusals: crate::logging::Throttle::default(),
            hosts: HashMap::new(),
            heartbeat,
            timeout: config.heartbeat_timeout,
            request_timeout: config.request_timeout,
            handler: config.handler.clone(),
            next_heartbeat: Instant::now() + heartbeat,
            events: Vec::new(),
            endpoint,
            _context: context,
        })
    }

    /// The endpoint bound, for the log.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Puts the pool's sockets into the loop (edge-triggered readable).
    pub(crate) fn register(
        &self,
        registry: &mio::Registry,
        router: mio::Token,
        zap: mio::Token,
    ) -> io::Result<()> {
        let fd = self.router.get_fd()?;
        registry.register(
            &mut mio::unix::SourceFd(&fd),
            router,
            mio::Interest::READABLE,
        )?;
        if let Some(handler) = &self.zap {
            let fd = handler.get_fd()?;
            registry.register(&mut mio::unix::SourceFd(&fd), zap, mio::Interest::READABLE)?;
        }
        Ok(())
    }

    /// How many hosts are connected, and how many workers they have ready.
    pub(crate) fn hosts(&self) -> (usize, usize) {
        let ready = self.hosts.values().map(|host| host.ready as usize).sum();
        (self.hosts.len(), ready)
    }

    /// Whether any host can take requests: joined, not leaving, with credit.
    pub(crate) fn any_serving(&self) -> bool {
        self.hosts
            .values()
            .any(|host| host.slot.is_some() && !host.leaving && host.credit > 0)
    }

    /// Whether a socket may have messages that its (edge-triggered) fd has
    /// not signalled: after a send, libzmq may have taken in messages
    /// without waking the loop.
    pub(crate) fn has_pending(&self) -> bool {
        let readable = |socket: &zmq::Socket| {
            socket
                .get_events()
                .is_ok_and(|events| events.contains(zmq::POLLIN))
        };
        !self.events.is_empty() || readable(&self.router) || self.zap.as_ref().is_some_and(readable)
    }

    /// Takes what the sockets hold, and returns what happened.
    pub(crate) fn take_events(&mut self, now: Instant) -> Vec<PoolEvent> {
        self.answer_zap();
        loop {
            // A host that joined needs its slot before what it sends next.
            if matches!(self.events.last(), Some(PoolEvent::Joined { .. })) {
                break;
            }
            match self.recv() {
                Ok(Some((host, address, frames))) => self.on_message(host, address, frames, now),
                Ok(None) => break,
                Err(e) => {
                    log::error!("worker pool: cannot read its socket: {e}");
                    break;
                }
            }
        }
        std::mem::take(&mut self.events)
    }

    /// One message: the host's routing id, its address, and its frames.
    #[allow(clippy::type_complexity)]
    fn recv(&self) -> Result<Option<(HostId, String, Vec<Vec<u8>>)>, zmq::Error> {
        let mut first = match self.router.recv_msg(zmq::DONTWAIT) {
            Ok(message) => message,
            Err(zmq::Error::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        };
        // The routing id is the ROUTER's own frame; the peer's address is
        // on the frames that came over the wire.
        let mut address = first.gets("Peer-Address").map(str::to_string);
        let host = first.to_vec();
        let mut frames = Vec::new();
        let mut more = first.get_more();
        while more {
            let mut part = self.router.recv_msg(0)?;
            more = part.get_more();
            if address.is_none() {
                address = part.gets("Peer-Address").map(str::to_string);
            }
            // A host that sends more frames than any message has is broken:
            // keep reading them (they are one message), keep no more.
            if frames.len() < 3 {
                frames.push(part.to_vec());
            }
        }
        // The socket takes IPv6 too, so IPv4 peers come as ::ffff:a.b.c.d.
        let address = address.map_or_else(
            || "?".to_string(),
            |a| a.strip_prefix("::ffff:").map_or(a.clone(), str::to_string),
        );
        Ok(Some((host, address, frames)))
    }

    fn on_message(&mut self, id: HostId, address: String, frames: Vec<Vec<u8>>, now: Instant) {
        let message = ToDaemon::decode(frames);
        let Some(host) = self.hosts.get_mut(&id) else {
            return self.on_stranger(id, address, message, now);
        };
        host.last_heard = now;
        // Slots come with Joined, handled before anything else is read.
        let Some(slot) = host.slot else {
            return;
        };
        let event = match message {
            Err(e) => {
                return self.lose(
                    &id,
                    "protocol",
                    &format!("it sent a message that does not parse ({e})"),
                )
            }
            Ok(ToDaemon::Hello { .. }) => return self.lose(&id, "protocol", "it said Hello twice"),
            Ok(ToDaemon::Heartbeat) => return,
            Ok(ToDaemon::Credit { credit, ready }) => {
                host.ready = ready;
                host.credit = credit;
                PoolEvent::Credit { slot, credit }
            }
            Ok(ToDaemon::Reply { id, micros, body }) => PoolEvent::Reply {
                slot,
                id,
                micros,
                body,
            },
            Ok(ToDaemon::Failed { id, lost, reason }) => PoolEvent::Failed {
                slot,
                id,
                lost,
                reason,
            },
            Ok(ToDaemon::Leaving) => {
                log::info!("worker pool: host {} is leaving", host.address);
                host.ready = 0;
                host.leaving = true;
                PoolEvent::Leaving { slot }
            }
        };
        self.events.push(event);
    }

    /// A message from a peer that is not a host (yet): only Hello opens a
    /// session; anything else is told `Unknown`, so that it says Hello.
    fn on_stranger(
        &mut self,
        id: HostId,
        address: String,
        message: Result<ToDaemon, ProtocolError>,
        now: Instant,
    ) {
        let (protocol, abi, credit, handler) = match message {
            Ok(ToDaemon::Hello {
                protocol,
                abi,
                credit,
                handler,
            }) => (protocol, abi, credit, handler),
            Ok(_) => return self.send_quietly(&id, ToHost::Unknown),
            Err(e) => {
                log::warn!(
                    "worker pool: dropped a message from {address} that does not parse ({e})"
                );
                return;
            }
        };
        let refusal = if protocol != protocol::PROTOCOL {
            Some(format!(
                "it speaks pool protocol {protocol}, this daemon speaks {}",
                protocol::PROTOCOL
            ))
        } else if abi != gaspard_handler_abi::ABI_VERSION {
            Some(format!(
                "its handler ABI is version {abi}, this daemon speaks version {}",
                gaspard_handler_abi::ABI_VERSION
            ))
        } else if handler != self.handler {
            Some(format!(
                "it runs handler {handler:?}, this daemon runs {:?}",
                self.handler
            ))
        } else if self.hosts.len() >= MAX_HOSTS {
            Some(format!("{MAX_HOSTS} worker hosts are the most"))
        } else {
            None
        };
        if let Some(reason) = refusal {
            log::error!("worker pool: refused host {address}: {reason}");
            return self.send_quietly(&id, ToHost::Refused { reason });
        }
        log::info!(
            "worker pool: host {address} joined: handler {handler:?} (ABI {abi}), {credit} requests of credit"
        );
        self.hosts.insert(
            id.clone(),
            Host {
                slot: None,
                address,
                last_heard: now,
                ready: 0,
                credit,
                leaving: false,
            },
        );
        let welcome = ToHost::Welcome {
            heartbeat: self.heartbeat,
            timeout: self.request_timeout,
        };
        if self.send(&id, welcome).is_ok() {
            self.events.push(PoolEvent::Joined { host: id, credit });
        } else {
            self.hosts.remove(&id);
        }
    }

    /// The workers part gave `host` its slot.
    pub(crate) fn set_slot(&mut self, host: &HostId, slot: usize) {
        if let Some(host) = self.hosts.get_mut(host) {
            host.slot = Some(slot);
        }
    }

    /// Sends request `id` to `host`. An error means the host is gone (it is
    /// then lost: see [`Self::take_events`]).
    pub(crate) fn send_request(&mut self, host: &HostId, id: u64, payload: &[u8]) -> bool {
        let message = ToHost::Request {
            id,
            payload: payload.to_vec(),
        };
        match self.send(host, message) {
            Ok(()) => true,
            Err(e) => {
                self.lose(
                    host,
                    "unreachable",
                    &format!("a request could not be sent to it ({e})"),
                );
                false
            }
        }
    }

    /// Whether `host` said it is leaving.
    pub(crate) fn is_leaving(&self, host: &HostId) -> bool {
        self.hosts.get(host).is_some_and(|host| host.leaving)
    }

    /// Gives up on the host in `slot`, which broke the rules: a `Lost`
    /// event follows.
    pub(crate) fn drop_slot(&mut self, slot: usize, why: &str) {
        let why = format!("it {why}");
        let id = self
            .hosts
            .iter()
            .find(|(_, host)| host.slot == Some(slot))
            .map(|(id, _)| id.clone());
        if let Some(id) = id {
            self.lose(&id, "protocol", &why);
        }
    }

    /// Forgets a host that left, once it holds nothing: it is told Bye, so
    /// that it knows no request of ours is still on its way to it.
    pub(crate) fn forget(&mut self, host: &HostId) {
        if let Some(left) = self.hosts.remove(host) {
            self.send_quietly(host, ToHost::Bye);
            log::info!("worker pool: host {} left", left.address);
        }
    }

    /// Heartbeats to every host; hosts not heard from for the timeout are
    /// lost.
    pub(crate) fn on_timers(&mut self, now: Instant) -> Vec<PoolEvent> {
        self.refusals.flush(now);
        let silent: Vec<HostId> = self
            .hosts
            .iter()
            .filter(|(_, host)| now.saturating_duration_since(host.last_heard) >= self.timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            let why = format!("nothing heard from it for {:?}", self.timeout);
            self.lose(&id, "heartbeat", &why);
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.heartbeat;
            let ids: Vec<HostId> = self.hosts.keys().cloned().collect();
            for id in ids {
                if let Err(e) = self.send(&id, ToHost::Heartbeat) {
                    let why = format!("a heartbeat could not be sent to it ({e})");
                    self.lose(&id, "unreachable", &why);
                }
            }
        }
        std::mem::take(&mut self.events)
    }

    /// When [`Self::on_timers`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let silent = self
            .hosts
            .values()
            .map(|host| host.last_heard + self.timeout);
        silent.chain([self.next_heartbeat]).min()
    }

    /// Gives up on a host: its requests are lost (a `Lost` event, if it had
    /// a slot). What it sends later is answered `Unknown`.
    fn lose(&mut self, id: &HostId, cause: &'static str, why: &str) {
        let Some(host) = self.hosts.remove(id) else {
            return;
        };
        if let Some(slot) = host.slot {
            self.events.push(PoolEvent::Lost {
                slot,
                cause,
                why: format!("worker host {} lost: {why}", host.address),
            });
        }
    }

    fn send(&self, host: &HostId, message: ToHost) -> Result<(), zmq::Error> {
        let (head, body) = message.encode();
        self.router
            .send(host.as_slice(), zmq::SNDMORE | zmq::DONTWAIT)?;
        match body {
            None => self.router.send(head, zmq::DONTWAIT),
            Some(body) => {
                self.router.send(head, zmq::SNDMORE | zmq::DONTWAIT)?;
                self.router.send(body, zmq::DONTWAIT)
            }
        }
    }

    /// A send whose failure needs no action (the peer is no host of ours).
    fn send_quietly(&self, host: &HostId, message: ToHost) {
        if let Err(e) = self.send(host, message) {
            log::debug!("worker pool: cannot answer a peer: {e}");
        }
    }

    /// Answers libzmq's authentication requests: a CURVE client key is let
    /// in if it is authorized. Each refused key is logged once.
    fn answer_zap(&mut self) {
        let Some(zap) = &self.zap else {
            return;
        };
        loop {
            let frames = match zap.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    log::error!("worker pool: ZAP handler: {e}");
                    return;
                }
            };
            // 1.0, request id, domain, address, identity, mechanism, key.
            // A REP socket must answer every request, malformed or not, or it
            // takes no more.
            let version = frames.first().cloned().unwrap_or_else(|| b"1.0".to_vec());
            let request_id = frames.get(1).cloned().unwrap_or_default();
            let address = frames
                .get(3)
                .map(|a| String::from_utf8_lossy(a).into_owned());
            let key = frames
                .get(6)
                .and_then(|key| Key::try_from(key.as_slice()).ok());
            let allowed = frames.get(5).is_some_and(|m| m == b"CURVE")
                && key.is_some_and(|key| self.authorized.contains(&key));
            if !allowed {
                if let Some(key) = key {
                    if self.refused.len() >= MAX_REFUSED {
                        self.refused.clear();
                    }
                    if self.refused.insert(key) {
                        self.refusals.warn(
                            Instant::now(),
                            format_args!(
                                "worker pool: refused a host at {} whose key {} is not in --pool-authorized",
                                address.as_deref().unwrap_or("?"),
                                keys::encode(&key)
                            ),
                        );
                    }
                }
            }
            let (code, text): (&[u8], &[u8]) = if allowed {
                (b"200", b"OK")
            } else {
                (b"400", b"not authorized")
            };
            let reply: [&[u8]; 6] = [&version, &request_id, code, text, b"", b""];
            if let Err(e) = zap.send_multipart(reply, zmq::DONTWAIT) {
                log::error!("worker pool: ZAP handler cannot answer: {e}");
                return;
            }
        }
    }
}
