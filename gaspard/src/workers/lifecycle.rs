//! The workers part, changing its workers: deaths and what they cost,
//! retiring on purpose, one more or one fewer (SIGTTIN / SIGTTOU), the
//! steps of a hot reload, and stopping them all.

use super::endpoint::Linking;
use super::reload::{Reload, Step};
use super::supervisor::{self, Death};
use super::{Answer, ClientKey, Notice, RequestId, Workers, WorkersError, MAX_WORKERS};
use crate::metrics::Outcome;
use crate::worker::EXIT_INIT_FAILED;
use nix::sys::signal::Signal;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// How long the daemon waits for the InitFailed of a zmq worker that exited
/// saying it sent one (`await_zmq_init_failures`).
const ZMQ_INIT_FAILED_WAIT: Duration = Duration::from_secs(1);

impl Workers {
    /// Request `id` of `client` failed: its client is told, with `reason`.
    fn fail(&mut self, client: ClientKey, id: RequestId, outcome: Outcome, reason: String) {
        self.answers.push(Answer::Failure {
            client,
            id,
            outcome,
            reason,
        });
    }

    /// Settles the requests of a worker that died, once everything it sent
    /// was read: the one it may have been running fails, the ones staged
    /// behind it go to other workers. Returns how many failed and went back.
    pub(super) fn lose_worker(&mut self, slot: usize, why: &str) -> (usize, usize) {
        let endpoint = self.endpoints.get_mut(slot).and_then(Option::take);
        let (failed, requeued) = self.dispatcher.worker_died(slot, |ticket, id| {
            // Without its endpoint (never the case for a started worker),
            // any request may have run.
            endpoint.as_ref().map_or(true, |e| e.started(ticket, id))
        });
        if let Some(mut endpoint) = endpoint {
            endpoint.deregister(&self.registry);
            endpoint.worker_gone();
        }
        // Every request it had started counts, also one whose client had
        // already been answered (its --timeout) or had left.
        let count = failed.len();
        for (id, client) in failed {
            let Some(client) = client else { continue };
            self.fail(client, id, Outcome::worker_lost, why.to_string());
        }
        let back = requeued.len();
        self.answers.extend(
            requeued
                .into_iter()
                .map(|client| Answer::Requeued { client }),
        );
        self.update_gauges();
        (count, back)
    }

    /// Gives up on a worker that broke its link's rules: what it ran is
    /// unknown, so every request it held fails now, and it is killed.
    pub(super) fn abandon_worker(&mut self, slot: usize, what: &str) {
        if let Some(Some(endpoint)) = self.endpoints.get(slot) {
            if matches!(endpoint.carrier, super::Carrier::Remote(_)) {
                // The pool drops the host; its requests fail with that news.
                if let Some(pool) = &mut self.pool {
                    pool.drop_slot(slot, what);
                }
                return;
            }
        }
        let incarnation = self.supervisor.incarnation_of(slot).unwrap_or(0);
        log::error!("worker {incarnation} (slot {slot}) {what}; killing it");
        self.close_endpoint(slot);
        for (id, client) in self.dispatcher.worker_lost(slot) {
            self.fail(
                client,
                id,
                Outcome::worker_lost,
                "its worker's link broke".to_string(),
            );
        }
        self.supervisor.kill(slot, "its link broke");
        self.update_gauges();
        self.update_ready_gauge();
    }

    /// Stops a worker on purpose without failing anything: it gets no new
    /// requests and is sent SIGTERM once it holds none. With `remove`, its
    /// slot is freed rather than restarted.
    pub(super) fn retire(&mut self, slot: usize, remove: bool) {
        self.supervisor.retire(slot, remove);
        self.dispatcher.close_worker(slot);
        if self.dispatcher.held(slot) == 0 {
            self.stop_retired(slot);
        }
    }

    pub(super) fn stop_retired(&mut self, slot: usize) {
        self.close_endpoint(slot);
        self.supervisor.signal(slot, Signal::SIGTERM);
        self.update_ready_gauge();
    }

    /// SIGCHLD: settles the workers that exited.
    pub(crate) fn on_exits(&mut self) -> Result<(), WorkersError> {
        // What a worker wrote before it died is in its link: a last reply
        // is delivered, an account of a failed start is read, before its
        // death is handled. Only those: one that exits meanwhile is handled
        // on its own SIGCHLD, after its link is read.
        let exited = self.supervisor.exited();
        for &slot in &exited {
            if let Some(endpoint) = self.endpoints.get_mut(slot).and_then(Option::as_mut) {
                endpoint.readable();
            }
            self.take_messages(slot, usize::MAX)?;
        }
        // zmq workers' last messages: what has reached the replies socket.
        // (One still in libzmq's hands when its worker is settled is dropped
        // on arrival: it names a worker that is gone.)
        if !exited.is_empty() {
            self.take_zmq_messages(usize::MAX)?;
            self.await_zmq_init_failures(&exited)?;
        }
        for death in self.supervisor.reap(&exited) {
            self.on_death(death)?;
        }
        // Snapshots of generations no worker runs any more (a rejected
        // reload, the end of a rolling one) can go now.
        if !self.reload.is_validating() {
            self.supervisor.forget_unused_snapshots(self.generation);
        }
        self.fail_queued_if_none_can_serve();
        self.update_gauges();
        self.update_ready_gauge();
        Ok(())
    }

    /// A zmq worker that exited with [`EXIT_INIT_FAILED`] had handed its
    /// InitFailed to the kernel first (its context lingers until sent), but
    /// the daemon's libzmq thread may not have passed it on yet: where the
    /// reason decides what happens (the first start, a reload's first
    /// worker), it is waited for, briefly, so that the daemon stops or
    /// rejects the reload with the handler's reason, as on the local link.
    fn await_zmq_init_failures(&mut self, exited: &[usize]) -> Result<(), WorkersError> {
        let deadline = Instant::now() + ZMQ_INIT_FAILED_WAIT;
        loop {
            let awaited = exited.iter().any(|&slot| {
                self.supervisor.exit_code(slot) == Some(EXIT_INIT_FAILED.into())
                    && self
                        .supervisor
                        .incarnation_of(slot)
                        .is_some_and(|incarnation| {
                            !self.started || self.reload.is_probe(incarnation)
                        })
            });
            let left = deadline.saturating_duration_since(Instant::now());
            let Linking::Zmq(hub) = &self.linking else {
                return Ok(());
            };
            if !awaited || left.is_zero() {
                return Ok(());
            }
            hub.wait_readable(left);
            self.take_zmq_messages(usize::MAX)?;
        }
    }

    /// One worker's death: settle its requests, say why in one line.
    pub(super) fn on_death(&mut self, death: Death) -> Result<(), WorkersError> {
        let (slot, incarnation, status) = (death.slot, death.incarnation, death.status);
        let how = match death.killed_because {
            Some(why) if status.signal() == Some(nix::libc::SIGKILL) => {
                format!("was killed because {why}")
            }
            _ => supervisor::describe(&status),
        };
        let cause = match (death.retired, status.signal()) {
            (true, _) => "stopped".to_string(),
            (false, Some(signal)) => Signal::try_from(signal)
                .map_or_else(|_| format!("signal_{signal}"), |s| s.as_str().to_string()),
            (false, None) => format!("exit_{}", status.code().unwrap_or(-1)),
        };
        self.metrics.worker_exited(&cause);
        if !self.started && !death.retired {
            // Its own account of why (InitFailed) was read first, if it
            // gave one.
            return Err(WorkersError::Load(format!(
                "handler {}: worker {how} while loading the handler",
                self.supervisor.handler_source().display()
            )));
        }
        if self.reload.is_probe(incarnation) {
            // Died loading the new handler without saying why (an
            // InitFailed would have rejected the reload already).
            self.supervisor.retire(slot, true);
            self.lose_worker(slot, "its worker died");
            self.reject_reload(&format!("its first worker {how} while loading it"));
            return Ok(());
        }
        let (failed, requeued) = self.lose_worker(slot, &format!("its worker {how}"));
        let line = death_line(&death, &how, failed, requeued);
        match death.killed_because {
            // Its cause was logged when it was killed: this is the sequel.
            _ if death.retired && death.status.success() => log::info!("{line}"),
            Some(_) => log::info!("{line}"),
            None => log::warn!("{line}"),
        }
        Ok(())
    }

    /// Gives back the pages of request areas that have been empty for
    /// `areas::TRIM_AFTER`; looks that often while an area holds such pages
    /// (`Workers::dispatch` sets the first look when one comes to hold them,
    /// and `next_deadline` wakes the loop for it).
    fn trim_areas(&mut self, now: Instant) {
        if !self.trim_check.is_some_and(|check| check <= now) {
            return;
        }
        let mut holding = false;
        for endpoint in self.endpoints.iter_mut().flatten() {
            endpoint.trim(now);
            holding |= endpoint.area_holds_pages();
        }
        self.trim_check = holding.then_some(now + super::areas::TRIM_AFTER);
    }

    /// Deadlines: requests past --timeout fail and their workers are killed
    /// (as gunicorn does with stuck workers; what was staged behind them goes
    /// to other workers once they are dead); a reload that takes too long is
    /// rejected; workers whose back-off ran out start again (also while
    /// draining: queued requests still need workers).
    pub(crate) fn on_timers(&mut self, now: Instant) {
        self.trim_areas(now);
        if let Some(pool) = &mut self.pool {
            let events = pool.on_timers(now);
            self.on_pool_events(events, now);
        }
        // Replies finished before a call that ran past --timeout are not
        // failed with it.
        self.take_unannounced(now, true);
        for (slot, id, client) in self.dispatcher.expire(now) {
            if let (
                Some(Some(super::Endpoint {
                    carrier: super::Carrier::Remote(_),
                    ..
                })),
                Some(pool),
            ) = (self.endpoints.get(slot), &mut self.pool)
            {
                // Its host should have failed it at --timeout: it broke
                // the contract, and what it holds is given up on.
                if let Some(client) = client {
                    self.answers.push(Answer::Failure {
                        client,
                        id,
                        outcome: Outcome::timeout,
                        reason: "request ran past --timeout on a worker host that never failed it"
                            .to_string(),
                    });
                }
                pool.drop_slot(
                    slot,
                    &format!("held request {id} past --timeout and its heartbeat timeout"),
                );
                continue;
            }
            log::error!(
                "a request ran past --timeout ({:?}) in worker slot {slot}; killing the worker",
                self.timeout.unwrap_or_default()
            );
            if let Some(client) = client {
                self.fail(
                    client,
                    id,
                    Outcome::timeout,
                    "request ran past --timeout".to_string(),
                );
            }
            self.supervisor.kill(slot, "a request ran past --timeout");
        }
        if self
            .reload
            .deadline()
            .is_some_and(|deadline| now >= deadline)
        {
            self.reject_reload("the new handler did not finish loading within --timeout");
        }
        for slot in self.supervisor.due(now) {
            self.metrics.worker_starts.inc();
            let started = self
                .supervisor
                .start(slot, &self.linking)
                .map_err(WorkersError::Start)
                .and_then(|(carrier, claims)| self.install(slot, carrier, claims));
            if let Err(e) = started {
                log::error!("{e}");
            }
        }
    }

    /// Changes --timeout: requests that start from now on, and reloads that
    /// begin from now on, get the new one. A worker host learns it from the
    /// daemon it joins.
    pub(crate) fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
        self.dispatcher.set_timeout(timeout);
    }

    /// A signal meant for the workers: SIGCHLD (deaths), and while
    /// `serving`, SIGHUP (reload), SIGTTIN and SIGTTOU (one more, one
    /// fewer). Others are the caller's.
    pub(crate) fn on_signal(&mut self, signal: i32, serving: bool) -> Result<(), WorkersError> {
        use signal_hook::consts::{SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU};
        match signal {
            SIGCHLD => self.on_exits()?,
            SIGHUP if serving => self.start_reload(),
            SIGHUP => log::warn!("SIGHUP ignored: not serving"),
            SIGTTIN if serving => self.scale(1),
            SIGTTOU if serving => self.scale(-1),
            _ => {}
        }
        Ok(())
    }

    /// SIGTTIN (+1) / SIGTTOU (-1): one more or one fewer worker.
    pub(crate) fn scale(&mut self, delta: i32) {
        if delta > 0 {
            if self.supervisor.slot_count() >= MAX_WORKERS {
                log::warn!("SIGTTIN ignored: {MAX_WORKERS} worker slots is the most");
                return;
            }
            self.target += 1;
            self.size_areas();
            match self.add_worker(self.generation) {
                Ok(_) => log::info!("SIGTTIN: one more worker ({} now)", self.target),
                Err(e) => log::error!("SIGTTIN: {e}"),
            }
            return;
        }
        if self.target <= 1 {
            log::warn!("SIGTTOU ignored: one worker is the fewest");
            return;
        }
        // Not the worker validating a reload: retiring it would reject the
        // reload for no fault of the handler.
        let Some(slot) = self.supervisor.last_active(self.reload.probe_slot()) else {
            return;
        };
        self.target -= 1;
        self.size_areas();
        self.retire(slot, true);
        log::info!("SIGTTOU: one fewer worker ({} now)", self.target);
    }

    /// Sizes the body areas of workers started from now on for the number
    /// of workers wanted now, so that all areas together stay near a
    /// quarter of --max-buffered (workers already running keep theirs until
    /// they are replaced).
    fn size_areas(&mut self) {
        if let super::Linking::Local { area_len } = &mut self.linking {
            let (max_request_size, max_buffered) = self.area_limits;
            *area_len = super::areas::area_len(max_request_size, max_buffered, self.target);
        }
    }

    /// SIGHUP: load the handler file again. The new file is loaded by one new
    /// worker first; only when it is up are the old workers replaced, one at
    /// a time, each finishing its request first. A broken file changes nothing.
    pub(crate) fn start_reload(&mut self) {
        if self.target == 0 {
            log::warn!(
                "SIGHUP ignored: no local workers (--workers 0); worker hosts reload on their own SIGHUP"
            );
            return;
        }
        if self.reload != Reload::Idle {
            log::warn!("SIGHUP ignored: a reload is already under way");
            return;
        }
        let source = self.supervisor.handler_source().display().to_string();
        self.notices.push(Notice::Reloading);
        let generation = match self.supervisor.snapshot_handler() {
            Ok(generation) => generation,
            Err(e) => {
                log::error!(
                    "reload rejected: cannot copy {source}: {e}; the old handler keeps serving"
                );
                self.notices.push(Notice::Reloaded);
                return;
            }
        };
        log::info!("SIGHUP: reloading handler {source} (generation {generation})");
        match self.add_worker(generation) {
            Ok(slot) => {
                let incarnation = self.supervisor.incarnation_of(slot).unwrap_or(0);
                let deadline = self.timeout.map(|t| Instant::now() + t);
                self.reload = Reload::validating(generation, slot, incarnation, deadline);
            }
            Err(e) => {
                log::error!("reload rejected: {e}");
                self.supervisor.forget_unused_snapshots(self.generation);
                self.notices.push(Notice::Reloaded);
            }
        }
    }

    pub(super) fn reject_reload(&mut self, reason: &str) {
        let Some((slot, incarnation)) = self.reload.probe() else {
            return;
        };
        log::error!("reload rejected: {reason}; the old handler keeps serving");
        if self.supervisor.incarnation_of(slot) == Some(incarnation) {
            self.supervisor.retire(slot, true);
            self.supervisor.kill(slot, "its reload was rejected");
            self.close_endpoint(slot);
        }
        self.reload = Reload::Idle;
        // Its snapshot goes once the worker is reaped (on_exits).
        self.notices.push(Notice::Reloaded);
    }

    /// One step of a validated reload, every loop turn: when no new worker
    /// is still starting, retire one old worker and start its replacement;
    /// when no old worker is left, the reload is done.
    pub(crate) fn advance_reload(&mut self) {
        match self.reload.next_step(&self.supervisor, self.target) {
            Step::Wait => {}
            Step::Done(generation) => {
                self.reload = Reload::Idle;
                self.supervisor.forget_unused_snapshots(generation);
                log::info!(
                    "reload complete: {} workers serve handler generation {generation}",
                    self.target
                );
                self.notices.push(Notice::Reloaded);
            }
            Step::Replace { old, start_new } => {
                if start_new {
                    if let Err(e) = self.add_worker(self.generation) {
                        log::error!("reload: {e}");
                        return;
                    }
                }
                self.retire(old, true);
            }
        }
    }

    /// Stops every worker: links first, so that a worker still in its
    /// handler cannot block writing a reply into a link nobody reads (it
    /// would never call the handler's shutdown); with the link closed, the
    /// write fails and the worker stops on its own. Then SIGTERM, and
    /// SIGKILL after `grace`.
    pub(crate) fn stop_all(&mut self, grace: Duration) {
        for slot in 0..self.endpoints.len() {
            self.close_endpoint(slot);
        }
        self.supervisor.stop_all(grace);
    }
}

/// The one line that tells a worker's death: what happened, what it cost,
/// what comes next.
fn death_line(death: &Death, how: &str, failed: usize, requeued: usize) -> String {
    let (incarnation, slot) = (death.incarnation, death.slot);
    if death.retired {
        let why = if death.removed {
            "stopped"
        } else {
            "recycled after reaching --max-requests"
        };
        // Its handler's shutdown may still have crashed on the way out.
        if death.status.success() {
            return format!("worker {incarnation} (slot {slot}) {why}");
        }
        return format!("worker {incarnation} (slot {slot}) {why}, and {how} on its way out");
    }
    let stage = if death.before_ready {
        " before it was ready"
    } else {
        ""
    };
    let next = if death.removed {
        String::new()
    } else if death.restart_in.is_zero() {
        "; restarting it".to_string()
    } else {
        format!(
            "; restarting it in {} ms (back-off after repeated failures)",
            death.restart_in.as_millis()
        )
    };
    let requeued = match requeued {
        0 => String::new(),
        n => format!(" ({n} staged behind it went to other workers)"),
    };
    format!(
        "worker {incarnation} (slot {slot}) {how}{stage}; {failed} requests failed{requeued}{next}"
    )
}
