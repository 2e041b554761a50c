//! A hot reload of the handler (SIGHUP), as a state machine: one new worker
//! validates the new file before anything old is touched; then old workers
//! are replaced one at a time. The workers part drives it and carries out
//! its steps.

use super::supervisor::Supervisor;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reload {
    Idle,
    /// The first worker of the new generation is loading it; nothing old has
    /// been touched yet.
    Validating {
        generation: u64,
        slot: usize,
        incarnation: u64,
        /// When to give up (--timeout).
        deadline: Option<Instant>,
    },
    /// Validated: old workers are being replaced one at a time.
    Rolling {
        generation: u64,
    },
}

/// What a rolling reload should do next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// A new worker is still starting, or old ones finish their requests.
    Wait,
    /// Every worker runs `generation`.
    Done(u64),
    /// Retire `old`, after starting its replacement if `start_new`.
    Replace { old: usize, start_new: bool },
}

impl Reload {
    pub(super) fn validating(
        generation: u64,
        slot: usize,
        incarnation: u64,
        deadline: Option<Instant>,
    ) -> Reload {
        Reload::Validating {
            generation,
            slot,
            incarnation,
            deadline,
        }
    }

    /// The slot and incarnation of the worker validating a new handler.
    pub(super) fn probe(&self) -> Option<(usize, u64)> {
        match *self {
            Reload::Validating {
                slot, incarnation, ..
            } => Some((slot, incarnation)),
            _ => None,
        }
    }

    pub(super) fn probe_slot(&self) -> Option<usize> {
        self.probe().map(|(slot, _)| slot)
    }

    /// Whether `incarnation` is the worker validating a new handler. By
    /// incarnation, not slot: the slot may have been reused by another
    /// worker (SIGTTIN) after the validating one died.
    pub(super) fn is_probe(&self, incarnation: u64) -> bool {
        self.probe().is_some_and(|(_, probe)| probe == incarnation)
    }

    pub(super) fn is_validating(&self) -> bool {
        matches!(self, Reload::Validating { .. })
    }

    /// When validation gives up.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match *self {
            Reload::Validating { deadline, .. } => deadline,
            _ => None,
        }
    }

    /// Worker `incarnation` is ready: if it validated the new handler, the
    /// rolling replacement begins. Returns the generation now to load.
    pub(super) fn validated(&mut self, incarnation: u64) -> Option<u64> {
        match *self {
            Reload::Validating {
                generation,
                incarnation: probe,
                ..
            } if probe == incarnation => {
                *self = Reload::Rolling { generation };
                Some(generation)
            }
            _ => None,
        }
    }

    /// The next step of a rolling reload, from the workers as they are.
    pub(super) fn next_step(&self, supervisor: &Supervisor, target: usize) -> Step {
        let Reload::Rolling { generation } = *self else {
            return Step::Wait;
        };
        // Wait for a new worker that is starting, but not for one backing
        // off after crashes: that is an ordinary crash loop, logged as such,
        // and must not hold the reload (and every later SIGHUP) forever.
        if supervisor.any_starting(generation) {
            return Step::Wait;
        }
        match supervisor.first_active_not_of(generation) {
            Some(old) => Step::Replace {
                old,
                start_new: supervisor.active_of(generation) < target,
            },
            // Old workers still finishing their requests.
            None if supervisor.any_live_not_of(generation) => Step::Wait,
            None => Step::Done(generation),
        }
    }
}
