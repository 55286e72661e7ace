// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Inflate, deflate and free page reporting: from guest elements to host ranges.
//!
//! * Inflate and deflate elements carry arrays of 32-bit little-endian PFNs (4 KiB units).
//!   They are read in chunks of `PFN_CHUNK` into a stack buffer, sorted, and merged into
//!   runs of adjacent pages; nothing is allocated per element.
//! * Inflated runs are merged further across elements in a small sorted set of *pending*
//!   ranges (at most [`PENDING_RANGES`], allocated once). A run that touches or overlaps a
//!   pending range joins it (and may join two of them); any other run becomes a range of its
//!   own. When the set is full, the range that has gone longest without growing is discarded
//!   to make room. Everything pending is discarded when the ranges together reach
//!   [`PENDING_CAP`], before a deflate, and when the device flushes (target reached, flush
//!   timer, pause, save); without `MUST_TELL_HOST`, at the end of every element.
//! * Discards cover whole host pages only, in each region pages of that region's size: the
//!   larger of the backend's [`host_page_size`](MemoryBackend::host_page_size) and the page
//!   size of what backs the region ([`RegionBacking::page_size`]: 2 MiB for a 2 MiB
//!   hugetlbfs region, the base page otherwise). A host page larger than 4 KiB (a huge page,
//!   a 64 KiB host) whose 4 KiB pieces arrive in several runs or elements is tracked in a
//!   small fixed table until every piece was inflated; a deflated piece is taken out of it
//!   again.
//! * What backs a region is found once, the first time the device discards or populates in
//!   it ([`RegionBacking::of_region`]), and remembered for up to `BACKING_CACHE` regions.
//!   It travels to the backend with every range ([`HostRange::backing`]). A region whose
//!   backing cannot be determined is counted ([`PageMetrics::unknown_backing_regions`],
//!   [`PageMetrics::unknown_backing_bytes`]); the default backend discards nothing there.
//! * Every range is clipped to the guest memory region it lies in; PFNs outside RAM are
//!   skipped and counted.
//!
//! # The order in which Linux inflates pages
//!
//! Linux's `fill_balloon()` takes up to 256 pages one at a time from the page allocator
//! (`balloon_page_alloc()`, order 0, movable) and sends their PFNs in one element, in the
//! reverse of the order they were allocated (it stacks them on a list first). The device
//! sorts each element, so only *which* pages share an element matters, and that follows
//! from how the allocator hands out order-0 pages:
//!
//! * Order-0 pages come from a per-CPU list. When it is empty, `rmqueue_bulk()` refills it
//!   with a batch (a few dozen pages) taken one by one from the buddy allocator
//!   (`__rmqueue()` / `__rmqueue_smallest()`) and appended at its tail; allocations take
//!   its head. `__rmqueue_smallest()` uses the smallest free block available, and when it
//!   has to split a larger block, `expand()` keeps the lowest page and puts each upper half
//!   at the head of the next smaller free list, so the following requests walk the block
//!   upwards. A 4 MiB block (the largest order) is therefore handed out as one ascending
//!   run of 1024 PFNs, across batch refills.
//! * Blocks of the largest order leave their free list from its head, and a block that
//!   became whole when freed is put at the head, so after a guest freed a large area the
//!   blocks come out in *descending* address order: in `tests/data`, a Linux 6.1 hint round
//!   of 980 blocks steps down by exactly 4 MiB 863 times. The stream is thus ascending
//!   inside a block and descending from block to block: an element that straddles two
//!   blocks holds the start of the lower block and the end of the upper one, and the lower
//!   block, once complete, ends exactly where the upper one starts.
//! * Smaller free blocks (the leftovers of earlier splits and frees) are used before any
//!   large one is split, each an ascending run at an unrelated address.
//! * A page freed on that CPU (`free_unref_page()` puts it at the *head* of the per-CPU
//!   list) is the next one allocated, so with other activity in the guest an element may
//!   also hold a stray page or short run.
//!
//! Measured with Linux 6.1.176 in User-Mode Linux (512 MiB, 300 MiB dirtied and freed, then
//! 100 MiB inflated with `MUST_TELL_HOST` off, so each element's runs show apart): the
//! first element held 9 runs (small leftover blocks and strays of 1 or 2 pages); every other
//! element one or two: 256 pages up through a 4 MiB block, and at each block boundary the
//! last pages of one block with the first pages of the block 4 MiB below it (84 + 172). 137
//! runs in 100 elements, 10 contiguous runs in all. With a single pending range each
//! boundary element ended the run twice (the lower block's start sorts first and is not
//! adjacent; the upper block's end is then not adjacent to it either), and a finished block
//! could no longer merge with the one above it, already discarded: 87 and 88 discard calls
//! for 10 and 12 runs in two runs (258 calls for 101 elements in an earlier experiment
//! without cross-element merging). Keeping several ranges lets each piece wait for its
//! neighbour: the same inflate took one discard call per run.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::regions::BackingCache;
use crate::backend::{HostRange, MemoryBackend, RegionBacking};
use crate::defs::{PAGE_SHIFT, PAGE_SIZE};
use crate::ratelimit::{warn_limited, RateLimit};

static BACKEND_FAILED: RateLimit = RateLimit::new();
static BAD_PFN_READ: RateLimit = RateLimit::new();

/// PFNs read and merged at a time (Linux sends at most 256 per element).
pub(crate) const PFN_CHUNK: usize = 256;

/// The most PFNs taken from one inflate or deflate element (16 times what Linux sends); the
/// rest of a longer element is ignored, which bounds the work a guest can cause per element.
pub const MAX_PFNS_PER_ELEMENT: usize = 16 * PFN_CHUNK;

/// The most inflated bytes kept pending (all pending ranges together) before every pending
/// range is discarded (bounds the time of one flush on the event loop thread).
pub const PENDING_CAP: u64 = 256 << 20;

/// The most pending inflate ranges at once (a fixed array, allocated with the device). Linux
/// hands out one or a few ascending streams at a time plus stray pages; 64 ranges hold
/// them with room to spare while keeping a flush to at most 64 discard calls (plus those of completed host pages).
pub const PENDING_RANGES: usize = 64;

/// Host pages tracked at once while only some of their 4 KiB pieces were inflated.
pub(crate) const PARTIAL_SLOTS: usize = 16;

/// The largest host page whose pieces are collected across runs and elements (1 GiB: a slot
/// of the partial table then takes 32 KiB). A larger page is discarded only when one pending
/// range covers all of it.
pub(crate) const MAX_PARTIAL_PAGE: u64 = 1 << 30;

/// Counters of the memory side of the balloon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PageMetrics {
    /// Inflate elements handled.
    pub inflate_elements: u64,
    /// Deflate elements handled.
    pub deflate_elements: u64,
    /// 4 KiB pages inflated inside guest RAM. PFNs are merged per chunk of 256 PFNs: a
    /// PFN repeated within a chunk counts once, a repeat in a later chunk counts again.
    pub inflated_pages: u64,
    /// 4 KiB pages deflated inside guest RAM.
    pub deflated_pages: u64,
    /// PFNs skipped because they are outside guest RAM.
    pub pfns_outside_ram: u64,
    /// PFNs ignored past [`MAX_PFNS_PER_ELEMENT`].
    pub pfns_over_limit: u64,
    /// Inflate, deflate or reporting elements refused as malformed (acked, nothing done).
    pub malformed_elements: u64,
    /// Calls to [`MemoryBackend::discard`] (one per merged, aligned range).
    pub discard_calls: u64,
    /// Bytes discarded for inflated pages.
    pub discarded_bytes: u64,
    /// Discards that failed.
    pub discards_failed: u64,
    /// Inflated bytes not discarded because discards were inhibited.
    pub discards_inhibited_bytes: u64,
    /// Calls to [`MemoryBackend::populate`].
    pub populate_calls: u64,
    /// Populates that failed.
    pub populates_failed: u64,
    /// Reporting elements handled.
    pub reporting_elements: u64,
    /// Reporting elements skipped as a whole (poison value set, or discards inhibited).
    pub reporting_elements_skipped: u64,
    /// Bytes of reported free pages discarded.
    pub reported_bytes: u64,
    /// Guest memory regions whose backing could not be determined
    /// ([`RegionBacking::Unknown`]), counted when the device first looked at them (again if
    /// more than 256 regions are in use and it had to forget one).
    #[serde(default)]
    pub unknown_backing_regions: u64,
    /// Bytes of inflated or reported pages in such regions handed to the backend; the
    /// default backend frees none of them (each such discard also counts as failed).
    #[serde(default)]
    pub unknown_backing_bytes: u64,
}

/// Why a PFN array could not be read to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PfnStop {
    /// The element holds more than [`MAX_PFNS_PER_ELEMENT`] PFNs.
    OverLimit,
    /// A descriptor points outside guest memory.
    Unreadable,
}

/// Reads the PFN array in the device-readable descriptors of `chain` (a byte stream: a PFN
/// may straddle two descriptors; 1-3 trailing bytes are ignored) and calls `f` with chunks
/// of at most `PFN_CHUNK` PFNs. Returns the number of PFNs read and why it stopped early.
pub(super) fn for_each_pfn_chunk<M>(
    chain: &DescriptorChain<M>,
    mut f: impl FnMut(&mut [u32]),
) -> (usize, Option<PfnStop>)
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let mem = chain.memory();
    let mut chunk = [0u32; PFN_CHUNK];
    let mut n = 0usize;
    let mut total = 0usize;
    let mut stage = [0u8; 1024];
    let mut carry = [0u8; 4];
    let mut carry_len = 0usize;
    let mut stop = None;
    'descs: for desc in chain.clone() {
        if desc.is_write_only() {
            continue;
        }
        let len = u64::from(desc.len());
        let mut off = 0u64;
        while off < len {
            let want = (len - off).min(stage.len() as u64) as usize;
            let read = desc
                .addr()
                .0
                .checked_add(off)
                .map(GuestAddress)
                .and_then(|a| mem.read_slice(&mut stage[..want], a).ok());
            if read.is_none() {
                stop = Some(PfnStop::Unreadable);
                break 'descs;
            }
            for &b in &stage[..want] {
                carry[carry_len] = b;
                carry_len += 1;
                if carry_len < 4 {
                    continue;
                }
                carry_len = 0;
                if total == MAX_PFNS_PER_ELEMENT {
                    stop = Some(PfnStop::OverLimit);
                    break 'descs;
                }
                chunk[n] = u32::from_le_bytes(carry);
                n += 1;
                total += 1;
                if n == PFN_CHUNK {
                    f(&mut chunk[..n]);
                    n = 0;
                }
            }
            off += want as u64;
        }
    }
    if n > 0 {
        f(&mut chunk[..n]);
    }
    (total, stop)
}

/// Sorts `pfns` and calls `f(first_pfn, count)` for each run of adjacent PFNs (a repeated
/// PFN joins its run).
pub(super) fn for_each_run(pfns: &mut [u32], mut f: impl FnMut(u64, u64)) {
    pfns.sort_unstable();
    let mut iter = pfns.iter().map(|&p| u64::from(p));
    let Some(mut first) = iter.next() else {
        return;
    };
    let mut last = first;
    for p in iter {
        if p > last + 1 {
            f(first, last - first + 1);
            first = p;
        }
        last = p;
    }
    f(first, last - first + 1);
}

/// Calls `f(region, gpa, len, host)` for each part of `[start, end)` inside one region of
/// `mem`, with the host address of `gpa`; returns the bytes outside every region (or in a
/// region without a host mapping). Bounded by the number of regions.
fn for_each_region_piece<Mem, F>(mem: &Mem, start: u64, end: u64, mut f: F) -> u64
where
    Mem: GuestMemoryBackend + ?Sized,
    F: FnMut(&Mem::R, u64, u64, u64),
{
    let mut unmapped = 0u64;
    let holes = super::regions::for_each_piece(mem, start, end, |region, cur, piece_end| {
        let host = region
            .get_host_address(MemoryRegionAddress(cur - region.start_addr().0))
            .map(|h| h as u64);
        match host {
            Ok(host) => f(region, cur, piece_end - cur, host),
            Err(_) => unmapped += piece_end - cur,
        }
    });
    holes + unmapped
}

/// A host range for `[gpa, gpa + len)`, which lies inside `region`, backed by `backing`.
fn host_range<R: GuestMemoryRegion>(
    region: &R,
    gpa: u64,
    len: u64,
    backing: RegionBacking,
) -> Option<HostRange<'_>> {
    let offset = gpa.checked_sub(region.start_addr().0)?;
    let host_addr = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
    Some(HostRange {
        gpa: GuestAddress(gpa),
        len,
        host_addr,
        region_offset: offset,
        file_offset: region.file_offset(),
        backing,
    })
}

/// Host pages of which only some 4 KiB pieces were inflated. A fixed number of slots, each
/// for one page of its region's page size with one bit per piece; the oldest slot is dropped
/// when a new page needs one (its pieces are then simply never discarded, which is always
/// safe). A slot's bits grow to the largest page it held (at most `MAX_PARTIAL_PAGE`) and
/// are reused after that, so the table never allocates more than `PARTIAL_SLOTS` times
/// `MAX_PARTIAL_PAGE / 4 KiB` bits, whatever the guest does.
#[derive(Debug)]
struct PartialPages {
    slots: Vec<PartialSlot>,
    clock: u64,
}

#[derive(Debug)]
struct PartialSlot {
    /// The guest address of the host page; `None` when the slot is free.
    base: Option<u64>,
    /// The size of the host page.
    page: u64,
    bits: Vec<u64>,
    stamp: u64,
}

impl PartialPages {
    fn new() -> Self {
        PartialPages {
            slots: (0..PARTIAL_SLOTS)
                .map(|_| PartialSlot {
                    base: None,
                    page: 0,
                    bits: Vec::new(),
                    stamp: 0,
                })
                .collect(),
            clock: 0,
        }
    }

    fn clear(&mut self) {
        for s in &mut self.slots {
            s.base = None;
        }
    }

    /// Marks pieces `[first, first + count)` of the host page of `page` bytes at `base`
    /// inflated; returns true (and forgets the page) once every piece of it was.
    fn add(&mut self, base: u64, page: u64, first: u64, count: u64) -> bool {
        let pieces = page / PAGE_SIZE;
        if pieces <= 1 || page > MAX_PARTIAL_PAGE {
            return false;
        }
        let Ok(words) = usize::try_from(pieces.div_ceil(64)) else {
            return false;
        };
        self.clock += 1;
        let found = self
            .slots
            .iter()
            .position(|s| s.base == Some(base) && s.page == page);
        let idx = match found {
            Some(i) => i,
            None => {
                let i = self
                    .slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| (s.base.is_some(), s.stamp))
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                let Some(slot) = self.slots.get_mut(i) else {
                    return false;
                };
                slot.base = Some(base);
                slot.page = page;
                slot.bits.clear();
                slot.bits.resize(words, 0);
                i
            }
        };
        let slot = &mut self.slots[idx];
        slot.stamp = self.clock;
        for p in first..first.saturating_add(count).min(pieces) {
            slot.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        let whole_words = (pieces / 64) as usize;
        let rest = pieces % 64;
        let full = slot.bits[..whole_words].iter().all(|&w| w == u64::MAX)
            && (rest == 0 || slot.bits[whole_words] == (1u64 << rest) - 1);
        if full {
            slot.base = None;
        }
        full
    }

    /// Forgets the pieces in `[start, end)` (they were deflated).
    fn remove(&mut self, start: u64, end: u64) {
        for slot in &mut self.slots {
            let Some(base) = slot.base else { continue };
            let page_end = base.saturating_add(slot.page);
            if end <= base || start >= page_end {
                continue;
            }
            let from = (start.max(base) - base) / PAGE_SIZE;
            let to = (end.min(page_end) - base).div_ceil(PAGE_SIZE);
            for p in from..to {
                slot.bits[(p / 64) as usize] &= !(1 << (p % 64));
            }
        }
    }
}

/// One pending inflated range `[start, end)` of guest addresses.
#[derive(Debug, Clone, Copy)]
struct PendingRange {
    start: u64,
    end: u64,
    /// The inflate element in which the range last grew ([`PendingRanges::clock`]).
    stamp: u64,
}

/// Inflated ranges waiting to be merged with later ones: sorted by address, disjoint and
/// never adjacent (adjacent ranges are merged), at most `cap` of them in a vector allocated
/// once.
///
/// When a run joins no range and the set is full, the range least likely to grow makes
/// room: the one that has not grown for the most elements. Linux's streams grow in every
/// element and a completed block waits only a few elements for the block below it, while
/// a stray page usually never grows, so strays go first. Among ranges that last grew in the
/// same element, the lowest goes: the device adds an element's runs in ascending order, so
/// that is the one added first, and discards keep the order in which pieces arrived (which
/// the partial host page table relies on to keep the most recent pages).
#[derive(Debug)]
struct PendingRanges {
    ranges: Vec<PendingRange>,
    cap: usize,
    bytes: u64,
    /// Inflate elements seen.
    clock: u64,
}

impl PendingRanges {
    fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        PendingRanges {
            ranges: Vec::with_capacity(cap),
            cap,
            bytes: 0,
            clock: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The bytes of all pending ranges together.
    fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The `i`-th range by address.
    fn get(&self, i: usize) -> Option<(u64, u64)> {
        self.ranges.get(i).map(|r| (r.start, r.end))
    }

    fn clear(&mut self) {
        self.ranges.clear();
        self.bytes = 0;
    }

    /// Marks the end of an inflate element.
    fn tick(&mut self) {
        self.clock = self.clock.wrapping_add(1);
    }

    /// Adds `[start, end)`, merging it with every range it overlaps or touches. When it
    /// joins none and the set is full, the range least likely to grow is taken out to make
    /// room and returned (the caller discards it).
    fn insert(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        if start >= end {
            return None;
        }
        let stamp = self.clock;
        // The ranges from `first` to `last` (exclusive) overlap or touch the new one.
        let first = self.ranges.partition_point(|r| r.end < start);
        let last = first
            + self.ranges[first..]
                .iter()
                .take_while(|r| r.start <= end)
                .count();
        if last > first {
            let joined: u64 = self.ranges[first..last]
                .iter()
                .map(|r| r.end - r.start)
                .sum();
            let merged = PendingRange {
                start: start.min(self.ranges[first].start),
                end: end.max(self.ranges[last - 1].end),
                stamp,
            };
            self.ranges[first] = merged;
            self.ranges.drain(first + 1..last);
            self.bytes = self
                .bytes
                .saturating_sub(joined)
                .saturating_add(merged.end - merged.start);
            return None;
        }
        let mut at = first;
        let mut evicted = None;
        if self.ranges.len() >= self.cap {
            let oldest = self
                .ranges
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.stamp)
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                let r = self.ranges.remove(i);
                self.bytes = self.bytes.saturating_sub(r.end - r.start);
                if i < at {
                    at -= 1;
                }
                evicted = Some((r.start, r.end));
            }
        }
        self.ranges.insert(at, PendingRange { start, end, stamp });
        self.bytes = self.bytes.saturating_add(end - start);
        evicted
    }
}

/// Turns inflated, deflated and reported pages into backend calls.
pub(super) struct PageEngine {
    backend: Arc<dyn MemoryBackend>,
    /// The backend's page size: the smallest unit discarded in any region.
    host_page: u64,
    backings: BackingCache,
    pending: PendingRanges,
    partial: PartialPages,
    inhibited: bool,
    pub(super) metrics: PageMetrics,
}

impl std::fmt::Debug for PageEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageEngine")
            .field("host_page", &self.host_page)
            .field("backings", &self.backings)
            .field("pending_ranges", &self.pending.len())
            .field("pending_bytes", &self.pending.bytes())
            .field("inhibited", &self.inhibited)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// A region's page size: the larger of the backend's (`host_page`, already checked) and the
/// one of what backs the region; `None` if that one is not a sane page size.
fn region_page(host_page: u64, backing: RegionBacking) -> Option<u64> {
    let own = backing.page_size();
    (own.is_power_of_two() && own >= PAGE_SIZE).then_some(own.max(host_page))
}

impl PageEngine {
    pub(super) fn new(backend: Arc<dyn MemoryBackend>) -> Self {
        Self::with_pending_ranges(backend, PENDING_RANGES)
    }

    /// An engine that keeps at most `ranges` pending ranges (1 behaves as the device did
    /// with a single pending range).
    fn with_pending_ranges(backend: Arc<dyn MemoryBackend>, ranges: usize) -> Self {
        let size = backend.host_page_size();
        let host_page = if size.is_power_of_two() && size >= PAGE_SIZE {
            size
        } else {
            PAGE_SIZE
        };
        PageEngine {
            backend,
            host_page,
            backings: BackingCache::new(),
            pending: PendingRanges::new(ranges),
            partial: PartialPages::new(),
            inhibited: false,
            metrics: PageMetrics::default(),
        }
    }

    /// The backend's page size, the smallest unit discarded in any region (a region on
    /// larger pages is discarded in those).
    pub(super) fn host_page(&self) -> u64 {
        self.host_page
    }

    /// What backs `region` and the size of the pages it is discarded in (found once per
    /// region). A region whose backing reports a page size that is no page size is handled
    /// as unknown, in the backend's pages.
    fn region_info<R: GuestMemoryRegion>(&mut self, region: &R) -> (RegionBacking, u64) {
        let (backing, fresh) = self.backings.get(region);
        let info = match region_page(self.host_page, backing) {
            Some(page) => (backing, page),
            None => (RegionBacking::Unknown, self.host_page),
        };
        if fresh && info.0 == RegionBacking::Unknown {
            self.metrics.unknown_backing_regions += 1;
        }
        info
    }

    /// Takes `backing` as what backs `region` (tests: a backing the test machine cannot
    /// provide).
    #[cfg(test)]
    fn assume_backing<R: GuestMemoryRegion>(&mut self, region: &R, backing: RegionBacking) {
        self.backings.insert(region, backing);
    }

    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(super) fn inhibited(&self) -> bool {
        self.inhibited
    }

    /// Stops (or allows again) every discard. Inhibiting drops the pending ranges.
    pub(super) fn set_inhibited(&mut self, on: bool) {
        self.inhibited = on;
        if on {
            self.metrics.discards_inhibited_bytes += self.pending.bytes();
            self.pending.clear();
            self.partial.clear();
        }
    }

    /// Ends an inflate element. Unless the driver promised to tell the device before it
    /// reuses a page (`must_tell_host`), everything inflated so far is discarded now, before
    /// the element is acknowledged, and partially inflated host pages are forgotten (as QEMU
    /// does): such a driver may reuse a page as soon as it *posted* its deflate, which the
    /// device may not have seen yet.
    pub(super) fn end_inflate_element<Mem>(&mut self, mem: &Mem, must_tell_host: bool)
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        self.pending.tick();
        if !must_tell_host {
            self.flush(mem);
            self.partial.clear();
        }
    }

    /// Forgets everything not yet discarded (device reset: the new driver owns the pages).
    pub(super) fn reset(&mut self) {
        self.pending.clear();
        self.partial.clear();
    }

    /// Records the inflated pages `[pfn, pfn + count)`; returns how many are outside RAM.
    pub(super) fn inflate<Mem>(&mut self, mem: &Mem, pfn: u64, count: u64) -> u64
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        let start = pfn << PAGE_SHIFT;
        let end = (pfn + count) << PAGE_SHIFT;
        let outside = for_each_region_piece(mem, start, end, |_, gpa, len, _| {
            self.metrics.inflated_pages += len >> PAGE_SHIFT;
            self.add_pending(mem, gpa, gpa + len);
        });
        outside >> PAGE_SHIFT
    }

    fn add_pending<Mem>(&mut self, mem: &Mem, s: u64, e: u64)
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        if let Some((es, ee)) = self.pending.insert(s, e) {
            self.discard_inflated(mem, es, ee);
        }
        if self.pending.bytes() >= PENDING_CAP {
            self.flush(mem);
        }
    }

    /// Discards every pending inflated range, in ascending address order.
    pub(super) fn flush<Mem>(&mut self, mem: &Mem)
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        for i in 0..self.pending.len() {
            if let Some((s, e)) = self.pending.get(i) {
                self.discard_inflated(mem, s, e);
            }
        }
        self.pending.clear();
    }

    /// Discards the whole host pages of the inflated range `[s, e)`; pieces of host pages
    /// at its ends go to the partial table.
    fn discard_inflated<Mem>(&mut self, mem: &Mem, s: u64, e: u64)
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        if self.inhibited {
            self.metrics.discards_inhibited_bytes += e - s;
            return;
        }
        for_each_region_piece(mem, s, e, |region, gpa, len, host| {
            let (backing, page) = self.region_info(region);
            let (a, b) = (host.next_multiple_of(page), (host + len) / page * page);
            if a > b {
                // Inside one host page.
                self.add_partial(
                    region,
                    backing,
                    page,
                    gpa.checked_sub(host % page),
                    gpa,
                    len,
                );
                return;
            }
            if a > host {
                let base = gpa.checked_sub(host % page);
                self.add_partial(region, backing, page, base, gpa, a - host);
            }
            if b > a {
                if let Some(r) = host_range(region, gpa + (a - host), b - a, backing) {
                    self.discard(&r);
                }
            }
            if host + len > b {
                let t = gpa + (b - host);
                self.add_partial(region, backing, page, Some(t), t, host + len - b);
            }
        });
    }

    /// Records the inflated part `[at, at + len)` of the host page of `page` bytes at guest
    /// address `base` and discards the page once it is whole (and entirely inside
    /// `region`). `base` is `None` when the host page would start below guest address 0 (a
    /// region whose host mapping is not aligned to the host page size): such a page is never
    /// whole.
    fn add_partial<R: GuestMemoryRegion>(
        &mut self,
        region: &R,
        backing: RegionBacking,
        page: u64,
        base: Option<u64>,
        at: u64,
        len: u64,
    ) {
        let region_start = region.start_addr().0;
        let region_end = region_start.saturating_add(region.len());
        let Some(base) = base
            .filter(|&b| b >= region_start && b.checked_add(page).is_some_and(|e| e <= region_end))
        else {
            return;
        };
        let first = (at - base) / PAGE_SIZE;
        if self.partial.add(base, page, first, len / PAGE_SIZE) {
            if let Some(r) = host_range(region, base, page, backing) {
                self.discard(&r);
            }
        }
    }

    fn discard(&mut self, r: &HostRange<'_>) {
        if self.call_discard(r) {
            self.metrics.discarded_bytes += r.len;
        }
    }

    fn call_discard(&mut self, r: &HostRange<'_>) -> bool {
        self.metrics.discard_calls += 1;
        if r.backing == RegionBacking::Unknown {
            self.metrics.unknown_backing_bytes =
                self.metrics.unknown_backing_bytes.saturating_add(r.len);
        }
        match self.backend.discard(r) {
            Ok(()) => true,
            Err(e) => {
                self.metrics.discards_failed += 1;
                warn_limited!(BACKEND_FAILED, "balloon: discard of {:?} failed: {}", r, e);
                false
            }
        }
    }

    /// Takes the deflated pages `[pfn, pfn + count)` back: they leave the partial table and
    /// their host pages are repopulated. Returns how many are outside RAM. The caller flushes
    /// the pending ranges first, so nothing discards these pages later.
    pub(super) fn deflate<Mem>(&mut self, mem: &Mem, pfn: u64, count: u64) -> u64
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        let start = pfn << PAGE_SHIFT;
        let end = (pfn + count) << PAGE_SHIFT;
        self.partial.remove(start, end);
        let mut inside = 0u64;
        let outside = for_each_region_piece(mem, start, end, |region, gpa, len, host| {
            inside += len >> PAGE_SHIFT;
            let (backing, page) = self.region_info(region);
            // Populate whole host pages, clipped to the region.
            let region_start = region.start_addr().0;
            let region_end = region_start.saturating_add(region.len());
            let lo = gpa.saturating_sub(host % page).max(region_start);
            let hi = (gpa + ((host + len).next_multiple_of(page) - host)).min(region_end);
            if let Some(r) = host_range(region, lo, hi - lo, backing) {
                self.metrics.populate_calls += 1;
                if let Err(e) = self.backend.populate(&r) {
                    self.metrics.populates_failed += 1;
                    warn_limited!(BACKEND_FAILED, "balloon: populate of {:?} failed: {}", r, e);
                }
            }
        });
        self.metrics.deflated_pages += inside;
        outside >> PAGE_SHIFT
    }

    /// Discards the reported free range `[gpa, gpa + len)`, rounded inward to whole host
    /// pages (of each region's page size) and clipped to each region. Returns the bytes
    /// discarded.
    pub(super) fn report<Mem>(&mut self, mem: &Mem, gpa: u64, len: u64) -> u64
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        let Some(end) = gpa.checked_add(len) else {
            return 0;
        };
        let mut done = 0u64;
        for_each_region_piece(mem, gpa, end, |region, gpa, len, host| {
            let (backing, page) = self.region_info(region);
            let (a, b) = (host.next_multiple_of(page), (host + len) / page * page);
            if a >= b {
                return;
            }
            if let Some(r) = host_range(region, gpa + (a - host), b - a, backing) {
                if self.call_discard(&r) {
                    done += r.len;
                }
            }
        });
        self.metrics.reported_bytes += done;
        done
    }
}

/// Logs a PFN array that stopped early.
pub(super) fn log_pfn_stop(queue: &str, stop: PfnStop) {
    warn_limited!(BAD_PFN_READ, "balloon: {} element: {:?}", queue, stop);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Mutex;
    use vm_memory::GuestMemoryMmap;

    #[derive(Debug, Default)]
    struct Recorder {
        page: u64,
        fail: bool,
        calls: Mutex<Vec<(char, u64, u64)>>,
    }

    impl Recorder {
        fn result(&self) -> io::Result<()> {
            if self.fail {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        }
    }

    impl MemoryBackend for Recorder {
        fn host_page_size(&self) -> u64 {
            self.page
        }
        fn discard(&self, r: &HostRange<'_>) -> io::Result<()> {
            self.calls.lock().unwrap().push(('d', r.gpa.0, r.len));
            self.result()
        }
        fn populate(&self, r: &HostRange<'_>) -> io::Result<()> {
            self.calls.lock().unwrap().push(('p', r.gpa.0, r.len));
            self.result()
        }
    }

    fn engine(page: u64) -> (PageEngine, Arc<Recorder>) {
        let rec = Arc::new(Recorder {
            page,
            ..Default::default()
        });
        (PageEngine::new(rec.clone()), rec)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x40_0000),
            (GuestAddress(0x100_0000), 0x40_0000),
        ])
        .unwrap()
    }

    #[test]
    fn runs_merge_adjacent_and_repeated_pfns() {
        let mut pfns = [9, 3, 4, 4, 5, 20, 8, 21];
        let mut runs = Vec::new();
        for_each_run(&mut pfns, |p, n| runs.push((p, n)));
        assert_eq!(runs, [(3, 3), (8, 2), (20, 2)]);
        let mut none: [u32; 0] = [];
        for_each_run(&mut none, |_, _| panic!("no run"));
    }

    #[test]
    fn contiguous_inflation_is_one_discard() {
        let (mut e, rec) = engine(4096);
        let m = mem();
        // Four elements in descending order, as a buddy allocator hands pages out.
        for k in (0..4u64).rev() {
            assert_eq!(e.inflate(&m, k * 256, 256), 0);
        }
        assert!(e.has_pending());
        e.flush(&m);
        assert_eq!(*rec.calls.lock().unwrap(), [('d', 0, 0x40_0000)]);
        assert_eq!(e.metrics.inflated_pages, 1024);
        assert_eq!(e.metrics.discard_calls, 1);
    }

    #[test]
    fn ranges_are_clipped_to_regions() {
        let (mut e, rec) = engine(4096);
        let m = mem();
        // From the last page of region 0 across the hole into region 1.
        let outside = e.inflate(&m, 0x3ff, 0x1000 - 0x3ff + 2);
        assert_eq!(outside, 0x1000 - 0x400);
        e.flush(&m);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [('d', 0x3f_f000, 0x1000), ('d', 0x100_0000, 0x2000)]
        );
    }

    #[test]
    fn huge_pages_discard_only_when_whole() {
        let (mut e, rec) = engine(0x20_0000);
        let m = mem();
        // Half of the first 2 MiB page, flushed (a non-adjacent run follows).
        e.inflate(&m, 0, 256);
        e.inflate(&m, 0x300, 1);
        e.flush(&m);
        assert!(rec.calls.lock().unwrap().is_empty());
        // The other half completes it.
        e.inflate(&m, 256, 256);
        e.flush(&m);
        assert_eq!(*rec.calls.lock().unwrap(), [('d', 0, 0x20_0000)]);
    }

    #[test]
    fn deflated_piece_keeps_its_huge_page() {
        let (mut e, rec) = engine(0x20_0000);
        let m = mem();
        e.inflate(&m, 0, 256);
        e.flush(&m);
        e.deflate(&m, 10, 1);
        e.inflate(&m, 256, 256);
        e.flush(&m);
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(calls, [('p', 0, 0x20_0000)], "no discard of a page in use");
        assert_eq!(e.metrics.deflated_pages, 1);
    }

    #[test]
    fn partial_table_is_bounded() {
        let (mut e, rec) = engine(0x1_0000);
        let m = mem();
        // One piece in each of 40 host pages: the table keeps the last 16.
        for k in 0..40u64 {
            e.inflate(&m, k * 16, 1);
        }
        e.flush(&m);
        // Completing the first page finds no slot left for it: nothing is discarded.
        e.inflate(&m, 1, 15);
        e.flush(&m);
        assert!(rec.calls.lock().unwrap().is_empty());
        // Completing the newest one discards it.
        e.inflate(&m, 39 * 16 + 1, 15);
        e.flush(&m);
        assert_eq!(*rec.calls.lock().unwrap(), [('d', 39 * 0x1_0000, 0x1_0000)]);
    }

    #[test]
    fn inhibited_discards_are_dropped() {
        let (mut e, rec) = engine(4096);
        let m = mem();
        e.inflate(&m, 0, 4);
        e.set_inhibited(true);
        assert!(e.inhibited());
        assert!(!e.has_pending());
        e.inflate(&m, 8, 4);
        e.flush(&m);
        assert!(rec.calls.lock().unwrap().is_empty());
        assert_eq!(e.metrics.discards_inhibited_bytes, 0x8000);
        e.set_inhibited(false);
        e.inflate(&m, 8, 4);
        e.reset();
        e.flush(&m);
        assert!(
            rec.calls.lock().unwrap().is_empty(),
            "reset drops the pending range"
        );
    }

    #[test]
    fn reports_are_aligned_inward() {
        let (mut e, rec) = engine(0x1_0000);
        let m = mem();
        assert_eq!(e.report(&m, 0x1000, 0x2_0000), 0x1_0000);
        assert_eq!(e.report(&m, 0x3f_0000, 0x2_0000), 0x1_0000);
        assert_eq!(e.report(&m, 0x1000, 0x1000), 0);
        assert_eq!(e.report(&m, u64::MAX - 0x1000, 0x2000), 0);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [('d', 0x1_0000, 0x1_0000), ('d', 0x3f_0000, 0x1_0000)]
        );
        assert_eq!(e.metrics.reported_bytes, 0x2_0000);
        assert_eq!(e.metrics.discarded_bytes, 0);
    }

    #[test]
    fn host_pages_follow_the_host_mapping_not_the_guest_address() {
        // A 2 MiB backend over an anonymous mapping that is only 4 KiB aligned: host pages
        // may start before the region (even "below" guest address 0).
        let (mut e, rec) = engine(0x20_0000);
        let m = mem();
        let host = m.get_host_address(GuestAddress(0)).unwrap() as u64;
        let skew = host % 0x20_0000;
        e.inflate(&m, 0, 1);
        e.flush(&m);
        e.deflate(&m, 0, 1);
        e.inflate(&m, 0, 0x400);
        e.flush(&m);
        let calls = rec.calls.lock().unwrap().clone();
        let first_boundary = (0x20_0000 - skew) % 0x20_0000;
        let mut want = vec![('p', 0, (0x20_0000 - skew).min(0x40_0000))];
        let whole = (0x40_0000 - first_boundary) / 0x20_0000 * 0x20_0000;
        if whole > 0 {
            want.push(('d', first_boundary, whole));
        }
        assert_eq!(calls, want);
    }

    #[test]
    fn backend_failures_are_counted() {
        let rec = Arc::new(Recorder {
            page: 4096,
            fail: true,
            ..Default::default()
        });
        let mut e = PageEngine::new(rec.clone());
        let m = mem();
        e.inflate(&m, 0, 2);
        e.flush(&m);
        e.deflate(&m, 0, 1);
        assert_eq!(e.report(&m, 0x10_0000, 0x1000), 0);
        let got = e.metrics;
        assert_eq!((got.discard_calls, got.discards_failed), (2, 2));
        assert_eq!((got.populate_calls, got.populates_failed), (1, 1));
        assert_eq!((got.discarded_bytes, got.reported_bytes), (0, 0));
        assert_eq!(rec.calls.lock().unwrap().len(), 3);
    }

    #[test]
    fn odd_host_page_sizes_fall_back_to_4k() {
        for page in [0, 3000, 2048, 0x3000] {
            assert_eq!(engine(page).0.host_page(), PAGE_SIZE, "{page}");
        }
        let mut none = PartialPages::new();
        assert!(
            !none.add(0, PAGE_SIZE, 0, 1),
            "4 KiB host pages need no table"
        );
    }

    #[test]
    fn tracked_pages_survive_unrelated_deflates_but_not_inhibition() {
        let (mut e, rec) = engine(0x20_0000);
        let m = mem();
        let host = m.get_host_address(GuestAddress(0)).unwrap() as u64;
        if host % 0x20_0000 != 0 {
            return; // the mapping is not huge-page aligned; covered elsewhere
        }
        e.inflate(&m, 0, 256);
        e.flush(&m);
        // A deflate in another host page leaves the tracked half alone.
        e.deflate(&m, 0x300, 1);
        e.inflate(&m, 256, 256);
        e.flush(&m);
        assert_eq!(
            rec.calls.lock().unwrap().clone(),
            [('p', 0x20_0000, 0x20_0000), ('d', 0, 0x20_0000)]
        );
        // Inhibiting forgets half-inflated pages: they are never discarded.
        e.inflate(&m, 0x200, 256);
        e.flush(&m);
        e.set_inhibited(true);
        e.set_inhibited(false);
        e.inflate(&m, 0x300, 256);
        e.flush(&m);
        assert_eq!(rec.calls.lock().unwrap().len(), 2);
    }

    #[test]
    fn pending_range_is_capped() {
        let (mut e, rec) = engine(4096);
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1100_0000)]).unwrap();
        let pages = PENDING_CAP >> PAGE_SHIFT;
        e.inflate(&m, 0, pages);
        assert!(!e.has_pending());
        assert_eq!(*rec.calls.lock().unwrap(), [('d', 0, PENDING_CAP)]);
    }

    /// Records every call with the backing it carried.
    #[derive(Debug, Default)]
    struct BackingRecorder {
        calls: Mutex<Vec<(char, u64, u64, RegionBacking)>>,
    }

    impl MemoryBackend for BackingRecorder {
        fn discard(&self, r: &HostRange<'_>) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(('d', r.gpa.0, r.len, r.backing));
            Ok(())
        }
        fn populate(&self, r: &HostRange<'_>) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(('p', r.gpa.0, r.len, r.backing));
            Ok(())
        }
    }

    const HUGE: u64 = 0x20_0000;
    const HUGE_SHARED: RegionBacking = RegionBacking::HugeTlb {
        page_size: HUGE,
        shared: true,
    };

    /// The first guest address in the region at `start` whose host address is 2 MiB aligned.
    fn first_huge_boundary(m: &GuestMemoryMmap, start: u64) -> u64 {
        let host = m.get_host_address(GuestAddress(start)).unwrap() as u64;
        start + (HUGE - host % HUGE) % HUGE
    }

    #[test]
    fn each_region_is_collected_in_its_own_page_size() {
        let rec = Arc::new(BackingRecorder::default());
        let mut e = PageEngine::new(rec.clone());
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x40_0000),
            (GuestAddress(0x100_0000), 0x80_0000),
        ])
        .unwrap();
        // Region 1 on 2 MiB huge pages (this machine's test memory is anonymous, so the
        // backing is assumed; tests/backings.rs uses real hugetlbfs).
        e.assume_backing(
            m.find_region(GuestAddress(0x100_0000)).unwrap(),
            HUGE_SHARED,
        );
        let anon = RegionBacking::AnonymousPrivate;
        let huge = first_huge_boundary(&m, 0x100_0000);
        let pfn = |gpa: u64| gpa >> PAGE_SHIFT;
        // Ten 4 KiB pages of region 0 and half a huge page of region 1.
        e.inflate(&m, 0, 10);
        e.inflate(&m, pfn(huge), 256);
        e.end_inflate_element(&m, true);
        e.flush(&m);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [('d', 0, 10 * PAGE_SIZE, anon)],
            "region 0 is discarded in 4 KiB pages, region 1 waits for the whole huge page"
        );
        // The other half, in two pieces and two elements, completes it.
        e.inflate(&m, pfn(huge) + 256, 100);
        e.end_inflate_element(&m, true);
        e.flush(&m);
        e.inflate(&m, pfn(huge) + 356, 156);
        e.end_inflate_element(&m, true);
        e.flush(&m);
        assert_eq!(
            rec.calls.lock().unwrap()[1..],
            [('d', huge, HUGE, HUGE_SHARED)]
        );
        // A deflated piece of region 1 repopulates its whole huge page and keeps the page
        // from being discarded; in region 0 only the 4 KiB page.
        rec.calls.lock().unwrap().clear();
        e.inflate(&m, pfn(huge + HUGE), 511);
        e.flush(&m);
        e.deflate(&m, pfn(huge + HUGE) + 5, 1);
        e.deflate(&m, 3, 1);
        e.inflate(&m, pfn(huge + HUGE) + 511, 1);
        e.flush(&m);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [
                ('p', huge + HUGE, HUGE, HUGE_SHARED),
                ('p', 3 * PAGE_SIZE, PAGE_SIZE, anon)
            ]
        );
        // Reports are rounded inward to each region's pages.
        rec.calls.lock().unwrap().clear();
        assert_eq!(e.report(&m, huge - PAGE_SIZE, HUGE + 2 * PAGE_SIZE), HUGE);
        assert_eq!(e.report(&m, huge + PAGE_SIZE, HUGE), 0);
        assert_eq!(e.report(&m, PAGE_SIZE, 2 * PAGE_SIZE), 2 * PAGE_SIZE);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [
                ('d', huge, HUGE, HUGE_SHARED),
                ('d', PAGE_SIZE, 2 * PAGE_SIZE, anon)
            ]
        );
        assert_eq!(e.metrics.unknown_backing_regions, 0);
        assert_eq!(
            e.host_page(),
            PAGE_SIZE,
            "the backend's own page size is unchanged"
        );
    }

    #[test]
    fn the_backend_page_size_is_a_floor_for_every_region() {
        // A 64 KiB backend over a 2 MiB region and a base-page region.
        let rec = Arc::new(Recorder {
            page: 0x1_0000,
            ..Default::default()
        });
        let mut e = PageEngine::new(rec.clone());
        let m = mem();
        e.assume_backing(
            m.find_region(GuestAddress(0x100_0000)).unwrap(),
            HUGE_SHARED,
        );
        let huge = first_huge_boundary(&m, 0x100_0000);
        e.inflate(&m, huge >> PAGE_SHIFT, 256);
        e.flush(&m);
        assert!(rec.calls.lock().unwrap().is_empty());
        e.inflate(&m, (huge >> PAGE_SHIFT) + 256, 256);
        e.flush(&m);
        assert_eq!(*rec.calls.lock().unwrap(), [('d', huge, HUGE)]);
    }

    #[test]
    fn regions_of_unknown_backing_are_counted() {
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::{GuestRegionMmap, MmapRegion};
        // A region that says it is on hugetlbfs while the kernel maps it anonymous.
        let region: MmapRegion = MmapRegionBuilder::new(0x40_0000)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .with_hugetlbfs(true)
            .build()
            .unwrap();
        let m = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::from_range(GuestAddress(0), 0x40_0000, None).unwrap(),
            GuestRegionMmap::new(region, GuestAddress(0x100_0000)).unwrap(),
        ])
        .unwrap();
        m.write_obj(0x5au8, GuestAddress(0x100_0000)).unwrap();
        let rec = Arc::new(BackingRecorder::default());
        let mut e = PageEngine::new(rec.clone());
        e.inflate(&m, 0x1000, 4);
        e.inflate(&m, 0, 2);
        e.flush(&m);
        e.inflate(&m, 0x1010, 1);
        e.flush(&m);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [
                ('d', 0, 2 * PAGE_SIZE, RegionBacking::AnonymousPrivate),
                ('d', 0x100_0000, 4 * PAGE_SIZE, RegionBacking::Unknown),
                ('d', 0x101_0000, PAGE_SIZE, RegionBacking::Unknown),
            ]
        );
        assert_eq!(
            e.metrics.unknown_backing_regions, 1,
            "counted once per region"
        );
        assert_eq!(e.metrics.unknown_backing_bytes, 5 * PAGE_SIZE);

        // The default backend frees nothing there: the discards fail and are counted.
        let mut e = PageEngine::new(Arc::new(crate::backend::MadviseBackend::new()));
        e.inflate(&m, 0x1000, 4);
        e.flush(&m);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100_0000)).unwrap(), 0x5a);
        let got = e.metrics;
        assert_eq!((got.discard_calls, got.discards_failed), (1, 1));
        assert_eq!(got.discarded_bytes, 0);
        assert_eq!(
            (got.unknown_backing_regions, got.unknown_backing_bytes),
            (1, 4 * PAGE_SIZE)
        );
        // Metrics saved by an older version, without these counters, still load.
        use serde::de::value::{Error, MapDeserializer};
        let before = [
            "inflate_elements",
            "deflate_elements",
            "inflated_pages",
            "deflated_pages",
            "pfns_outside_ram",
            "pfns_over_limit",
            "malformed_elements",
            "discard_calls",
            "discarded_bytes",
            "discards_failed",
            "discards_inhibited_bytes",
            "populate_calls",
            "populates_failed",
            "reporting_elements",
            "reporting_elements_skipped",
            "reported_bytes",
        ];
        let saved = MapDeserializer::<_, Error>::new(before.iter().map(|&f| (f, 7u64)));
        let old = PageMetrics::deserialize(saved).unwrap();
        assert_eq!(
            (
                old.discard_calls,
                old.reported_bytes,
                old.unknown_backing_regions
            ),
            (7, 7, 0)
        );
    }

    #[test]
    fn the_partial_table_holds_pages_up_to_1_gib() {
        let mut t = PartialPages::new();
        let gib = MAX_PARTIAL_PAGE;
        let pieces = gib / PAGE_SIZE;
        assert!(!t.add(0, 2 * gib, 0, 2 * pieces), "too large to collect");
        assert!(!t.add(0, gib, 0, pieces / 2));
        // The same base with another page size is another page.
        assert!(!t.add(0, HUGE, 0, 1));
        t.remove(0, PAGE_SIZE);
        assert!(
            !t.add(0, gib, pieces / 2, pieces / 2),
            "piece 0 was deflated"
        );
        assert!(t.add(0, gib, 0, 1));
        assert!(t.add(0, HUGE, 0, HUGE / PAGE_SIZE));
        assert!(t.slots.iter().all(|s| s.base.is_none()));
        let words: usize = t.slots.iter().map(|s| s.bits.capacity()).max().unwrap();
        assert!(
            words as u64 <= pieces / 64 + 8,
            "{words} words for one slot"
        );
    }
}

/// The pending set fed with PFN orders like the ones Linux's `fill_balloon()` produces (see
/// the module documentation), with a single pending range (as before) and with the full set.
#[cfg(test)]
mod linux_order_tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::io;
    use std::sync::Mutex;
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    /// Pages of a largest-order (4 MiB) buddy block.
    const BLOCK: u32 = 1024;
    /// A per-CPU list refill for a 512 MiB guest.
    const BATCH: usize = 31;

    /// Records discards as `(gpa, len)`.
    #[derive(Debug, Default)]
    struct Discards {
        page: u64,
        calls: Mutex<Vec<(u64, u64)>>,
    }

    impl MemoryBackend for Discards {
        fn host_page_size(&self) -> u64 {
            self.page
        }
        fn discard(&self, r: &HostRange<'_>) -> io::Result<()> {
            self.calls.lock().unwrap().push((r.gpa.0, r.len));
            Ok(())
        }
        fn populate(&self, _: &HostRange<'_>) -> io::Result<()> {
            Ok(())
        }
    }

    /// xorshift64*: reproducible without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    /// The pages of 4 MiB block `b` (PFN `b * 1024` on), ascending, as `expand()` hands a
    /// freshly split block out.
    fn block(b: u32) -> impl Iterator<Item = u32> {
        b * BLOCK..(b + 1) * BLOCK
    }

    /// `n` blocks from block `top` down, each ascending: the order-10 free list after a
    /// large free.
    fn descending_blocks(top: u32, n: u32) -> Vec<u32> {
        (0..n).flat_map(|k| block(top - k)).collect()
    }

    /// Inserts `per_element` (up to) stray pages from `[lo, hi)` (PFNs) before each 256 pages
    /// of `stream`, as pages freed on the CPU between allocations come out of the per-CPU
    /// list first. A stray is never a page of the stream and never repeated.
    fn with_strays(stream: &[u32], rng: &mut Rng, per_element: u64, lo: u32, hi: u32) -> Vec<u32> {
        let used: BTreeSet<u32> = stream.iter().copied().collect();
        let mut taken = BTreeSet::new();
        let mut out = Vec::new();
        for part in stream.chunks(PFN_CHUNK - per_element as usize) {
            for _ in 0..rng.below(per_element + 1) {
                let p = lo + rng.below(u64::from(hi - lo)) as u32;
                if !used.contains(&p) && taken.insert(p) {
                    out.push(p);
                }
            }
            out.extend_from_slice(part);
        }
        out
    }

    /// Streams taken in turns of `batch` pages (several CPUs or tasks refilling their lists
    /// from the buddy allocator in turn).
    fn interleave(streams: &[Vec<u32>], batch: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut pos = vec![0usize; streams.len()];
        while out.len() < streams.iter().map(Vec::len).sum() {
            for (s, p) in streams.iter().zip(pos.iter_mut()) {
                let end = (*p + batch).min(s.len());
                out.extend_from_slice(&s[*p..end]);
                *p = end;
            }
        }
        out
    }

    /// What one run of an order cost and did.
    #[derive(Debug)]
    struct Outcome {
        calls: usize,
        discarded: BTreeSet<u64>,
    }

    /// Sends `pfns` in elements of 256 as `process_plain_queue` handles them, then flushes
    /// (target reached), with at most `ranges` pending ranges.
    fn feed(
        mem: &GuestMemoryMmap,
        page: u64,
        ranges: usize,
        pfns: &[u32],
        must_tell_host: bool,
    ) -> Outcome {
        let rec = Arc::new(Discards {
            page,
            ..Default::default()
        });
        let mut e = PageEngine::with_pending_ranges(rec.clone(), ranges);
        for element in pfns.chunks(PFN_CHUNK) {
            let mut buf = element.to_vec();
            for_each_run(&mut buf, |p, n| {
                e.inflate(mem, p, n);
            });
            e.end_inflate_element(mem, must_tell_host);
        }
        e.flush(mem);
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(e.metrics.discard_calls, calls.len() as u64);
        let mut discarded = BTreeSet::new();
        for &(gpa, len) in &calls {
            assert_eq!(gpa % PAGE_SIZE, 0);
            for p in gpa >> PAGE_SHIFT..(gpa + len) >> PAGE_SHIFT {
                assert!(discarded.insert(p), "page {p:#x} discarded twice");
            }
        }
        Outcome {
            calls: calls.len(),
            discarded,
        }
    }

    /// The distinct inflated PFNs inside RAM.
    fn in_ram(mem: &GuestMemoryMmap, pfns: &[u32]) -> BTreeSet<u64> {
        pfns.iter()
            .map(|&p| u64::from(p))
            .filter(|&p| mem.find_region(GuestAddress(p << PAGE_SHIFT)).is_some())
            .collect()
    }

    /// Maximal runs of `pages`, split where a region ends (a discard never spans two).
    fn runs(mem: &GuestMemoryMmap, pages: &BTreeSet<u64>) -> usize {
        let region = |p: u64| {
            mem.find_region(GuestAddress(p << PAGE_SHIFT))
                .map(|r| r.start_addr().0)
        };
        let mut n = 0;
        let mut prev: Option<u64> = None;
        for &p in pages {
            if prev.is_none_or(|q| q + 1 != p || region(q) != region(p)) {
                n += 1;
            }
            prev = Some(p);
        }
        n
    }

    /// The runs of each element on its own (what flushing after every element costs).
    fn element_runs(mem: &GuestMemoryMmap, pfns: &[u32]) -> usize {
        pfns.chunks(PFN_CHUNK)
            .map(|c| runs(mem, &in_ram(mem, c)))
            .sum()
    }

    /// The pages of `pages` whose whole host page (by host address) was inflated.
    fn whole_host_pages(mem: &GuestMemoryMmap, page: u64, pages: &BTreeSet<u64>) -> BTreeSet<u64> {
        let per = page / PAGE_SIZE;
        pages
            .iter()
            .copied()
            .filter(|&p| {
                let gpa = p << PAGE_SHIFT;
                let host = mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
                let first = (gpa - host % page) >> PAGE_SHIFT;
                (first..first + per).all(|q| pages.contains(&q))
            })
            .collect()
    }

    /// Feeds `pfns` with one pending range and with [`PENDING_RANGES`], checks that exactly
    /// the inflated pages (whole host pages of them) were discarded, each once, and that the
    /// full set needs at most two calls per run (plus one per [`PENDING_CAP`] inflated).
    /// Returns the calls with one range and with the set.
    fn check(name: &str, mem: &GuestMemoryMmap, page: u64, pfns: &[u32]) -> (usize, usize) {
        let pages = in_ram(mem, pfns);
        let want = if page == PAGE_SIZE {
            pages.clone()
        } else {
            whole_host_pages(mem, page, &pages)
        };
        let n_runs = runs(mem, &pages);
        let before = feed(mem, page, 1, pfns, true);
        let after = feed(mem, page, PENDING_RANGES, pfns, true);
        let per_element = feed(mem, page, PENDING_RANGES, pfns, false);
        assert_eq!(before.discarded, want, "{name}: single range");
        assert_eq!(after.discarded, want, "{name}: pending set");
        eprintln!(
            "{name}: {} PFNs in {} elements, {} runs ({} within elements): discard calls \
             {} with one pending range, {} with {} ranges, {} flushing every element",
            pfns.len(),
            pfns.len().div_ceil(PFN_CHUNK),
            n_runs,
            element_runs(mem, pfns),
            before.calls,
            after.calls,
            PENDING_RANGES,
            per_element.calls,
        );
        let cap_cuts = (pages.len() as u64 * PAGE_SIZE / PENDING_CAP) as usize;
        assert!(
            after.calls <= 2 * n_runs + cap_cuts,
            "{name}: {} calls for {n_runs} runs",
            after.calls
        );
        if page == PAGE_SIZE {
            assert_eq!(per_element.discarded, want, "{name}: per element");
            assert_eq!(per_element.calls, element_runs(mem, pfns), "{name}");
        }
        (before.calls, after.calls)
    }

    fn ram(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib * MIB) as usize)]).unwrap()
    }

    #[test]
    fn descending_blocks_ascending_inside() {
        let m = ram(512);
        // 25 adjacent blocks (100 MiB) from 400 MiB down; a short first element shifts the
        // element boundaries off the block boundaries, as leftovers of earlier frees do.
        let mut pfns: Vec<u32> = (0..100).map(|k| 120 * BLOCK + 7 * k).collect();
        pfns.extend(descending_blocks(99, 25));
        let (before, after) = check("descending 4 MiB blocks", &m, PAGE_SIZE, &pfns);
        assert!(after < before);
        // The same blocks with holes between them (every other block).
        let gaps: Vec<u32> = (0..25).rev().flat_map(|k| block(50 + 2 * k)).collect();
        check("descending blocks with gaps", &m, PAGE_SIZE, &gaps);
    }

    #[test]
    fn stray_pages_in_every_element() {
        let m = ram(512);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // The measured guest: 100 MiB from descending blocks, and pages freed by the rest of
        // the guest (anywhere below 96 MiB) in front of most elements.
        let stream = descending_blocks(124, 25);
        let pfns = with_strays(&stream, &mut rng, 3, 0, 24 * BLOCK);
        let (before, after) = check("descending blocks + strays", &m, PAGE_SIZE, &pfns);
        assert!(after < before, "{after} vs {before}");
        // 1 GiB of it: the cap cuts the stream every 256 MiB.
        let m = ram(1536);
        let stream = descending_blocks(300, 256);
        let pfns = with_strays(&stream, &mut rng, 2, 0, 40 * BLOCK);
        check("1 GiB descending blocks + strays", &m, PAGE_SIZE, &pfns);
    }

    #[test]
    fn interleaved_ascending_streams() {
        let m = ram(512);
        // Two CPUs' refills alternating, each over its own blocks.
        let a = descending_blocks(60, 12);
        let b = descending_blocks(110, 12);
        check(
            "two interleaved streams",
            &m,
            PAGE_SIZE,
            &interleave(&[a, b], BATCH),
        );
        // Three streams in larger batches, one of them ascending block by block.
        let a = descending_blocks(30, 8);
        let b: Vec<u32> = (0..8).flat_map(|k| block(70 + k)).collect();
        let c = descending_blocks(120, 8);
        check(
            "three interleaved streams",
            &m,
            PAGE_SIZE,
            &interleave(&[a, b, c], 63),
        );
        // Two streams taking turns inside the same blocks (another task allocating from the
        // same free list): both have gaps that the other fills.
        let s = descending_blocks(100, 16);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (i, part) in s.chunks(BATCH).enumerate() {
            if i % 2 == 0 { &mut a } else { &mut b }.extend_from_slice(part);
        }
        check(
            "two streams sharing blocks",
            &m,
            PAGE_SIZE,
            &interleave(&[a, b], 4 * BATCH),
        );
    }

    #[test]
    fn blocks_in_random_order() {
        let m = ram(512);
        let mut rng = Rng(0x1234_5678_9abc_def1);
        // 32 of the 64 blocks of a 256 MiB area, handed out in a random order.
        let mut blocks: Vec<u32> = (20..84).collect();
        rng.shuffle(&mut blocks);
        blocks.truncate(32);
        let pfns: Vec<u32> = blocks.iter().flat_map(|&b| block(b)).collect();
        check("32 blocks in random order", &m, PAGE_SIZE, &pfns);
        // Free fragments of every order, smallest first (as __rmqueue_smallest takes
        // them), in random order within an order, each ascending.
        let mut frags = Vec::new();
        let mut next = 10 * BLOCK;
        for order in 0..=8u32 {
            let mut these: Vec<u32> = (0..(40 >> (order / 2)))
                .map(|_| {
                    let at = next.next_multiple_of(1 << order) + (1 << order);
                    next = at + (1 << order) + rng.below(3) as u32 * 16;
                    at
                })
                .collect();
            rng.shuffle(&mut these);
            frags.extend(these.into_iter().flat_map(|f| f..f + (1 << order)));
        }
        frags.extend(descending_blocks(110, 4));
        check("fragments smallest order first", &m, PAGE_SIZE, &frags);
    }

    #[test]
    fn pages_over_several_regions() {
        // Two adjacent regions split at 258 MiB and a third after a hole.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (258 * MIB) as usize),
            (GuestAddress(258 * MIB), (254 * MIB) as usize),
            (GuestAddress(1024 * MIB), (128 * MIB) as usize),
        ])
        .unwrap();
        let mut rng = Rng(0xdead_beef_0bad_cafe);
        // Blocks around the region boundary (64 and 65 straddle nothing, 64 holds it), the
        // last ones in the high region, and strays in the hole (outside RAM: skipped).
        let mut stream = descending_blocks(70, 12);
        stream.extend(descending_blocks(280, 10));
        let mut pfns = with_strays(&stream, &mut rng, 2, 200 * BLOCK, 300 * BLOCK);
        pfns.extend((0..40).map(|k| 150 * BLOCK + 3 * k));
        check("several regions", &m, PAGE_SIZE, &pfns);
    }

    #[test]
    fn huge_and_large_host_pages() {
        let m = ram(258);
        let host = m.get_host_address(GuestAddress(0)).unwrap() as u64;
        for page in [0x1_0000, 0x20_0000] {
            let mut rng = Rng(page);
            // Blocks aligned to host pages (the mapping need not be), descending; strays
            // never complete a host page, so they are never discarded.
            let skew = ((page - host % page) % page) >> PAGE_SHIFT;
            let skew = skew as u32;
            let stream: Vec<u32> = (0..20u32)
                .rev()
                .flat_map(|k| block(30 + k).map(move |p| p + skew))
                .collect();
            let mut pfns = with_strays(&stream, &mut rng, 2, 0, 20 * BLOCK);
            // Host pages whose pieces arrive in two far apart elements.
            let late: Vec<u32> = (0..8u32)
                .flat_map(|k| (0..(page / PAGE_SIZE) as u32).map(move |i| (k, i)))
                .map(|(k, i)| 60 * BLOCK + skew + k * 2 * (page / PAGE_SIZE) as u32 + i)
                .collect();
            let (first, second) = late.split_at(late.len() / 2);
            pfns.splice(300..300, first.iter().copied());
            pfns.extend_from_slice(second);
            check(&format!("{} KiB host pages", page >> 10), &m, page, &pfns);
        }
    }

    #[test]
    fn pending_set_merges_bridges_and_evicts_the_oldest() {
        let mut p = PendingRanges::new(3);
        assert_eq!(p.insert(0x10, 0x20), None);
        assert_eq!(p.insert(0x40, 0x50), None);
        assert_eq!(p.insert(0x5, 0x5), None, "empty");
        // Touching both: one range.
        assert_eq!(p.insert(0x20, 0x40), None);
        assert_eq!(
            (p.len(), p.bytes(), p.get(0)),
            (1, 0x40, Some((0x10, 0x50)))
        );
        p.tick();
        assert_eq!(p.insert(0x80, 0x90), None);
        p.tick();
        assert_eq!(p.insert(0x0, 0x8), None);
        p.tick();
        assert_eq!(
            p.insert(0x30, 0x60),
            None,
            "an overlap grows (and renews) 0x10..0x50"
        );
        // Full: the range that went longest without growing goes first.
        assert_eq!(p.insert(0xa0, 0xb0), Some((0x80, 0x90)));
        assert_eq!(p.insert(0xc0, 0xd0), Some((0x0, 0x8)));
        // Among ranges of the same element, the lowest.
        assert_eq!(p.insert(0xe0, 0xe4), Some((0x10, 0x60)));
        let all: Vec<_> = (0..p.len()).filter_map(|i| p.get(i)).collect();
        assert_eq!(all, [(0xa0, 0xb0), (0xc0, 0xd0), (0xe0, 0xe4)]);
        assert_eq!(p.bytes(), 0x10 + 0x10 + 0x4);
        // Covering everything merges all three.
        assert_eq!(p.insert(0, 0x100), None);
        assert_eq!((p.len(), p.bytes()), (1, 0x100));
        p.clear();
        assert!(p.is_empty());
        assert_eq!(p.bytes(), 0);
        assert_eq!(PendingRanges::new(0).cap, 1);
    }

    #[test]
    fn the_cap_flushes_every_pending_range() {
        let m = ram(300);
        let rec = Arc::new(Discards {
            page: PAGE_SIZE,
            ..Default::default()
        });
        let mut e = PageEngine::new(rec.clone());
        e.inflate(&m, 0, 1);
        e.inflate(&m, 2, 1);
        e.end_inflate_element(&m, true);
        // Two pages and 255 MiB pending: under the cap.
        let mib = MIB >> PAGE_SHIFT;
        for k in 0..(PENDING_CAP >> 20) - 1 {
            e.inflate(&m, 16 + k * mib, mib);
            e.end_inflate_element(&m, true);
        }
        assert!(rec.calls.lock().unwrap().is_empty());
        // One more MiB reaches it: everything pending is discarded.
        e.inflate(&m, 16 + ((PENDING_CAP >> 20) - 1) * mib, mib);
        assert!(!e.has_pending());
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [(0, PAGE_SIZE), (0x2000, PAGE_SIZE), (0x1_0000, PENDING_CAP)]
        );
    }

    #[test]
    fn evictions_and_deflates_keep_discards_exact() {
        // More scattered pages than ranges (evictions), then a deflate in the middle: the
        // device flushes first, so the deflated pages are never discarded afterwards.
        let m = ram(64);
        let rec = Arc::new(Discards {
            page: PAGE_SIZE,
            ..Default::default()
        });
        let mut e = PageEngine::new(rec.clone());
        for k in 0..200u64 {
            e.inflate(&m, 3 * k, 1);
        }
        assert_eq!(rec.calls.lock().unwrap().len(), 200 - PENDING_RANGES);
        e.flush(&m);
        e.deflate(&m, 0, 600);
        let mark = rec.calls.lock().unwrap().len();
        e.inflate(&m, 1000, 10);
        e.flush(&m);
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(mark, 200);
        assert_eq!(calls[mark..], [(1000 << PAGE_SHIFT, 10 << PAGE_SHIFT)]);
    }
}
