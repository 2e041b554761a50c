//! The daemon's side of the workers: handing them requests, taking their
//! replies, noticing their deaths, and changing them on purpose (hot reload
//! on SIGHUP, one more or one fewer on SIGTTIN / SIGTTOU).

use super::{Daemon, Phase, Reload, Reply, PUSH_BASE, REPLIES_PER_TURN};
use crate::channel::{self, Kind};
use crate::dispatcher::Assignment;
use crate::metrics::Outcome;
use crate::supervisor::{self, Death, SlotState};
use anyhow::{bail, Context as _};
use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::sys::signal::Signal;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::time::Instant;

impl Daemon {
    /// Adds a worker of `generation` and starts it.
    pub(super) fn add_worker(&mut self, generation: u64) -> std::io::Result<usize> {
        let slot = self.supervisor.add(generation)?;
        self.metrics.worker_starts.inc();
        Ok(slot)
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

    /// Hands queued requests to workers with credit.
    pub(super) fn dispatch(&mut self) {
        let now = Instant::now();
        while let Some(assignment) = self.dispatcher.next_assignment(now) {
            let Some(push) = self.pushes.get(assignment.slot).and_then(Option::as_ref) else {
                self.dispatcher.unassign(assignment);
                return;
            };
            let Assignment { slot, id, payload } = assignment;
            // Sending moves the payload into zmq without a copy.
            match channel::try_send(push, &id.to_le_bytes(), payload.into()) {
                Ok(()) => {
                    // Let libzmq process pending commands (libzmq issue 3641).
                    let _ = push.get_events();
                }
                Err(e) => {
                    // The payload went with the failed send and cannot be
                    // retried, so the request fails like a lost worker's.
                    log::error!("cannot send a request to worker slot {slot}: {e}; killing it");
                    self.lose_worker(
                        slot,
                        Outcome::worker_lost,
                        "its worker could not be reached",
                    );
                    self.supervisor.signal(slot, Signal::SIGKILL);
                    return;
                }
            }
        }
        self.metrics.queued.set(self.dispatcher.queued() as i64);
        self.metrics
            .in_flight
            .set((self.dispatcher.outstanding() - self.dispatcher.queued()) as i64);
    }

    /// Takes every message the workers sent, up to a fair share per turn.
    pub(super) fn on_replies(&mut self) -> anyhow::Result<()> {
        self.replies_pending = false;
        for _ in 0..REPLIES_PER_TURN {
            let message = match channel::try_recv(&self.replies) {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e).context("the workers' reply socket failed"),
            };
            match message.kind {
                Kind::Reply | Kind::Failed => {
                    let Some((slot, client)) = self.dispatcher.complete(message.value) else {
                        continue; // its worker was already given up on
                    };
                    if self.supervisor.note_served(slot) {
                        self.retire(slot, false);
                    } else if self.supervisor.is_retiring(slot) && self.dispatcher.held(slot) == 0 {
                        self.stop_retired(slot);
                    }
                    let Some(key) = client else {
                        continue; // the client went away
                    };
                    if message.kind == Kind::Failed {
                        let reason = String::from_utf8_lossy(&message.body).into_owned();
                        self.fail(key, message.value, Outcome::handler_error, reason);
                    } else {
                        self.deliver(key, message.value, Reply(message.body));
                    }
                }
                Kind::Ready => self.on_worker_ready(message.value, &message.body)?,
                Kind::InitFailed => {
                    let reason = String::from_utf8_lossy(&message.body).into_owned();
                    self.on_init_failed(message.value, reason)?;
                }
            }
        }
        self.replies_pending = true;
        Ok(())
    }

    /// Waits up to `limit` for worker messages and handles them: a worker
    /// that died while loading the handler sent its reason just before.
    /// Blocks the loop, so only for start-up and reload failures.
    fn await_messages(&mut self, limit: std::time::Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.poll(zmq::POLLIN, left.as_millis() as i64) {
                Ok(0) => return Ok(()),
                Ok(_) => return self.on_replies(),
                // Other workers exiting interrupt the wait.
                Err(zmq::Error::EINTR) if !left.is_zero() => continue,
                Err(zmq::Error::EINTR) => return Ok(()),
                Err(e) => return Err(e).context("waiting for worker messages"),
            }
        }
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

    fn on_worker_ready(&mut self, incarnation: u64, body: &[u8]) -> anyhow::Result<()> {
        let Some(slot) = self.supervisor.slot_of(incarnation) else {
            return Ok(()); // an incarnation already replaced
        };
        if self.supervisor.is_retiring(slot) {
            // Told to stop while starting (SIGTTOU, a rejected reload): it
            // gets no work, and exits on the signal it already has.
            return Ok(());
        }
        let pid: u32 = std::str::from_utf8(body)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0);
        let push = channel::socket(&self.zmq, zmq::PUSH)?;
        push.connect(&channel::worker_endpoint(&self.runtime_dir, incarnation))?;
        if self.pushes.len() <= slot {
            self.pushes.resize_with(slot + 1, || None);
        }
        self.drop_push(slot);
        self.poll.registry().register(
            &mut SourceFd(&push.as_raw_fd()),
            Token(PUSH_BASE + slot),
            Interest::READABLE,
        )?;
        self.pushes[slot] = Some(push);
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
        Ok(())
    }

    pub(super) fn drop_push(&mut self, slot: usize) {
        if let Some(push) = self.pushes.get_mut(slot).and_then(Option::take) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&push.as_raw_fd()));
            self.metrics.workers_ready.dec();
        }
    }

    /// Fails the requests a worker holds and stops sending it more; the
    /// process itself is reaped on SIGCHLD.
    /// Returns how many requests failed.
    fn lose_worker(&mut self, slot: usize, outcome: Outcome, why: &str) -> usize {
        self.drop_push(slot);
        let lost = self.dispatcher.worker_lost(slot);
        let failed = lost.len();
        for (id, key) in lost {
            self.fail(key, id, outcome, why.to_string());
        }
        failed
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
        self.drop_push(slot);
        self.supervisor.signal(slot, Signal::SIGTERM);
    }

    pub(super) fn on_worker_exits(&mut self) -> anyhow::Result<()> {
        for death in self.supervisor.reap() {
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
                // The worker's own account of why (its InitFailed message)
                // may still be on its way: give it a moment.
                self.await_messages(std::time::Duration::from_secs(1))?;
                bail!(
                    "handler {}: worker {how} while loading the handler",
                    self.supervisor.handler_source().display()
                );
            }
            // Its socket file is of no more use.
            let _ = std::fs::remove_file(channel::worker_socket(&self.runtime_dir, incarnation));
            if let Reload::Validating {
                incarnation: probe,
                deadline,
                died,
                ..
            } = &mut self.reload
            {
                if *probe == incarnation {
                    // Its own reason (InitFailed) may still be on its way:
                    // wait briefly for it without blocking the loop.
                    *died = Some(format!("its first worker {how} while loading it"));
                    *deadline = Some(Instant::now() + std::time::Duration::from_millis(500));
                    self.supervisor.retire(slot, true);
                    self.lose_worker(slot, Outcome::worker_lost, "its worker died");
                    continue;
                }
            }
            let failed = self.lose_worker(slot, Outcome::worker_lost, &format!("its worker {how}"));
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
            log::warn!(
                "worker {incarnation} (slot {slot}) {how}{stage}; {failed} requests failed{next}"
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
    /// does with stuck workers).
    pub(super) fn kill_overdue(&mut self, now: Instant) {
        for slot in self.dispatcher.overdue(now) {
            log::error!(
                "a request ran past --timeout ({:?}) in worker slot {slot}; killing the worker",
                self.config.timeout.unwrap_or_default()
            );
            self.lose_worker(slot, Outcome::timeout, "request ran past --timeout");
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
                    died: None,
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
            self.drop_push(slot);
        }
        self.reload = Reload::Idle;
        // Its snapshot goes once the worker is reaped (on_worker_exits).
        self.notify("READY=1");
    }

    pub(super) fn reload_timeout(&mut self, now: Instant) {
        if let Reload::Validating {
            deadline: Some(deadline),
            died,
            ..
        } = &self.reload
        {
            if now >= *deadline {
                let reason = died.clone().unwrap_or_else(|| {
                    "the new handler did not finish loading within --timeout".to_string()
                });
                self.reject_reload(&reason);
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
