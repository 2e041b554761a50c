//! Requests between a client and a worker: ids, the FIFO queue, which worker
//! holds which request, and deadlines.
//!
//! A worker takes at most `credit` requests at a time (1 by default), so a
//! request never waits behind a long one while another worker is idle, and
//! when a worker dies exactly the requests it held fail.
//!
//! The dispatcher knows connections only by an opaque key and workers only by
//! slot number; it does no I/O.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub type RequestId = u64;

/// Where a request is.
#[derive(Debug)]
enum Place {
    /// Waiting for a worker, with its payload.
    Queued(Vec<u8>),
    /// Sent to the worker in this slot; its deadline, if any.
    Running {
        slot: usize,
        deadline: Option<Instant>,
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
    ready: bool,
    held: Vec<RequestId>,
}

/// A request to hand to a worker now.
#[derive(Debug)]
pub struct Assignment {
    pub slot: usize,
    pub id: RequestId,
    pub payload: Vec<u8>,
}

pub struct Dispatcher {
    requests: HashMap<RequestId, Request>,
    /// Ids in arrival order; ids no longer queued are skipped lazily.
    queue: VecDeque<RequestId>,
    queued: usize,
    workers: Vec<WorkerLoad>,
    credit: usize,
    timeout: Option<Duration>,
    next_id: RequestId,
    /// Where the search for an idle worker starts, so work spreads over all of them.
    cursor: usize,
}

impl Dispatcher {
    pub fn new(credit: usize, timeout: Option<Duration>) -> Dispatcher {
        Dispatcher {
            requests: HashMap::new(),
            queue: VecDeque::new(),
            queued: 0,
            workers: Vec::new(),
            credit: credit.max(1),
            timeout,
            next_id: 1,
            cursor: 0,
        }
    }

    /// Queues a client's request.
    pub fn submit(&mut self, client: usize, payload: Vec<u8>) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.insert(
            id,
            Request {
                client: Some(client),
                place: Place::Queued(payload),
            },
        );
        self.queue.push_back(id);
        self.queued += 1;
        id
    }

    /// Requests waiting for a worker.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Requests accepted and not yet answered (queued or running).
    pub fn outstanding(&self) -> usize {
        self.requests.len()
    }

    /// The next request to send and the worker to send it to, if a request is
    /// queued and a worker has credit. The caller must either send it or give
    /// it back with [`Self::unassign`].
    pub fn next_assignment(&mut self, now: Instant) -> Option<Assignment> {
        let slot = self.idle_worker()?;
        loop {
            let id = self.queue.pop_front()?;
            let Some(request) = self.requests.get_mut(&id) else {
                continue; // cancelled while queued
            };
            // The clock starts when the worker starts it: only the first
            // request a worker holds is running; others (credit > 1) wait.
            let deadline = if self.workers[slot].held.is_empty() {
                self.timeout.map(|t| now + t)
            } else {
                None
            };
            let Place::Queued(payload) =
                std::mem::replace(&mut request.place, Place::Running { slot, deadline })
            else {
                unreachable!("only queued requests are in the queue");
            };
            self.queued -= 1;
            self.workers[slot].held.push(id);
            self.cursor = (slot + 1) % self.workers.len();
            return Some(Assignment { slot, id, payload });
        }
    }

    /// Puts back an assignment that could not be sent, at the head of the queue.
    pub fn unassign(&mut self, assignment: Assignment) {
        let Assignment { slot, id, payload } = assignment;
        self.workers[slot].held.retain(|&held| held != id);
        if let Some(request) = self.requests.get_mut(&id) {
            request.place = Place::Queued(payload);
            self.queue.push_front(id);
            self.queued += 1;
        }
    }

    fn idle_worker(&self) -> Option<usize> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        // The least loaded worker with credit left, so that a second request
        // (credit > 1) is staged on a busy worker only when none is idle;
        // ties go round-robin from the cursor.
        (0..n)
            .map(|i| (self.cursor + i) % n)
            .filter(|&slot| self.workers[slot].ready && self.workers[slot].held.len() < self.credit)
            .min_by_key(|&slot| self.workers[slot].held.len())
    }

    /// A worker can take requests. Slots are numbered by the supervisor and
    /// may grow (SIGTTIN, reloads).
    pub fn worker_ready(&mut self, slot: usize) {
        if self.workers.len() <= slot {
            self.workers.resize_with(slot + 1, WorkerLoad::default);
        }
        self.workers[slot].ready = true;
    }

    /// A worker's reply arrived. Returns the worker's slot and the client to
    /// answer, if it is still there; `None` for ids already failed.
    pub fn complete(&mut self, id: RequestId) -> Option<(usize, Option<usize>)> {
        let Place::Running { slot, .. } = self.requests.get(&id)?.place else {
            return None; // a worker cannot answer a request it was never given
        };
        let request = self.requests.remove(&id)?;
        self.workers[slot].held.retain(|&held| held != id);
        // The worker takes its next request now: start that one's clock.
        if let Some(&next) = self.workers[slot].held.first() {
            if let Some(Request {
                place: Place::Running { deadline, .. },
                ..
            }) = self.requests.get_mut(&next)
            {
                if deadline.is_none() {
                    *deadline = self.timeout.map(|t| Instant::now() + t);
                }
            }
        }
        Some((slot, request.client))
    }

    /// How many more requests ready workers could take right now.
    pub fn idle_credit(&self) -> usize {
        self.workers
            .iter()
            .filter(|load| load.ready)
            .map(|load| self.credit.saturating_sub(load.held.len()))
            .sum()
    }

    /// Stops giving a worker requests (it is being retired).
    pub fn worker_draining(&mut self, slot: usize) {
        if let Some(load) = self.workers.get_mut(slot) {
            load.ready = false;
        }
    }

    /// How many requests the worker in `slot` holds.
    pub fn held(&self, slot: usize) -> usize {
        self.workers.get(slot).map_or(0, |load| load.held.len())
    }

    /// The worker in `slot` is gone (died, or is being killed): it takes no
    /// more requests, and every request it held fails. Returns them with
    /// their clients.
    pub fn worker_lost(&mut self, slot: usize) -> Vec<(RequestId, usize)> {
        let Some(load) = self.workers.get_mut(slot) else {
            return Vec::new();
        };
        load.ready = false;
        std::mem::take(&mut load.held)
            .into_iter()
            .filter_map(|id| Some((id, self.requests.remove(&id)?.client?)))
            .collect()
    }

    /// The client of `id` went away: a queued request is dropped, a running
    /// one's reply will be discarded.
    pub fn client_gone(&mut self, id: RequestId) {
        let Some(request) = self.requests.get_mut(&id) else {
            return;
        };
        match request.place {
            Place::Queued(_) => {
                self.requests.remove(&id);
                self.queued -= 1;
            }
            Place::Running { .. } => request.client = None,
        }
    }

    /// Fails every queued request (no worker will take them). Returns them
    /// with their clients.
    pub fn fail_queued(&mut self) -> Vec<(RequestId, usize)> {
        let mut clients = Vec::new();
        for id in self.queue.drain(..) {
            if let Some(client) = self.requests.remove(&id).and_then(|r| r.client) {
                clients.push((id, client));
            }
        }
        self.queued = 0;
        clients
    }

    /// Slots holding a request whose deadline has passed.
    pub fn overdue(&self, now: Instant) -> Vec<usize> {
        let mut slots: Vec<usize> = self
            .requests
            .values()
            .filter_map(|request| match request.place {
                Place::Running {
                    slot,
                    deadline: Some(deadline),
                } if deadline <= now => Some(slot),
                _ => None,
            })
            .collect();
        slots.sort_unstable();
        slots.dedup();
        slots
    }

    /// The earliest deadline of a running request, for the loop's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.workers
            .iter()
            .flat_map(|load| &load.held)
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
    fn an_idle_worker_never_waits_behind_a_busy_one() {
        let mut d = Dispatcher::new(1, None);
        d.worker_ready(0);
        d.worker_ready(1);
        let now = Instant::now();
        let a = d.submit(10, b"a".to_vec());
        let b = d.submit(11, b"b".to_vec());
        let c = d.submit(12, b"c".to_vec());
        let first = d.next_assignment(now).unwrap();
        let second = d.next_assignment(now).unwrap();
        assert_eq!((first.id, second.id), (a, b));
        assert_ne!(first.slot, second.slot);
        assert!(
            d.next_assignment(now).is_none(),
            "both workers hold their credit"
        );
        assert_eq!(d.complete(b), Some((second.slot, Some(11))));
        let third = d.next_assignment(now).unwrap();
        assert_eq!((third.id, third.slot), (c, second.slot));
    }

    #[test]
    fn with_more_credit_busy_workers_take_a_second_request_only_when_none_is_idle() {
        let mut d = Dispatcher::new(2, None);
        d.worker_ready(0);
        d.worker_ready(1);
        let now = Instant::now();
        for client in 0..5 {
            d.submit(client, vec![]);
        }
        let slots: Vec<usize> = (0..4)
            .map(|_| d.next_assignment(now).unwrap().slot)
            .collect();
        assert_ne!(slots[0], slots[1], "the first two go to different workers");
        assert_eq!(d.held(0), 2);
        assert_eq!(d.held(1), 2);
        assert!(d.next_assignment(now).is_none());
    }

    #[test]
    fn a_staged_request_gets_its_deadline_when_its_worker_starts_it() {
        let timeout = Duration::from_secs(1);
        let mut d = Dispatcher::new(2, Some(timeout));
        d.worker_ready(0);
        let start = Instant::now();
        let first = d.submit(1, vec![]);
        let second = d.submit(2, vec![]);
        d.next_assignment(start).unwrap();
        d.next_assignment(start).unwrap();
        assert_eq!(
            d.next_deadline(),
            Some(start + timeout),
            "only the first runs"
        );
        assert_eq!(d.overdue(start + timeout * 3 / 2), vec![0]);
        d.complete(first);
        let restarted = d.next_deadline().unwrap();
        assert!(restarted > start + timeout, "the second's clock starts now");
        d.complete(second);
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn a_lost_worker_fails_exactly_its_requests() {
        let mut d = Dispatcher::new(1, None);
        d.worker_ready(0);
        d.worker_ready(1);
        let now = Instant::now();
        d.submit(1, vec![]);
        d.submit(2, vec![]);
        d.submit(3, vec![]);
        let on0 = d.next_assignment(now).unwrap();
        let _on1 = d.next_assignment(now).unwrap();
        assert_eq!(d.worker_lost(on0.slot), vec![(on0.id, 1)]);
        assert_eq!(d.outstanding(), 2);
        assert!(
            d.next_assignment(now).is_none(),
            "the lost worker takes nothing"
        );
        assert_eq!(
            d.complete(on0.id),
            None,
            "a late reply from the dead worker is ignored"
        );
    }

    #[test]
    fn gone_clients_cost_nothing() {
        let mut d = Dispatcher::new(1, Some(Duration::from_secs(1)));
        d.worker_ready(0);
        let now = Instant::now();
        let running = d.submit(1, vec![]);
        let queued = d.submit(2, vec![]);
        let assignment = d.next_assignment(now).unwrap();
        d.client_gone(queued);
        d.client_gone(running);
        assert_eq!(d.queued(), 0);
        assert_eq!(d.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(d.overdue(now + Duration::from_secs(2)), vec![0]);
        assert_eq!(
            d.complete(assignment.id),
            Some((0, None)),
            "the reply is discarded"
        );
        assert!(d.next_assignment(now).is_none());
        assert_eq!(d.outstanding(), 0);
    }
}
