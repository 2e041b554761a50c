//! Moving bytes between sockets and buffers without extra work: vectored
//! writes that resume part-way, and reads that append to a buffer without
//! zeroing it first.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

/// Allocations up to this size come from the heap, not a fresh mmap: glibc
/// raises its threshold this far by itself only after freeing such a
/// block, and starts at 128 KiB.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap is given back to the system only past
/// this much. glibc's default (twice the mmap threshold, 256 KiB to start)
/// gave back, and faulted in again, a megabyte body's pages on almost
/// every request.
const TRIM_THRESHOLD: i32 = 64 << 20;

/// Makes the allocator keep large buffers for reuse: request and reply
/// bodies of a few megabytes come and go all the time, and each fresh one
/// costs a page fault per 4 KiB. With it, 1 MiB echo went from about 250
/// page faults per request in the daemon to none, and from 0.9x to 1.35x
/// the throughput of the build before it (bench/compare.py). The memory
/// kept is what the last bursts held, bounded like them by --max-buffered.
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes two of glibc's allocation thresholds;
    // it is called at the start of the process, before any other thread.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Reads what `source` has, up to `max` bytes, into `buf`'s spare capacity
/// and appends it: the number of bytes read (0 at the end of the stream).
///
/// Why not `Read::take(..).read_to_end(..)`: for a reader without a native
/// `read_buf` (mio's sockets), std zeroes the spare capacity before each
/// read, a memset of every large body before the kernel overwrites it.
pub(crate) fn read_appending(
    source: &impl AsRawFd,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    loop {
        // SAFETY: read(2) writes at most `len` bytes into the spare
        // capacity, which is valid for writes of that many bytes.
        let n = unsafe { nix::libc::read(source.as_raw_fd(), spare.as_mut_ptr().cast(), len) };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: read(2) initialized the first `n` bytes after `len()`.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Fills `slices` with the next slices of `parts`, in order, leaving out
/// the first `skip` bytes (written before) and empty parts; returns how many
/// it filled. The caller's array lives on its stack: a write allocates
/// nothing.
pub(crate) fn gather<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
    mut skip: usize,
    slices: &mut [IoSlice<'a>],
) -> usize {
    let mut filled = 0;
    for part in parts {
        if filled == slices.len() {
            break;
        }
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        slices[filled] = IoSlice::new(&part[skip..]);
        filled += 1;
        skip = 0;
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::{gather, read_appending};
    use std::io::{IoSlice, Write};

    #[test]
    fn reads_append_into_spare_capacity_up_to_the_limit() {
        let (mut writer, reader) = std::os::unix::net::UnixStream::pair().unwrap();
        writer.write_all(b"hello world").unwrap();
        let mut buf = Vec::with_capacity(8);
        buf.extend_from_slice(b">");
        assert_eq!(read_appending(&reader, &mut buf, 5).unwrap(), 5);
        assert_eq!(buf, b">hello");
        // Never past the capacity, whatever the limit.
        assert_eq!(read_appending(&reader, &mut buf, 100).unwrap(), 2);
        assert_eq!(buf, b">hello w");
        reader.set_nonblocking(true).unwrap();
        buf.reserve(100);
        assert_eq!(read_appending(&reader, &mut buf, 100).unwrap(), 4);
        let empty = read_appending(&reader, &mut buf, 100).unwrap_err();
        assert_eq!(empty.kind(), std::io::ErrorKind::WouldBlock);
        drop(writer);
        // Blocking: a process another test forks holds a copy of the writer
        // until it execs.
        reader.set_nonblocking(false).unwrap();
        assert_eq!(
            read_appending(&reader, &mut buf, 100).unwrap(),
            0,
            "the end"
        );
        assert_eq!(buf, b">hello world");
    }

    #[test]
    fn skips_what_was_written_across_parts_and_stops_at_max() {
        let parts: [&[u8]; 4] = [b"head", b"", b"body", b"tail"];
        let mut slices = [IoSlice::new(&[]); 8];
        let n = gather(parts, 6, &mut slices);
        let got: Vec<&[u8]> = slices[..n].iter().map(|s| &s[..]).collect();
        assert_eq!(got, vec![&b"dy"[..], b"tail"]);
        assert_eq!(gather(parts, 0, &mut slices[..2]), 2);
        assert_eq!(gather(parts, 12, &mut slices), 0);
    }
}
