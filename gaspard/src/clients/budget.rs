//! The budget of bytes the clients part holds in flight (--max-buffered):
//! request bodies being read or waiting for their reply, and replies not
//! yet written. Each connection charges what it holds.
//!
//! A body that needs more than the read at hand (over 64 KiB) is read only
//! once admitted, while large bodies hold at most 7/8 of the budget: the
//! last eighth is kept for small requests and the replies, so that a flood
//! of large bodies never stops a small request. Over the whole budget,
//! accept pauses until it falls back. A client that does not take its
//! reply is dropped at its --read-timeout, as always.

use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Instant;

pub(crate) struct Budget {
    limit: usize,
    held: usize,
    /// Since when more than `limit` has been held, if it is.
    over_since: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl Budget {
    pub(crate) fn new(limit: usize, metrics: Arc<Metrics>) -> Budget {
        Budget {
            limit,
            held: 0,
            over_since: None,
            metrics,
        }
    }

    /// Whether a body of `len` more bytes may be read now, and if so
    /// charges it: it fits in the large bodies' share, or nothing at all is
    /// held (so that one body larger than the budget still gets through,
    /// alone).
    pub(crate) fn admit(&mut self, len: usize) -> bool {
        let share = self.limit - self.limit / 8;
        if self.held != 0 && self.held.saturating_add(len) > share {
            return false;
        }
        self.charge(len);
        true
    }

    /// Whether less than the large bodies' share is held: parked bodies
    /// may be tried.
    pub(crate) fn has_room(&self) -> bool {
        self.held < self.limit - self.limit / 8
    }

    /// More is held: what cannot be refused (a reply that came, a small
    /// request already read).
    pub(crate) fn charge(&mut self, bytes: usize) {
        self.held = self.held.saturating_add(bytes);
        self.changed();
    }

    pub(crate) fn release(&mut self, bytes: usize) {
        self.held = self.held.saturating_sub(bytes);
        self.changed();
    }

    /// `old` bytes held become `new` ones (a request's bytes its reply's):
    /// one change, so the gauge and the over-budget clock never see the
    /// moment in between.
    fn replace(&mut self, old: usize, new: usize) {
        self.held = self.held.saturating_sub(old).saturating_add(new);
        self.changed();
    }

    /// More than the budget is held: accept stays paused.
    pub(crate) fn is_over(&self) -> bool {
        self.held > self.limit
    }

    pub(crate) fn held(&self) -> usize {
        self.held
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    fn changed(&mut self) {
        self.metrics.bytes_held.set(self.held as i64);
        match (self.is_over(), self.over_since) {
            (true, None) => self.over_since = Some(Instant::now()),
            (false, Some(since)) => {
                self.over_since = None;
                self.metrics
                    .over_budget_seconds
                    .inc_by(since.elapsed().as_secs_f64());
            }
            _ => {}
        }
    }
}

/// One connection's account with the budget: what it has charged.
pub(crate) struct Account<'a> {
    pub(crate) budget: &'a mut Budget,
    pub(crate) held: &'a mut usize,
}

impl Account<'_> {
    /// [`Budget::admit`], charged to this connection.
    pub(crate) fn admit(&mut self, len: usize) -> bool {
        let admitted = self.budget.admit(len);
        if admitted {
            *self.held += len;
        }
        admitted
    }

    /// Makes what the connection has charged what it holds now.
    pub(crate) fn settle(&mut self, holds: usize) {
        if holds != *self.held {
            self.budget.replace(*self.held, holds);
            *self.held = holds;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_admitted_while_they_fit_and_one_always_gets_through() {
        let mut budget = Budget::new(800, Arc::new(Metrics::default()));
        assert!(budget.admit(2000), "alone, even a body over the budget");
        assert!(!budget.admit(1), "nothing more while it is held");
        assert!(budget.is_over());
        budget.release(2000);
        assert!(budget.admit(600));
        assert!(budget.admit(100), "exactly the large bodies' share");
        assert!(!budget.admit(1));
        assert!(!budget.has_room());
        budget.charge(100); // small requests and replies: the last eighth
        assert!(!budget.is_over(), "full, not over");
        budget.charge(1);
        assert!(budget.is_over());
        assert_eq!(budget.held(), 801);
        budget.release(801);
        assert_eq!((budget.held(), budget.has_room()), (0, true));
    }
}
