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
//! A request travels with a [`Ticket`]: the index of its word (its entry)
//! and a generation, new each time the entry is used, so that a frame read
//! late can never claim a later use of the same entry (not even by the same
//! request, sent again). The word holds generation, request id and state.
//!
//! The same memory holds the worker's reply ring (see [`Ring`]) and, on
//! the local link, its two body areas (`areas.rs`): one the daemon copies
//! large request bodies into, one the worker's handler writes large
//! replies into. Their size is the file's: the daemon chooses it, the
//! worker reads it.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Words per worker: as many as the most requests a worker may hold.
pub const ENTRIES: usize = 64;
/// Where the ring's positions are: bytes written (the worker's), bytes taken
/// (the daemon's), each on a cache line of its own, after the claim words.
const HEAD_AT: usize = 512;
const TAIL_AT: usize = 576;
const _: () = assert!(ENTRIES * std::mem::size_of::<u64>() <= HEAD_AT);
/// Where the ring's bytes start: the second page.
const RING_AT: usize = 4096;
/// The ring's size. Its pages are only taken once written.
pub const RING_LEN: usize = 128 * 1024;
/// Where the daemon publishes how far it has taken the reply area.
const AREA_TAIL_AT: usize = 640;
/// The words, the positions and the ring: the memory without body areas.
const BASE_BYTES: usize = RING_AT + RING_LEN;
/// Where the request area begins (a page boundary).
const AREAS_AT: usize = BASE_BYTES;
/// The largest body area: a body larger than this takes the link's sockets.
pub const MAX_AREA: usize = 256 << 20;
pub const PAGE: usize = 4096;
const _: () = assert!(BASE_BYTES % PAGE == 0 && AREA_TAIL_AT % 64 == 0);

const STAGED: u64 = 1;
const STARTED: u64 = 2;
const WITHDRAWN: u64 = 3;

/// Low bits of the request id kept in a word (the generation makes each
/// use of an entry unique anyway; the id is a check on top).
const ID_BITS: u32 = 46;

/// Where a request's word is, and which use of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ticket {
    pub entry: usize,
    pub generation: u16,
}

impl Ticket {
    /// The 22 bits a request frame carries (`link::request_header`).
    pub fn encode(self) -> u32 {
        self.entry as u32 | (u32::from(self.generation) << 6)
    }

    /// `None` for bits a ticket never has.
    pub fn decode(bits: u32) -> Option<Ticket> {
        let entry = (bits & 0x3f) as usize;
        let generation = u16::try_from(bits >> 6).ok()?;
        Some(Ticket { entry, generation })
    }
}

fn word(ticket: Ticket, id: u64, state: u64) -> u64 {
    let id = id & ((1 << ID_BITS) - 1);
    (u64::from(ticket.generation) << (ID_BITS + 2)) | (id << 2) | state
}

/// One worker's words, mapped in this process.
pub struct Claims {
    base: NonNull<AtomicU64>,
    /// Bytes in each body area (0: none).
    area_len: usize,
}

/// The size of each body area for requests of up to `max_body` bytes: a
/// whole number of pages, at most [`MAX_AREA`]. Its pages are only taken
/// once written, and given back when unused (`areas.rs`).
pub fn area_len_for(max_body: usize) -> usize {
    max_body.div_ceil(PAGE).saturating_mul(PAGE).min(MAX_AREA)
}

impl Claims {
    /// Makes a new set of words (all free), for a worker about to start,
    /// with body areas of `area_len` bytes each (see [`area_len_for`]; 0
    /// for none). Returns them and the memfd to hand to the worker
    /// (close-on-exec).
    pub fn create(area_len: usize) -> io::Result<(Claims, OwnedFd)> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        use std::os::fd::AsRawFd;
        let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
        let fd = memfd_create(c"gaspard-claims", flags)?;
        assert!(
            area_len % PAGE == 0 && area_len <= MAX_AREA,
            "area of {area_len} bytes"
        );
        let bytes = BASE_BYTES + 2 * area_len;
        nix::unistd::ftruncate(&fd, bytes as i64)?;
        // Its size is fixed for good: a worker shrinking it would make the
        // daemon's next access to the mapping fault.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
        Ok((Claims::map(&fd, area_len)?, fd))
    }

    /// Maps the words the daemon made (in the worker), after checking that
    /// `fd` is what the daemon passed: a sealed file of the size of the
    /// words and ring plus two equal body areas. Both areas are mapped
    /// read-only: a handler that writes through a stray pointer faults
    /// rather than change a request staged behind the one it runs, or a
    /// reply the daemon still writes to a client (`ReplyArea` makes the
    /// buffer it hands out writable, until a call or the handler's shutdown
    /// finds the daemon holding a reply).
    pub fn open(fd: OwnedFd) -> io::Result<Claims> {
        let size = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        let areas = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_sub(BASE_BYTES));
        let area_len = areas
            .map(|areas| areas / 2)
            .filter(|area| Some(2 * area) == areas && area % PAGE == 0 && *area <= MAX_AREA);
        let Some(area_len) = area_len else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("claims fd has {size} bytes, not {BASE_BYTES} plus two body areas"),
            ));
        };
        let claims = Claims::map(&fd, area_len)?;
        if let Some(start) = NonNull::new(claims.area(true)).filter(|_| area_len > 0) {
            use nix::sys::mman::{mprotect, ProtFlags};
            // SAFETY: the two areas are the last 2 * `area_len` bytes of the
            // mapping just made, page-aligned (AREAS_AT and area_len are
            // whole pages); no reference into them exists yet.
            unsafe { mprotect(start.cast(), 2 * area_len, ProtFlags::PROT_READ) }?;
        }
        Ok(claims)
    }

    fn bytes(&self) -> usize {
        BASE_BYTES + 2 * self.area_len
    }

    fn map(fd: &impl AsFd, area_len: usize) -> io::Result<Claims> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let len = NonZeroUsize::new(BASE_BYTES + 2 * area_len).expect("not zero");
        // SAFETY: a fresh shared mapping of a file that is exactly `len`
        // long (sealed so, see `create`); nothing else in this process maps
        // or frees it, and it is unmapped only when this `Claims` is dropped.
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
        Ok(Claims {
            base: base.cast(),
            area_len,
        })
    }

    /// The reply ring in this memory.
    pub fn ring(&self) -> Ring<'_> {
        Ring { claims: self }
    }

    /// Bytes in each body area (0: this worker has none).
    pub fn area_len(&self) -> usize {
        self.area_len
    }

    /// The start of the request area (`requests`) or the reply area.
    pub fn area(&self, requests: bool) -> *mut u8 {
        let at = AREAS_AT + if requests { 0 } else { self.area_len };
        // SAFETY: `at` is at most BASE_BYTES + area_len: inside the mapping,
        // or its end when the areas are empty.
        unsafe { self.base.as_ptr().cast::<u8>().add(at) }
    }

    /// How far the daemon has taken replies from the reply area.
    pub fn area_tail(&self) -> u64 {
        self.atomic_at(AREA_TAIL_AT).load(Ordering::Acquire)
    }

    /// The daemon: replies up to `tail` are taken, and their bytes may be
    /// written again.
    pub fn publish_area_tail(&self, tail: u64) {
        self.atomic_at(AREA_TAIL_AT).store(tail, Ordering::Release);
    }

    /// The u64 at byte `at` (a multiple of 8, below [`RING_AT`]).
    fn atomic_at(&self, at: usize) -> &AtomicU64 {
        assert!(at % 8 == 0 && at < RING_AT, "offset {at} is not a word");
        // SAFETY: the mapping is page-aligned and longer than RING_AT, so `at`
        // (checked above) is an aligned u64 inside it; AtomicU64 has u64's
        // layout; it lives as long as `self`; other processes touch it only
        // through atomic operations.
        unsafe { &*self.base.as_ptr().cast::<u8>().add(at).cast::<AtomicU64>() }
    }

    fn word(&self, entry: usize) -> &AtomicU64 {
        assert!(entry < ENTRIES, "claim entry {entry} out of range");
        // SAFETY: the mapping is page-aligned and longer than RING_AT, so entry
        // `entry < ENTRIES` is an aligned u64 inside it; AtomicU64 has u64's
        // layout; and it lives as long as `self`. Other processes touch it
        // only through atomic operations.
        unsafe { &*self.base.as_ptr().add(entry) }
    }

    /// The daemon: request `id` is staged under `ticket` (the entry's
    /// previous use is answered or taken back).
    pub fn stage(&self, ticket: Ticket, id: u64) {
        self.word(ticket.entry)
            .store(word(ticket, id, STAGED), Ordering::Release);
    }

    /// The worker: claims request `id` before running it. False: the daemon
    /// took it back (or this frame is a stale one), and it must not run.
    pub fn start(&self, ticket: Ticket, id: u64) -> bool {
        self.swap(ticket, id, STARTED)
    }

    /// The daemon: takes back request `id` if the worker has not started it.
    pub fn withdraw(&self, ticket: Ticket, id: u64) -> bool {
        self.swap(ticket, id, WITHDRAWN)
    }

    /// The daemon, once the worker is dead: whether it had started `id`.
    pub fn started(&self, ticket: Ticket, id: u64) -> bool {
        self.word(ticket.entry).load(Ordering::Acquire) == word(ticket, id, STARTED)
    }

    fn swap(&self, ticket: Ticket, id: u64, to: u64) -> bool {
        self.word(ticket.entry)
            .compare_exchange(
                word(ticket, id, STAGED),
                word(ticket, id, to),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), self.bytes()) };
    }
}

/// The reply ring: [`RING_LEN`] bytes that the worker writes at its head
/// and the daemon reads at its tail, both counted in bytes since the start
/// (never wrapping in practice). Only the worker moves the head and only
/// the daemon the tail; each keeps its own position and publishes it, and
/// the daemon never trusts what the worker publishes beyond checking it
/// (`link.rs`): the bytes it copies out are untrusted like any frame.
pub struct Ring<'a> {
    claims: &'a Claims,
}

impl Ring<'_> {
    /// How far the worker has written.
    pub fn head(&self) -> u64 {
        self.claims.atomic_at(HEAD_AT).load(Ordering::Acquire)
    }

    /// The worker: bytes up to `head` are written.
    pub fn publish_head(&self, head: u64) {
        self.claims
            .atomic_at(HEAD_AT)
            .store(head, Ordering::Release);
    }

    /// How far the daemon has read.
    pub fn tail(&self) -> u64 {
        self.claims.atomic_at(TAIL_AT).load(Ordering::Acquire)
    }

    /// The daemon: bytes up to `tail` are read, and may be written again.
    pub fn publish_tail(&self, tail: u64) {
        self.claims
            .atomic_at(TAIL_AT)
            .store(tail, Ordering::Release);
    }

    /// The ring's byte pointer for position `at`, and how many bytes follow
    /// it before the ring wraps.
    fn span(&self, at: u64) -> (*mut u8, usize) {
        let offset = (at % RING_LEN as u64) as usize;
        // SAFETY: RING_AT + offset < BASE_BYTES: inside the mapping.
        let ptr = unsafe { self.claims.base.as_ptr().cast::<u8>().add(RING_AT + offset) };
        (ptr, RING_LEN - offset)
    }

    /// Copies `bytes` (at most [`RING_LEN`]) into the ring at position `at`.
    pub fn write(&self, at: u64, bytes: &[u8]) {
        assert!(bytes.len() <= RING_LEN, "more than the ring holds");
        let (ptr, room) = self.span(at);
        let first = bytes.len().min(room);
        // SAFETY: `ptr` has `room` bytes of the mapping after it, and the
        // ring's start has RING_LEN; no reference to these bytes exists
        // anywhere (they are only ever copied in and out), and the other
        // process reads them only once told they are written.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, first);
            let (start, _) = self.span(0);
            std::ptr::copy_nonoverlapping(bytes[first..].as_ptr(), start, bytes.len() - first);
        }
    }

    /// Copies `out.len()` bytes (at most [`RING_LEN`]) from the ring at
    /// position `at`. What the worker wrote there may change meanwhile: the
    /// copy is untrusted, and no reference to the ring's bytes is made.
    pub fn read(&self, at: u64, out: &mut [u8]) {
        assert!(out.len() <= RING_LEN, "more than the ring holds");
        let (ptr, room) = self.span(at);
        let first = out.len().min(room);
        // SAFETY: as in `write`: both ranges lie inside the mapping, and
        // `out` is this process's own memory.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, out.as_mut_ptr(), first);
            let (start, _) = self.span(0);
            let rest = out.len() - first;
            std::ptr::copy_nonoverlapping(start, out[first..].as_mut_ptr(), rest);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_ring_is_shared_and_wraps() {
        let (daemon, fd) = Claims::create(0).unwrap();
        let worker = Claims::open(fd).unwrap();
        let at = RING_LEN as u64 * 3 - 5;
        worker.ring().write(at, b"0123456789");
        worker.ring().publish_head(at + 10);
        assert_eq!(daemon.ring().head(), at + 10);
        let mut out = [0; 10];
        daemon.ring().read(at, &mut out);
        assert_eq!(&out, b"0123456789");
        daemon.ring().publish_tail(at + 10);
        assert_eq!(worker.ring().tail(), at + 10);
        // The claims are untouched.
        daemon.stage(ticket(0, 1), 7);
        assert!(worker.start(ticket(0, 1), 7));
    }

    fn ticket(entry: usize, generation: u16) -> Ticket {
        Ticket { entry, generation }
    }

    #[test]
    fn one_side_wins_each_request_and_the_other_sees_it() {
        let (daemon, fd) = Claims::create(0).unwrap();
        // The worker's mapping is the same memory.
        let worker = Claims::open(fd).unwrap();
        daemon.stage(ticket(0, 1), 7);
        daemon.stage(ticket(1, 1), 8);
        assert!(worker.start(ticket(0, 1), 7));
        assert!(!daemon.withdraw(ticket(0, 1), 7), "too late: it started");
        assert!(daemon.started(ticket(0, 1), 7));
        assert!(daemon.withdraw(ticket(1, 1), 8));
        assert!(
            !worker.start(ticket(1, 1), 8),
            "taken back: the worker skips it"
        );
        assert!(!daemon.started(ticket(1, 1), 8));
        // The entry used again, even for the same request sent again: the
        // old frame, read late, cannot claim it; the new one can.
        daemon.stage(ticket(1, 2), 8);
        assert!(!worker.start(ticket(1, 1), 8));
        assert!(worker.start(ticket(1, 2), 8));
    }

    #[test]
    fn tickets_travel_in_22_bits() {
        for t in [ticket(0, 0), ticket(63, u16::MAX), ticket(17, 300)] {
            assert_eq!(Ticket::decode(t.encode()), Some(t));
            assert!(t.encode() < 1 << 22);
        }
        assert_eq!(Ticket::decode(1 << 22), None, "bits a ticket never has");
    }

    #[test]
    fn the_size_is_sealed() {
        let (_daemon, fd) = Claims::create(0).unwrap();
        assert!(nix::unistd::ftruncate(&fd, 8).is_err());
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused() {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        for size in [
            8,
            BASE_BYTES + PAGE,
            BASE_BYTES + 3 * PAGE,
            BASE_BYTES + 2 * MAX_AREA + 2 * PAGE,
        ] {
            let fd = memfd_create(c"wrong", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
            nix::unistd::ftruncate(&fd, size as i64).unwrap();
            assert!(Claims::open(fd).is_err(), "{size} bytes");
        }
    }

    /// The permissions of this process's mapping that begins at `start`
    /// (as `/proc/self/maps` shows them, e.g. " r--s "), or "" if none does.
    pub(crate) fn mapping_perms(start: usize) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|line| line.starts_with(&format!("{start:x}-")))
            .map(str::to_string);
        line.unwrap_or_default()
    }

    #[test]
    fn the_worker_maps_its_areas_read_only() {
        let (daemon, fd) = Claims::create(area_len_for(100_000)).unwrap();
        let worker = Claims::open(fd).unwrap();
        // One read-only mapping from the request area's start to the end.
        let areas = mapping_perms(worker.area(true) as usize);
        assert!(areas.contains(" r--s "), "{areas}");
        let end = worker.area(true) as usize + 2 * worker.area_len();
        assert!(areas.starts_with(&format!("{:x}-{end:x} ", worker.area(true) as usize)));
        // The words and the ring stay writable; the daemon's mapping stays
        // one writable whole.
        assert!(mapping_perms(worker.base.as_ptr() as usize).contains(" rw-s "));
        assert!(mapping_perms(daemon.base.as_ptr() as usize).contains(" rw-s "));
    }

    #[test]
    fn the_worker_finds_the_areas_the_daemon_chose() {
        let (daemon, fd) = Claims::create(area_len_for(100_000)).unwrap();
        let worker = Claims::open(fd).unwrap();
        assert_eq!(daemon.area_len(), 25 * PAGE);
        assert_eq!(worker.area_len(), 25 * PAGE);
        daemon.publish_area_tail(77);
        assert_eq!(worker.area_tail(), 77);
        assert_eq!(area_len_for(usize::MAX), MAX_AREA);
        assert_eq!(area_len_for(0), 0);
    }
}
