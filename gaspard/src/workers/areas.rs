//! Body areas: where a large request or reply crosses the local link
//! without passing through the kernel. Each worker's shared memory
//! (`claims.rs`) holds two, each as large as the largest request
//! (`--max-request-size`, at most [`MAX_AREA`], and all together at most a
//! quarter of `--max-buffered`: [`area_len`]) but taking pages only where
//! written:
//!
//! - the *request area*, which only the daemon writes: a request body of
//!   [`MIN_BODY`] to [`MAX_COPIED_BODY`] bytes is read there straight from
//!   its client, or moved there when sent from the daemon's memory or from
//!   another worker's area ([`RequestArea::move_in`]), and a small
//!   [`Kind::RequestInArea`] frame says where; the handler reads it in
//!   place. Either way it is an [`AreaBody`], the daemon's only copy of the
//!   body, whose place the daemon gives back to itself when it is dropped
//!   (the request is answered, or its client gone), never while the worker
//!   may still read it.
//! - the *reply area*, which only the worker writes: the buffer a handler
//!   asks for a large reply is there ([`ReplyArea`]), and a small
//!   [`Kind::ReplyInArea`] frame says where it is. The daemon writes the
//!   reply to its client from there ([`ReplyBody::Area`]), and gives its
//!   bytes back once written or dropped, publishing how far the area is free
//!   ([`Claims::publish_area_tail`]); where it finds a position out of step
//!   it breaks the link ([`ReplyAreaReader`]). A client slow to take its
//!   reply holds its part of the area meanwhile, and later large replies
//!   take the sockets until it is free again.
//!
//! The reply area is a ring of positions counted in bytes since the start,
//! like the reply ring, since both sides must agree on what is free; a body
//! never wraps (it skips to the next lap instead), so a handler sees one
//! slice. The request area, which only the daemon allocates, takes each body
//! in the first gap that fits, so that one body held long holds up only its
//! own bytes. When the body does not fit (the area is full of others, or it
//! is larger than the area), it takes the link's sockets as before: the
//! areas make large bodies cheaper, never a condition for serving them.
//!
//! Memory stays bounded: an area takes pages up to the largest body seen;
//! while in use, the side that writes it gives back its pages more than
//! [`SPARE`] past the bodies it holds as they leave (the reply ring begins
//! a new lap early, so that they stay low), and once it has been empty for
//! [`TRIM_AFTER`], what lies beyond [`KEEP`] (`madvise(MADV_REMOVE)`).
//!
//! Why shared memory rather than the socket: a megabyte through a socket
//! pair is copied into and out of the kernel in socket-buffer-sized
//! pieces, each a wake-up on both sides; here a request is no copy at all
//! (read in place) or one `memcpy`, a reply none, and only a 32-byte frame
//! wakes the other side.
//!
//! [`Kind::RequestInArea`]: super::link::Kind::RequestInArea
//! [`Kind::ReplyInArea`]: super::link::Kind::ReplyInArea
//! [`MAX_AREA`]: super::claims::MAX_AREA

use super::claims::{area_len_for, Claims, PAGE};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bodies smaller than this take the link's sockets: they batch well there,
/// and a frame of their own would cost as much as the copy saves.
pub const MIN_BODY: usize = 16 * 1024;
/// The largest request body the daemon copies into an area: the copy is
/// one `memcpy` on the loop (about 1.5–3 ms here for 16 MiB), and other
/// clients wait meanwhile; larger bodies take the socket pair, in
/// non-blocking pieces. Replies of any size fit: the worker writes them.
pub const MAX_COPIED_BODY: usize = 16 << 20;
/// The body of an area frame: position and length, each a u64 little-endian.
pub const FRAME_BODY: usize = 16;
/// What an area keeps of its pages when trimmed.
pub const KEEP: usize = 1 << 20;
/// What an area keeps at least of its free pages past the bodies it holds
/// while in use: room for one more of the largest bodies copied on the
/// loop, or of the largest body it has held, if larger (a reply may be),
/// so that a steady load of them, given back in order, faults no page in
/// again. Past that its pages go back as bodies leave, so that the daemon's
/// memory follows the bodies in flight rather than the most the area ever
/// held.
pub const SPARE: usize = MAX_COPIED_BODY;
/// How long an area must have been empty before it is trimmed.
pub const TRIM_AFTER: Duration = Duration::from_secs(1);

/// The size of each body area of a local worker: large enough for a
/// request of `max_request_size` bytes (`--max-request-size`), but all the
/// areas of `workers` workers together at most a quarter of `max_buffered`
/// (`--max-buffered`): their pages stay taken while in use (the daemon maps
/// them too), so they count against the memory the operator allowed for
/// bodies. Bodies larger than the area take the link's sockets.
pub fn area_len(max_request_size: usize, max_buffered: usize, workers: usize) -> usize {
    let share = max_buffered / (8 * workers.max(1));
    // Whole pages, rounded down: area_len_for rounds up.
    area_len_for(max_request_size.min(share / PAGE * PAGE))
}

/// Encodes where a body is, as an area frame's body.
pub fn encode(at: u64, len: usize) -> [u8; FRAME_BODY] {
    let mut body = [0; FRAME_BODY];
    body[..8].copy_from_slice(&at.to_le_bytes());
    body[8..].copy_from_slice(&(len as u64).to_le_bytes());
    body
}

/// Decodes an area frame's body: position and length.
pub fn decode(body: &[u8]) -> Option<(u64, u64)> {
    let body: &[u8; FRAME_BODY] = body.try_into().ok()?;
    let at = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(body[8..].try_into().expect("8 bytes"));
    Some((at, len))
}

/// The request body a [`Kind::RequestInArea`] frame's `body` says is in the
/// request area of `claims`; `None` if the frame is not one or points
/// outside the area.
///
/// # Safety
/// The daemon must not write those bytes while the slice lives: it does not
/// while the request is claimed and unanswered (see [`RequestArea`]).
///
/// [`Kind::RequestInArea`]: super::link::Kind::RequestInArea
pub unsafe fn request_body<'a>(claims: &'a Claims, body: &[u8]) -> Option<&'a [u8]> {
    let (at, len) = decode(body)?;
    let area = claims.area_len();
    if area == 0 || len > area as u64 || offset(at, area) as u64 + len > area as u64 {
        return None;
    }
    // SAFETY: offset + len lies inside the request area (checked above),
    // inside the mapping, which lives as long as `claims`; the caller
    // guarantees nobody writes it meanwhile.
    Some(unsafe {
        std::slice::from_raw_parts(claims.area(true).add(offset(at, area)), len as usize)
    })
}

/// The position of `len` contiguous bytes at or after `head`, in an area of
/// `area` bytes whose bytes before `tail` are free: `head` itself, or the
/// start of the next lap if the body would wrap. `None` if it does not fit.
fn place(head: u64, tail: u64, len: usize, area: usize) -> Option<u64> {
    let (len, area) = (len as u64, area as u64);
    if len == 0 || len > area {
        return None;
    }
    let offset = head % area;
    let at = if offset + len > area {
        head + (area - offset)
    } else {
        head
    };
    (at + len - tail <= area).then_some(at)
}

/// The start of the next lap, for a body of `len` bytes in an area of
/// `area` bytes free before `tail`, once `head` is more than [`SPARE`]
/// into its lap and the body fits there: a ring that begins again early
/// keeps its pages in use few, where one that runs its whole lap first
/// would take every page of the area (and [`ReplyArea::idle`] gives back
/// those more than [`SPARE`] past the replies held).
fn next_lap_past_spare(head: u64, tail: u64, len: usize, area: usize) -> Option<u64> {
    let into_lap = head % area as u64;
    if into_lap <= SPARE as u64 {
        return None;
    }
    let next = head + (area as u64 - into_lap);
    place(next, tail, len, area)
}

/// Whether a body of `len` bytes at position `at` lies whole in one lap of
/// an area of `area` bytes, between `tail` and `tail + area`.
fn fits(at: u64, len: u64, tail: u64, area: usize) -> bool {
    let area = area as u64;
    len <= area
        && at >= tail
        && at.checked_add(len).is_some_and(|end| end - tail <= area)
        && at % area + len <= area
}

/// The offset in its area of position `at`.
fn offset(at: u64, area: usize) -> usize {
    (at % area as u64) as usize
}

/// The side that writes an area gives back its pages past [`KEEP`] once
/// it has been empty for [`TRIM_AFTER`]: `high` is how far pages may have
/// been taken since the last trim.
#[derive(Default)]
struct Trim {
    high: usize,
    /// The largest body placed since the last trim.
    largest: usize,
    empty_since: Option<Instant>,
}

impl Trim {
    /// A body of `len` bytes ending at `end` is placed.
    fn used(&mut self, end: usize, len: usize) {
        self.high = self.high.max(end);
        self.largest = self.largest.max(len);
        self.empty_since = None;
    }

    /// What the area keeps of its free pages past the bodies it holds.
    fn spare(&self) -> usize {
        SPARE.max(self.largest)
    }

    fn emptied(&mut self, now: Instant) {
        self.empty_since.get_or_insert(now);
    }

    /// Whether the area holds pages a trim would give back.
    fn holding(&self) -> bool {
        self.high > KEEP
    }

    /// Whether [`Self::trim`] would give pages back now.
    fn due(&self, now: Instant) -> bool {
        let due = self.empty_since.map(|since| since + TRIM_AFTER);
        self.holding() && due.is_some_and(|due| due <= now)
    }

    /// Gives back the pages of `start[KEEP..high]` if the area has been
    /// empty for [`TRIM_AFTER`].
    fn trim(&mut self, start: *mut u8, now: Instant) {
        if !self.due(now) {
            return;
        }
        // Nobody reads it while it is empty: the other side only reads bytes
        // it was told of, and all those were given back.
        self.cut(start, KEEP);
        self.largest = 0;
    }

    /// Whether pages lie more than [`Self::spare`] past `top`, where the
    /// bodies held end.
    fn spares_past(&self, top: usize) -> bool {
        self.high > top.saturating_add(self.spare())
    }

    /// Gives back the pages more than [`Self::spare`] past `top`, where the
    /// bodies held end: nobody reads bytes past them.
    fn cap(&mut self, start: *mut u8, top: usize) {
        if self.spares_past(top) {
            self.cut(start, top + self.spare());
        }
    }

    /// Gives back the pages from `keep` (rounded up to a page) to `high`:
    /// the whole last page too, since nothing past `high` is used.
    fn cut(&mut self, start: *mut u8, keep: usize) {
        let keep = keep.next_multiple_of(PAGE);
        remove_pages(start, keep, self.high.next_multiple_of(PAGE));
        self.high = self.high.min(keep);
    }
}

/// Gives back the whole pages of `area[from..to]` (`from` rounded up, `to`
/// down), whose bytes nobody reads any more. MADV_REMOVE frees the pages
/// and their backing in the memfd: a later read sees zeros, never a fault.
fn remove_pages(area: *mut u8, from: usize, to: usize) {
    let (from, to) = (from.div_ceil(PAGE) * PAGE, to / PAGE * PAGE);
    if from >= to {
        return;
    }
    // SAFETY: `area` is the start of a body area, a whole number of pages
    // inside its mapping, and callers keep `to` within its length; no
    // reference into these bytes is live.
    let removed = unsafe {
        nix::sys::mman::madvise(
            std::ptr::NonNull::new(area.add(from))
                .expect("inside a mapping")
                .cast(),
            to - from,
            nix::sys::mman::MmapAdvise::MADV_REMOVE,
        )
    };
    if let Err(e) = removed {
        log::debug!("cannot give back a body area's pages: {e}");
    }
}

/// Makes the pages of `area[from..to]` writable, or read-only again, in
/// this process's mapping (`from` and `to` are whole pages).
fn protect(area: *mut u8, from: usize, to: usize, writable: bool) -> io::Result<()> {
    use nix::sys::mman::{mprotect, ProtFlags};
    debug_assert!(from % PAGE == 0 && to % PAGE == 0 && from < to);
    let flags = if writable {
        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
    } else {
        ProtFlags::PROT_READ
    };
    // SAFETY: `area[from..to]` is whole pages of a body area inside its
    // mapping (callers keep `to` within the area's length); only the
    // access allowed changes, and no Rust reference into these bytes lives
    // across the call.
    let start = unsafe { area.add(from) };
    let start = std::ptr::NonNull::new(start).expect("inside a mapping");
    // SAFETY: as above.
    unsafe { mprotect(start.cast(), to - from, flags) }.map_err(io::Error::from)
}

/// Replies placed one after another in the reply area and given back in
/// any order: the area is free up to the first one still held. Each is
/// named by its position and spans `at..end`.
#[derive(Default)]
struct InOrder {
    out: VecDeque<Placed>,
}

struct Placed {
    at: u64,
    end: u64,
    given: bool,
}

impl InOrder {
    fn push(&mut self, at: u64, end: u64) {
        self.out.push_back(Placed {
            at,
            end,
            given: false,
        });
    }

    /// Gives back the reply at `at`.
    fn give_back(&mut self, at: u64) {
        if let Some(placed) = self.out.iter_mut().find(|placed| placed.at == at) {
            placed.given = true;
        }
        while self.out.front().is_some_and(|placed| placed.given) {
            self.out.pop_front();
        }
    }

    /// Where the first body still held begins.
    fn first_held(&self) -> Option<u64> {
        self.out.front().map(|placed| placed.at)
    }

    /// The bodies still held: where each begins and ends.
    fn held(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.out
            .iter()
            .filter(|placed| !placed.given)
            .map(|placed| (placed.at, placed.end))
    }
}

/// Gives back the pages of an area of `len` bytes at `area` but those of
/// the bodies `held` (positions from, to).
fn remove_pages_around(area: *mut u8, len: usize, held: impl Iterator<Item = (u64, u64)>) {
    if len == 0 {
        return;
    }
    let mut held: Vec<(usize, usize)> = held
        .map(|(at, end)| (offset(at, len), offset(at, len) + (end - at) as usize))
        .collect();
    held.sort_unstable();
    let mut from = 0;
    for (start, end) in held {
        remove_pages(area, from, start);
        from = from.max(end);
    }
    remove_pages(area, from, len);
}

/// The daemon's side of a worker's request area: where each body lies that
/// it read there straight from its client or moved there ([`AreaBody`],
/// until dropped).
#[derive(Default)]
pub struct RequestArea {
    /// Shared with the bodies read into the area, which give their place
    /// back when dropped.
    bodies: Rc<RefCell<RequestBodies>>,
}

#[derive(Default)]
struct RequestBodies {
    /// The bodies in the area, by offset, each under a number of its own.
    held: Vec<HeldBody>,
    /// The last number given to a body.
    last_key: u64,
    trim: Trim,
    /// The worker is gone: a body gives its pages back when dropped, since
    /// nothing will use them again.
    detached: bool,
}

struct HeldBody {
    key: u64,
    start: usize,
    end: usize,
    /// Moved in when sent ([`RequestArea::move_in`]), not read in place:
    /// it does not count as work about to come.
    moved: bool,
}

/// Where bodies begin in the request area: a cache line.
const BODY_ALIGN: usize = 64;

impl RequestBodies {
    /// Room for `len` bytes in an area of `area` bytes, held under `key`:
    /// the first gap large enough, from the area's start; `None` also for a
    /// body too small to be worth it or too large to copy on the loop
    /// ([`MIN_BODY`], [`MAX_COPIED_BODY`]). Not a ring, as the
    /// reply area is: only the daemon allocates here and the worker reads
    /// only where a frame says, so a body held long (a slow client's, or one
    /// another worker runs) keeps only its own bytes from use. From the
    /// start: the pages in use stay those of the largest bodies.
    fn reserve(&mut self, len: usize, area: usize, moved: bool) -> Option<(u64, usize)> {
        if !(MIN_BODY..=MAX_COPIED_BODY).contains(&len) {
            return None;
        }
        let mut start = 0;
        let mut index = self.held.len();
        for (i, held) in self.held.iter().enumerate() {
            if held.start >= start + len {
                index = i;
                break;
            }
            start = held.end.next_multiple_of(BODY_ALIGN);
        }
        if start + len > area {
            return None;
        }
        let end = start + len;
        self.last_key += 1;
        let key = self.last_key;
        self.held.insert(
            index,
            HeldBody {
                key,
                start,
                end,
                moved,
            },
        );
        self.trim.used(end, len);
        Some((key, start))
    }

    /// Gives back the body held under `key`, and the pages of the area at
    /// `area` more than a spare (see [`SPARE`]) past the bodies still held.
    fn give_back(&mut self, key: u64, area: *mut u8, now: Instant) {
        if let Some(i) = self.held.iter().position(|held| held.key == key) {
            self.held.remove(i);
        }
        if self.held.is_empty() {
            self.trim.emptied(now);
        }
        // Held bodies lie in order of place: the last ends highest.
        let top = self.held.last().map_or(0, |held| held.end);
        self.trim.cap(area, top);
    }
}

impl RequestArea {
    /// Room for a request body of `len` bytes, to be read there straight
    /// from its client (see [`AreaBody`]); `None` if it is too small to be
    /// worth it, too large to copy should it go to another worker, or does
    /// not fit. `slot` is the worker's, for the dispatcher's choice.
    pub fn place(&mut self, claims: &Rc<Claims>, slot: usize, len: usize) -> Option<AreaBody> {
        self.place_as(claims, slot, len, false)
    }

    /// Moves `body` (the daemon's own bytes, or a body in another worker's
    /// area) into the area for this worker (in `slot`) to run: it lies there
    /// from now on, as a body read in place does, and the caller drops the
    /// body it had. `None` if it is too small to be worth it, too large to
    /// copy on the loop, or does not fit. Moved rather than copied: a copy
    /// kept beside the body it came from until the answer would hold each
    /// such body twice, up to a whole area of them per worker.
    pub fn move_in(&mut self, claims: &Rc<Claims>, slot: usize, body: &[u8]) -> Option<AreaBody> {
        let mut moved = self.place_as(claims, slot, body.len(), true)?;
        moved.unfilled().copy_from_slice(body);
        moved.filled(body.len());
        Some(moved)
    }

    /// Room for `len` bytes, for a body read in place or `moved` in.
    fn place_as(
        &mut self,
        claims: &Rc<Claims>,
        slot: usize,
        len: usize,
        moved: bool,
    ) -> Option<AreaBody> {
        let area = claims.area_len();
        let (key, start) = self.bodies.borrow_mut().reserve(len, area, moved)?;
        Some(AreaBody {
            bodies: Rc::clone(&self.bodies),
            claims: Rc::clone(claims),
            slot,
            key,
            start,
            len,
            filled: 0,
        })
    }

    /// Where `body` lies if it was read into this very area: it is sent as
    /// it is, and its place is given back when it is dropped.
    pub fn position_of(&self, body: &RequestBody) -> Option<u64> {
        match body {
            RequestBody::Area(body) if Rc::ptr_eq(&body.bodies, &self.bodies) => {
                Some(body.start as u64)
            }
            _ => None,
        }
    }

    /// Bodies read into the area and not yet given back: how busy the
    /// worker is about to be.
    pub fn read_in_place(&self) -> usize {
        let bodies = self.bodies.borrow();
        let in_place = bodies.held.iter().filter(|held| !held.moved);
        in_place.count()
    }

    /// The worker is dead: nobody reads the area any more, so its pages are
    /// given back, but for the bodies in it, which are the daemon's only
    /// copy (kept for another worker, or until their client goes).
    pub fn worker_gone(&mut self, claims: &Claims) {
        let mut bodies = self.bodies.borrow_mut();
        let kept = bodies
            .held
            .iter()
            .map(|held| (held.start as u64, held.end as u64));
        remove_pages_around(claims.area(true), claims.area_len(), kept);
        bodies.trim.high = 0;
        bodies.detached = true;
    }

    /// Whether the area holds pages [`Self::trim`] would give back once it
    /// has been empty for [`TRIM_AFTER`].
    pub fn holds_pages(&self) -> bool {
        self.bodies.borrow().trim.holding()
    }

    /// Gives back the area's pages past [`KEEP`] if it has been empty for
    /// [`TRIM_AFTER`].
    pub fn trim(&mut self, claims: &Claims, now: Instant) {
        let mut bodies = self.bodies.borrow_mut();
        if bodies.held.is_empty() {
            bodies.trim.trim(claims.area(true), now);
        }
    }

    /// Bodies whose place is not free yet, for tests.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.bodies.borrow().held.len()
    }
}

/// A request body in a worker's request area, read there straight from its
/// client (no copy on the loop when that worker runs it, one `memcpy` into
/// its area when another does) or moved there when sent. Its place is the
/// daemon's until this is dropped: the request is answered or failed, or
/// its client went away mid-body. The worker maps the area read-only (against a handler's stray
/// writes), and the bytes outlive its death for a retry.
pub struct AreaBody {
    bodies: Rc<RefCell<RequestBodies>>,
    /// Keeps the area mapped even once the worker's endpoint is gone.
    claims: Rc<Claims>,
    slot: usize,
    key: u64,
    /// Its offset in the area (and its position in frames).
    start: usize,
    len: usize,
    /// Bytes read into it so far.
    filled: usize,
}

impl AreaBody {
    /// The bytes still to read from the client.
    pub fn unfilled(&mut self) -> &mut [u8] {
        // SAFETY: `place` reserved `start..start + len` inside the request
        // area, inside the mapping `claims` keeps; only the daemon writes
        // the request area, and no worker is told of these bytes before the
        // body is whole. `&mut self` keeps this the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.claims.area(true).add(self.start + self.filled),
                self.len - self.filled,
            )
        }
    }

    /// `n` more bytes were read into [`Self::unfilled`].
    pub fn filled(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.len);
    }

    /// Whether the whole body has been read.
    pub fn is_whole(&self) -> bool {
        self.filled == self.len
    }
}

impl InArea for AreaBody {
    fn position(&self) -> usize {
        self.start
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: as in `unfilled`, and nothing in the daemon writes these
        // bytes while this lives. The worker maps the area read-only; one
        // whose handler defeats that on purpose could change them meanwhile
        // (the same formal race as `AreaReply::bytes`), and they only go,
        // as they are, to a worker or into another area.
        unsafe { std::slice::from_raw_parts(self.claims.area(true).add(self.start), self.filled) }
    }
}

impl Drop for AreaBody {
    fn drop(&mut self) {
        let mut bodies = self.bodies.borrow_mut();
        let area = self.claims.area(true);
        bodies.give_back(self.key, area, Instant::now());
        if bodies.detached {
            remove_pages(area, self.start, self.start + self.len);
        }
    }
}

/// A body's bytes in the daemon: its own, or in one of a worker's body
/// areas ([`AreaBody`] for a request, [`AreaReply`] for a reply), whose
/// place is given back when this is dropped.
pub enum Body<A> {
    Own(Vec<u8>),
    Area(A),
}

/// A request's bytes: its own, or read straight into a worker's request area.
pub type RequestBody = Body<AreaBody>;
/// A reply's bytes: its own, or where the worker wrote them in its reply area.
pub type ReplyBody = Body<AreaReply>;

/// Bytes that lie in a body area.
pub trait InArea {
    fn bytes(&self) -> &[u8];
    /// Where they lie, for `Debug`.
    fn position(&self) -> usize;
}

impl<A: InArea> std::ops::Deref for Body<A> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Body::Own(bytes) => bytes,
            Body::Area(body) => body.bytes(),
        }
    }
}

impl<A: InArea> AsRef<[u8]> for Body<A> {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl<A> From<Vec<u8>> for Body<A> {
    fn from(bytes: Vec<u8>) -> Body<A> {
        Body::Own(bytes)
    }
}

impl<A: InArea> std::fmt::Debug for Body<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Own(bytes) => write!(f, "Own({} bytes)", bytes.len()),
            Body::Area(body) => {
                let (len, at) = (body.bytes().len(), body.position());
                write!(f, "Area({len} bytes at {at})")
            }
        }
    }
}

impl RequestBody {
    /// The worker slot whose request area it was read into, if it was.
    pub fn area_slot(&self) -> Option<usize> {
        match self {
            Body::Own(_) => None,
            Body::Area(body) => Some(body.slot),
        }
    }
}

impl ReplyBody {
    /// The bytes as a `Vec` of their own: moved if they are already one,
    /// copied out of the reply area (and given back) if not.
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Body::Own(bytes) => bytes,
            Body::Area(reply) => reply.bytes().to_vec(),
        }
    }
}

/// A reply in a worker's reply area, held by the daemon until written.
pub struct AreaReply {
    taken: Rc<RefCell<Taken>>,
    /// Keeps the area mapped even once the worker's endpoint is gone.
    claims: Rc<Claims>,
    at: u64,
    len: usize,
}

impl InArea for AreaReply {
    fn position(&self) -> usize {
        offset(self.at, self.claims.area_len())
    }

    fn bytes(&self) -> &[u8] {
        let start = offset(self.at, self.claims.area_len());
        // SAFETY: `ReplyAreaReader::take` checked that these `len` bytes lie
        // inside the reply area, which stays mapped while `claims` lives.
        // The worker writes them again only after they are given back (on
        // drop); a worker that breaks that rule changes what its own client
        // receives, and nothing in the daemon depends on these bytes.
        unsafe { std::slice::from_raw_parts(self.claims.area(false).add(start), self.len) }
    }
}

impl Drop for AreaReply {
    fn drop(&mut self) {
        self.taken.borrow_mut().give_back(self.at, &self.claims);
    }
}

/// The replies taken from a reply area and not yet given back, in order.
#[derive(Default)]
struct Taken {
    /// The end of the last reply taken: the next one lies at or after it.
    until: u64,
    /// The replies taken, keyed by position.
    out: InOrder,
}

impl Taken {
    /// The replies before the first still held are free for the worker.
    fn free_until(&self) -> u64 {
        self.out.first_held().unwrap_or(self.until)
    }

    fn give_back(&mut self, at: u64, claims: &Claims) {
        let before = self.free_until();
        self.out.give_back(at);
        if self.free_until() != before {
            claims.publish_area_tail(self.free_until());
        }
    }
}

/// The daemon's reading of a worker's reply area: what it has taken, and
/// what of that is still held for a client.
#[derive(Default)]
pub struct ReplyAreaReader {
    taken: Rc<RefCell<Taken>>,
}

impl ReplyAreaReader {
    /// The worker is dead: of its reply area only the replies still held
    /// for clients are kept; the pages around them are given back.
    pub fn worker_gone(&self, claims: &Claims) {
        let taken = self.taken.borrow();
        remove_pages_around(claims.area(false), claims.area_len(), taken.out.held());
    }

    /// Takes the reply a [`Kind::ReplyInArea`] frame's `body` points to: its
    /// bytes stay where they are until the [`ReplyBody`] is dropped. An error
    /// means the worker is out of step (a position behind what was taken,
    /// past the area, over bytes still held, or wrapping), and its link
    /// cannot be trusted.
    ///
    /// [`Kind::ReplyInArea`]: super::link::Kind::ReplyInArea
    pub fn take(&mut self, claims: &Rc<Claims>, body: &[u8]) -> io::Result<ReplyBody> {
        let area = claims.area_len();
        let out_of_step = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let (at, len) =
            decode(body).ok_or_else(|| out_of_step("a reply area frame of the wrong size"))?;
        let mut taken = self.taken.borrow_mut();
        // With nothing held, all is free: the worker may begin a new lap.
        let free = taken.out.first_held().unwrap_or(at);
        if area == 0 || len == 0 || at < taken.until || !fits(at, len, free, area) {
            return Err(out_of_step(&format!(
                "a reply area position out of range ({len} bytes at {at}, taken up to {}, free from {free})",
                taken.until
            )));
        }
        let before = taken.free_until();
        taken.until = at + len;
        taken.out.push(at, at + len);
        if taken.free_until() != before {
            // Nothing was held: all before this reply is free, the bytes a
            // new lap skipped too. Else the worker would count them as held
            // until this reply is given back, and find no room meanwhile.
            claims.publish_area_tail(taken.free_until());
        }
        drop(taken);
        Ok(ReplyBody::Area(AreaReply {
            taken: Rc::clone(&self.taken),
            claims: Rc::clone(claims),
            at,
            len: len as usize,
        }))
    }
}

/// The worker's side of its reply area: where the next large reply goes.
pub struct ReplyArea<'a> {
    claims: &'a Claims,
    head: u64,
    trim: Trim,
    /// The pages this worker may write: those of the last buffer handed
    /// out. The rest of the area stays read-only in the worker, so that a
    /// handler writing past its buffer faults instead of changing a reply
    /// the daemon is still writing to another client. They stay writable
    /// after the call while the daemon holds no reply (see
    /// [`Self::protect_held`]).
    writable: Option<(usize, usize)>,
}

/// A reply buffer in the reply area: `len` bytes at position `at`.
pub struct AreaBuffer {
    pub at: u64,
    ptr: *mut u8,
    len: usize,
}

impl AsMut<[u8]> for AreaBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` has `len` bytes of the reply area after it (see
        // `ReplyArea::buffer`), which only this worker writes, and which the
        // daemon reads only once the frame that names them is sent. A
        // handler that asks again gets the same bytes again, but the ABI
        // forbids it to touch the earlier buffer then (`reply_buffer`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl AreaBuffer {
    pub fn len(&self) -> usize {
        self.len
    }
}

impl<'a> ReplyArea<'a> {
    pub fn new(claims: &'a Claims) -> ReplyArea<'a> {
        ReplyArea {
            claims,
            head: claims.area_tail(),
            trim: Trim::default(),
            writable: None,
        }
    }

    /// A buffer of `len` bytes for a handler's reply, if it is large enough
    /// to be worth it and the area has room (the daemon has taken enough of
    /// the replies before); `None`: the reply takes a buffer of its own.
    /// Nothing is taken until [`Self::sent`]: a handler that asks again
    /// gets the same place.
    pub fn buffer(&mut self, len: usize) -> Option<AreaBuffer> {
        let area = self.claims.area_len();
        if len < MIN_BODY || area == 0 {
            return None;
        }
        let tail = self.claims.area_tail();
        // Empty: begin at the area's start, so that the pages in use stay
        // those of the largest reply. Only `sent` moves `head`: a buffer
        // asked for and never sent (the handler failed, or asked again for
        // a small one) must leave the area empty, else `idle` never sees
        // the daemon's tail reach it and never trims.
        let (head, tail) = if tail == self.head {
            let start = self.head.div_ceil(area as u64) * area as u64;
            (start, start)
        } else {
            (self.head, tail)
        };
        // Each buffer begins a page, so that the pages made writable for it
        // hold no byte of another reply.
        let head = head.next_multiple_of(PAGE as u64);
        let at =
            next_lap_past_spare(head, tail, len, area).or_else(|| place(head, tail, len, area))?;
        let (from, to) = (
            offset(at, area),
            (offset(at, area) + len).next_multiple_of(PAGE),
        );
        if self.writable != Some((from, to)) {
            if !self.make_read_only() {
                return None;
            }
            if let Err(e) = protect(self.claims.area(false), from, to, true) {
                log::debug!("cannot open the reply area for a buffer: {e}");
                return None;
            }
            self.writable = Some((from, to));
        }
        // SAFETY: `place` keeps offset + len within the area.
        let ptr = unsafe { self.claims.area(false).add(from) };
        Some(AreaBuffer { at, ptr, len })
    }

    /// Before each handler call, and when the worker has waited
    /// `worker::STOP_CHECK` for one: the last buffer's pages are
    /// made read-only if the daemon holds a reply (that one, or any other,
    /// which the handler must not reach by writing past a buffer). If it
    /// holds none, they stay writable: the whole area is free, the next
    /// large reply begins at its start again, and a reply of the same size
    /// then costs no `mprotect` (two per reply were 11% of a worker's time
    /// for 1 MiB echo on one connection, where each reply is taken before
    /// the next request comes). A handler's own threads, writing between
    /// calls, could reach a held reply until then.
    pub fn protect_held(&mut self) {
        if self.claims.area_tail() != self.head {
            self.make_read_only();
        }
    }

    /// Makes the writable pages read-only; false if they could not be
    /// (they stay on record, to be tried again).
    fn make_read_only(&mut self) -> bool {
        let Some((from, to)) = self.writable else {
            return true;
        };
        if let Err(e) = protect(self.claims.area(false), from, to, false) {
            log::warn!("cannot make a reply buffer read-only again: {e}");
            return false;
        }
        self.writable = None;
        true
    }

    /// The reply in `buffer` is sent: its bytes are the daemon's until it
    /// takes them.
    pub fn sent(&mut self, buffer: &AreaBuffer) {
        self.head = buffer.at + buffer.len as u64;
        let start = offset(buffer.at, self.claims.area_len());
        self.trim.used(start + buffer.len, buffer.len);
    }

    /// Whether the area holds pages [`Self::idle`] may give back.
    pub fn holds_pages(&self) -> bool {
        self.trim.holding()
    }

    /// Between requests (and while waiting for one): gives back the area's
    /// pages more than a spare (see [`SPARE`]) past the replies the daemon holds, and past
    /// [`KEEP`] once it has given back every reply and the area has been
    /// empty for [`TRIM_AFTER`].
    pub fn idle(&mut self, now: Instant) {
        if !self.trim.holding() {
            return;
        }
        let (tail, area) = (self.claims.area_tail(), self.claims.area_len() as u64);
        let top = if tail == self.head {
            self.trim.emptied(now);
            if self.trim.due(now) {
                // MADV_REMOVE wants a writable mapping.
                let (start, len) = (self.claims.area(false), self.claims.area_len());
                if protect(start, 0, len, true).is_ok() {
                    self.trim.trim(start, now);
                    self.writable = Some((0, len));
                    self.make_read_only();
                }
                return;
            }
            0
        } else if tail / area == (self.head - 1) / area {
            // The replies held lie in one lap, and nothing past them.
            offset(self.head - 1, self.claims.area_len()) + 1
        } else {
            // They wrap round: what lies between waits until they do not.
            return;
        };
        if self.trim.spares_past(top) {
            self.give_back_past(top);
        }
    }

    /// Gives back the pages more than a spare (see [`SPARE`]) past `top`,
    /// where the replies held end.
    fn give_back_past(&mut self, top: usize) {
        let (start, len) = (self.claims.area(false), self.claims.area_len());
        let from = (top + self.trim.spare()).next_multiple_of(PAGE);
        let to = self.trim.high.next_multiple_of(PAGE).min(len);
        // MADV_REMOVE wants a writable mapping; the last buffer's pages,
        // which may lie there, are made read-only first.
        if from >= to || !self.make_read_only() || protect(start, from, to, true).is_err() {
            return;
        }
        self.trim.cap(start, top);
        self.writable = Some((from, to));
        self.make_read_only();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_areas_together_take_at_most_a_quarter_of_the_budget() {
        assert_eq!(area_len(64 << 20, 1 << 30, 2), 64 << 20);
        assert_eq!(area_len(64 << 20, 1 << 30, 64), 2 << 20);
        assert_eq!(area_len(64 << 20, 96 << 20, 2), 6 << 20);
        assert_eq!(area_len(1000, 1 << 30, 2), 4096);
        assert_eq!(area_len(64 << 20, 4096, 2), 0, "too small a budget: none");
        assert_eq!(area_len(64 << 20, 1 << 30, 0), 64 << 20);
    }

    #[test]
    fn place_skips_to_the_next_lap_rather_than_wrap() {
        assert_eq!(place(0, 0, 10, 100), Some(0));
        assert_eq!(place(95, 95, 10, 100), Some(100));
        assert_eq!(place(95, 5, 10, 100), None, "would overwrite 5..10");
        assert_eq!(place(95, 60, 10, 100), Some(100));
        assert_eq!(place(0, 0, 101, 100), None);
        assert_eq!(place(0, 0, 0, 100), None);
    }

    #[test]
    fn fits_refuses_what_lies_outside_one_lap_after_the_tail() {
        assert!(fits(0, 100, 0, 100));
        assert!(fits(100, 10, 95, 100));
        assert!(!fits(90, 20, 90, 100), "wraps");
        assert!(!fits(5, 10, 10, 100), "behind the tail");
        assert!(!fits(200, 10, 95, 100), "beyond the lap");
        assert!(!fits(u64::MAX - 5, 10, u64::MAX - 6, 100));
    }

    fn shared(max: usize) -> (Claims, Claims) {
        let (daemon, fd) = Claims::create(area_len_for(max)).unwrap();
        (daemon, Claims::open(fd).unwrap())
    }

    /// The `len` bytes the worker reads for a request put at `at`.
    fn read_request(worker: &Claims, at: u64, len: usize) -> Vec<u8> {
        // SAFETY: the daemon wrote these bytes; nothing writes them now.
        unsafe { request_body(worker, &encode(at, len)) }
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_worker_refuses_a_request_said_to_lie_outside_its_area() {
        let (_daemon, worker) = shared(64 * 1024);
        let area = worker.area_len();
        // SAFETY (each): nobody writes the area in this test.
        assert!(unsafe { request_body(&worker, &encode(area as u64 - 10, 10)) }.is_some());
        for bad in [encode(area as u64 - 10, 11), encode(5, area + 1)] {
            assert!(unsafe { request_body(&worker, &bad) }.is_none());
        }
        assert!(unsafe { request_body(&worker, &[0; 3]) }.is_none());
        let (_daemon, none) = shared(0);
        assert!(unsafe { request_body(&none, &encode(0, 1)) }.is_none());
    }

    /// `len` bytes of `byte` moved into `area`, as a body is when sent,
    /// and where they lie; `None` if they take the socket.
    fn moved(
        area: &mut RequestArea,
        claims: &Rc<Claims>,
        len: usize,
        byte: u8,
    ) -> Option<(AreaBody, u64)> {
        let body = area.move_in(claims, 0, &vec![byte; len])?;
        let at = body.start as u64;
        Some((body, at))
    }

    #[test]
    fn a_request_body_too_long_to_copy_on_the_loop_takes_the_socket() {
        let (daemon, _worker) = shared(64 << 20);
        let daemon = Rc::new(daemon);
        let mut area = RequestArea::default();
        assert!(moved(&mut area, &daemon, MAX_COPIED_BODY + 1, 1).is_none());
        assert!(moved(&mut area, &daemon, MAX_COPIED_BODY, 2).is_some());
    }

    #[test]
    fn a_request_body_crosses_and_its_bytes_are_reused_once_answered() {
        let (daemon, worker) = shared(64 * 1024);
        let daemon = Rc::new(daemon);
        let mut area = RequestArea::default();
        assert!(
            moved(&mut area, &daemon, 100, 7).is_none(),
            "small: the socket"
        );
        let (one, a) = moved(&mut area, &daemon, 40_000, 1).unwrap();
        assert!(moved(&mut area, &daemon, 40_000, 2).is_none(), "full");
        assert_eq!(read_request(&worker, a, 40_000), vec![1; 40_000]);
        drop(one); // answered
        assert_eq!(area.held(), 0);
        let (two, b) = moved(&mut area, &daemon, 40_000, 2).unwrap();
        let (three, c) = moved(&mut area, &daemon, 20_000, 3).unwrap();
        assert_eq!(read_request(&worker, b, 40_000), vec![2; 40_000]);
        assert_eq!(read_request(&worker, c, 20_000), vec![3; 20_000]);
        // Answered out of order: each place is free at once, and the first
        // gap that fits takes the next body.
        drop(two);
        assert_eq!(area.held(), 1);
        let (four, d) = moved(&mut area, &daemon, 30_000, 4).unwrap();
        assert_eq!(d, b, "in the gap 2 left, before 3");
        assert_eq!(read_request(&worker, c, 20_000), vec![3; 20_000]);
        drop((three, four));
        assert_eq!(area.held(), 0);
    }

    #[test]
    fn a_body_held_long_keeps_only_its_own_bytes_from_use() {
        let (daemon, _worker) = shared(1 << 20);
        let daemon = Rc::new(daemon);
        let mut area = RequestArea::default();
        // A slow client's body, or one another worker runs, held all along.
        let held = read_in_place(&mut area, &daemon, 20_000, 1);
        for n in 0..200 {
            let (body, at) = moved(&mut area, &daemon, 40_000, 2)
                .unwrap_or_else(|| panic!("body {n} found no room"));
            assert!(at >= 20_000, "never over the held body");
            drop(body);
        }
        assert_eq!(&RequestBody::Area(held)[..], &[1; 20_000][..]);
    }

    /// A body of `len` bytes read into `area` in place, its bytes `byte`.
    fn read_in_place(
        area: &mut RequestArea,
        claims: &Rc<Claims>,
        len: usize,
        byte: u8,
    ) -> AreaBody {
        let mut body = area.place(claims, 0, len).expect("room for it");
        // Two reads, as from a socket.
        let half = len / 2;
        body.unfilled()[..half].fill(byte);
        body.filled(half);
        assert!(!body.is_whole());
        body.unfilled().fill(byte);
        body.filled(len - half);
        assert!(body.is_whole());
        body
    }

    #[test]
    fn a_body_read_in_place_is_sent_from_where_it_lies_and_freed_when_dropped() {
        let (daemon, worker) = shared(128 * 1024);
        let daemon = Rc::new(daemon);
        let mut area = RequestArea::default();
        assert!(
            area.place(&daemon, 0, 100).is_none(),
            "small: its own memory"
        );
        let body = RequestBody::Area(read_in_place(&mut area, &daemon, 40_000, 4));
        assert_eq!(&body[..], &[4; 40_000][..]);
        let at = area.position_of(&body).expect("it lies in this area");
        assert_eq!(read_request(&worker, at, 40_000), vec![4; 40_000]);
        // Answered or not, the place is held until the body is dropped, and
        // the next body goes after it.
        assert_eq!(area.held(), 1);
        let (next, after) = moved(&mut area, &daemon, 40_000, 5).unwrap();
        assert!(after >= at + 40_000);
        assert_eq!(area.read_in_place(), 1, "a body moved in is already sent");
        drop((body, next));
        assert_eq!(area.held(), 0);
    }

    #[test]
    fn a_body_read_into_one_workers_area_moves_to_another_that_runs_it() {
        let (first, _) = shared(128 * 1024);
        let (second, worker) = shared(128 * 1024);
        let (first, second) = (Rc::new(first), Rc::new(second));
        let mut home = RequestArea::default();
        let mut other = RequestArea::default();
        let body = RequestBody::Area(read_in_place(&mut home, &first, 30_000, 6));
        assert_eq!(body.area_slot(), Some(0));
        assert_eq!(other.position_of(&body), None);
        let there = RequestBody::Area(other.move_in(&second, 1, &body).unwrap());
        let at = other.position_of(&there).unwrap();
        assert_eq!(read_request(&worker, at, 30_000), vec![6; 30_000]);
        assert_eq!(there.area_slot(), Some(1));
        // The dispatcher keeps the body where it now lies: its first place
        // is free.
        drop(body);
        assert_eq!((home.held(), other.held()), (0, 1));
    }

    #[test]
    fn a_dead_workers_area_keeps_the_bodies_the_daemon_holds_until_dropped() {
        let (daemon, _worker) = shared(1 << 20);
        let daemon = Rc::new(daemon);
        let mut area = RequestArea::default();
        let (moved_in, first) = moved(&mut area, &daemon, 5 * PAGE, 1).unwrap();
        let body = RequestBody::Area(read_in_place(&mut area, &daemon, 6 * PAGE, 2));
        let (gone, between) = moved(&mut area, &daemon, 4 * PAGE, 3).unwrap();
        drop(gone);
        area.worker_gone(&daemon);
        // Each body is the daemon's only copy: kept for a retry. The pages
        // around them go.
        assert_eq!(area.held(), 2);
        assert_eq!(read_request(&daemon, first, 5 * PAGE), vec![1; 5 * PAGE]);
        assert_eq!(&body[..], &[2; 6 * PAGE][..]);
        assert_eq!(read_request(&daemon, between, 4 * PAGE), vec![0; 4 * PAGE]);
        let at = area.position_of(&body).unwrap();
        drop((body, moved_in));
        assert_eq!(area.held(), 0);
        // Dropped, each gives its own pages back: nothing will use them again.
        assert_eq!(read_request(&daemon, at, 6 * PAGE), vec![0; 6 * PAGE]);
        assert_eq!(read_request(&daemon, first, 5 * PAGE), vec![0; 5 * PAGE]);
    }

    #[test]
    fn replies_on_a_new_lap_do_not_count_the_bytes_it_skipped_as_held() {
        let (daemon, worker) = shared(64 * 1024);
        let daemon = Rc::new(daemon);
        let mut writer = ReplyArea::new(&worker);
        let mut reader = ReplyAreaReader::default();
        let mut send = |writer: &mut ReplyArea, len| {
            let buffer = writer.buffer(len).expect("room in the area");
            writer.sent(&buffer);
            reader.take(&daemon, &encode(buffer.at, len)).unwrap()
        };
        // One reply taken and given back: the area is empty, and the next
        // reply begins a new lap, past the bytes of the first.
        drop(send(&mut writer, 20_000));
        let second = send(&mut writer, 20_000);
        // Held by a slow client: the area has room for two more of them
        // all the same, since nothing before the second is held.
        let third = send(&mut writer, 20_000);
        let fourth = send(&mut writer, 20_000);
        assert!(writer.buffer(20_000).is_none(), "now it is full");
        drop((second, third, fourth));
        assert!(writer.buffer(60_000).is_some());
    }

    #[test]
    fn a_reply_buffer_is_writable_only_while_no_held_reply_lies_there_and_begins_a_page() {
        use crate::workers::claims::tests::mapping_perms;
        let (_daemon, worker) = shared(64 * 1024);
        let mut writer = ReplyArea::new(&worker);
        let one = writer.buffer(20_000).unwrap();
        let start = one.ptr as usize;
        assert!(mapping_perms(start).contains(" rw-s "));
        // Writable are the buffer's whole pages, and no more.
        let writable = mapping_perms(start);
        assert!(writable.starts_with(&format!("{start:x}-{:x} ", start + 20_480)));
        writer.sent(&one);
        writer.protect_held();
        assert!(
            !mapping_perms(start).contains(" rw-s "),
            "read-only while the daemon holds the reply"
        );
        // The next begins on the page after the last byte of the first.
        let two = writer.buffer(20_000).unwrap();
        assert_eq!(two.at, 20_480);
        // Asking again gives the same place; only the second ask's pages
        // are writable.
        let again = writer.buffer(30_000).unwrap();
        assert_eq!(again.at, two.at);
        let writable = mapping_perms(again.ptr as usize);
        assert!(writable.starts_with(&format!(
            "{:x}-{:x} ",
            again.ptr as usize,
            again.ptr as usize + 32_768
        )));
        writer.protect_held();
        assert!(!mapping_perms(again.ptr as usize).contains(" rw-s "));
    }

    #[test]
    fn a_reply_buffer_stays_writable_between_calls_only_while_the_daemon_holds_no_reply() {
        use crate::workers::claims::tests::mapping_perms;
        let (daemon, worker) = shared(64 * 1024);
        let daemon = Rc::new(daemon);
        let mut writer = ReplyArea::new(&worker);
        let mut reader = ReplyAreaReader::default();
        let only = |ptr: *mut u8, len: usize| {
            let start = ptr as usize;
            mapping_perms(start).starts_with(&format!("{start:x}-{:x} rw-s ", start + len))
        };
        let one = writer.buffer(20_000).unwrap();
        writer.sent(&one);
        drop(reader.take(&daemon, &encode(one.at, 20_000)).unwrap());
        // Taken and given back: the area is free, its pages stay writable,
        // and the next reply of that size goes in the same ones.
        writer.protect_held();
        assert!(only(one.ptr, 20_480));
        let two = writer.buffer(20_000).unwrap();
        assert_eq!(two.ptr, one.ptr);
        assert!(only(two.ptr, 20_480));
        // A larger one: its own pages, and only those.
        let larger = writer.buffer(30_000).unwrap();
        assert!(only(larger.ptr, 32_768));
        writer.sent(&larger);
        let held = reader.take(&daemon, &encode(larger.at, 30_000)).unwrap();
        writer.protect_held();
        assert!(
            !mapping_perms(larger.ptr as usize).contains(" rw-s "),
            "held by the daemon: read-only"
        );
        drop(held);
    }

    #[test]
    fn a_reply_crosses_and_a_position_out_of_step_is_refused() {
        let (daemon, worker) = shared(64 * 1024);
        let mut writer = ReplyArea::new(&worker);
        let mut reader = ReplyAreaReader::default();
        assert!(writer.buffer(100).is_none(), "small: a buffer of its own");
        let mut one = writer.buffer(30_000).unwrap();
        one.as_mut().fill(1);
        writer.sent(&one);
        let mut two = writer.buffer(30_000).unwrap();
        two.as_mut().fill(2);
        writer.sent(&two);
        assert!(
            writer.buffer(30_000).is_none(),
            "full until the daemon takes"
        );
        let daemon = Rc::new(daemon);
        let frame_one = encode(one.at, one.len());
        let one_body = reader.take(&daemon, &frame_one).unwrap();
        assert_eq!(&*one_body, &[1; 30_000][..]);
        assert!(reader.take(&daemon, &frame_one).is_err(), "taken already");
        let two_body = reader.take(&daemon, &encode(two.at, two.len())).unwrap();
        assert_eq!(&*two_body, &[2; 30_000][..]);
        // Held until written: given back in any order, freed in order.
        drop(two_body);
        assert!(writer.buffer(30_000).is_none(), "the first is still held");
        drop(one_body);
        // Everything given back: the next reply begins at the area's start.
        let three = writer.buffer(60_000).unwrap();
        assert_eq!(three.at % daemon.area_len() as u64, 0);
        for bad in [
            encode(three.at, daemon.area_len() + 1),
            encode(three.at + 10_000, daemon.area_len() - 5_000),
            encode(three.at, 0),
            [0; FRAME_BODY],
        ] {
            assert!(reader.take(&daemon, &bad).is_err());
        }
        assert!(reader.take(&daemon, &[0; 3]).is_err());
    }

    #[test]
    fn an_area_gives_back_its_pages_once_empty_for_a_while() {
        let (daemon, worker) = shared(8 << 20);
        let daemon = Rc::new(daemon);
        let mut area = RequestArea::default();
        let (body, _) = moved(&mut area, &daemon, 4 << 20, 9).unwrap();
        assert!(area.holds_pages());
        area.trim(&daemon, Instant::now() + 2 * TRIM_AFTER);
        assert_eq!(read_request(&worker, KEEP as u64, 16)[0], 9, "in use");
        drop(body);
        let start = Instant::now();
        area.trim(&daemon, start);
        assert_eq!(read_request(&worker, KEEP as u64, 16)[0], 9, "not yet");
        area.trim(&daemon, start + TRIM_AFTER);
        assert!(!area.holds_pages());
        assert_eq!(
            read_request(&worker, KEEP as u64, 16),
            vec![0; 16],
            "given back"
        );
        assert_eq!(read_request(&worker, 0, 16), vec![9; 16], "kept");
    }

    #[test]
    fn a_request_area_in_use_keeps_no_more_than_a_spare_past_the_bodies_it_holds() {
        const MIB: usize = 1 << 20;
        let (daemon, worker) = shared(64 * MIB);
        let daemon = Rc::new(daemon);
        let mut area = RequestArea::default();
        let mut bodies = Vec::new();
        for n in 1..=3 {
            let (body, at) = moved(&mut area, &daemon, 16 * MIB, n).unwrap();
            assert_eq!(at, u64::from(n - 1) * 16 * MIB as u64);
            bodies.push(body);
        }
        drop(bodies.pop());
        assert_eq!(
            read_request(&worker, 40 * MIB as u64, 16),
            vec![3; 16],
            "a spare past 32 MiB"
        );
        drop(bodies.pop());
        // Body 1 is still held: the area is not empty, yet the pages more
        // than a spare past it go back at once.
        assert_eq!(
            read_request(&worker, 40 * MIB as u64, 16),
            vec![0; 16],
            "given back"
        );
        assert_eq!(
            read_request(&worker, 20 * MIB as u64, 16),
            vec![2; 16],
            "the spare"
        );
        assert_eq!(read_request(&worker, 0, 16), vec![1; 16], "held");
    }

    #[test]
    fn a_reply_area_in_use_begins_again_early_and_keeps_no_more_than_a_spare_past_the_replies_held()
    {
        const MIB: usize = 1 << 20;
        let (daemon, worker) = shared(64 * MIB);
        let daemon = Rc::new(daemon);
        let mut writer = ReplyArea::new(&worker);
        let mut reader = ReplyAreaReader::default();
        let mut reply = |writer: &mut ReplyArea, fill: u8| {
            let mut buffer = writer.buffer(16 * MIB).unwrap();
            buffer.as_mut().fill(fill);
            writer.sent(&buffer);
            reader
                .take(&daemon, &encode(buffer.at, buffer.len()))
                .unwrap()
        };
        let (first, second, third) = (
            reply(&mut writer, 1),
            reply(&mut writer, 2),
            reply(&mut writer, 3),
        );
        let at = |body: &ReplyBody| match body {
            Body::Area(reply) => reply.at,
            Body::Own(_) => panic!("not in the area"),
        };
        assert_eq!(
            (at(&first), at(&second), at(&third)),
            (0, 16 << 20, 32 << 20),
            "the first still held"
        );
        drop((first, second));
        let fourth = reply(&mut writer, 4);
        assert_eq!(
            at(&fourth),
            64 << 20,
            "past the spare and with room: a new lap"
        );
        let read = |offset: usize| {
            // SAFETY: inside the reply area; nothing writes it now.
            unsafe { std::slice::from_raw_parts(daemon.area(false).add(offset), 16) }.to_vec()
        };
        writer.idle(Instant::now());
        assert_eq!(read(40 * MIB), vec![3; 16], "the third is still held");
        drop(third);
        writer.idle(Instant::now());
        assert_eq!(
            read(40 * MIB),
            vec![0; 16],
            "more than a spare past the fourth: given back"
        );
        assert_eq!(read(20 * MIB), vec![2; 16], "the spare is kept");
        assert_eq!(read(0), vec![4; 16]);
        drop(fourth);
    }

    #[test]
    fn replies_larger_than_the_spare_keep_their_pages_from_one_call_to_the_next() {
        const MIB: usize = 1 << 20;
        let (daemon, worker) = shared(64 * MIB);
        let daemon = Rc::new(daemon);
        let mut writer = ReplyArea::new(&worker);
        let mut reader = ReplyAreaReader::default();
        for fill in 1..=2 {
            let mut buffer = writer.buffer(2 * SPARE).unwrap();
            assert_eq!(
                buffer.at % (64 * MIB) as u64,
                0,
                "an empty area: from its start"
            );
            buffer.as_mut().fill(fill);
            writer.sent(&buffer);
            drop(
                reader
                    .take(&daemon, &encode(buffer.at, buffer.len()))
                    .unwrap(),
            );
            writer.idle(Instant::now());
            // SAFETY: inside the reply area; nothing writes it now.
            let past_spare =
                unsafe { std::slice::from_raw_parts(daemon.area(false).add(SPARE + MIB), 16) };
            assert_eq!(
                past_spare, &[fill; 16],
                "the pages of the largest reply stay for the next"
            );
        }
    }

    #[test]
    fn a_buffer_asked_for_and_not_sent_does_not_keep_the_reply_area_from_shrinking() {
        let (daemon, worker) = shared(4 << 20);
        let daemon = Rc::new(daemon);
        let mut writer = ReplyArea::new(&worker);
        let mut reader = ReplyAreaReader::default();
        // A 3 MiB reply, taken and written to its client.
        let mut big = writer.buffer(3 << 20).unwrap();
        big.as_mut().fill(9);
        writer.sent(&big);
        drop(reader.take(&daemon, &encode(big.at, big.len())).unwrap());
        // The next handler asks for a large buffer, then fails (or asks
        // again for a small one): nothing is sent.
        assert!(writer.buffer(100_000).is_some());
        let start = Instant::now();
        writer.idle(start);
        writer.idle(start + TRIM_AFTER);
        // SAFETY: inside the reply area; nothing writes it now.
        let past_keep = unsafe { std::slice::from_raw_parts(daemon.area(false).add(KEEP), 16) };
        assert_eq!(past_keep, &[0; 16], "the area is idle: its pages go back");
        // And the whole area is still there for the next reply.
        let whole = writer.buffer(daemon.area_len()).expect("all of it is free");
        writer.sent(&whole);
        assert!(reader.take(&daemon, &encode(whole.at, whole.len())).is_ok());
    }
}
