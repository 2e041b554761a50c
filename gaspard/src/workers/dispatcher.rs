//! Requests between a client and a worker: ids, the FIFO queue, which worker
//! holds which request, and deadlines.
//!
//! Requests go to the least loaded worker, so a request never waits at a
//! busy worker while another is idle, and when a worker dies only the
//! request it had started fails (`claims.rs`; the others go to other
//! workers). How many a worker may hold is its [`Credit`]: by default a busy
//! worker is given more (staged behind the one it runs) only while its
//! requests are quick, so that it never idles for the round trip to the
//! daemon, yet nothing is staged behind a long request.
//!
//! The dispatcher knows connections only by an opaque key and workers only by
//! slot number; it does no I/O.

use super::areas::RequestBody;
use super::claims::{Ticket, ENTRIES};
use super::ClientKey;
use crate::config::Credit;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

pub(crate) type RequestId = u64;

/// A request's bytes, shared with the link that sends them: kept until the
/// reply, so that a request staged at a worker that dies before starting it
/// can go to another.
pub(crate) type Payload = Rc<RequestBody>;

/// Hashes request ids for the request map. They are the daemon's own
/// sequential numbers, never chosen by a client, so they need no defence
/// against keys crafted to collide (what SipHash, std's default, is for,
/// at about a sixth of the daemon's instructions per pipelined request):
/// one multiplication by an odd constant spreads them, keeping consecutive
/// ids in distinct buckets.
#[derive(Default)]
struct IdHasher(u64);

const SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(SPREAD);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(SPREAD);
    }
}

/// Where a request is.
#[derive(Debug)]
enum Place {
    /// Waiting for a worker.
    Queued(Payload),
    /// Sent to the worker in this slot, under `ticket` (`claims.rs`); its
    /// deadline, if any (only the request a worker runs has one; staged ones
    /// wait for theirs).
    Running {
        slot: usize,
        ticket: Ticket,
        deadline: Option<Instant>,
        payload: Payload,
    },
}

#[derive(Debug)]
struct Request {
    /// The client's connection key; `None` once the client has gone, so the
    /// reply is discarded but the worker's credit still returns.
    client: Option<usize>,
    place: Place,
}

#[derive(Debug, Default)]
struct WorkerLoad {
    /// It takes new requests: ready, and not being retired or killed.
    open: bool,
    /// The requests it holds, oldest (the one it runs) first. Replies come
    /// back mostly in order, so one leaves from the front.
    held: VecDeque<RequestId>,
    /// The claim entries its requests are in (a bit each; `claims.rs`).
    entries: u64,
    /// Each entry's last generation.
    generations: Vec<u16>,
    /// A request staged here could not be taken back: the worker has moved
    /// on to it, and the call that was slow has ended. Nothing more is
    /// tried until its next reply.
    take_back_failed: bool,
    /// When the worker started the first request it holds.
    busy_since: Option<Instant>,
    /// How long its handler calls take, in microseconds: rises at once to
    /// a slower call, falls slowly after quicker ones. `None`: no call yet.
    service_micros: Option<u32>,
    /// A worker host of the pool: the credit it gave (many workers behind
    /// one slot, running several requests at once, which it times out
    /// itself). Its requests have no deadline here and are never taken
    /// back (there are no claims to take them back with).
    remote_credit: Option<usize>,
}

impl WorkerLoad {
    /// A free claim entry, under a new generation (credit never exceeds the
    /// entries, so there is one).
    fn take_entry(&mut self) -> Ticket {
        debug_assert!(self.entries != u64::MAX, "every claim entry is in use");
        let entry = (!self.entries).trailing_zeros() as usize % ENTRIES;
        self.entries |= 1 << entry;
        if self.generations.len() < ENTRIES {
            self.generations.resize(ENTRIES, 0);
        }
        self.generations[entry] = self.generations[entry].wrapping_add(1);
        Ticket {
            entry,
            generation: self.generations[entry],
        }
    }

    fn free_entry(&mut self, ticket: Ticket) {
        self.entries &= !(1 << ticket.entry);
    }

    /// Forgets a request it held.
    fn release(&mut self, id: RequestId) {
        if let Some(at) = self.held.iter().position(|&held| held == id) {
            self.held.remove(at);
        }
    }
}

/// Whether a busy worker's running call has turned out slow, with requests
/// staged behind it that can still be taken back.
fn is_stuck(load: &WorkerLoad, now: Instant) -> bool {
    load.remote_credit.is_none()
        && load.held.len() > 1
        && !load.take_back_failed
        && load
            .busy_since
            .is_some_and(|since| now >= since + SLOW_CALL)
}

/// The most handler time the requests staged at a busy worker may add up to.
pub(crate) const STAGE_BUDGET: Duration = Duration::from_millis(2);
/// The most requests a worker holds under [`Credit::Auto`].
pub(crate) const MAX_AUTO_CREDIT: usize = ENTRIES;
/// Under [`Credit::Auto`], a request with a body this large is never staged
/// behind a busy worker: it waits for the first worker free. Staging saves
/// a round trip to the worker, which a large body's own transfer outweighs,
/// and it binds the request to one worker. Side by side at 1 MiB and four
/// connections: 0.85-0.89x the baseline with one request per worker,
/// 0.77-0.82x staged.
pub(crate) const UNSTAGED_BODY: usize = super::areas::MIN_BODY;
/// A call that has run this long stops staging at its worker, and what is
/// staged behind it may be taken back: the budget, whatever the handler's
/// usual time. Not less: on a busy (virtual) machine a worker may wait a
/// scheduler slice (1.4 ms here) just to run, which must not count as a slow
/// call. With 500 µs, one request in six at 256 echo clients was taken back
/// and sent again, for 0.61-0.71x the baseline; with 2 ms (and only as many
/// taken back as others can take), 0.68-0.87x.
pub(crate) const SLOW_CALL: Duration = STAGE_BUDGET;

/// Why a worker's reply completes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotHeld {
    /// The request was already settled (failed when its worker timed out).
    Settled,
    /// Another worker holds it, or it is queued: the worker that answered
    /// it never had it.
    ByOther,
}

/// A request to hand to a worker now.
#[derive(Debug)]
pub(crate) struct Assignment {
    pub(crate) slot: usize,
    pub(crate) id: RequestId,
    /// Its claim ticket.
    pub(crate) ticket: Ticket,
    pub(crate) payload: Payload,
}

pub(crate) struct Dispatcher {
    requests: HashMap<RequestId, Request, BuildHasherDefault<IdHasher>>,
    /// The ids of the requests waiting for a worker, in arrival order.
    queue: VecDeque<RequestId>,
    workers: Vec<WorkerLoad>,
    credit: Credit,
    timeout: Option<Duration>,
    /// How long a worker host may hold a request before it is given up on:
    /// --timeout (which the host enforces) plus its heartbeat timeout. A
    /// backstop against a host that heartbeats but never answers.
    remote_timeout: Option<Duration>,
    next_id: RequestId,
    /// Where the search for an idle worker starts, so work spreads over all of them.
    cursor: usize,
}

impl Dispatcher {
    pub(crate) fn new(credit: Credit, timeout: Option<Duration>) -> Dispatcher {
        Dispatcher {
            requests: HashMap::default(),
            queue: VecDeque::new(),
            workers: Vec::new(),
            credit: match credit {
                Credit::Fixed(n) => Credit::Fixed(n.max(1)),
                Credit::Auto => Credit::Auto,
            },
            timeout,
            remote_timeout: None,
            next_id: 1,
            cursor: 0,
        }
    }

    /// Sets the backstop for requests held by worker hosts.
    pub(crate) fn set_remote_timeout(&mut self, timeout: Option<Duration>) {
        self.remote_timeout = timeout;
    }

    /// Changes --timeout for requests that start from now on (a worker
    /// host learns it from the daemon it joins).
    pub(crate) fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Queues a client's request.
    pub(crate) fn submit(&mut self, client: ClientKey, payload: RequestBody) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.insert(
            id,
            Request {
                client: Some(client),
                place: Place::Queued(Rc::new(payload)),
            },
        );
        self.queue.push_back(id);
        id
    }

    /// Whether request `id` waits for a worker.
    pub(crate) fn is_queued(&self, id: RequestId) -> bool {
        self.requests
            .get(&id)
            .is_some_and(|request| matches!(request.place, Place::Queued(_)))
    }

    /// Requests waiting for a worker.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Requests accepted and not yet answered (queued or running).
    pub(crate) fn outstanding(&self) -> usize {
        self.requests.len()
    }

    /// The next request to send and the worker to send it to, if a request is
    /// queued and a worker has credit. The caller must either send it or give
    /// it back with [`Self::unassign`].
    pub(crate) fn next_assignment(&mut self, now: Instant) -> Option<Assignment> {
        let mut slot = self.idle_worker(now)?;
        let (home, large) = self.first_queued().map_or((None, false), |payload| {
            (payload.area_slot(), payload.len() >= UNSTAGED_BODY)
        });
        // A body read into a worker's area goes to that worker if it is as
        // free as the one chosen: no copy then.
        if let Some(home) = home {
            let held = self.workers[slot].held.len();
            if home != slot
                && self.workers.get(home).is_some_and(|load| {
                    load.open && load.held.len() == held && held < self.credit_of(load, now)
                })
            {
                slot = home;
            }
        }
        if self.credit == Credit::Auto
            && !self.workers[slot].held.is_empty()
            && self.workers[slot].remote_credit.is_none()
            && large
        {
            return None;
        }
        loop {
            let id = self.queue.pop_front()?;
            let Some(request) = self.requests.get_mut(&id) else {
                continue; // never the case: a cancelled request leaves the queue
            };
            // The clock starts when the worker starts it: only the first
            // request a worker holds is running; others (credit > 1) wait.
            // A worker host runs what it holds at once, and times it
            // itself: only a backstop here, from when it is sent.
            let load = &self.workers[slot];
            let deadline = if load.remote_credit.is_some() {
                self.remote_timeout.map(|t| now + t)
            } else if load.held.is_empty() {
                self.timeout.map(|t| now + t)
            } else {
                None
            };
            let Place::Queued(payload) = &request.place else {
                unreachable!("only queued requests are in the queue");
            };
            let payload = Rc::clone(payload);
            let load = &mut self.workers[slot];
            let ticket = load.take_entry();
            request.place = Place::Running {
                slot,
                ticket,
                deadline,
                payload: Rc::clone(&payload),
            };
            if load.held.is_empty() {
                load.busy_since = Some(now);
            }
            load.held.push_back(id);
            self.cursor = (slot + 1) % self.workers.len();
            return Some(Assignment {
                slot,
                id,
                ticket,
                payload,
            });
        }
    }

    /// Request `id`'s body now lies in its worker's request area
    /// (`Link::queue_request`): that is the body kept from now on, for the
    /// request to be sent again if need be, and the one it replaces goes.
    pub(crate) fn body_moved(&mut self, id: RequestId, moved: Payload) {
        match self.requests.get_mut(&id) {
            Some(Request {
                place: Place::Running { payload, .. },
                ..
            }) => *payload = moved,
            // `next_assignment` has just made it Running: the body moved is
            // its only copy, and dropping it would free bytes the worker is
            // about to read.
            _ => debug_assert!(false, "request {id} moved its body but is not running"),
        }
    }

    /// Puts back an assignment that could not be sent, at the head of the queue.
    pub(crate) fn unassign(&mut self, assignment: Assignment) {
        let Assignment {
            slot,
            id,
            ticket,
            payload,
        } = assignment;
        let load = &mut self.workers[slot];
        load.release(id);
        load.free_entry(ticket);
        if load.held.is_empty() {
            load.busy_since = None;
        }
        if let Some(request) = self.requests.get_mut(&id) {
            request.place = Place::Queued(payload);
            self.queue.push_front(id);
        }
    }

    /// The body of the request at the head of the queue.
    fn first_queued(&self) -> Option<&Payload> {
        let first = self.queue.front().and_then(|id| self.requests.get(id))?;
        match &first.place {
            Place::Queued(payload) => Some(payload),
            Place::Running { .. } => None,
        }
    }

    fn idle_worker(&self, now: Instant) -> Option<usize> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        // The least loaded worker with credit left, so that a second request
        // (credit > 1) is staged on a busy worker only when none is idle;
        // ties go round-robin from the cursor.
        (0..n)
            .map(|i| (self.cursor + i) % n)
            .filter(|&slot| {
                let load = &self.workers[slot];
                load.open && load.held.len() < self.credit_of(load, now)
            })
            .min_by_key(|&slot| self.workers[slot].held.len())
    }

    /// How many requests a worker may hold now.
    fn credit_of(&self, load: &WorkerLoad, now: Instant) -> usize {
        if let Some(credit) = load.remote_credit {
            return credit;
        }
        let running = load
            .busy_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        // The call it runs has turned out slow: stage nothing more behind
        // it (and what is staged there is taken back).
        if running >= SLOW_CALL {
            return 1;
        }
        match self.credit {
            Credit::Fixed(n) => n.min(ENTRIES),
            Credit::Auto => {
                let Some(micros) = load.service_micros else {
                    return 1;
                };
                let budget = STAGE_BUDGET.as_micros() as usize;
                (1 + budget / (micros as usize).max(1)).min(MAX_AUTO_CREDIT)
            }
        }
    }

    /// A worker can take requests. Slots are numbered by the supervisor and
    /// may grow (SIGTTIN, reloads).
    pub(crate) fn open_worker(&mut self, slot: usize) {
        if self.workers.len() <= slot {
            self.workers.resize_with(slot + 1, WorkerLoad::default);
        }
        // A new worker in the slot: nothing known of its handler times yet.
        let load = &mut self.workers[slot];
        debug_assert!(load.held.is_empty(), "a new worker holds nothing");
        load.open = true;
        load.busy_since = None;
        load.service_micros = None;
        load.entries = 0;
        load.take_back_failed = false;
        load.remote_credit = None;
    }

    /// A worker host can take `credit` requests (at most [`ENTRIES`]: each
    /// held request has a claim ticket, even where no claims are shared).
    pub(crate) fn open_remote(&mut self, slot: usize, credit: usize) {
        self.open_worker(slot);
        self.set_remote_credit(slot, credit);
    }

    /// A worker host's credit changed.
    pub(crate) fn set_remote_credit(&mut self, slot: usize, credit: usize) {
        if let Some(load) = self.workers.get_mut(slot) {
            load.remote_credit = Some(credit.min(ENTRIES));
        }
    }

    /// The worker in `slot` answered request `id`, after its handler ran
    /// `micros`. Returns the client to answer, if it is still there. A reply
    /// for a request that worker does not hold is refused: for one already
    /// settled (its worker was given up on) it is dropped; from a worker
    /// that never held it, it means the worker cannot be trusted.
    pub(crate) fn complete(
        &mut self,
        slot: usize,
        id: RequestId,
        micros: u32,
        now: Instant,
    ) -> Result<Option<ClientKey>, NotHeld> {
        let Entry::Occupied(held) = self.requests.entry(id) else {
            return Err(NotHeld::Settled);
        };
        let ticket = match held.get().place {
            Place::Running {
                slot: held_by,
                ticket,
                ..
            } if held_by == slot => ticket,
            _ => return Err(NotHeld::ByOther),
        };
        let request = held.remove();
        let load = &mut self.workers[slot];
        load.release(id);
        load.free_entry(ticket);
        load.take_back_failed = false;
        // Up at once, down slowly: one slow call stops staging at once, and
        // a few quick ones do not make a slow handler look quick.
        load.service_micros = Some(match load.service_micros {
            Some(before) if micros < before => before - (before - micros) / 8,
            _ => micros,
        });
        load.busy_since = (!load.held.is_empty()).then_some(now);
        // The worker takes its next request now: start that one's clock
        // (a worker host times its requests itself).
        let timed = self.workers[slot].remote_credit.is_none();
        if let Some(&next) = self.workers[slot].held.front().filter(|_| timed) {
            if let Some(Request {
                place: Place::Running { deadline, .. },
                ..
            }) = self.requests.get_mut(&next)
            {
                if deadline.is_none() {
                    *deadline = self.timeout.map(|t| now + t);
                }
            }
        }
        Ok(request.client)
    }

    /// How many more requests ready workers could take right now.
    pub(crate) fn idle_credit(&self, now: Instant) -> usize {
        self.workers
            .iter()
            .filter(|load| load.open)
            .map(|load| self.credit_of(load, now).saturating_sub(load.held.len()))
            .sum()
    }

    /// Stops giving a worker requests (it is being retired, or killed).
    pub(crate) fn close_worker(&mut self, slot: usize) {
        if let Some(load) = self.workers.get_mut(slot) {
            load.open = false;
        }
    }

    /// When the worker in `slot` started the first request it holds.
    pub(crate) fn busy_since(&self, slot: usize) -> Option<Instant> {
        self.workers.get(slot).and_then(|load| load.busy_since)
    }

    /// Whether the worker in `slot` takes new requests.
    pub(crate) fn is_open(&self, slot: usize) -> bool {
        self.workers.get(slot).is_some_and(|load| load.open)
    }

    /// How many requests the worker in `slot` holds.
    pub(crate) fn held(&self, slot: usize) -> usize {
        self.workers.get(slot).map_or(0, |load| load.held.len())
    }

    /// The worker in `slot` died, and every reply it sent was taken.
    /// `started(ticket, id)` says whether it had claimed a request (see
    /// `claims.rs`): those may have run, and fail (returned, with their
    /// clients if any still wait). The others never started and go back to
    /// the head of the queue, in order, for another worker (returned: their
    /// clients).
    pub(crate) fn worker_died(
        &mut self,
        slot: usize,
        started: impl Fn(Ticket, RequestId) -> bool,
    ) -> (Vec<(RequestId, Option<ClientKey>)>, Vec<usize>) {
        let Some(load) = self.workers.get_mut(slot) else {
            return (Vec::new(), Vec::new());
        };
        load.open = false;
        load.busy_since = None;
        load.entries = 0;
        load.take_back_failed = false;
        let held = std::mem::take(&mut load.held);
        let mut failed = Vec::new();
        let mut requeued = Vec::new();
        for &id in held.iter().rev() {
            let Some(Request {
                place: Place::Running {
                    ticket, payload, ..
                },
                client,
            }) = self.requests.get(&id)
            else {
                continue;
            };
            let client = *client;
            if started(*ticket, id) {
                self.requests.remove(&id);
                failed.push((id, client));
                continue;
            }
            let Some(client) = client else {
                self.requests.remove(&id); // nobody waits for it
                continue;
            };
            let payload = Rc::clone(payload);
            self.requeue(id, payload);
            requeued.push(client);
        }
        failed.reverse();
        requeued.reverse();
        (failed, requeued)
    }

    /// Puts a request back at the head of the queue.
    fn requeue(&mut self, id: RequestId, payload: Payload) {
        if let Some(request) = self.requests.get_mut(&id) {
            request.place = Place::Queued(payload);
            self.queue.push_front(id);
        }
    }

    /// Requests staged at workers whose running call has turned out slow
    /// (run for [`SLOW_CALL`]), as many as other workers have room for now:
    /// they should be taken back, before the room goes to newer requests.
    /// Returns (slot, id, ticket) for each, to be tried with the worker's
    /// claims: then [`Self::taken_back`] or [`Self::take_back_failed`].
    pub(crate) fn stuck(&self, now: Instant) -> Vec<(usize, RequestId, Ticket)> {
        let mut stuck = Vec::new();
        if !self.workers.iter().any(|load| is_stuck(load, now)) {
            return stuck;
        }
        // Only as many as other workers can take now: the rest would only
        // wait in the queue for the same worker instead.
        let mut room = self.room_elsewhere(now);
        for (slot, load) in self.workers.iter().enumerate() {
            if !is_stuck(load, now) {
                continue;
            }
            for &id in load.held.iter().skip(1) {
                if room == 0 {
                    return stuck;
                }
                room -= 1;
                if let Some(Request {
                    place: Place::Running { ticket, .. },
                    ..
                }) = self.requests.get(&id)
                {
                    stuck.push((slot, id, *ticket));
                }
            }
        }
        stuck
    }

    /// Local workers whose running call has run [`SLOW_CALL`] with requests
    /// behind it, or (with `deadlines`) whose running request is past its
    /// deadline: replies they finished before it and have not announced
    /// yet (`link.rs`) should be taken now rather than wait for that call.
    pub(crate) fn in_long_calls(
        &self,
        now: Instant,
        deadlines: bool,
    ) -> impl Iterator<Item = usize> + '_ {
        self.workers
            .iter()
            .enumerate()
            .filter(move |(_, load)| {
                let slow = load.held.len() > 1
                    && load
                        .busy_since
                        .is_some_and(|since| now >= since + SLOW_CALL);
                let overdue = || {
                    deadlines
                        && load.held.front().is_some_and(|id| {
                            matches!(
                                self.requests.get(id).map(|request| &request.place),
                                Some(Place::Running { deadline: Some(at), .. }) if *at <= now
                            )
                        })
                };
                load.remote_credit.is_none() && (slow || overdue())
            })
            .map(|(slot, _)| slot)
    }

    /// How many requests workers that are not stuck could take now.
    fn room_elsewhere(&self, now: Instant) -> usize {
        self.workers
            .iter()
            .filter(|load| load.open && !is_stuck(load, now))
            .map(|load| self.credit_of(load, now).saturating_sub(load.held.len()))
            .sum()
    }

    /// When [`Self::stuck`] may next find something, for the loop's timeout.
    /// A worker already stuck counts only while another has room: else
    /// nothing can change before a reply or a new worker wakes the loop
    /// anyway (and waking it every millisecond meanwhile is waste).
    pub(crate) fn next_stuck(&self, now: Instant) -> Option<Instant> {
        let room = self.room_elsewhere(now) > 0;
        self.workers
            .iter()
            .filter(|load| {
                load.held.len() > 1 && !load.take_back_failed && load.remote_credit.is_none()
            })
            .filter_map(|load| Some(load.busy_since? + SLOW_CALL))
            .filter(|&at| at > now || room)
            .min()
    }

    /// The daemon took request `id` back from its worker before it started:
    /// it waits at the head of the queue again (taken back in reverse
    /// order, requests keep their order). Returns its client, if it still
    /// has one; a request nobody waits for is dropped.
    pub(crate) fn taken_back(&mut self, id: RequestId) -> Option<usize> {
        let Some(Request {
            place:
                Place::Running {
                    slot,
                    ticket,
                    payload,
                    ..
                },
            client,
        }) = self.requests.get(&id)
        else {
            return None;
        };
        let (slot, ticket, payload, client) = (*slot, *ticket, Rc::clone(payload), *client);
        let load = &mut self.workers[slot];
        load.release(id);
        load.free_entry(ticket);
        if client.is_none() {
            self.requests.remove(&id);
            return None;
        }
        self.requeue(id, payload);
        client
    }

    /// The worker in `slot` had already started a request the daemon tried
    /// to take back: its slow call is over. Nothing more is tried there
    /// until its next reply.
    pub(crate) fn take_back_failed(&mut self, slot: usize) {
        if let Some(load) = self.workers.get_mut(slot) {
            load.take_back_failed = true;
        }
    }

    /// The requests running past their deadline, taken from their clients
    /// (returned, to be failed) while their workers, about to be killed,
    /// still hold them: `worker_died` then knows which request each ran.
    /// Those workers take nothing more.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(usize, RequestId, Option<ClientKey>)> {
        let mut expired = Vec::new();
        // Only the first request a worker holds runs, so only it has a deadline.
        for (slot, load) in self.workers.iter_mut().enumerate() {
            let Some(request) = load.held.front().and_then(|id| self.requests.get_mut(id)) else {
                continue;
            };
            if let Place::Running { deadline, .. } = &mut request.place {
                if deadline.is_some_and(|at| at <= now) {
                    *deadline = None;
                    load.open = false;
                    expired.push((slot, load.held[0], request.client.take()));
                }
            }
        }
        expired
    }

    /// The worker in `slot` cannot be trusted with what it held (its link
    /// broke): it takes no more requests, and every request it held fails.
    /// Returns them with their clients.
    pub(crate) fn worker_lost(&mut self, slot: usize) -> Vec<(RequestId, ClientKey)> {
        let Some(load) = self.workers.get_mut(slot) else {
            return Vec::new();
        };
        load.open = false;
        load.busy_since = None;
        load.entries = 0;
        load.take_back_failed = false;
        std::mem::take(&mut load.held)
            .into_iter()
            .filter_map(|id| Some((id, self.requests.remove(&id)?.client?)))
            .collect()
    }

    /// The client of `id` went away: a queued request is dropped, a running
    /// one's reply will be discarded.
    pub(crate) fn client_gone(&mut self, id: RequestId) {
        let Some(request) = self.requests.get_mut(&id) else {
            return;
        };
        match request.place {
            Place::Queued(_) => {
                self.requests.remove(&id);
                // Rare (a client that gives up while its request waits),
                // and the queue is bounded by --max-queue.
                if let Some(at) = self.queue.iter().position(|&queued| queued == id) {
                    self.queue.remove(at);
                }
            }
            Place::Running { .. } => request.client = None,
        }
    }

    /// Fails every queued request (no worker will take them). Returns them
    /// with their clients.
    pub(crate) fn fail_queued(&mut self) -> Vec<(RequestId, ClientKey)> {
        let mut clients = Vec::new();
        for id in self.queue.drain(..) {
            if let Some(client) = self.requests.remove(&id).and_then(|r| r.client) {
                clients.push((id, client));
            }
        }
        clients
    }

    /// The earliest deadline of a running request, for the loop's timeout.
    /// Only the first request a worker holds runs, so only it is looked at
    /// (as [`Self::expire`] does): this runs every loop turn, and a worker
    /// may hold 64.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.workers
            .iter()
            .filter_map(|load| load.held.front())
            .filter_map(|id| match self.requests.get(id)?.place {
                Place::Running { deadline, .. } => deadline,
                Place::Queued(_) => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_ids_hash_apart() {
        use std::hash::BuildHasher;
        let ids: BuildHasherDefault<IdHasher> = BuildHasherDefault::default();
        // The low bits pick the bucket: 4096 consecutive ids, 4096 buckets.
        let mut buckets: Vec<u64> = (1..=4096u64).map(|id| ids.hash_one(id) & 4095).collect();
        buckets.sort_unstable();
        buckets.dedup();
        assert_eq!(buckets.len(), 4096);
        // The top 7 bits (hashbrown's tag) vary too.
        let tags: std::collections::HashSet<u64> =
            (1..=512u64).map(|id| ids.hash_one(id) >> 57).collect();
        assert!(tags.len() > 64, "{} tags", tags.len());
    }

    #[test]
    fn an_idle_worker_never_waits_behind_a_busy_one() {
        let mut d = Dispatcher::new(Credit::Fixed(1), None);
        d.open_worker(0);
        d.open_worker(1);
        let now = Instant::now();
        let a = d.submit(10, b"a".to_vec().into());
        let b = d.submit(11, b"b".to_vec().into());
        let c = d.submit(12, b"c".to_vec().into());
        let first = d.next_assignment(now).unwrap();
        let second = d.next_assignment(now).unwrap();
        assert_eq!((first.id, second.id), (a, b));
        assert_ne!(first.slot, second.slot);
        assert!(
            d.next_assignment(now).is_none(),
            "both workers hold their credit"
        );
        assert_eq!(d.complete(second.slot, b, 5, Instant::now()), Ok(Some(11)));
        let third = d.next_assignment(now).unwrap();
        assert_eq!((third.id, third.slot), (c, second.slot));
    }

    #[test]
    fn with_more_credit_busy_workers_take_a_second_request_only_when_none_is_idle() {
        let mut d = Dispatcher::new(Credit::Fixed(2), None);
        d.open_worker(0);
        d.open_worker(1);
        let now = Instant::now();
        for client in 0..5 {
            d.submit(client, vec![].into());
        }
        let slots: Vec<usize> = (0..4)
            .map(|_| d.next_assignment(now).unwrap().slot)
            .collect();
        assert_ne!(slots[0], slots[1], "the first two go to different workers");
        assert_eq!(d.held(0), 2);
        assert_eq!(d.held(1), 2);
        assert!(d.next_assignment(now).is_none());
    }

    /// Runs one request through worker 0 so that its handler time is known.
    /// Submits `n` requests and hands each to a worker; their assignments.
    fn assign(d: &mut Dispatcher, n: usize, now: Instant) -> Vec<Assignment> {
        (0..n)
            .map(|client| {
                let id = d.submit(client, vec![].into());
                let assignment = d.next_assignment(now).unwrap();
                assert_eq!(assignment.id, id);
                assignment
            })
            .collect()
    }

    fn timed(d: &mut Dispatcher, micros: u32, now: Instant) {
        let id = d.submit(99, vec![].into());
        let assignment = d.next_assignment(now).unwrap();
        assert_eq!(assignment.id, id);
        d.complete(assignment.slot, id, micros, Instant::now())
            .unwrap();
    }

    #[test]
    fn auto_credit_stages_behind_quick_requests_only() {
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(30)));
        d.open_worker(0);
        let now = Instant::now();
        for client in 0..100 {
            d.submit(client, vec![].into());
        }
        d.next_assignment(now).unwrap();
        assert!(
            d.next_assignment(now).is_none(),
            "nothing is staged before a handler call was timed"
        );
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(30)));
        d.open_worker(0);
        timed(&mut d, 100, now);
        for client in 0..100 {
            d.submit(client, vec![].into());
        }
        let mut taken = 0;
        while d.next_assignment(now).is_some() {
            taken += 1;
        }
        assert_eq!(taken, 21, "2 ms of 100 µs calls behind the running one");
        assert_eq!(d.idle_credit(now), 0);
    }

    #[test]
    fn a_body_read_into_a_workers_area_goes_to_it_when_it_is_as_free_as_any() {
        use crate::workers::areas::RequestArea;
        use crate::workers::claims::{area_len_for, Claims};
        let now = Instant::now();
        let (claims, _fd) = Claims::create(area_len_for(1 << 20)).unwrap();
        let claims = Rc::new(claims);
        let mut area = RequestArea::default();
        let mut read_into = |slot| {
            let mut body = area.place(&claims, slot, 20_000).unwrap();
            body.unfilled().fill(7);
            body.filled(20_000);
            RequestBody::Area(body)
        };
        let mut d = Dispatcher::new(Credit::Fixed(1), None);
        d.open_worker(0);
        d.open_worker(1);
        // Both idle: the cursor would pick 0, the body's area is 1's.
        let at1 = d.submit(1, read_into(1));
        let first = d.next_assignment(now).unwrap();
        assert_eq!((first.id, first.slot), (at1, 1));
        // Worker 1 busy, 0 idle: it goes to 0 (and is copied there) rather
        // than wait.
        let also_at1 = d.submit(2, read_into(1));
        let second = d.next_assignment(now).unwrap();
        assert_eq!((second.id, second.slot), (also_at1, 0));
    }

    #[test]
    fn auto_credit_never_stages_a_large_body_but_waits_for_a_free_worker() {
        let now = Instant::now();
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(30)));
        d.open_worker(0);
        d.open_worker(1);
        // Both workers' calls are timed: both would stage.
        timed(&mut d, 100, now);
        timed(&mut d, 100, now);
        let large = vec![0; UNSTAGED_BODY];
        let [first, second, third] = [1, 2, 3].map(|client| d.submit(client, large.clone().into()));
        let one = d.next_assignment(now).unwrap();
        let two = d.next_assignment(now).unwrap();
        assert_eq!((one.id, two.id), (first, second));
        assert_ne!(one.slot, two.slot);
        assert!(d.next_assignment(now).is_none(), "both busy: it waits");
        // A small request behind it waits too: the queue keeps its order.
        let small = d.submit(4, vec![1; 16].into());
        assert!(d.next_assignment(now).is_none());
        d.complete(two.slot, second, 100, Instant::now()).unwrap();
        let next = d.next_assignment(now).unwrap();
        assert_eq!(
            (next.id, next.slot),
            (third, two.slot),
            "to the worker free first"
        );
        // Small ones are staged as before.
        assert_eq!(d.next_assignment(now).map(|a| a.id), Some(small));
        // And a fixed credit stages whatever the size.
        let mut d = Dispatcher::new(Credit::Fixed(2), None);
        d.open_worker(0);
        d.submit(1, large.clone().into());
        d.submit(2, large.into());
        assert!(d.next_assignment(now).is_some() && d.next_assignment(now).is_some());
    }

    #[test]
    fn auto_credit_stages_nothing_after_a_slow_call_or_behind_a_long_running_one() {
        let now = Instant::now();
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(30)));
        d.open_worker(0);
        timed(&mut d, 10, now);
        // One slow call is enough to stop staging at once...
        timed(&mut d, 5_000, now);
        d.submit(1, vec![].into());
        d.submit(2, vec![].into());
        d.next_assignment(now).unwrap();
        assert!(
            d.next_assignment(now).is_none(),
            "one at a time after a slow call"
        );

        // ...and a quick worker whose request has run for SLOW_CALL gets
        // nothing behind it.
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(30)));
        d.open_worker(0);
        timed(&mut d, 10, now);
        d.submit(1, vec![].into());
        d.submit(2, vec![].into());
        d.next_assignment(now).unwrap();
        assert!(d.next_assignment(now + SLOW_CALL).is_none());
        assert!(d.next_assignment(now + SLOW_CALL / 2).is_some());

        // Nor one whose calls take 1 ms.
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(30)));
        d.open_worker(0);
        timed(&mut d, 1_000, now);
        d.submit(1, vec![].into());
        d.submit(2, vec![].into());
        d.next_assignment(now).unwrap();
        assert!(d.next_assignment(now + STAGE_BUDGET).is_none());
        assert!(d.next_assignment(now + STAGE_BUDGET / 2).is_some());
    }

    #[test]
    fn a_staged_request_gets_its_deadline_when_its_worker_starts_it() {
        let timeout = Duration::from_secs(1);
        let mut d = Dispatcher::new(Credit::Fixed(2), Some(timeout));
        d.open_worker(0);
        let start = Instant::now();
        let first = d.submit(1, vec![].into());
        let second = d.submit(2, vec![].into());
        d.next_assignment(start).unwrap();
        d.next_assignment(start).unwrap();
        assert_eq!(
            d.next_deadline(),
            Some(start + timeout),
            "only the first runs"
        );
        d.complete(0, first, 5, Instant::now()).unwrap();
        let restarted = d.next_deadline().unwrap();
        assert!(restarted > start + timeout, "the second's clock starts now");
        d.complete(0, second, 5, Instant::now()).unwrap();
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn a_worker_cannot_answer_a_request_it_does_not_hold() {
        let mut d = Dispatcher::new(Credit::Fixed(1), None);
        d.open_worker(0);
        d.open_worker(1);
        let now = Instant::now();
        let [on0, on1] = [d.submit(1, vec![].into()), d.submit(2, vec![].into())];
        d.next_assignment(now).unwrap();
        d.next_assignment(now).unwrap();
        let queued = d.submit(3, vec![].into());
        assert_eq!(d.complete(1, on0, 5, Instant::now()), Err(NotHeld::ByOther));
        assert_eq!(
            d.complete(0, queued, 5, Instant::now()),
            Err(NotHeld::ByOther)
        );
        assert_eq!(d.complete(0, 999, 5, Instant::now()), Err(NotHeld::Settled));
        assert_eq!(
            (d.held(0), d.held(1), d.queued()),
            (1, 1, 1),
            "nothing moved"
        );
        assert_eq!(
            d.complete(0, on0, 5, Instant::now()),
            Ok(Some(1)),
            "its own worker still can"
        );
        assert_eq!(d.complete(1, on1, 5, Instant::now()), Ok(Some(2)));
    }

    #[test]
    fn a_lost_worker_fails_exactly_its_requests() {
        let mut d = Dispatcher::new(Credit::Fixed(1), None);
        d.open_worker(0);
        d.open_worker(1);
        let now = Instant::now();
        d.submit(1, vec![].into());
        d.submit(2, vec![].into());
        d.submit(3, vec![].into());
        let on0 = d.next_assignment(now).unwrap();
        let _on1 = d.next_assignment(now).unwrap();
        assert_eq!(d.worker_lost(on0.slot), vec![(on0.id, 1)]);
        assert_eq!(d.outstanding(), 2);
        assert!(
            d.next_assignment(now).is_none(),
            "the lost worker takes nothing"
        );
        assert_eq!(
            d.complete(on0.slot, on0.id, 5, Instant::now()),
            Err(NotHeld::Settled),
            "a late reply from the dead worker is ignored"
        );
    }

    #[test]
    fn a_dead_worker_fails_the_request_it_ran_and_gives_back_the_staged_ones() {
        let mut d = Dispatcher::new(Credit::Fixed(3), None);
        d.open_worker(0);
        let now = Instant::now();
        let ids: Vec<RequestId> = (0..4)
            .map(|client| d.submit(client, vec![client as u8].into()))
            .collect();
        for _ in 0..3 {
            d.next_assignment(now).unwrap();
        }
        assert_eq!(d.complete(0, ids[0], 5, Instant::now()), Ok(Some(0)));
        // It died running ids[1] (claimed); ids[2] was staged behind it.
        let ran = ids[1];
        assert_eq!(
            d.worker_died(0, |_, id| id == ran),
            (vec![(ids[1], Some(1))], vec![2])
        );
        assert_eq!(d.queued(), 2);
        d.open_worker(0);
        let again = d.next_assignment(now).unwrap();
        assert_eq!(
            (again.id, &again.payload[..]),
            (ids[2], &[2u8][..]),
            "first, in order"
        );
        assert_eq!(d.next_assignment(now).unwrap().id, ids[3]);
    }

    #[test]
    fn a_body_moved_into_an_area_is_the_one_kept_and_sent_again() {
        let mut d = Dispatcher::new(Credit::Fixed(2), None);
        d.open_worker(0);
        let now = Instant::now();
        let id = d.submit(7, vec![1; 32].into());
        let sent = d.next_assignment(now).unwrap();
        let first = Rc::downgrade(&sent.payload);
        drop(sent);
        // The link moved it: the dispatcher keeps that one, and the body it
        // came from goes.
        let moved: Payload = Rc::new(vec![2; 32].into());
        d.body_moved(id, Rc::clone(&moved));
        assert!(first.upgrade().is_none(), "the first body is freed");
        // Taken back (or left by a dead worker), it goes again as it lies.
        assert_eq!(d.taken_back(id), Some(7));
        let again = d.next_assignment(now).unwrap();
        assert!(Rc::ptr_eq(&again.payload, &moved));
    }

    #[test]
    fn a_worker_that_started_none_of_its_requests_gives_all_of_them_back() {
        let mut d = Dispatcher::new(Credit::Fixed(3), None);
        d.open_worker(0);
        let now = Instant::now();
        let assigned = assign(&mut d, 3, now);
        let ids: Vec<RequestId> = assigned.iter().map(|a| a.id).collect();
        let entries: Vec<usize> = assigned.iter().map(|a| a.ticket.entry).collect();
        assert_eq!(entries, vec![0, 1, 2], "each in its own claim entry");
        assert_eq!(d.worker_died(0, |_, _| false), (vec![], vec![0, 1, 2]));
        d.open_worker(0);
        let order: Vec<RequestId> = (0..3).map(|_| d.next_assignment(now).unwrap().id).collect();
        assert_eq!(order, ids, "in their first order");
    }

    #[test]
    fn requests_staged_behind_a_call_that_turns_out_slow_can_be_taken_back() {
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(30)));
        d.open_worker(0);
        d.open_worker(1);
        let now = Instant::now();
        timed(&mut d, 10, now);
        // Worker 1 is busy too, so three go to worker 0: one runs, two wait.
        let other = d.submit(9, vec![].into());
        let on1 = d.next_assignment(now).unwrap();
        assert_eq!((on1.id, on1.slot), (other, 1));
        let ids: Vec<RequestId> = (0..3)
            .map(|client| d.submit(client, vec![].into()))
            .collect();
        let mut on0 = Vec::new();
        while let Some(assignment) = d.next_assignment(now) {
            if assignment.slot == 0 {
                on0.push((assignment.id, assignment.ticket));
            }
        }
        assert!(on0.len() >= 2, "staged at worker 0: {on0:?}");
        assert_eq!(d.stuck(now), vec![], "nothing is slow yet");
        let later = now + SLOW_CALL;
        assert_eq!(d.next_stuck(now), Some(later));
        assert_eq!(
            d.stuck(later),
            vec![],
            "worker 1's call is as slow: nobody could take them"
        );
        d.complete(1, other, 10, Instant::now()).unwrap();
        let stuck = d.stuck(later);
        let expected: Vec<_> = on0[1..]
            .iter()
            .map(|&(id, ticket)| (0, id, ticket))
            .collect();
        assert_eq!(stuck, expected, "all but the one running");
        for &(_, id, _) in stuck.iter().rev() {
            assert!(d.taken_back(id).is_some(), "its client waits");
        }
        assert_eq!(d.held(0), 1);
        assert_eq!(d.queued(), stuck.len());
        // They go to the free worker, in their order; the slow one gets
        // none of them back.
        let order: Vec<RequestId> = (0..stuck.len())
            .map(|_| d.next_assignment(later).unwrap())
            .inspect(|a| assert_eq!(a.slot, 1))
            .map(|a| a.id)
            .collect();
        assert_eq!(order, stuck.iter().map(|s| s.1).collect::<Vec<_>>());
        assert!(ids.iter().all(|id| d.requests.contains_key(id)));
    }

    #[test]
    fn only_as_many_are_taken_back_as_other_workers_can_take() {
        let mut d = Dispatcher::new(Credit::Fixed(3), None);
        d.open_worker(0);
        let now = Instant::now();
        let on0 = assign(&mut d, 3, now);
        // Worker 1 starts later and holds two of its three.
        d.open_worker(1);
        let later = now + SLOW_CALL;
        for client in 3..5 {
            d.submit(client, vec![].into());
            assert_eq!(d.next_assignment(later).unwrap().slot, 1);
        }
        assert_eq!(d.stuck(later), vec![(0, on0[1].id, on0[1].ticket)]);
        assert_eq!(d.next_stuck(later), Some(later));
        // Nobody can take any: nothing is taken back, and the loop is not
        // woken for it (a reply will wake it).
        d.submit(5, vec![].into());
        assert_eq!(d.next_assignment(later).unwrap().slot, 1);
        assert_eq!(d.stuck(later), vec![]);
        assert_eq!(
            d.next_stuck(later),
            Some(later + SLOW_CALL),
            "only when worker 1's call may turn slow"
        );
        assert_eq!(d.next_stuck(now), Some(later), "not slow yet: woken then");
    }

    #[test]
    fn a_failed_take_back_stops_further_tries_until_the_next_reply() {
        let mut d = Dispatcher::new(Credit::Fixed(3), Some(Duration::from_secs(30)));
        d.open_worker(0);
        let now = Instant::now();
        let assigned = assign(&mut d, 3, now);
        let ids: Vec<RequestId> = assigned.iter().map(|a| a.id).collect();
        // An idle worker could take them.
        d.open_worker(1);
        // Fixed credit too: 2 ms is slow.
        let later = now + SLOW_CALL;
        assert_eq!(d.stuck(later).len(), 2);
        d.take_back_failed(0);
        assert_eq!(d.stuck(later), vec![], "no retry on every loop turn");
        assert_eq!(d.next_stuck(later), None);
        d.complete(0, ids[0], 5, Instant::now()).unwrap();
        assert!(d.next_stuck(later).is_some(), "tried again after a reply");
        // A client gone: taking its request back drops it.
        d.client_gone(ids[2]);
        assert_eq!(d.taken_back(ids[2]), None);
        assert_eq!(d.queued(), 0);
        // Entries come back with a new generation each time they are used.
        d.close_worker(1);
        let again = d.submit(7, vec![].into());
        let assignment = d.next_assignment(Instant::now()).unwrap();
        assert_eq!(assignment.id, again);
        // Entry 0, freed by the reply, is the lowest free one.
        assert_eq!(assignment.ticket.entry, assigned[0].ticket.entry);
        assert_ne!(assignment.ticket.generation, assigned[0].ticket.generation);
    }

    #[test]
    fn an_overdue_request_is_failed_at_once_and_its_worker_settled_at_death() {
        let timeout = Duration::from_secs(1);
        let mut d = Dispatcher::new(Credit::Fixed(2), Some(timeout));
        d.open_worker(0);
        d.open_worker(1);
        let now = Instant::now();
        let slow = d.submit(1, vec![].into());
        let other = d.submit(2, vec![].into());
        let staged = d.submit(3, vec![].into());
        let on0 = d.next_assignment(now).unwrap();
        let on1 = d.next_assignment(now).unwrap();
        let behind = d.next_assignment(now).unwrap();
        assert_eq!((on0.id, on1.id, behind.id), (slow, other, staged));
        assert_eq!(behind.slot, on0.slot);
        d.complete(on1.slot, other, 5, Instant::now()).unwrap();
        let late = now + timeout * 2;
        assert_eq!(d.expire(late), vec![(on0.slot, slow, Some(1))]);
        assert_eq!(d.expire(late), vec![], "failed once");
        let next = d.submit(4, vec![].into());
        let assignment = d.next_assignment(late).unwrap();
        assert_eq!(
            (assignment.id, assignment.slot),
            (next, on1.slot),
            "the worker about to be killed takes nothing more"
        );
        assert!(d.next_assignment(late).is_none());
        // At its death the expired request is the one it ran: nobody is
        // told twice, and the staged one goes back to the queue.
        assert_eq!(
            d.worker_died(on0.slot, |_, id| id == slow),
            (vec![(slow, None)], vec![3]),
        );
        assert_eq!(d.next_assignment(late).unwrap().id, staged);
    }

    #[test]
    fn a_worker_host_holds_its_credit_with_no_deadline_and_nothing_to_take_back() {
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_millis(1)));
        d.open_remote(0, 3);
        let now = Instant::now();
        let sent = assign(&mut d, 3, now);
        d.submit(3, vec![].into());
        assert!(
            d.next_assignment(now).is_none(),
            "its credit, 3, is used up"
        );
        let later = now + Duration::from_secs(1);
        assert!(d.expire(later).is_empty(), "the host times its requests");
        assert!(d.stuck(later).is_empty(), "no claims to take back with");
        assert_eq!(d.next_deadline(), None);
        d.set_remote_credit(0, 0);
        assert_eq!(d.complete(0, sent[0].id, 10, Instant::now()), Ok(Some(0)));
        assert!(d.next_assignment(later).is_none(), "its credit went to 0");
        let (failed, requeued) = d.worker_died(0, |_, _| true);
        assert_eq!(
            (failed.len(), requeued.len()),
            (2, 0),
            "a lost host fails all it held"
        );
    }

    #[test]
    fn a_worker_host_that_holds_a_request_past_the_backstop_is_given_up_on() {
        let mut d = Dispatcher::new(Credit::Auto, Some(Duration::from_secs(1)));
        d.set_remote_timeout(Some(Duration::from_secs(5)));
        d.open_remote(0, 2);
        let now = Instant::now();
        let sent = assign(&mut d, 2, now);
        assert_eq!(d.next_deadline(), Some(now + Duration::from_secs(5)));
        assert!(d.expire(now + Duration::from_secs(4)).is_empty());
        let expired = d.expire(now + Duration::from_secs(6));
        assert_eq!(expired, vec![(0, sent[0].id, Some(0))]);
        assert!(d.next_assignment(now).is_none(), "it takes nothing more");
    }

    #[test]
    fn gone_clients_cost_nothing() {
        let mut d = Dispatcher::new(Credit::Fixed(1), Some(Duration::from_secs(1)));
        d.open_worker(0);
        let now = Instant::now();
        let running = d.submit(1, vec![].into());
        let queued = d.submit(2, vec![].into());
        let assignment = d.next_assignment(now).unwrap();
        d.client_gone(queued);
        d.client_gone(running);
        assert_eq!(d.queued(), 0);
        assert_eq!(d.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(
            d.expire(now + Duration::from_secs(2)),
            vec![(0, running, None)],
            "a stuck worker is killed even if nobody waits for it"
        );
        assert_eq!(
            d.complete(0, assignment.id, 5, Instant::now()),
            Ok(None),
            "the reply is discarded"
        );
        assert!(d.next_assignment(now).is_none());
        assert_eq!(d.outstanding(), 0);
    }
}
