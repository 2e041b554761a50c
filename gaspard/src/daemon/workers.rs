//! The daemon's side of the workers: handing them requests, taking their
//! replies, noticing their deaths, and changing them on purpose (hot reload
//! on SIGHUP, one more or one fewer on SIGTTIN / SIGTTOU).

use super::{Daemon, Phase, Reload, Reply, WorkerLink, LINK_BASE, REPLIES_PER_TURN};
use crate::claims::Claims;
use crate::dispatcher::Assignment;
use crate::link::{Kind, Link, Message};
use crate::metrics::Outcome;
use crate::supervisor::{self, Death, SlotState};
use anyhow::bail;
use mio::event::Event;
use mio::Token;
use nix::sys::signal::Signal;
use std::os::unix::process::ExitStatusExt;
use std::time::Instant;

impl Daemon {
    /// Adds a worker of `generation` and starts it.
    pub(super) fn add_worker(&mut self, generation: u64) -> anyhow::Result<usize> {
        let (slot, link, claims) = self.supervisor.add(generation)?;
        self.metrics.worker_starts.inc();
        let incarnation = self.supervisor.incarnation_of(slot).unwrap_or(0);
        self.install_link(slot, incarnation, link, claims)?;
        Ok(slot)
    }

    /// Puts a just-started worker's link into the loop.
    pub(super) fn install_link(
        &mut self,
        slot: usize,
        incarnation: u64,
        mut link: Link,
        claims: Claims,
    ) -> anyhow::Result<()> {
        if self.links.len() <= slot {
            self.links.resize_with(slot + 1, || None);
        }
        self.drop_link(slot);
        link.register(self.poll.registry(), Token(LINK_BASE + slot))?;
        self.links[slot] = Some(WorkerLink {
            link,
            claims,
            incarnation,
            ready: false,
        });
        Ok(())
    }

    /// Whether the first workers are all up.
    pub(super) fn all_ready(&self) -> bool {
        let ready = self
            .supervisor
            .slots
            .iter()
            .filter(|slot| matches!(slot.state, SlotState::Ready { .. }))
            .count();
        ready >= self.target_workers
    }

    /// Hands queued requests to workers with credit. A worker that was idle
    /// gets its requests at once, in one write; what is staged behind a busy
    /// worker's request waits for [`Daemon::flush_links`] at the end of the
    /// loop turn, so that a turn's requests for it leave in one write.
    pub(super) fn dispatch(&mut self) {
        let now = Instant::now();
        // First: room a reply has just freed goes to requests stuck behind
        // a slow call (they go back to the head of the queue) rather than
        // to newer ones, or under steady load they would never move.
        self.take_back_stuck(now);
        let mut idle = Vec::new();
        while let Some(assignment) = self.dispatcher.next_assignment(now) {
            let Some(worker) = self.links.get_mut(assignment.slot).and_then(Option::as_mut) else {
                self.dispatcher.unassign(assignment);
                break;
            };
            let Assignment {
                slot,
                id,
                ticket,
                payload,
            } = assignment;
            // Staged in its claim entry before the worker can see it; the
            // payload is shared with the dispatcher, not copied.
            worker.claims.stage(ticket, id);
            worker.link.queue_request(id, ticket.encode(), payload);
            if self.dispatcher.held(slot) == 1 {
                idle.push(slot);
            } else if !idle.contains(&slot) && !self.links_to_flush.contains(&slot) {
                self.links_to_flush.push(slot);
            }
        }
        for slot in idle {
            self.flush_link(slot);
        }
        self.metrics.queued.set(self.dispatcher.queued() as i64);
        self.metrics
            .in_flight
            .set((self.dispatcher.outstanding() - self.dispatcher.queued()) as i64);
    }

    /// Sends what [`Daemon::dispatch`] staged during this turn.
    pub(super) fn flush_links(&mut self) {
        for slot in std::mem::take(&mut self.links_to_flush) {
            self.flush_link(slot);
        }
    }

    /// Writes what a worker's link has queued. A worker that cannot be
    /// written to is gone or broken: it is killed, and its requests are
    /// settled when its death is (see `lose_worker`).
    fn flush_link(&mut self, slot: usize) {
        let Some(worker) = self.links.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let registry = self.poll.registry();
        let token = Token(LINK_BASE + slot);
        let flushed = worker.link.flush();
        let watched = worker.link.watch_writable(registry, token);
        if let Err(e) = flushed.and(watched) {
            worker.link.discard_output();
            let _ = worker.link.watch_writable(registry, token);
            log::error!("cannot send requests to worker slot {slot}: {e}; killing it");
            self.dispatcher.worker_draining(slot);
            self.supervisor.signal(slot, Signal::SIGKILL);
        }
    }

    /// Readiness of a worker's link.
    pub(super) fn on_link_event(&mut self, slot: usize, event: &Event) -> anyhow::Result<()> {
        if event.is_writable() {
            self.flush_link(slot);
        }
        if event.is_readable() || event.is_read_closed() {
            if let Some(worker) = self.links.get_mut(slot).and_then(Option::as_mut) {
                worker.link.readable();
            }
            self.on_messages(slot)?;
        }
        Ok(())
    }

    /// Takes the messages a worker sent, up to a fair share per turn.
    pub(super) fn on_messages(&mut self, slot: usize) -> anyhow::Result<()> {
        self.take_messages(slot, REPLIES_PER_TURN)
    }

    /// Takes up to `limit` messages from a worker's link; if more may be
    /// waiting, the slot is marked for the next turn.
    fn take_messages(&mut self, slot: usize, limit: usize) -> anyhow::Result<()> {
        for _ in 0..limit {
            let Some(worker) = self.links.get_mut(slot).and_then(Option::as_mut) else {
                return Ok(());
            };
            let incarnation = worker.incarnation;
            match worker.link.try_recv() {
                Ok(Some(message)) => self.on_message(slot, incarnation, message)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    // Only our own worker writes there: a broken stream
                    // means its memory is corrupt, and what it ran is unknown.
                    log::error!("worker {incarnation} (slot {slot}) sent garbage: {e}; killing it");
                    self.abandon_worker(slot);
                    return Ok(());
                }
            }
        }
        if !self.links_pending.contains(&slot) {
            self.links_pending.push(slot);
        }
        Ok(())
    }

    fn on_message(
        &mut self,
        slot: usize,
        incarnation: u64,
        message: Message,
    ) -> anyhow::Result<()> {
        match message.kind {
            Kind::Reply | Kind::Failed => {
                let Some((held_by, client)) =
                    self.dispatcher.complete(message.value, message.micros)
                else {
                    return Ok(()); // its worker was already given up on
                };
                debug_assert_eq!(held_by, slot);
                if self.supervisor.note_served(slot) {
                    self.retire(slot, false);
                } else if self.supervisor.is_retiring(slot) && self.dispatcher.held(slot) == 0 {
                    self.stop_retired(slot);
                }
                let Some(key) = client else {
                    return Ok(()); // the client went away
                };
                if message.kind == Kind::Failed {
                    let reason = String::from_utf8_lossy(&message.body).into_owned();
                    self.fail(key, message.value, Outcome::handler_error, reason);
                } else {
                    self.deliver(key, message.value, Reply(message.body));
                }
            }
            Kind::Ready => self.on_worker_ready(slot, incarnation, &message.body),
            Kind::InitFailed => {
                let reason = String::from_utf8_lossy(&message.body).into_owned();
                self.on_init_failed(incarnation, reason)?;
            }
            Kind::Request => {
                log::error!("worker {incarnation} (slot {slot}) sent a request frame; killing it");
                self.abandon_worker(slot);
            }
        }
        Ok(())
    }

    fn on_init_failed(&mut self, incarnation: u64, reason: String) -> anyhow::Result<()> {
        if self.phase == Phase::Starting {
            bail!("{reason}");
        }
        match self.reload {
            Reload::Validating {
                incarnation: probe, ..
            } if probe == incarnation => self.reject_reload(&reason),
            _ => log::error!("worker {incarnation} could not start: {reason}"),
        }
        Ok(())
    }

    fn on_worker_ready(&mut self, slot: usize, incarnation: u64, body: &[u8]) {
        if self
            .links
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|w| w.ready)
        {
            log::warn!("worker {incarnation} (slot {slot}) said Ready twice; ignored");
            return;
        }
        if self.supervisor.is_retiring(slot) {
            // Told to stop while starting (SIGTTOU, a rejected reload): it
            // gets no work, and exits on the signal it already has.
            return;
        }
        let pid: u32 = std::str::from_utf8(body)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0);
        if let Some(worker) = self.links.get_mut(slot).and_then(Option::as_mut) {
            worker.ready = true;
        }
        self.supervisor.mark_ready(slot, pid);
        self.dispatcher.worker_ready(slot);
        self.metrics.workers_ready.inc();
        log::debug!("worker {incarnation} (slot {slot}, pid {pid}) is ready");
        if let Reload::Validating {
            generation,
            incarnation: probe,
            ..
        } = self.reload
        {
            // By incarnation: the slot may have been reused by another
            // worker (SIGTTIN) after the validating one died.
            if probe == incarnation {
                log::info!(
                    "reload: the new handler loaded; replacing {} workers one at a time",
                    self.target_workers
                );
                self.generation = generation;
                self.reload = Reload::Rolling { generation };
            }
        }
    }

    /// Closes a worker's link: nothing more is sent to it or read from it
    /// (a live worker reads the end of its link and stops).
    pub(super) fn drop_link(&mut self, slot: usize) {
        if let Some(worker) = self.links.get_mut(slot).and_then(Option::take) {
            self.forget_link(worker);
        }
    }

    fn forget_link(&mut self, mut worker: WorkerLink) {
        worker.link.deregister(self.poll.registry());
        if worker.ready {
            self.metrics.workers_ready.dec();
        }
    }

    /// Settles the requests of a worker that died, once everything it sent
    /// was read: the one it may have been running fails, the ones staged
    /// behind it go to other workers. Returns how many failed and went back.
    fn lose_worker(&mut self, slot: usize, why: &str) -> (usize, usize) {
        let worker = self.links.get_mut(slot).and_then(Option::take);
        let (failed, requeued) = self.dispatcher.worker_died(slot, |ticket, id| {
            // Without its claims (never the case for a started worker),
            // any request may have run.
            worker
                .as_ref()
                .map_or(true, |w| w.claims.started(ticket, id))
        });
        if let Some(worker) = worker {
            self.forget_link(worker);
        }
        let count = failed.len();
        for (id, key) in failed {
            self.fail(key, id, Outcome::worker_lost, why.to_string());
        }
        // Waiting in the queue again: a client that leaves now must be seen.
        for &key in &requeued {
            self.watch_if_waiting(key);
        }
        (count, requeued.len())
    }

    /// Takes back the requests staged behind calls that turned out slow,
    /// if their workers have not started them: they go to whichever worker
    /// is free first (see `claims.rs`).
    pub(super) fn take_back_stuck(&mut self, now: Instant) {
        let stuck = self.dispatcher.stuck(now);
        // In reverse: each goes back to the head of the queue.
        for &(slot, id, ticket) in stuck.iter().rev() {
            let Some(worker) = self.links.get(slot).and_then(Option::as_ref) else {
                continue;
            };
            if !worker.claims.withdraw(ticket, id) {
                // It has started it: the slow call is over.
                self.dispatcher.take_back_failed(slot);
                continue;
            }
            log::debug!("took back request {id} from slot {slot}: its worker runs a slow call");
            if let Some(key) = self.dispatcher.taken_back(id) {
                // Waiting in the queue again: a client that leaves must be seen.
                self.watch_if_waiting(key);
            }
        }
    }

    /// Kills a worker whose link broke: what it ran is unknown, so every
    /// request it held fails now.
    fn abandon_worker(&mut self, slot: usize) {
        self.drop_link(slot);
        for (id, key) in self.dispatcher.worker_lost(slot) {
            let why = "its worker's link broke".to_string();
            self.fail(key, id, Outcome::worker_lost, why);
        }
        self.supervisor.signal(slot, Signal::SIGKILL);
    }

    /// Stops a worker on purpose without failing anything: it gets no new
    /// requests and is sent SIGTERM once it holds none. With `remove`, its
    /// slot is freed rather than restarted.
    fn retire(&mut self, slot: usize, remove: bool) {
        self.supervisor.retire(slot, remove);
        self.dispatcher.worker_draining(slot);
        if self.dispatcher.held(slot) == 0 {
            self.stop_retired(slot);
        }
    }

    fn stop_retired(&mut self, slot: usize) {
        self.drop_link(slot);
        self.supervisor.signal(slot, Signal::SIGTERM);
    }

    pub(super) fn on_worker_exits(&mut self) -> anyhow::Result<()> {
        // What a worker wrote before it died is in its link: a last reply
        // is delivered, an account of a failed start is read, before its
        // death is handled.
        // Only those: one that exits meanwhile is handled on its own SIGCHLD,
        // after its link is read.
        let exited = self.supervisor.exited();
        for &slot in &exited {
            if let Some(worker) = self.links.get_mut(slot).and_then(Option::as_mut) {
                worker.link.readable();
            }
            self.take_messages(slot, usize::MAX)?;
        }
        for death in self.supervisor.reap(&exited) {
            let Death {
                slot,
                incarnation,
                status,
                before_ready,
                retired,
                removed,
                restart_in,
            } = death;
            let how = supervisor::describe(&status);
            let cause = match (retired, status.signal()) {
                (true, _) => "stopped".to_string(),
                (false, Some(signal)) => Signal::try_from(signal)
                    .map_or_else(|_| format!("signal_{signal}"), |s| s.as_str().to_string()),
                (false, None) => format!("exit_{}", status.code().unwrap_or(-1)),
            };
            self.metrics.worker_exited(&cause);
            if self.phase == Phase::Starting && !retired {
                // Its own account of why (InitFailed) was read above, if it
                // gave one.
                bail!(
                    "handler {}: worker {how} while loading the handler",
                    self.supervisor.handler_source().display()
                );
            }
            if let Reload::Validating {
                incarnation: probe, ..
            } = self.reload
            {
                // Died loading the new handler without saying why (an
                // InitFailed would have rejected the reload above).
                if probe == incarnation {
                    self.supervisor.retire(slot, true);
                    self.lose_worker(slot, "its worker died");
                    self.reject_reload(&format!("its first worker {how} while loading it"));
                    continue;
                }
            }
            let (failed, requeued) = self.lose_worker(slot, &format!("its worker {how}"));
            if retired {
                let why = if removed {
                    "stopped"
                } else {
                    "recycled after reaching --max-requests"
                };
                log::info!("worker {incarnation} (slot {slot}) {why}");
                continue;
            }
            let stage = if before_ready {
                " before it was ready"
            } else {
                ""
            };
            let next = if removed {
                String::new()
            } else if restart_in.is_zero() {
                "; restarting it".to_string()
            } else {
                format!(
                    "; restarting it in {} ms (back-off after repeated failures)",
                    restart_in.as_millis()
                )
            };
            let requeued = match requeued {
                0 => String::new(),
                n => format!(" ({n} staged behind it went to other workers)"),
            };
            log::warn!(
                "worker {incarnation} (slot {slot}) {how}{stage}; {failed} requests failed{requeued}{next}"
            );
        }
        // Snapshots of generations no worker runs any more (a rejected
        // reload, the end of a rolling one) can go now.
        if !matches!(self.reload, Reload::Validating { .. }) {
            self.supervisor.forget_unused_snapshots(self.generation);
        }
        if self.supervisor.all_failing() {
            let queued = self.dispatcher.fail_queued();
            if !queued.is_empty() {
                log::error!(
                    "no worker can serve (the handler keeps failing); resetting {} queued requests",
                    queued.len()
                );
            }
            for (id, key) in queued {
                let reason = "no worker can serve: the handler keeps failing".to_string();
                self.fail(key, id, Outcome::refused, reason);
            }
        }
        Ok(())
    }

    /// Fails requests past --timeout and kills their workers (as gunicorn
    /// does with stuck workers). What was staged behind them goes to other
    /// workers once they are dead.
    pub(super) fn kill_overdue(&mut self, now: Instant) {
        let expired = self.dispatcher.expire(now);
        for &(slot, id, client) in &expired {
            log::error!(
                "a request ran past --timeout ({:?}) in worker slot {slot}; killing the worker",
                self.config.timeout.unwrap_or_default()
            );
            if let Some(key) = client {
                let why = "request ran past --timeout".to_string();
                self.fail(key, id, Outcome::timeout, why);
            }
            self.supervisor.signal(slot, Signal::SIGKILL);
        }
    }

    /// SIGTTIN (+1) / SIGTTOU (-1): one more or one fewer worker.
    pub(super) fn scale(&mut self, delta: i32) {
        if self.phase != Phase::Serving {
            return;
        }
        if delta > 0 {
            if self.supervisor.slots.len() >= super::MAX_WORKERS {
                log::warn!(
                    "SIGTTIN ignored: {} worker slots is the most",
                    super::MAX_WORKERS
                );
                return;
            }
            self.target_workers += 1;
            match self.add_worker(self.generation) {
                Ok(_) => log::info!("SIGTTIN: one more worker ({} now)", self.target_workers),
                Err(e) => log::error!("SIGTTIN: cannot start a worker: {e}"),
            }
        } else {
            if self.target_workers <= 1 {
                log::warn!("SIGTTOU ignored: one worker is the fewest");
                return;
            }
            // Not the worker validating a reload: retiring it would reject
            // the reload for no fault of the handler.
            let probe = match self.reload {
                Reload::Validating { slot, .. } => Some(slot),
                _ => None,
            };
            let slots = &self.supervisor.slots;
            let Some(slot) = (0..slots.len())
                .rev()
                .find(|&i| slots[i].is_active() && Some(i) != probe)
            else {
                return;
            };
            self.target_workers -= 1;
            self.retire(slot, true);
            log::info!("SIGTTOU: one fewer worker ({} now)", self.target_workers);
        }
    }

    /// SIGHUP: load the handler file again. The new file is loaded by one new
    /// worker first; only when it is up are the old workers replaced, one at
    /// a time, each finishing its request first. A broken file changes nothing.
    pub(super) fn start_reload(&mut self) {
        if self.phase != Phase::Serving {
            log::warn!("SIGHUP ignored: not serving");
            return;
        }
        if self.reload != Reload::Idle {
            log::warn!("SIGHUP ignored: a reload is already under way");
            return;
        }
        let source = self.supervisor.handler_source().display().to_string();
        if let Some(notifier) = &self.notifier {
            notifier.reloading();
        }
        let generation = match self.supervisor.snapshot_handler() {
            Ok(generation) => generation,
            Err(e) => {
                log::error!(
                    "reload rejected: cannot copy {source}: {e}; the old handler keeps serving"
                );
                self.notify("READY=1");
                return;
            }
        };
        log::info!("SIGHUP: reloading handler {source} (generation {generation})");
        match self.add_worker(generation) {
            Ok(slot) => {
                let deadline = self.config.timeout.map(|t| Instant::now() + t);
                self.reload = Reload::Validating {
                    generation,
                    slot,
                    incarnation: self.supervisor.incarnation_of(slot).unwrap_or(0),
                    deadline,
                };
            }
            Err(e) => {
                log::error!("reload rejected: cannot start a worker: {e}");
                self.supervisor.forget_unused_snapshots(self.generation);
                self.notify("READY=1");
            }
        }
    }

    fn reject_reload(&mut self, reason: &str) {
        let Reload::Validating {
            slot, incarnation, ..
        } = self.reload
        else {
            return;
        };
        log::error!("reload rejected: {reason}; the old handler keeps serving");
        if self.supervisor.incarnation_of(slot) == Some(incarnation) {
            self.supervisor.retire(slot, true);
            self.supervisor.signal(slot, Signal::SIGKILL);
            self.drop_link(slot);
        }
        self.reload = Reload::Idle;
        // Its snapshot goes once the worker is reaped (on_worker_exits).
        self.notify("READY=1");
    }

    pub(super) fn reload_timeout(&mut self, now: Instant) {
        if let Reload::Validating {
            deadline: Some(deadline),
            ..
        } = self.reload
        {
            if now >= deadline {
                self.reject_reload("the new handler did not finish loading within --timeout");
            }
        }
    }

    /// One step of a validated reload, called every loop turn: when no new
    /// worker is still starting, retire one old worker and start its
    /// replacement; when no old worker is left, the reload is done.
    pub(super) fn advance_reload(&mut self) {
        let Reload::Rolling { generation } = self.reload else {
            return;
        };
        let slots = &self.supervisor.slots;
        // Wait for a new worker that is starting, but not for one backing
        // off after crashes: that is an ordinary crash loop, logged as such,
        // and must not hold the reload (and every later SIGHUP) forever.
        let starting = slots.iter().any(|slot| {
            slot.generation == generation
                && slot.is_active()
                && matches!(slot.state, SlotState::Starting { .. })
        });
        if starting {
            return;
        }
        let old = slots
            .iter()
            .position(|slot| slot.is_active() && slot.generation != generation);
        let Some(old) = old else {
            if slots
                .iter()
                .any(|s| s.is_live() && s.generation != generation)
            {
                return; // old workers still finishing their requests
            }
            self.reload = Reload::Idle;
            self.supervisor.forget_unused_snapshots(generation);
            log::info!(
                "reload complete: {} workers serve handler generation {generation}",
                self.target_workers
            );
            self.notify("READY=1");
            return;
        };
        let new_active = slots
            .iter()
            .filter(|slot| slot.is_active() && slot.generation == generation)
            .count();
        if new_active < self.target_workers {
            if let Err(e) = self.add_worker(generation) {
                log::error!("reload: cannot start a worker: {e}");
                return;
            }
        }
        self.retire(old, true);
    }
}
