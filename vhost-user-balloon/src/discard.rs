// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the daemon does with memory the guest gives up, and how it measures that.
//!
//! vhost-user guest memory is a file the frontend shares (UML's memory file in `/dev/shm`,
//! QEMU's `memory-backend-memfd` or `memory-backend-file`, possibly on hugetlbfs), so
//! `MADV_DONTNEED` alone would free nothing. By default ([`DiscardMode::Auto`]) the device
//! looks at what backs each region and frees it accordingly ([`DiscardPolicy::Auto`]): a
//! shared file or memfd has holes punched in it, hugetlbfs is freed in whole huge pages,
//! private memory gets `MADV_DONTNEED`, and a region whose backing cannot be told is left
//! alone (and counted in the device's metrics). The other modes override that choice for
//! every region.
//! [`TrackingBackend`] wraps the chosen backend and keeps the union of the ranges it
//! discarded as a set of maximal runs, so a test can compare the number of discard calls with
//! the number of contiguous runs the guest actually gave.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use virtio_balloon::backend::{
    DiscardPolicy, HostRange, MadviseBackend, MemoryBackend, NoopBackend,
};

use crate::device::lock;

/// How inflated and reported pages are discarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// By what backs each region (the default): punch holes in shared files and memfds
    /// (whole huge pages on hugetlbfs), `MADV_DONTNEED` for private memory, never a file
    /// mapped privately, nothing where the backing is unknown.
    #[default]
    Auto,
    /// Override: punch a hole in every region's file (unless it is known to be mapped
    /// privately), then `MADV_DONTNEED`; regions without a file get `MADV_DONTNEED`. The
    /// daemon's default before regions were classified.
    PunchHole,
    /// Override: `MADV_DONTNEED` only, in every region (frees nothing of a shared file; for
    /// private memory).
    Madvise,
    /// Leave memory alone.
    None,
}

impl DiscardMode {
    /// The backend for this mode.
    pub fn backend(self) -> Arc<dyn MemoryBackend> {
        let policy = match self {
            DiscardMode::Auto => DiscardPolicy::Auto,
            DiscardMode::PunchHole => DiscardPolicy::PunchHoles,
            DiscardMode::Madvise => DiscardPolicy::Madvise,
            DiscardMode::None => return Arc::new(NoopBackend),
        };
        Arc::new(MadviseBackend::new().with_policy(policy))
    }
}

/// The most runs [`TrackingBackend`] keeps; past it, new runs are counted but not merged.
pub const MAX_TRACKED_RUNS: usize = 1 << 16;

/// Discard figures, for the control socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiscardStats {
    /// Calls to the wrapped backend's `discard`.
    pub calls: u64,
    /// Bytes discarded.
    pub bytes: u64,
    /// Maximal contiguous runs (in guest physical addresses) in the union of everything
    /// discarded since the last reset.
    pub runs: u64,
    /// Ranges not merged because [`MAX_TRACKED_RUNS`] runs were already kept.
    pub untracked: u64,
}

#[derive(Debug, Default)]
struct Tracked {
    /// Run start → run end (exclusive), disjoint and not touching.
    runs: BTreeMap<u64, u64>,
    stats: DiscardStats,
}

impl Tracked {
    fn add(&mut self, start: u64, end: u64) {
        let mut start = start;
        let mut end = end;
        // Merge with a run that starts at or before `start` and reaches it.
        if let Some((&s, &e)) = self.runs.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.runs.remove(&s);
            }
        }
        // Merge with every run that starts inside or right after [start, end].
        while let Some((&s, &e)) = self.runs.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.runs.remove(&s);
        }
        if self.runs.len() >= MAX_TRACKED_RUNS {
            self.stats.untracked += 1;
            return;
        }
        self.runs.insert(start, end);
    }
}

/// A backend that forwards to another and measures what it discards.
pub struct TrackingBackend {
    inner: Arc<dyn MemoryBackend>,
    tracked: Mutex<Tracked>,
}

impl std::fmt::Debug for TrackingBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackingBackend")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TrackingBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn MemoryBackend>) -> Self {
        TrackingBackend {
            inner,
            tracked: Mutex::new(Tracked::default()),
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> DiscardStats {
        let t = lock(&self.tracked);
        DiscardStats {
            runs: t.runs.len() as u64,
            ..t.stats
        }
    }

    /// Starts counting afresh.
    pub fn reset(&self) {
        *lock(&self.tracked) = Tracked::default();
    }
}

impl MemoryBackend for TrackingBackend {
    fn host_page_size(&self) -> u64 {
        self.inner.host_page_size()
    }

    fn discard(&self, range: &HostRange<'_>) -> io::Result<()> {
        let result = self.inner.discard(range);
        let mut t = lock(&self.tracked);
        t.stats.calls += 1;
        if result.is_ok() {
            t.stats.bytes = t.stats.bytes.saturating_add(range.len);
            if let Some(end) = range.gpa.0.checked_add(range.len) {
                t.add(range.gpa.0, end);
            }
        }
        result
    }

    fn populate(&self, range: &HostRange<'_>) -> io::Result<()> {
        self.inner.populate(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_balloon::backend::RegionBacking;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
    use vm_memory::{FileOffset, MemoryRegionAddress};

    #[test]
    fn every_mode_frees_a_shared_file_its_own_way() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&[0x5a; 0x5000]).unwrap();
        let fo = FileOffset::new(file.try_clone().unwrap(), 0);
        let mem =
            GuestMemoryMmap::<()>::from_ranges_with_files([(GuestAddress(0), 0x5000, Some(fo))])
                .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let backing = RegionBacking::of_region(region);
        assert_eq!(backing, RegionBacking::SharedFile);
        let range = |gpa: u64| HostRange {
            gpa: GuestAddress(gpa),
            len: 0x1000,
            host_addr: region.get_host_address(MemoryRegionAddress(gpa)).unwrap(),
            region_offset: gpa,
            file_offset: region.file_offset(),
            backing,
        };
        let file_byte = |f: &mut std::fs::File, at: u64| {
            let mut b = [0u8];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut b).unwrap();
            b[0]
        };
        assert_eq!(DiscardMode::default(), DiscardMode::Auto);
        for (mode, gpa, punched) in [
            (DiscardMode::Auto, 0x1000, true),
            (DiscardMode::PunchHole, 0x2000, true),
            (DiscardMode::Madvise, 0x3000, false),
            (DiscardMode::None, 0x4000, false),
        ] {
            mode.backend().discard(&range(gpa)).unwrap();
            let want = if punched { 0 } else { 0x5a };
            assert_eq!(file_byte(&mut file, gpa), want, "{mode:?}");
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(gpa)).unwrap(),
                want,
                "{mode:?}"
            );
        }
        assert_eq!(file_byte(&mut file, 0), 0x5a);
    }

    fn runs(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut t = Tracked::default();
        for &(s, e) in ranges {
            t.add(s, e);
        }
        t.runs.into_iter().collect()
    }

    #[test]
    fn ranges_merge_into_maximal_runs() {
        assert_eq!(runs(&[(0, 4), (8, 12), (4, 8)]), [(0, 12)]);
        assert_eq!(runs(&[(8, 12), (0, 4)]), [(0, 4), (8, 12)]);
        assert_eq!(runs(&[(0, 4), (2, 6), (1, 3)]), [(0, 6)]);
        assert_eq!(
            runs(&[(10, 20), (0, 5), (5, 10), (30, 40)]),
            [(0, 20), (30, 40)]
        );
        assert_eq!(runs(&[(0, 100), (10, 20), (90, 110)]), [(0, 110)]);
        // Descending pages, as Linux often hands them out.
        let desc: Vec<(u64, u64)> = (0..64).rev().map(|p| (p * 4096, (p + 1) * 4096)).collect();
        assert_eq!(runs(&desc), [(0, 64 * 4096)]);
    }

    #[test]
    fn the_run_table_is_bounded() {
        let mut t = Tracked::default();
        for i in 0..(MAX_TRACKED_RUNS as u64 + 10) {
            t.add(i * 8192, i * 8192 + 4096);
        }
        assert_eq!(t.runs.len(), MAX_TRACKED_RUNS);
        assert_eq!(t.stats.untracked, 10);
    }
}
