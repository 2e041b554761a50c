//! Claims: one word of memory per request a worker holds, shared by the
//! daemon and that worker (a memfd both map), so that exactly one of them
//! decides what becomes of a staged request. The worker claims a request
//! (staged → started) before it runs it; the daemon can take back one still
//! staged (staged → withdrawn) and give it to another worker. Each is one
//! compare-and-swap, so they cannot both win, and a request never runs twice.
//!
//! It also tells the daemon, when a worker dies, exactly which of its
//! requests had started: those fail, the others go to other workers.
//!
//! A word holds a request id and its state; a request travels with the
//! index of its word (its *entry*, see `link::Kind::Request`).

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Words per worker: as many as the most requests a worker may hold.
pub const ENTRIES: usize = 64;
const BYTES: usize = ENTRIES * std::mem::size_of::<u64>();

const STAGED: u64 = 1;
const STARTED: u64 = 2;
const WITHDRAWN: u64 = 3;

fn word(id: u64, state: u64) -> u64 {
    (id << 2) | state
}

/// One worker's words, mapped in this process.
pub struct Claims {
    base: NonNull<AtomicU64>,
}

impl Claims {
    /// Makes a new set of words (all free), for a worker about to start.
    /// Returns them and the memfd to hand to the worker (close-on-exec).
    pub fn create() -> io::Result<(Claims, OwnedFd)> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"gaspard-claims", MemFdCreateFlag::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, BYTES as i64)?;
        Ok((Claims::map(&fd)?, fd))
    }

    /// Maps the words the daemon made (in the worker), after checking that
    /// `fd` is what the daemon passed: a file of exactly their size.
    pub fn open(fd: OwnedFd) -> io::Result<Claims> {
        let size = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if size != BYTES as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("claims fd has {size} bytes, not {BYTES}"),
            ));
        }
        Claims::map(&fd)
    }

    fn map(fd: &impl AsFd) -> io::Result<Claims> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let len = NonZeroUsize::new(BYTES).expect("not zero");
        // SAFETY: a fresh shared mapping of a file that is exactly `BYTES`
        // long; nothing else in this process maps or frees it, and it is
        // unmapped only when this `Claims` is dropped.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Ok(Claims { base: base.cast() })
    }

    fn entry(&self, entry: usize) -> &AtomicU64 {
        assert!(entry < ENTRIES, "claim entry {entry} out of range");
        // SAFETY: the mapping is page-aligned and `BYTES` long, so entry
        // `entry < ENTRIES` is an aligned u64 inside it; AtomicU64 has u64's
        // layout; and it lives as long as `self`. Other processes touch it
        // only through atomic operations.
        unsafe { &*self.base.as_ptr().add(entry) }
    }

    /// The daemon: request `id` is staged in `entry` (any previous holder of
    /// the entry is answered or taken back).
    pub fn stage(&self, entry: usize, id: u64) {
        self.entry(entry).store(word(id, STAGED), Ordering::Release);
    }

    /// The worker: claims request `id` before running it. False: the daemon
    /// took it back, and the worker must not run it.
    pub fn start(&self, entry: usize, id: u64) -> bool {
        self.swap(entry, id, STARTED)
    }

    /// The daemon: takes back request `id` if the worker has not started it.
    pub fn withdraw(&self, entry: usize, id: u64) -> bool {
        self.swap(entry, id, WITHDRAWN)
    }

    /// The daemon, once the worker is dead: whether it had started `id`.
    pub fn started(&self, entry: usize, id: u64) -> bool {
        self.entry(entry).load(Ordering::Acquire) == word(id, STARTED)
    }

    fn swap(&self, entry: usize, id: u64, to: u64) -> bool {
        self.entry(entry)
            .compare_exchange(
                word(id, STAGED),
                word(id, to),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_side_wins_each_request_and_the_other_sees_it() {
        let (daemon, fd) = Claims::create().unwrap();
        // The worker's mapping is the same memory.
        let worker = Claims::open(fd).unwrap();
        daemon.stage(0, 7);
        daemon.stage(1, 8);
        assert!(worker.start(0, 7));
        assert!(!daemon.withdraw(0, 7), "too late: it started");
        assert!(daemon.started(0, 7));
        assert!(daemon.withdraw(1, 8));
        assert!(!worker.start(1, 8), "taken back: the worker skips it");
        assert!(!daemon.started(1, 8));
        // An entry reused for another request: the old one's frame, read
        // late, cannot claim the new one.
        daemon.stage(1, 9);
        assert!(!worker.start(1, 8));
        assert!(worker.start(1, 9));
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused() {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"wrong", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 8).unwrap();
        assert!(Claims::open(fd).is_err());
    }
}
