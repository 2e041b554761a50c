//! How one worker is reached, as the workers part sees it.

use super::args::LinkArgs;
use super::claims::{Claims, Ticket};
use super::dispatcher::{Assignment, Payload, RequestId};
use super::link::{self, Link, Message};
use super::zmq_link::{ZmqHub, ZmqLink, ZmqLinkError};
use crate::pool::server::HostId;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// How one worker is reached: what carries its frames, and its claim
/// entries. The dispatcher sees only what it needs of a worker: requests
/// sent with a ticket, replies received, and whether a staged request was
/// started (or can still be taken back).
pub(super) struct Endpoint {
    pub(super) carrier: Carrier,
    /// `None` for a worker host: no memory is shared with it.
    /// Shared with the replies still held in its reply area (`areas.rs`).
    pub(super) claims: Option<std::rc::Rc<Claims>>,
}

/// What carries a worker's frames.
pub(super) enum Carrier {
    /// The local link (`link.rs`): the default.
    Local(Link),
    /// `--link zmq` (`zmq_link.rs`): replies arrive on the hub's socket,
    /// shared by every zmq worker, not on the carrier.
    Zmq(ZmqLink),
    /// A worker host of the pool (`pool/server.rs`), which sends and
    /// receives for it: here, only what waits to be sent.
    Remote(RemoteLink),
}

/// What waits to be sent to a worker host.
pub(super) struct RemoteLink {
    pub(super) host: HostId,
    pub(super) outgoing: Vec<(RequestId, Payload)>,
}

/// How new workers are linked to the daemon (--link).
pub(super) enum Linking {
    /// With body areas of `area_len` bytes (`areas.rs`).
    Local {
        area_len: usize,
    },
    Zmq(ZmqHub),
}

/// A new worker's link: the daemon's end, what the worker is told, and the
/// fds it must inherit.
pub(super) struct NewLink {
    pub(super) carrier: Carrier,
    pub(super) args: LinkArgs,
    pub(super) inherit: Vec<OwnedFd>,
}

/// Why a worker's link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot make a worker link: {0}")]
    Local(#[from] io::Error),
    #[error(transparent)]
    Zmq(#[from] ZmqLinkError),
}

impl Linking {
    /// How large each body area of a new worker is: the zmq link has none.
    pub(super) fn area_len(&self) -> usize {
        match self {
            Linking::Local { area_len } => *area_len,
            Linking::Zmq(_) => 0,
        }
    }

    /// Makes the link for worker `incarnation`.
    pub(super) fn open(&self, incarnation: u64) -> Result<NewLink, LinkError> {
        match self {
            Linking::Local { .. } => {
                let (link, ends) = link::pair()?;
                Ok(NewLink {
                    carrier: Carrier::Local(link),
                    args: LinkArgs::Local {
                        requests_fd: ends.requests.as_raw_fd(),
                        replies_fd: ends.replies.as_raw_fd(),
                    },
                    inherit: vec![ends.requests, ends.replies],
                })
            }
            Linking::Zmq(hub) => {
                let (link, args) = hub.open(incarnation)?;
                Ok(NewLink {
                    carrier: Carrier::Zmq(link),
                    args,
                    inherit: Vec::new(),
                })
            }
        }
    }
}

impl Endpoint {
    /// Stages request `id` in its claim entry before the worker can see it,
    /// then queues it; the payload is shared with the dispatcher, not copied
    /// (the zmq link copies it into its message). Returns the payload as it
    /// now lies in the worker's request area, if it was moved there: the
    /// dispatcher keeps that instead (`Link::queue_request`).
    #[must_use = "a payload moved into the area is freed with it: the dispatcher must keep it"]
    pub(super) fn send(&mut self, assignment: Assignment) -> Option<Payload> {
        let Assignment {
            slot,
            id,
            ticket,
            payload,
        } = assignment;
        if let Some(claims) = &self.claims {
            claims.stage(ticket, id);
        }
        match &mut self.carrier {
            Carrier::Local(link) => {
                return link.queue_request(id, ticket.encode(), payload, slot, self.claims.as_ref())
            }
            Carrier::Zmq(link) => link.queue_request(id, ticket.encode(), payload),
            Carrier::Remote(link) => link.outgoing.push((id, payload)),
        }
        None
    }

    /// Whether the worker had started request `id` (it may have run; with
    /// no claims to tell, any may have).
    pub(super) fn started(&self, ticket: Ticket, id: RequestId) -> bool {
        self.claims
            .as_ref()
            .map_or(true, |claims| claims.started(ticket, id))
    }

    /// Takes back request `id` if the worker has not started it.
    pub(super) fn withdraw(&mut self, ticket: Ticket, id: RequestId) -> bool {
        // Its body, if in the area, stays there: the request waits in the
        // queue with it, and goes as it is should this worker take it again.
        self.claims
            .as_ref()
            .is_some_and(|claims| claims.withdraw(ticket, id))
    }

    /// Whether the worker's request area holds pages to give back once it
    /// has been empty a while.
    pub(super) fn area_holds_pages(&self) -> bool {
        matches!(&self.carrier, Carrier::Local(link) if link.area_holds_pages())
    }

    /// The worker is dead, or its link is closed: gives back what its areas
    /// hold but the replies still being written to clients, which keep the
    /// memory mapped.
    pub(super) fn worker_gone(&mut self) {
        if let (Carrier::Local(link), Some(claims)) = (&mut self.carrier, &self.claims) {
            link.worker_gone(claims);
        }
    }

    /// Gives back the request area's pages if it has been empty a while.
    pub(super) fn trim(&mut self, now: std::time::Instant) {
        if let (Carrier::Local(link), Some(claims)) = (&mut self.carrier, &self.claims) {
            link.trim(claims, now);
        }
    }

    /// Puts the endpoint's own fds into the loop (a zmq worker's replies
    /// arrive on the hub, which is registered once).
    pub(super) fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> io::Result<()> {
        match &mut self.carrier {
            Carrier::Local(link) => link.register(registry, token),
            Carrier::Zmq(_) | Carrier::Remote(_) => Ok(()),
        }
    }

    pub(super) fn deregister(&mut self, registry: &mio::Registry) {
        if let Carrier::Local(link) = &mut self.carrier {
            link.deregister(registry);
        }
    }

    /// Sends what is queued; watches for room if some must wait for it. (A
    /// worker host's requests are sent by the pool: `Workers::flush_endpoint`.)
    pub(super) fn flush(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        match &mut self.carrier {
            Carrier::Local(link) => {
                let flushed = link.flush();
                let watched = link.watch_writable(registry, token);
                flushed.and(watched)
            }
            Carrier::Zmq(link) => link.flush(),
            Carrier::Remote(_) => Ok(()),
        }
    }

    /// Forgets what is queued (the worker cannot be written to).
    pub(super) fn discard_output(&mut self, registry: &mio::Registry, token: mio::Token) {
        match &mut self.carrier {
            Carrier::Local(link) => {
                link.discard_output();
                let _ = link.watch_writable(registry, token);
            }
            Carrier::Zmq(link) => link.discard_output(),
            Carrier::Remote(link) => link.outgoing.clear(),
        }
    }

    /// The endpoint's fds were readable: read them again.
    pub(super) fn readable(&mut self) {
        if let Carrier::Local(link) = &mut self.carrier {
            link.readable();
        }
    }

    /// Lets [`Self::try_recv`] take the replies the worker has finished but
    /// not announced yet (see `Link::take_unannounced`).
    pub(super) fn take_unannounced(&mut self) -> io::Result<()> {
        match (&mut self.carrier, &self.claims) {
            (Carrier::Local(link), Some(claims)) => link.take_unannounced(claims),
            _ => Ok(()),
        }
    }

    /// The next message from the worker on this endpoint's own fds.
    pub(super) fn try_recv(&mut self) -> io::Result<Option<Message>> {
        match &mut self.carrier {
            Carrier::Local(link) => link.try_recv(self.claims.as_ref()),
            Carrier::Zmq(_) | Carrier::Remote(_) => Ok(None),
        }
    }
}
