// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The "to send" bitmap of a precopy migration, which free page hints trim.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::counting::{merge_log, DirtyBitmap};
use super::dirty_log::{DirtyLog, DirtyLogClear, RegionInfo};
use super::error::Error;
use crate::defs::{PAGE_SHIFT, PAGE_SIZE};
use crate::ratelimit::{warn_limited, RateLimit};
use crate::sink::FreePageSink;

/// Bitmap of one guest memory region: bit `i` is the 4 KiB page at `start + i * 4096`.
#[derive(Debug)]
struct RegionBitmap {
    /// Position among the bitmap's regions (ascending address order).
    index: usize,
    start: u64,
    /// Last byte of the region (inclusive, so a region may end at the top of the address
    /// space).
    last: u64,
    bitmap: DirtyBitmap,
    /// One bit per [`CLEAR_CHUNK_PAGES`] pages: the chunk may hold pages the dirty log
    /// reported that were not yet cleared in it (set at each sync when a [`DirtyLogClear`]
    /// is installed; cleared once the chunk was cleared in the log).
    uncleared: DirtyBitmap,
    /// Held while a chunk is cleared in the log; the chunk's bit is reset only after the
    /// clear completed, so a sender that finds it reset may read the chunk's pages.
    clear_lock: Mutex<()>,
}

/// Hints kept because the dirty log could not be cleared for them.
static CLEAR_FAILED: RateLimit = RateLimit::new();

/// Pages cleared in the dirty log at once before the first of them is sent (64 MiB).
/// Smaller chunks cost more `KVM_CLEAR_DIRTY_LOG` calls; larger ones write-protect pages
/// earlier than needed.
pub const CLEAR_CHUNK_PAGES: u64 = 1 << 14;

impl RegionBitmap {
    fn info(&self) -> RegionInfo {
        RegionInfo {
            index: self.index,
            start: GuestAddress(self.start),
            len: self.last - self.start + 1,
        }
    }
}

/// The migration dirty bitmap: which 4 KiB guest pages still have to be sent.
///
/// One [`DirtyBitmap`] per guest memory region and an atomic counter of the dirty pages, the
/// Rust counterpart of QEMU's per-RAMBlock `bmap` and `migration_dirty_pages`. The migration
/// thread fills it with [`sync`](Self::sync) (or [`mark_all_dirty`](Self::mark_all_dirty)
/// before the first pass) and takes pages off it with
/// [`test_and_clear`](Self::test_and_clear) as it sends them. Free page hints take pages off
/// it with [`clear_free_range`](Self::clear_free_range), which is what the
/// [`FreePageSink`] implementation calls.
///
/// Hints only ever clear this bitmap. The dirty log that collects the guest's writes (KVM's,
/// or vm-memory's write bitmap) is a different bitmap that hints never touch, so a page the
/// guest writes after the hint is found dirty again at the next [`sync`](Self::sync).
///
/// All operations take `&self` and are lock-free: one atomic read-modify-write per bitmap
/// word, plus one per counter update. The counter equals the number of set bits whenever no
/// operation is in flight.
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::MigrationBitmap;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
/// let bitmap = MigrationBitmap::new(&mem).unwrap();
/// assert_eq!(bitmap.mark_all_dirty(), 256);
///
/// // The guest hints 2.5 pages from 0x1800: only the two pages wholly inside are clear.
/// assert_eq!(bitmap.clear_free_range(GuestAddress(0x1800), 0x2800), 2);
/// assert_eq!(bitmap.dirty_pages(), 254);
/// assert!(bitmap.test_and_clear(GuestAddress(0x1000)));
/// assert!(!bitmap.test_and_clear(GuestAddress(0x2000)));
/// ```
#[derive(Debug)]
pub struct MigrationBitmap {
    /// Sorted by start address, non-overlapping.
    regions: Box<[RegionBitmap]>,
    /// Dirty pages. Signed because a clear may subtract a bit before the concurrent set of
    /// that same bit has added it; the value is exact once both have returned.
    dirty_pages: AtomicI64,
    /// Pages that hints took off the bitmap (they were dirty when the hint arrived).
    hinted_pages: AtomicU64,
    /// Re-arms the dirty log before pages leave the bitmap (manual protection).
    log_clear: OnceLock<Arc<dyn DirtyLogClear>>,
    /// Hinted ranges kept in the bitmap because the log could not be cleared for them.
    log_clear_failures: AtomicU64,
}

impl std::fmt::Debug for dyn DirtyLogClear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirtyLogClear")
    }
}

impl MigrationBitmap {
    /// Creates a bitmap covering every region of `mem`, all pages clean.
    ///
    /// # Errors
    ///
    /// The same as [`from_ranges`](Self::from_ranges); a `GuestMemoryMmap` never triggers
    /// them.
    pub fn new<M: GuestMemoryBackend>(mem: &M) -> Result<Self, Error> {
        let ranges: Vec<(GuestAddress, u64)> =
            mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        Self::from_ranges(&ranges)
    }

    /// Creates a bitmap covering the regions `(start, length in bytes)`, all pages clean.
    ///
    /// Regions may come in any order. A region whose length is not a multiple of 4 KiB gets a
    /// bit for its partial last page.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRegion`] for a zero length, [`Error::RegionOverflow`] for a region that
    /// runs past the top of the address space, [`Error::OverlappingRegions`] when two
    /// regions share an address.
    pub fn from_ranges(ranges: &[(GuestAddress, u64)]) -> Result<Self, Error> {
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|(start, _)| *start);
        let mut regions = Vec::with_capacity(sorted.len());
        for &(start, len) in &sorted {
            let last = len
                .checked_sub(1)
                .ok_or(Error::EmptyRegion { start })?
                .checked_add(start.0)
                .ok_or(Error::RegionOverflow { start, len })?;
            if let Some(prev) = regions.last() {
                let prev: &RegionBitmap = prev;
                if start.0 <= prev.last {
                    return Err(Error::OverlappingRegions {
                        first: GuestAddress(prev.start),
                        second: start,
                    });
                }
            }
            let pages = usize::try_from(len.div_ceil(PAGE_SIZE))
                .map_err(|_| Error::RegionOverflow { start, len })?;
            regions.push(RegionBitmap {
                index: regions.len(),
                start: start.0,
                last,
                bitmap: DirtyBitmap::new(pages),
                uncleared: DirtyBitmap::new(pages.div_ceil(CLEAR_CHUNK_PAGES as usize)),
                clear_lock: Mutex::new(()),
            });
        }
        Ok(MigrationBitmap {
            regions: regions.into_boxed_slice(),
            dirty_pages: AtomicI64::new(0),
            hinted_pages: AtomicU64::new(0),
            log_clear: OnceLock::new(),
            log_clear_failures: AtomicU64::new(0),
        })
    }

    /// Installs the dirty log's clear step, for a log with manual protection (KVM's with
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, see `KvmDirtyLog` with the `kvm` feature): from then on, hinted pages are cleared in the
    /// log before their bits are cleared here, and [`take_page`](Self::take_page) clears a
    /// page in the log before it is sent. Call it once, before the migration starts.
    ///
    /// Returns `false` (and changes nothing) if one is already installed.
    pub fn set_log_clear(&self, clear: Arc<dyn DirtyLogClear>) -> bool {
        self.log_clear.set(clear).is_ok()
    }

    /// Hinted ranges that stayed in the bitmap because clearing them in the dirty log
    /// failed (they are sent as if no hint had come).
    pub fn log_clear_failures(&self) -> u64 {
        self.log_clear_failures.load(Ordering::Relaxed)
    }

    /// Number of regions tracked.
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// The regions tracked, in ascending address order.
    pub fn regions(&self) -> impl Iterator<Item = RegionInfo> + '_ {
        self.regions.iter().map(RegionBitmap::info)
    }

    /// Number of 4 KiB pages tracked, over all regions.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.bitmap.len() as u64).sum()
    }

    /// Number of pages still to send.
    ///
    /// Exact whenever no operation is running concurrently; while operations race it may
    /// lag by the pages they are changing (never below 0).
    pub fn dirty_pages(&self) -> u64 {
        u64::try_from(self.dirty_pages.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Number of dirty pages that free page hints took off the bitmap since it was created.
    pub fn hinted_pages(&self) -> u64 {
        self.hinted_pages.load(Ordering::Relaxed)
    }

    fn add_dirty(&self, pages: usize) {
        if pages != 0 {
            // `pages` is at most the number of bits of one region bitmap, far below i64::MAX.
            self.dirty_pages.fetch_add(pages as i64, Ordering::AcqRel);
        }
    }

    fn sub_dirty(&self, pages: usize) {
        if pages != 0 {
            self.dirty_pages.fetch_sub(pages as i64, Ordering::AcqRel);
        }
    }

    /// Region containing `addr` and the page index of `addr` in it.
    fn locate(&self, addr: GuestAddress) -> Option<(&RegionBitmap, usize)> {
        let i = self.regions.partition_point(|r| r.last < addr.0);
        let region = self.regions.get(i).filter(|r| r.start <= addr.0)?;
        let page = (addr.0 - region.start) >> PAGE_SHIFT;
        // The region's page count fits a usize (checked at construction), so its indices do.
        Some((region, page as usize))
    }

    /// Calls `f(region, first_byte, end_byte)` for every region intersecting the bytes
    /// `[start, last]` (`last` inclusive, so a range may end at the top of the address
    /// space), with the intersection as region-relative byte offsets (`end_byte` exclusive;
    /// at most the region's length, which fits a `u64`).
    fn for_each_intersection(
        &self,
        start: u64,
        last: u64,
        mut f: impl FnMut(&RegionBitmap, u64, u64),
    ) {
        let first = self.regions.partition_point(|r| r.last < start);
        for region in self.regions[first..].iter() {
            if region.start > last {
                break;
            }
            let lo = start.max(region.start) - region.start;
            let hi = last.min(region.last) - region.start + 1;
            f(region, lo, hi);
        }
    }

    /// Marks every page dirty, the state of QEMU's bitmap before the first pass. Returns how
    /// many pages became dirty.
    pub fn mark_all_dirty(&self) -> u64 {
        let mut newly = 0u64;
        for region in self.regions.iter() {
            let n = region.bitmap.set_all();
            self.add_dirty(n);
            newly += n as u64;
        }
        newly
    }

    /// Marks dirty every page that `[gpa, gpa + len)` touches (partial pages included),
    /// ignoring what is not RAM. A range that overflows the address space is clipped at its
    /// top. Returns how many pages became dirty.
    pub fn mark_dirty(&self, gpa: GuestAddress, len: u64) -> u64 {
        let Some(span) = len.checked_sub(1) else {
            return 0;
        };
        let last = gpa.0.saturating_add(span);
        let mut newly = 0u64;
        self.for_each_intersection(gpa.0, last, |region, lo, hi| {
            let first = lo >> PAGE_SHIFT;
            let end_page = hi.div_ceil(PAGE_SIZE);
            let n = region
                .bitmap
                .set_range(first as usize, (end_page - first) as usize);
            self.add_dirty(n);
            newly += n as u64;
        });
        newly
    }

    /// Takes the free range `[gpa, gpa + len)` off the bitmap. Returns how many dirty pages
    /// it cleared (the amount subtracted from [`dirty_pages`](Self::dirty_pages)).
    ///
    /// Only whole pages are cleared: within each region the start is rounded up and the end
    /// rounded down to 4 KiB, so a page the range covers only in part stays dirty. The range
    /// is split at region boundaries and whatever lies outside RAM is ignored. A range may
    /// end exactly at the top of the address space; one that would run past it is malformed
    /// and clears nothing.
    pub fn clear_free_range(&self, gpa: GuestAddress, len: u64) -> u64 {
        let Some(last) = len.checked_sub(1).and_then(|span| gpa.0.checked_add(span)) else {
            return 0;
        };
        let mut cleared = 0u64;
        let log_clear = self.log_clear.get();
        self.for_each_intersection(gpa.0, last, |region, lo, hi| {
            let first = lo.div_ceil(PAGE_SIZE);
            let end_page = hi >> PAGE_SHIFT;
            if end_page > first {
                if let Some(log) = log_clear {
                    // Clear in the log first: a write after this is logged again, and the
                    // next sync brings the page back.
                    if let Err(e) = log.clear_dirty_log(&region.info(), first, end_page - first) {
                        warn_limited!(
                            CLEAR_FAILED,
                            "hint of {:#x}+{:#x} kept: clearing the dirty log failed: {e}",
                            region.start + (first << PAGE_SHIFT),
                            (end_page - first) << PAGE_SHIFT
                        );
                        self.log_clear_failures.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                let n = region
                    .bitmap
                    .clear_range(first as usize, (end_page - first) as usize);
                self.sub_dirty(n);
                cleared += n as u64;
            }
        });
        if cleared != 0 {
            self.hinted_pages.fetch_add(cleared, Ordering::Relaxed);
        }
        cleared
    }

    /// Takes the page containing `addr` off the bitmap for sending: with a
    /// [`DirtyLogClear`] installed, first clears in the log the chunk of
    /// [`CLEAR_CHUNK_PAGES`] pages around it (once per chunk after each sync), so that the
    /// read that follows sees every write the log does not log again. Returns whether the
    /// page was dirty (`false` outside RAM). Without a clear step it is
    /// [`test_and_clear`](Self::test_and_clear).
    ///
    /// # Errors
    ///
    /// [`Error::ClearDirtyLog`] when the log cannot be cleared; the page stays dirty.
    pub fn take_page(&self, addr: GuestAddress) -> Result<bool, Error> {
        let Some((region, page)) = self.locate(addr) else {
            return Ok(false);
        };
        if let Some(log) = self.log_clear.get() {
            let chunk = page / CLEAR_CHUNK_PAGES as usize;
            if region.uncleared.test(chunk) {
                let _g = region.clear_lock.lock().unwrap_or_else(|e| e.into_inner());
                if region.uncleared.test(chunk) {
                    let first = (chunk as u64) * CLEAR_CHUNK_PAGES;
                    log.clear_dirty_log(&region.info(), first, CLEAR_CHUNK_PAGES)
                        .map_err(|source| Error::ClearDirtyLog {
                            region: region.index,
                            source,
                        })?;
                    region.uncleared.test_and_clear(chunk);
                }
            }
        }
        let was_dirty = region.bitmap.test_and_clear(page);
        if was_dirty {
            self.sub_dirty(1);
        }
        Ok(was_dirty)
    }

    /// Whether the page containing `addr` is dirty (`false` outside RAM).
    pub fn is_dirty(&self, addr: GuestAddress) -> bool {
        self.locate(addr)
            .is_some_and(|(region, page)| region.bitmap.test(page))
    }

    /// Takes the page containing `addr` off the bitmap, as the sending side does just before
    /// it sends the page. Returns whether the page was dirty (`false` outside RAM).
    ///
    /// It never touches the dirty log: with a [`DirtyLogClear`] installed, send with
    /// [`take_page`](Self::take_page) instead.
    pub fn test_and_clear(&self, addr: GuestAddress) -> bool {
        let Some((region, page)) = self.locate(addr) else {
            return false;
        };
        let was_dirty = region.bitmap.test_and_clear(page);
        if was_dirty {
            self.sub_dirty(1);
        }
        was_dirty
    }

    /// The dirty pages at or after `from`, in ascending address order, as the address of each
    /// page. Each bitmap word is read once as the iterator reaches it.
    pub fn iter_dirty_from(&self, from: GuestAddress) -> impl Iterator<Item = GuestAddress> + '_ {
        let first = self.regions.partition_point(|r| r.last < from.0);
        self.regions[first..].iter().flat_map(move |region| {
            let start_page = from.0.saturating_sub(region.start) >> PAGE_SHIFT;
            region
                .bitmap
                .iter_set_from(start_page as usize)
                .map(move |page| GuestAddress(region.start + ((page as u64) << PAGE_SHIFT)))
        })
    }

    /// All dirty pages, in ascending address order.
    pub fn iter_dirty(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.iter_dirty_from(GuestAddress(0))
    }

    /// Merges a dirty log into the bitmap: every page the log reports as written since the
    /// previous sync becomes dirty again. Returns how many pages became dirty (pages that were
    /// still dirty do not count twice).
    ///
    /// The log is asked for each region in turn ([`DirtyLog::take_dirty_log`]). Bits past the
    /// end of a region are ignored.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyLog`] when the log fails for a region (the regions before it are already
    /// merged, the ones after it keep their logs for the next sync).
    /// [`Error::DirtyLogPageSize`] when it reports a page size of zero: the words it
    /// returned cannot be placed, so the whole region is marked dirty before the error is
    /// returned and no write is lost.
    pub fn sync<L: DirtyLog + ?Sized>(&self, log: &mut L) -> Result<u64, Error> {
        let mut newly = 0u64;
        for (index, region) in self.regions.iter().enumerate() {
            let info = region.info();
            let harvest = log
                .take_dirty_log(&info)
                .map_err(|source| Error::DirtyLog {
                    region: index,
                    source,
                })?;
            let Some(n) = merge_log(&region.bitmap, harvest.page_size, &harvest.words) else {
                // The log is already taken: rather than lose what it held, treat the whole
                // region as written.
                self.add_dirty(region.bitmap.set_all());
                return Err(Error::DirtyLogPageSize {
                    region: index,
                    page_size: harvest.page_size,
                });
            };
            self.add_dirty(n);
            newly += n as u64;
            if self.log_clear.get().is_some() {
                region.uncleared.set_all();
            }
        }
        Ok(newly)
    }
}

impl FreePageSink for MigrationBitmap {
    /// Clears the hinted range from the bitmap being sent
    /// ([`clear_free_range`](MigrationBitmap::clear_free_range)). The command id is not
    /// needed: the device delivers only hints of the round in progress, and the round is
    /// stopped (at [`PrecopyEvent::BeforeBitmapSync`](super::PrecopyEvent)) before every
    /// sync, so no hint of an old round lands after the bitmap is refilled.
    fn free_page_hint(&self, _cmd_id: u32, gpa: GuestAddress, len: u64) {
        self.clear_free_range(gpa, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::dirty_log::HarvestedLog;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;

    fn two_regions() -> MigrationBitmap {
        // [0, 1 MiB) and [2 MiB, 3 MiB): a hole in between.
        MigrationBitmap::from_ranges(&[(GuestAddress(2 * MIB), MIB), (GuestAddress(0), MIB)])
            .unwrap()
    }

    fn count_bits(b: &MigrationBitmap) -> u64 {
        b.regions.iter().map(|r| r.bitmap.count() as u64).sum()
    }

    #[test]
    fn construction_checks_regions() {
        assert!(matches!(
            MigrationBitmap::from_ranges(&[(GuestAddress(0), 0)]),
            Err(Error::EmptyRegion { .. })
        ));
        assert!(matches!(
            MigrationBitmap::from_ranges(&[(GuestAddress(u64::MAX), 2)]),
            Err(Error::RegionOverflow { .. })
        ));
        assert!(matches!(
            MigrationBitmap::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x1000), 1)]),
            Err(Error::OverlappingRegions { .. })
        ));
        let b = two_regions();
        assert_eq!(b.num_regions(), 2);
        assert_eq!(b.total_pages(), 512);
        let infos: Vec<_> = b.regions().collect();
        assert_eq!(infos[0].start, GuestAddress(0));
        assert_eq!(infos[1].start, GuestAddress(2 * MIB));
        assert_eq!(infos[1].len, MIB);
        assert_eq!(infos[1].index, 1);
    }

    #[test]
    fn region_at_the_top_of_the_address_space() {
        let start = u64::MAX - 0x3fff;
        let b = MigrationBitmap::from_ranges(&[(GuestAddress(start), 0x4000)]).unwrap();
        assert_eq!(b.mark_all_dirty(), 4);
        // One byte past the top: malformed, nothing cleared.
        assert_eq!(b.clear_free_range(GuestAddress(start), 0x4001), 0);
        // Ending exactly at the top is fine.
        assert_eq!(b.clear_free_range(GuestAddress(start + 0x1000), 0x3000), 3);
        assert!(b.test_and_clear(GuestAddress(u64::MAX - 0x3fff)));
        assert_eq!(b.dirty_pages(), 0);
        // Marking clips at the top.
        assert_eq!(b.mark_dirty(GuestAddress(start), u64::MAX), 4);
        assert_eq!(b.clear_free_range(GuestAddress(start), 0x4000), 4);
        assert_eq!(b.mark_dirty(GuestAddress(u64::MAX), 1), 1);
        assert_eq!(b.clear_free_range(GuestAddress(u64::MAX), 1), 0);
    }

    #[test]
    fn clear_rounds_inwards_and_counts_only_set_bits() {
        let b = two_regions();
        assert_eq!(b.mark_all_dirty(), 512);
        // Less than a page: nothing.
        assert_eq!(b.clear_free_range(GuestAddress(0x1000), 0xfff), 0);
        // Unaligned on both ends: only [0x2000, 0x4000).
        assert_eq!(b.clear_free_range(GuestAddress(0x1001), 0x3ffe), 2);
        assert!(b.is_dirty(GuestAddress(0x1000)));
        assert!(!b.is_dirty(GuestAddress(0x2000)));
        assert!(!b.is_dirty(GuestAddress(0x3fff)));
        assert!(b.is_dirty(GuestAddress(0x4000)));
        // Clearing again subtracts nothing.
        assert_eq!(b.clear_free_range(GuestAddress(0x2000), 0x2000), 0);
        assert_eq!(b.dirty_pages(), 510);
        assert_eq!(b.hinted_pages(), 2);
        assert_eq!(count_bits(&b), 510);
    }

    #[test]
    fn clear_splits_at_regions_and_skips_holes() {
        let b = two_regions();
        b.mark_all_dirty();
        // From the last 2 pages of region 0, across the hole, into 3 pages of region 1.
        let cleared = b.clear_free_range(GuestAddress(MIB - 0x2000), MIB + 0x5000);
        assert_eq!(cleared, 5);
        assert_eq!(b.dirty_pages(), 507);
        // Entirely in the hole, or past the end of RAM.
        assert_eq!(b.clear_free_range(GuestAddress(MIB), MIB), 0);
        assert_eq!(b.clear_free_range(GuestAddress(3 * MIB), 1 << 40), 0);
        // Nearly the whole address space, then a range that runs past its top.
        assert_eq!(b.clear_free_range(GuestAddress(0), u64::MAX), 512 - 5);
        assert_eq!(b.clear_free_range(GuestAddress(0x1000), u64::MAX), 0);
        assert_eq!(b.dirty_pages(), 0);
        assert_eq!(count_bits(&b), 0);
    }

    #[test]
    fn partial_last_page_is_tracked_but_never_hinted_away() {
        let b = MigrationBitmap::from_ranges(&[(GuestAddress(0), 0x2800)]).unwrap();
        assert_eq!(b.total_pages(), 3);
        assert_eq!(b.mark_all_dirty(), 3);
        // The hint covers the whole region, but the last page is only 0x800 long.
        assert_eq!(b.clear_free_range(GuestAddress(0), 0x3000), 2);
        assert!(b.is_dirty(GuestAddress(0x2000)));
    }

    #[test]
    fn mark_dirty_rounds_outwards() {
        let b = two_regions();
        assert_eq!(b.mark_dirty(GuestAddress(0x1fff), 2), 2);
        assert_eq!(b.mark_dirty(GuestAddress(0x1000), 0x2000), 0);
        assert_eq!(b.mark_dirty(GuestAddress(0x1000), 0), 0);
        assert_eq!(b.mark_dirty(GuestAddress(MIB), MIB + 1), 1);
        assert_eq!(b.dirty_pages(), 3);
        let pages: Vec<_> = b.iter_dirty().collect();
        assert_eq!(
            pages,
            [
                GuestAddress(0x1000),
                GuestAddress(0x2000),
                GuestAddress(2 * MIB)
            ]
        );
        let later: Vec<_> = b.iter_dirty_from(GuestAddress(0x2000)).collect();
        assert_eq!(later, [GuestAddress(0x2000), GuestAddress(2 * MIB)]);
        assert_eq!(b.iter_dirty_from(GuestAddress(3 * MIB)).count(), 0);
    }

    #[test]
    fn test_and_clear_is_the_sending_side() {
        let b = two_regions();
        b.mark_dirty(GuestAddress(2 * MIB + 0x5000), 1);
        assert!(!b.test_and_clear(GuestAddress(MIB + 0x5000)));
        assert!(!b.test_and_clear(GuestAddress(u64::MAX)));
        assert!(b.test_and_clear(GuestAddress(2 * MIB + 0x5fff)));
        assert!(!b.test_and_clear(GuestAddress(2 * MIB + 0x5000)));
        assert_eq!(b.dirty_pages(), 0);
        assert!(!b.is_dirty(GuestAddress(MIB)));
    }

    /// A clear step that records its calls, or fails.
    #[derive(Default)]
    struct Clears {
        calls: std::sync::Mutex<Vec<(usize, u64, u64)>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl DirtyLogClear for Clears {
        fn clear_dirty_log(
            &self,
            region: &RegionInfo,
            first_page: u64,
            pages: u64,
        ) -> Result<(), crate::migration::DirtyLogError> {
            if self.fail.load(Ordering::Relaxed) {
                return Err("clear failed".into());
            }
            self.calls
                .lock()
                .unwrap()
                .push((region.index, first_page, pages));
            Ok(())
        }
    }

    #[test]
    fn the_log_is_cleared_before_bits_leave_the_bitmap() {
        let b = two_regions();
        let clears = Arc::new(Clears::default());
        assert!(b.set_log_clear(clears.clone()));
        assert!(!b.set_log_clear(clears.clone()), "only once");
        assert!(format!("{b:?}").contains("DirtyLogClear"));
        let calls = || std::mem::take(&mut *clears.calls.lock().unwrap());
        b.mark_all_dirty();

        // A hint spanning both regions clears each part, in region page numbers, first.
        assert_eq!(
            b.clear_free_range(GuestAddress(MIB - 0x2000), MIB + 0x4000),
            4
        );
        assert_eq!(calls(), [(0, 254, 2), (1, 0, 2)]);

        // Before any sync nothing was reported: sending clears nothing.
        assert!(b.take_page(GuestAddress(0)).unwrap());
        assert!(calls().is_empty());
        assert!(!b.take_page(GuestAddress(MIB + 0x1000)).unwrap(), "a hole");

        // After a sync, the first send in each chunk clears the chunk, once.
        let mut log = |_: &RegionInfo| -> Result<Vec<u64>, crate::migration::DirtyLogError> {
            Ok(vec![0b11])
        };
        b.sync(&mut log).unwrap();
        assert!(b.take_page(GuestAddress(0)).unwrap());
        assert!(b.take_page(GuestAddress(0x1000)).unwrap());
        assert_eq!(calls(), [(0, 0, CLEAR_CHUNK_PAGES)]);

        // A failing clear keeps the hinted pages and fails the send.
        clears.fail.store(true, Ordering::Relaxed);
        assert_eq!(b.clear_free_range(GuestAddress(0x10000), 0x2000), 0);
        assert_eq!(b.log_clear_failures(), 1);
        assert!(b.is_dirty(GuestAddress(0x10000)));
        let err = b.take_page(GuestAddress(2 * MIB)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "clearing the dirty log of region 1 failed: clear failed"
        );
        assert!(b.is_dirty(GuestAddress(2 * MIB)));
        clears.fail.store(false, Ordering::Relaxed);
        assert!(b.take_page(GuestAddress(2 * MIB)).unwrap());
        assert_eq!(calls(), [(1, 0, CLEAR_CHUNK_PAGES)]);
    }

    #[test]
    fn sync_from_a_kvm_style_log() {
        let b = two_regions();
        let mut calls = Vec::new();
        let mut log =
            |r: &RegionInfo| -> Result<Vec<u64>, Box<dyn std::error::Error + Send + Sync>> {
                calls.push(r.index);
                // Pages 0..3 of region 0, page 64 of region 1, and bits past the region's end.
                Ok(match r.index {
                    0 => vec![0b111, 0, 0, 0, u64::MAX],
                    _ => vec![0, 1],
                })
            };
        assert_eq!(b.sync(&mut log).unwrap(), 4);
        assert_eq!(calls, [0, 1]);
        assert!(b.is_dirty(GuestAddress(2 * MIB + 64 * 0x1000)));
        assert_eq!(b.dirty_pages(), 4);
        assert_eq!(count_bits(&b), 4);
    }

    #[test]
    fn sync_reports_the_failing_region() {
        let b = two_regions();
        let mut log =
            |r: &RegionInfo| -> Result<Vec<u64>, Box<dyn std::error::Error + Send + Sync>> {
                if r.index == 1 {
                    Err("slot gone".into())
                } else {
                    Ok(vec![1])
                }
            };
        let err = b.sync(&mut log).unwrap_err();
        assert!(matches!(err, Error::DirtyLog { region: 1, .. }));
        assert!(err.to_string().contains("slot gone"));
        assert_eq!(b.dirty_pages(), 1);
    }

    struct SizedLog(u64, Vec<u64>);
    impl DirtyLog for SizedLog {
        fn take_dirty_log(
            &mut self,
            _region: &RegionInfo,
        ) -> Result<HarvestedLog, Box<dyn std::error::Error + Send + Sync>> {
            Ok(HarvestedLog {
                page_size: self.0,
                words: self.1.clone(),
            })
        }
    }

    #[test]
    fn sync_converts_other_page_sizes() {
        // 64 KiB pages: bit 1 is 4 KiB pages 16..32.
        let b = two_regions();
        assert_eq!(b.sync(&mut SizedLog(0x10000, vec![0b10])).unwrap(), 32);
        assert!(b.is_dirty(GuestAddress(0x10000)));
        assert!(!b.is_dirty(GuestAddress(0xf000)));
        assert!(b.is_dirty(GuestAddress(2 * MIB + 0x1f000)));
        // 1 KiB pages: bits 4..8 are 4 KiB page 1, bit 9 is page 2.
        let b = two_regions();
        assert_eq!(
            b.sync(&mut SizedLog(0x400, vec![0b10_1111_0000])).unwrap(),
            4
        );
        // Bits far past the region are dropped; so are bits whose byte offset overflows.
        let b = two_regions();
        let mut words = vec![0u64; 64];
        words[63] = 1 << 63;
        assert_eq!(b.sync(&mut SizedLog(0x10000, words)).unwrap(), 0);
        assert_eq!(b.sync(&mut SizedLog(1 << 62, vec![0b110])).unwrap(), 0);
        // Not a power of two: bit 1 is bytes [3000, 6000), pages 0 and 1.
        let b = two_regions();
        assert_eq!(b.sync(&mut SizedLog(3000, vec![0b10])).unwrap(), 4);
        assert!(b.is_dirty(GuestAddress(0x1000)));
        assert!(!b.is_dirty(GuestAddress(0x2000)));
        // Zero: the words cannot be placed, so every page of the region is dirty.
        let b = two_regions();
        assert!(matches!(
            b.sync(&mut SizedLog(0, vec![1])),
            Err(Error::DirtyLogPageSize {
                region: 0,
                page_size: 0
            })
        ));
        assert_eq!(b.dirty_pages(), 256);
        assert!(b.is_dirty(GuestAddress(MIB - 1)));
    }

    #[test]
    fn sync_from_vm_memory_write_tracking() {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), MIB as usize),
            (GuestAddress(4 * MIB), MIB as usize),
        ])
        .unwrap();
        let b = MigrationBitmap::new(&mem).unwrap();
        mem.write_obj(0xAAu8, GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[1u8; 0x2000], GuestAddress(4 * MIB + 0x800))
            .unwrap();
        let mut log = crate::migration::GuestMemoryDirtyLog::new(&mem);
        assert_eq!(b.sync(&mut log).unwrap(), 4);
        assert!(b.is_dirty(GuestAddress(0x3000)));
        assert!(b.is_dirty(GuestAddress(4 * MIB + 0x2000)));
        // The log was harvested: a second sync finds nothing new.
        assert_eq!(b.sync(&mut log).unwrap(), 0);
        // A hint never touches the write log: a write after the hint comes back.
        assert_eq!(b.clear_free_range(GuestAddress(0x3000), 0x1000), 1);
        mem.write_obj(0xBBu8, GuestAddress(0x3010)).unwrap();
        assert_eq!(b.sync(&mut log).unwrap(), 1);
        assert!(b.is_dirty(GuestAddress(0x3000)));
    }

    #[test]
    fn sink_clears_through_the_trait() {
        let b = two_regions();
        b.mark_all_dirty();
        let sink: &dyn FreePageSink = &b;
        sink.free_page_hint(7, GuestAddress(0), 0x10_0000);
        assert_eq!(b.dirty_pages(), 256);
        assert_eq!(b.hinted_pages(), 256);
    }
}
