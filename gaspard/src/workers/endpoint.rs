//! How one worker is reached, as the workers part sees it.

use super::claims::{Claims, Ticket};
use super::dispatcher::{Assignment, RequestId};
use super::link::Link;

/// How one worker is reached: today the local link (a socket pair and a
/// reply pipe) and its claim entries. The dispatcher sees only what it
/// needs of a worker: requests sent with a ticket, replies received, and
/// whether a staged request was started (or can still be taken back).
pub(super) struct Endpoint {
    pub(super) link: Link,
    pub(super) claims: Claims,
}

impl Endpoint {
    /// Stages request `id` in its claim entry before the worker can see it,
    /// then queues it; the payload is shared with the dispatcher, not copied.
    pub(super) fn send(&mut self, assignment: Assignment) {
        let Assignment {
            id,
            ticket,
            payload,
            ..
        } = assignment;
        self.claims.stage(ticket, id);
        self.link.queue_request(id, ticket.encode(), payload);
    }

    /// Whether the worker had started request `id` (it may have run).
    pub(super) fn started(&self, ticket: Ticket, id: RequestId) -> bool {
        self.claims.started(ticket, id)
    }

    /// Takes back request `id` if the worker has not started it.
    pub(super) fn withdraw(&self, ticket: Ticket, id: RequestId) -> bool {
        self.claims.withdraw(ticket, id)
    }
}
