// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Splitting a guest physical range at the edges of guest memory regions, and remembering
//! what backs each region.

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::backend::RegionBacking;

/// The most regions whose backing the device remembers. With more regions in use, the one
/// used least recently is forgotten and looked at again when next needed (which costs a read
/// of `/proc/self/maps`, but never more memory).
pub(crate) const BACKING_CACHE: usize = 256;

/// Calls `f(region, start, end)` for each part `[start, end)` of `[start, end)` that lies in
/// one region of `mem`, in ascending order, and returns the bytes that lie in no region.
///
/// The loop runs at most once per region plus once per hole, so it is bounded by the memory
/// layout, not by whoever chose the range.
pub(super) fn for_each_piece<M, F>(mem: &M, start: u64, end: u64, mut f: F) -> u64
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

/// A region as the cache tells regions apart: where it is in the guest and in the host, and
/// which descriptor and offset its file has. A region that goes away and comes back
/// different (memory hotplug) differs in at least one of them in practice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RegionKey {
    gpa: u64,
    len: u64,
    host: usize,
    file: Option<(i32, u64)>,
}

impl RegionKey {
    fn of<R: GuestMemoryRegion>(region: &R) -> Self {
        RegionKey {
            gpa: region.start_addr().0,
            len: region.len(),
            host: region
                .get_host_address(MemoryRegionAddress(0))
                .map_or(0, |h| h as usize),
            file: region
                .file_offset()
                .map(|f| (f.file().as_raw_fd(), f.start())),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: RegionKey,
    backing: RegionBacking,
    stamp: u64,
}

/// What backs each guest memory region, found once per region
/// ([`RegionBacking::of_region`]) and kept for at most `BACKING_CACHE` regions. The layout
/// of guest memory is the VMM's, so the work and memory here are bounded by it, not by the
/// guest.
#[derive(Debug, Default)]
pub(super) struct BackingCache {
    entries: Vec<Entry>,
    clock: u64,
}

impl BackingCache {
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// What backs `region`, and whether it was looked at just now (not remembered).
    pub(super) fn get<R: GuestMemoryRegion>(&mut self, region: &R) -> (RegionBacking, bool) {
        let key = RegionKey::of(region);
        self.clock = self.clock.wrapping_add(1);
        let clock = self.clock;
        if let Some(e) = self.entries.iter_mut().find(|e| e.key == key) {
            e.stamp = clock;
            return (e.backing, false);
        }
        let backing = RegionBacking::of_region(region);
        self.put(key, backing);
        (backing, true)
    }

    /// Remembers `backing` for `region` (replacing what was known).
    #[cfg(test)]
    pub(super) fn insert<R: GuestMemoryRegion>(&mut self, region: &R, backing: RegionBacking) {
        let key = RegionKey::of(region);
        self.entries.retain(|e| e.key != key);
        self.put(key, backing);
    }

    fn put(&mut self, key: RegionKey, backing: RegionBacking) {
        let entry = Entry {
            key,
            backing,
            stamp: self.clock,
        };
        if self.entries.len() < BACKING_CACHE {
            self.entries.push(entry);
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|e| e.stamp) {
            *oldest = entry;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
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

    #[test]
    fn backings_are_looked_at_once_per_region_and_bounded() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0x1000), 0x2000),
            (GuestAddress(0x5000), 0x1000),
        ])
        .unwrap();
        let mut cache = BackingCache::new();
        let r0 = mem.find_region(GuestAddress(0x1000)).unwrap();
        let r1 = mem.find_region(GuestAddress(0x5000)).unwrap();
        assert_eq!(cache.get(r0), (RegionBacking::AnonymousPrivate, true));
        assert_eq!(cache.get(r0), (RegionBacking::AnonymousPrivate, false));
        assert_eq!(cache.get(r1), (RegionBacking::AnonymousPrivate, true));
        cache.insert(r1, RegionBacking::Unknown);
        assert_eq!(cache.get(r1), (RegionBacking::Unknown, false));
        assert_eq!(cache.len(), 2);
        // More regions than it keeps: the least recently used goes, the size stays.
        let many = GuestMemoryMmap::<()>::from_ranges(
            &(0..BACKING_CACHE as u64 + 2)
                .map(|i| (GuestAddress(0x10_0000 + i * 0x2000), 0x1000))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        for r in many.iter() {
            assert!(cache.get(r).1);
        }
        assert_eq!(cache.len(), BACKING_CACHE);
        assert!(cache.get(r0).1, "forgotten, looked at again");
        let last = many.iter().last().unwrap();
        assert!(!cache.get(last).1);
    }
}
