// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Splitting a guest physical range at the edges of guest memory regions.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Calls `f(region, start, end)` for each part `[start, end)` of `[start, end)` that lies in
/// one region of `mem`, in ascending order, and returns the bytes that lie in no region.
///
/// The loop runs at most once per region plus once per hole, so it is bounded by the memory
/// layout, not by whoever chose the range.
pub(crate) fn for_each_piece<M, F>(mem: &M, start: u64, end: u64, mut f: F) -> u64
where
    M: GuestMemoryBackend + ?Sized,
    F: FnMut(&M::R, u64, u64),
{
    let mut holes = 0u64;
    let mut cur = start;
    while cur < end {
        match mem.find_region(GuestAddress(cur)) {
            Some(region) => {
                let region_end = region.start_addr().0.saturating_add(region.len());
                let piece_end = region_end.min(end);
                if piece_end <= cur {
                    break;
                }
                f(region, cur, piece_end);
                cur = piece_end;
            }
            None => {
                // Skip the hole up to the next region that starts inside the range.
                let next = mem
                    .iter()
                    .map(|r| r.start_addr().0)
                    .filter(|&s| s > cur && s < end)
                    .min()
                    .unwrap_or(end);
                holes += next - cur;
                cur = next;
            }
        }
    }
    holes
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn pieces_follow_regions_and_holes_are_counted() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0x1000), 0x2000),
            (GuestAddress(0x5000), 0x1000),
        ])
        .unwrap();
        let mut pieces = Vec::new();
        let holes = for_each_piece(&mem, 0, 0x8000, |r, s, e| {
            pieces.push((r.start_addr().0, s, e))
        });
        assert_eq!(pieces, [(0x1000, 0x1000, 0x3000), (0x5000, 0x5000, 0x6000)]);
        assert_eq!(holes, 0x1000 + 0x2000 + 0x2000);
        assert_eq!(for_each_piece(&mem, 0x1800, 0x1800, |_, _, _| panic!()), 0);
    }
}
