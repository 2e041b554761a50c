//! Starting, watching, killing and restarting worker processes.
//!
//! A worker is started by fork+exec of gaspard's own binary in worker mode
//! (see `worker.rs`): a clean process that inherits nothing but its ends of
//! a new link (`link.rs`) and its claims (`claims.rs`), and the same path for
//! the first start and every restart. Each start is a new *incarnation* with
//! its own number and link, so nothing of a dead worker can be mistaken for
//! its replacement.
//!
//! Workers never load the operator's handler file directly: each *generation*
//! of the handler is a snapshot copied into the private runtime directory. A
//! worker that restarts loads its own generation's snapshot, so overwriting
//! or breaking the file on disk cannot crash or change running workers; only
//! a validated reload (SIGHUP) moves workers to a new generation.
//!
//! The supervisor owns processes only; the dispatcher owns the requests.

use super::args::{WorkerArgs, CONFIG_ENV};
use super::claims::Claims;
use super::endpoint::{Carrier, LinkError, Linking, NewLink};

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot make a worker's claims: {0}")]
    Claims(#[source] std::io::Error),
    #[error("cannot start a worker process: {0}")]
    Spawn(#[source] std::io::Error),
}
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The first restart delay after repeated failures; it doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Restarts are never spaced further apart than this.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What a slot is doing.
#[derive(Debug)]
enum SlotState {
    /// Started; waiting for its Ready message.
    Starting { child: Child, incarnation: u64 },
    /// Serving.
    Ready { child: Child, incarnation: u64 },
    /// Waiting to be restarted after failures.
    Backoff { until: Instant },
    /// No worker, and none to start: a free slot.
    Stopped,
    /// Lent to a worker host of the pool (`pool/server.rs`): no process of
    /// this daemon's, but a slot number the dispatcher knows it by.
    Lent,
}

/// One worker position, kept across restarts.
#[derive(Debug)]
struct Slot {
    state: SlotState,
    /// The handler generation this slot's workers load.
    generation: u64,
    /// Consecutive deaths without a served request in between.
    failures: u32,
    /// Requests the current incarnation has served.
    served: u64,
    /// The current incarnation is recycled after this many requests.
    request_limit: Option<u64>,
    /// Being stopped on purpose: its exit is no failure.
    retiring: bool,
    /// Not to be restarted once stopped (fewer workers, or replaced by a reload).
    removing: bool,
    /// Why the daemon killed its current worker, if it did.
    killed_because: Option<&'static str>,
}

impl Slot {
    /// Whether a process of this daemon's runs (or is about to) in this slot.
    fn is_live(&self) -> bool {
        !matches!(self.state, SlotState::Stopped | SlotState::Lent)
    }

    /// Whether it counts towards the worker count: live and staying.
    fn is_active(&self) -> bool {
        self.is_live() && !self.removing
    }
}

/// Why a worker went away.
#[derive(Debug, Clone)]
pub(super) struct Death {
    pub(super) slot: usize,
    pub(super) incarnation: u64,
    pub(super) status: ExitStatus,
    /// It never reported Ready.
    pub(super) before_ready: bool,
    /// It was stopped on purpose, not a failure.
    pub(super) retired: bool,
    /// Its slot is now free (`false`: a worker restarts after `restart_in`).
    pub(super) removed: bool,
    /// When the slot's next worker starts (back-off after repeated failures).
    pub(super) restart_in: Duration,
    /// Why the daemon killed it, if it did: its death is that cause's
    /// consequence, not news of its own.
    pub(super) killed_because: Option<&'static str>,
}

/// What became of a signal meant for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signalled {
    Sent,
    /// Not sent: the worker has exited (its pid is no longer its own).
    Exited,
    /// Not sent: no worker runs in that slot.
    NotRunning,
    /// kill(2) refused.
    Failed(nix::errno::Errno),
}

/// When workers are recycled (--max-requests and its jitter).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Recycling {
    pub(crate) max_requests: Option<u64>,
    pub(crate) jitter: u64,
}

pub(crate) struct Supervisor {
    program: PathBuf,
    template: WorkerArgs,
    /// Where handler snapshots are kept (the private runtime directory).
    runtime_dir: PathBuf,
    /// The daemon's log filter, so workers log at the same level.
    log_filter: String,
    recycling: Recycling,
    /// Handler snapshots by generation.
    snapshots: BTreeMap<u64, PathBuf>,
    next_incarnation: u64,
    slots: Vec<Slot>,
}

impl Supervisor {
    /// `template.handler` is the operator's file; workers load snapshots of it.
    pub(crate) fn new(
        program: PathBuf,
        template: WorkerArgs,
        runtime_dir: PathBuf,
        log_filter: &str,
        recycling: Recycling,
    ) -> Supervisor {
        Supervisor {
            program,
            template,
            runtime_dir,
            log_filter: log_filter.to_string(),
            recycling,
            snapshots: BTreeMap::new(),
            next_incarnation: 1,
            slots: Vec::new(),
        }
    }

    /// Copies the handler file into the runtime directory as a new generation.
    pub(crate) fn snapshot_handler(&mut self) -> std::io::Result<u64> {
        let generation = self.snapshots.keys().next_back().map_or(1, |g| g + 1);
        let snapshot = self.runtime_dir.join(format!("handler-{generation}.so"));
        std::fs::copy(&self.template.handler, &snapshot)?;
        self.snapshots.insert(generation, snapshot);
        Ok(generation)
    }

    /// Deletes the snapshots no slot uses any more, except `keep`.
    pub(crate) fn forget_unused_snapshots(&mut self, keep: u64) {
        let used: Vec<u64> = self
            .slots
            .iter()
            .filter(|slot| slot.is_live())
            .map(|slot| slot.generation)
            .collect();
        self.snapshots.retain(|generation, path| {
            let keep = *generation == keep || used.contains(generation);
            if !keep {
                let _ = std::fs::remove_file(path.as_path());
            }
            keep
        });
    }

    /// The operator's handler file.
    pub(crate) fn handler_source(&self) -> &Path {
        &self.template.handler
    }

    /// Adds a worker position for `generation` (reusing a free one) and
    /// starts its worker, linked as `linking` says. Returns the slot, the
    /// daemon's end of the link and the worker's claims.
    pub(crate) fn add(
        &mut self,
        generation: u64,
        linking: &Linking,
    ) -> Result<(usize, Carrier, Claims), StartError> {
        let slot = self.free_slot(generation);
        let entry = &mut self.slots[slot];
        entry.generation = generation;
        entry.failures = 0;
        entry.removing = false;
        let (carrier, claims) = self.start(slot, linking)?;
        Ok((slot, carrier, claims))
    }

    /// A free slot (a new one if none is free), for `generation`.
    fn free_slot(&mut self, generation: u64) -> usize {
        if let Some(free) = self
            .slots
            .iter()
            .position(|slot| matches!(slot.state, SlotState::Stopped))
        {
            return free;
        }
        self.slots.push(Slot {
            state: SlotState::Stopped,
            generation,
            failures: 0,
            served: 0,
            request_limit: None,
            retiring: false,
            removing: false,
            killed_because: None,
        });
        self.slots.len() - 1
    }

    /// Lends a slot to a worker host: the slot number is the host's in the
    /// dispatcher until [`Self::give_back`].
    pub(crate) fn lend(&mut self) -> usize {
        let slot = self.free_slot(0);
        let entry = &mut self.slots[slot];
        entry.state = SlotState::Lent;
        entry.failures = 0;
        entry.retiring = false;
        entry.removing = false;
        entry.request_limit = None;
        slot
    }

    /// A worker host's slot is free again.
    pub(crate) fn give_back(&mut self, slot: usize) {
        if let Some(entry) = self.slots.get_mut(slot) {
            if matches!(entry.state, SlotState::Lent) {
                entry.state = SlotState::Stopped;
            }
        }
    }

    /// Starts a worker in `slot`, linked as `linking` says. Returns the
    /// daemon's end of its link, and its claims.
    pub(crate) fn start(
        &mut self,
        slot: usize,
        linking: &Linking,
    ) -> Result<(Carrier, Claims), StartError> {
        let started = self.spawn(slot, linking);
        if started.is_err() {
            // Try again later rather than never, and not on every loop turn.
            self.slots[slot].state = SlotState::Backoff {
                until: Instant::now() + MAX_BACKOFF,
            };
        }
        started
    }

    fn spawn(&mut self, slot: usize, linking: &Linking) -> Result<(Carrier, Claims), StartError> {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let generation = self.slots[slot].generation;
        let snapshot = self.snapshots.get(&generation).cloned().ok_or_else(|| {
            StartError::Spawn(std::io::Error::other(format!(
                "no snapshot of handler generation {generation}"
            )))
        })?;
        let NewLink {
            carrier,
            args: link_args,
            inherit,
        } = linking.open(incarnation)?;
        let (claims, claims_fd) = Claims::create(linking.area_len()).map_err(StartError::Claims)?;
        let args = WorkerArgs {
            link: link_args,
            claims_fd: claims_fd.as_raw_fd(),
            incarnation,
            slot,
            load_from: snapshot,
            ..self.template.clone()
        };
        let mut command = Command::new(&self.program);
        crate::notify::forget_daemon_env(&mut command);
        // The fds the worker inherits. The loop thread is the only one that
        // starts processes, and all are closed (dropped) right after, so no
        // other child can inherit them.
        for fd in inherit.iter().chain([&claims_fd]).map(AsRawFd::as_raw_fd) {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(|e| StartError::Spawn(e.into()))?;
        }
        let spawned = command
            .args(args.to_args())
            .stdin(Stdio::null())
            .env(crate::logging::FILTER_ENV, &self.log_filter)
            .env(CONFIG_ENV, &self.template.handler_config)
            // Its own process group: a terminal's Ctrl-C reaches the daemon
            // alone, which then stops the workers in order.
            .process_group(0)
            .spawn();
        drop(inherit);
        drop(claims_fd);
        let child = spawned.map_err(StartError::Spawn)?;
        log::debug!(
            "worker {incarnation} started in slot {slot} (pid {}, handler generation {generation})",
            child.id()
        );
        let jitter = match self.recycling.jitter {
            0 => 0,
            n => random_u64() % (n + 1),
        };
        let slot = &mut self.slots[slot];
        slot.state = SlotState::Starting { child, incarnation };
        slot.served = 0;
        slot.retiring = false;
        slot.killed_because = None;
        slot.request_limit = self
            .recycling
            .max_requests
            .map(|n| n.saturating_add(jitter));
        Ok((carrier, claims))
    }

    /// The incarnation running (or starting) in `slot`.
    pub(crate) fn incarnation_of(&self, slot: usize) -> Option<u64> {
        match self.slots.get(slot)?.state {
            SlotState::Starting { incarnation, .. } | SlotState::Ready { incarnation, .. } => {
                Some(incarnation)
            }
            _ => None,
        }
    }

    /// The process id of the worker running (or starting) in `slot`. Not
    /// reaped yet, so the pid is still this worker's.
    pub(crate) fn pid_of(&self, slot: usize) -> Option<u32> {
        match &self.slots.get(slot)?.state {
            SlotState::Starting { child, .. } | SlotState::Ready { child, .. } => Some(child.id()),
            _ => None,
        }
    }

    /// How many workers serve (ready, and not being stopped).
    pub(crate) fn ready_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| matches!(slot.state, SlotState::Ready { .. }) && !slot.retiring)
            .count()
    }

    /// Whether the worker in `slot` has said it is ready.
    pub(crate) fn is_ready(&self, slot: usize) -> bool {
        matches!(self.slots[slot].state, SlotState::Ready { .. })
    }

    /// How many worker positions there are, free ones included.
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The last slot whose worker counts towards the worker count, other
    /// than `except`: the one to retire when there should be one fewer.
    pub(crate) fn last_active(&self, except: Option<usize>) -> Option<usize> {
        (0..self.slots.len())
            .rev()
            .find(|&i| self.slots[i].is_active() && Some(i) != except)
    }

    /// Whether a worker of `generation` is starting (not backing off).
    pub(crate) fn any_starting(&self, generation: u64) -> bool {
        self.slots.iter().any(|slot| {
            slot.generation == generation
                && slot.is_active()
                && matches!(slot.state, SlotState::Starting { .. })
        })
    }

    /// The first staying worker of another generation than `generation`.
    pub(crate) fn first_active_not_of(&self, generation: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.is_active() && slot.generation != generation)
    }

    /// Whether a worker of another generation still runs (finishing).
    pub(crate) fn any_live_not_of(&self, generation: u64) -> bool {
        self.slots
            .iter()
            .any(|slot| slot.is_live() && slot.generation != generation)
    }

    /// How many staying workers run `generation`.
    pub(crate) fn active_of(&self, generation: u64) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.is_active() && slot.generation == generation)
            .count()
    }

    /// Marks a starting worker as serving.
    pub(crate) fn mark_ready(&mut self, slot: usize) {
        let state = std::mem::replace(&mut self.slots[slot].state, SlotState::Stopped);
        self.slots[slot].state = match state {
            SlotState::Starting { child, incarnation } => SlotState::Ready { child, incarnation },
            other => other,
        };
    }

    /// Marks a worker to be stopped on purpose; with `remove`, its slot is
    /// freed afterwards instead of restarted. A slot with no process is
    /// freed (or left to restart) at once.
    pub(crate) fn retire(&mut self, slot: usize, remove: bool) {
        let entry = &mut self.slots[slot];
        entry.removing |= remove;
        match entry.state {
            SlotState::Starting { .. } | SlotState::Ready { .. } => entry.retiring = true,
            SlotState::Backoff { .. } if entry.removing => entry.state = SlotState::Stopped,
            _ => {}
        }
    }

    /// Whether the worker in `slot` is being stopped on purpose.
    pub(crate) fn is_retiring(&self, slot: usize) -> bool {
        self.slots[slot].retiring
    }

    /// The slots whose worker has exited but is not yet reaped: what they
    /// wrote before dying is all in their links now, to be read first.
    pub(crate) fn exited(&mut self) -> Vec<usize> {
        let mut exited = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let SlotState::Starting { child, .. } | SlotState::Ready { child, .. } =
                &mut slot.state
            {
                // The status is kept by `child` for `reap`.
                if matches!(child.try_wait(), Ok(Some(_))) {
                    exited.push(index);
                }
            }
        }
        exited
    }

    /// The exit code of the worker in `slot`, if it has exited with one and
    /// is not reaped yet.
    pub(crate) fn exit_code(&mut self, slot: usize) -> Option<i32> {
        match &mut self.slots.get_mut(slot)?.state {
            SlotState::Starting { child, .. } | SlotState::Ready { child, .. } => {
                child.try_wait().ok().flatten()?.code()
            }
            _ => None,
        }
    }

    /// Collects the workers of `slots` that have exited (see [`Self::exited`]).
    pub(crate) fn reap(&mut self, slots: &[usize]) -> Vec<Death> {
        let mut deaths = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if !slots.contains(&index) {
                continue;
            }
            let (child, incarnation, before_ready) = match &mut slot.state {
                SlotState::Starting { child, incarnation } => (child, *incarnation, true),
                SlotState::Ready {
                    child, incarnation, ..
                } => (child, *incarnation, false),
                _ => continue,
            };
            let status = match child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    log::error!("cannot wait for worker {incarnation}: {e}");
                    continue;
                }
            };
            let retired = slot.retiring;
            let delay = if retired || slot.failures < 1 {
                Duration::ZERO
            } else {
                FIRST_BACKOFF
                    .saturating_mul(1 << (slot.failures - 1).min(16))
                    .min(MAX_BACKOFF)
            };
            if !retired {
                slot.failures = slot.failures.saturating_add(1);
            }
            slot.retiring = false;
            slot.state = if slot.removing {
                SlotState::Stopped
            } else {
                SlotState::Backoff {
                    until: Instant::now() + delay,
                }
            };
            deaths.push(Death {
                slot: index,
                incarnation,
                status,
                before_ready,
                retired,
                removed: slot.removing,
                restart_in: delay,
                killed_because: slot.killed_because.take(),
            });
        }
        deaths
    }

    /// A worker answered a request (even with a handler error): the handler
    /// works, so a later death restarts at once. Returns true when the worker
    /// has reached its --max-requests and should be retired.
    pub(crate) fn note_served(&mut self, slot: usize) -> bool {
        let slot = &mut self.slots[slot];
        slot.failures = 0;
        slot.served += 1;
        !slot.retiring && slot.request_limit.is_some_and(|limit| slot.served >= limit)
    }

    /// Whether no worker can serve and every active slot keeps failing (died
    /// twice or more without serving a request): the handler crashes at init
    /// or on every request, and restarts are backing off. One death is not
    /// enough: a crash on one bad request restarts at once.
    pub(crate) fn all_failing(&self) -> bool {
        let mut active = self.slots.iter().filter(|slot| slot.is_active()).peekable();
        active.peek().is_some()
            && active
                .all(|slot| slot.failures >= 2 && !matches!(slot.state, SlotState::Ready { .. }))
    }

    /// Slots whose back-off has run out, to be started again.
    pub(crate) fn due(&self, now: Instant) -> Vec<usize> {
        (0..self.slots.len())
            .filter(
                |&i| matches!(self.slots[i].state, SlotState::Backoff { until } if until <= now),
            )
            .collect()
    }

    /// The earliest back-off deadline, for the loop's timeout.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|slot| match slot.state {
                SlotState::Backoff { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Sends `signal` to the worker in `slot`, if it is running. Never once
    /// its exit status is known: from then on its pid may be reused by an
    /// unrelated process. Until that status is collected (here, or by
    /// [`Self::exited`]), an exited worker is a zombie whose pid is still
    /// ours, and nothing else in the daemon reaps children.
    pub(crate) fn signal(&mut self, slot: usize, signal: Signal) -> Signalled {
        let child = match &mut self.slots[slot].state {
            SlotState::Starting { child, .. } | SlotState::Ready { child, .. } => child,
            _ => return Signalled::NotRunning,
        };
        // `try_wait` keeps a status it found, so a known exit is never
        // asked for again, nor signalled.
        if !matches!(child.try_wait(), Ok(None)) {
            return Signalled::Exited;
        }
        match kill(Pid::from_raw(child.id() as i32), signal) {
            Ok(()) => Signalled::Sent,
            Err(e) => {
                log::warn!("cannot send {signal} to worker pid {}: {e}", child.id());
                Signalled::Failed(e)
            }
        }
    }

    /// Kills the worker in `slot` (SIGKILL), remembering why for the account
    /// of its death.
    pub(crate) fn kill(&mut self, slot: usize, because: &'static str) -> Signalled {
        let signalled = self.signal(slot, Signal::SIGKILL);
        if signalled == Signalled::Sent {
            self.slots[slot].killed_because.get_or_insert(because);
        }
        signalled
    }

    /// Whether any worker process is still running.
    pub(crate) fn any_running(&self) -> bool {
        self.slots.iter().any(|slot| {
            matches!(
                slot.state,
                SlotState::Starting { .. } | SlotState::Ready { .. }
            )
        })
    }

    /// Stops every worker: SIGTERM, then SIGKILL after `grace`, and waits for
    /// all of them so that none outlives the daemon.
    pub(crate) fn stop_all(&mut self, grace: Duration) {
        for slot in 0..self.slots.len() {
            self.retire(slot, true);
            self.signal(slot, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        loop {
            let all: Vec<usize> = (0..self.slots.len()).collect();
            self.reap(&all);
            if !self.any_running() {
                break;
            }
            if Instant::now() >= deadline {
                for slot in 0..self.slots.len() {
                    self.signal(slot, Signal::SIGKILL);
                }
                for slot in &mut self.slots {
                    if let SlotState::Starting { child, .. } | SlotState::Ready { child, .. } =
                        &mut slot.state
                    {
                        let _ = child.wait();
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for slot in &mut self.slots {
            slot.state = SlotState::Stopped;
        }
        self.forget_unused_snapshots(0);
    }
}

/// A random number for jitter, from the standard library's per-process
/// random hash keys (no dependency needed for this little).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Describes a child's exit status for the log: "exited with status 3",
/// "was killed by SIGSEGV".
pub(crate) fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(signal) = status.signal() {
        match Signal::try_from(signal) {
            Ok(signal) => format!("was killed by {signal}"),
            Err(_) => format!("was killed by signal {signal}"),
        }
    } else {
        status.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervisor whose "workers" are `true`: they exit at once.
    fn supervisor(dir: &Path) -> Supervisor {
        let handler = dir.join("handler.so");
        std::fs::write(&handler, b"not loaded").unwrap();
        let template = WorkerArgs::template(handler, String::new());
        let mut supervisor = Supervisor::new(
            PathBuf::from("/bin/true"),
            template,
            dir.to_path_buf(),
            "info",
            Recycling::default(),
        );
        supervisor.snapshot_handler().unwrap();
        supervisor
    }

    fn wait_exited(supervisor: &mut Supervisor) -> Vec<usize> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exited = supervisor.exited();
            if !exited.is_empty() || Instant::now() > deadline {
                return exited;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_worker_that_cannot_be_started_backs_off_instead_of_being_retried_every_turn() {
        let dir = tempfile::tempdir().unwrap();
        let mut supervisor = supervisor(dir.path());
        // Generation 2 has no snapshot: starting it fails.
        assert!(supervisor.add(2, &Linking::Local { area_len: 0 }).is_err());
        let now = Instant::now();
        assert!(supervisor.due(now).is_empty(), "not due again at once");
        let next = supervisor.next_deadline().expect("a start is planned");
        assert!(
            next >= now + MAX_BACKOFF - Duration::from_secs(1),
            "{:?}",
            next - now
        );
    }

    #[test]
    fn lent_slots_are_no_workers_and_are_not_reused_until_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut supervisor = supervisor(dir.path());
        let lent = supervisor.lend();
        let (slot, _link, _claims) = supervisor.add(1, &Linking::Local { area_len: 0 }).unwrap();
        assert_ne!(slot, lent);
        assert_eq!(supervisor.ready_count(), 0);
        assert_eq!(
            supervisor.last_active(None),
            Some(slot),
            "never retired by SIGTTOU"
        );
        assert_eq!(supervisor.incarnation_of(lent), None);
        assert_eq!(
            supervisor.signal(lent, Signal::SIGTERM),
            Signalled::NotRunning
        );
        supervisor.give_back(lent);
        assert_eq!(supervisor.lend(), lent, "free again");
    }

    #[test]
    fn a_worker_whose_exit_is_known_is_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let mut supervisor = supervisor(dir.path());
        let (slot, _link, _claims) = supervisor.add(1, &Linking::Local { area_len: 0 }).unwrap();
        assert_eq!(wait_exited(&mut supervisor), vec![slot]);
        // Its status is known, so its pid may belong to anyone by now.
        assert_eq!(supervisor.signal(slot, Signal::SIGKILL), Signalled::Exited);
        let deaths = supervisor.reap(&[slot]);
        assert_eq!(deaths.len(), 1);
        assert_eq!(deaths[0].status.code(), Some(0), "the status is kept");
        assert_eq!(
            supervisor.signal(slot, Signal::SIGKILL),
            Signalled::NotRunning
        );
    }

    #[test]
    fn signalling_a_worker_that_just_exited_does_not_lose_its_death() {
        let dir = tempfile::tempdir().unwrap();
        let mut supervisor = supervisor(dir.path());
        let (slot, _link, _claims) = supervisor.add(1, &Linking::Local { area_len: 0 }).unwrap();
        // Exited, but nobody has looked yet (a SIGCHLD on its way).
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(supervisor.signal(slot, Signal::SIGTERM), Signalled::Exited);
        assert_eq!(supervisor.exited(), vec![slot], "still reported once");
        assert_eq!(supervisor.reap(&[slot]).len(), 1);
    }
}
