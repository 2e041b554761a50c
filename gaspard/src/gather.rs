//! Vectored writes that resume part-way: the slices of a queue of buffers,
//! skipping what an earlier write already took.

use std::io::IoSlice;

/// Up to `max` slices of `parts`, in order, leaving out the first `skip`
/// bytes (written before). Empty parts are left out too.
pub(crate) fn gather<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
    mut skip: usize,
    max: usize,
) -> Vec<IoSlice<'a>> {
    let mut slices = Vec::with_capacity(max);
    for part in parts {
        if slices.len() == max {
            break;
        }
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        slices.push(IoSlice::new(&part[skip..]));
        skip = 0;
    }
    slices
}

#[cfg(test)]
mod tests {
    use super::gather;

    #[test]
    fn skips_what_was_written_across_parts_and_stops_at_max() {
        let parts: [&[u8]; 4] = [b"head", b"", b"body", b"tail"];
        let slices = gather(parts, 6, 8);
        let got: Vec<&[u8]> = slices.iter().map(|s| &s[..]).collect();
        assert_eq!(got, vec![&b"dy"[..], b"tail"]);
        assert_eq!(gather(parts, 0, 2).len(), 2);
        assert!(gather(parts, 12, 8).is_empty());
    }
}
