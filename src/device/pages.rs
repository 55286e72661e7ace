// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Inflate, deflate and free page reporting: from guest elements to host ranges.
//!
//! * Inflate and deflate elements carry arrays of 32-bit little-endian PFNs (4 KiB units).
//!   They are read in chunks of [`PFN_CHUNK`] into a stack buffer, sorted, and merged into
//!   runs of adjacent pages; nothing is allocated per element.
//! * Inflated runs are merged further across elements into one *pending* range, which is
//!   discarded when the next run is not adjacent, when it reaches [`PENDING_CAP`], before a
//!   deflate, and when the device flushes (target reached, flush timer, pause, save). A Linux
//!   guest inflating 1 GiB of contiguous pages costs a handful of discards, not 262,144.
//! * Discards cover whole host pages only. A host page larger than 4 KiB (a huge page, a
//!   64 KiB host) whose 4 KiB pieces arrive in several runs or elements is tracked in a small
//!   fixed table until every piece was inflated; a deflated piece is taken out of it again.
//! * Every range is clipped to the guest memory region it lies in; PFNs outside RAM are
//!   skipped and counted.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::backend::{HostRange, MemoryBackend};
use crate::ratelimit::{warn_limited, RateLimit};
use crate::spec::{PAGE_SHIFT, PAGE_SIZE};

static BACKEND_FAILED: RateLimit = RateLimit::new();
static BAD_PFN_READ: RateLimit = RateLimit::new();

/// PFNs read and merged at a time (Linux sends at most 256 per element).
pub const PFN_CHUNK: usize = 256;

/// The most PFNs taken from one inflate or deflate element (16 times what Linux sends); the
/// rest of a longer element is ignored, which bounds the work a guest can cause per element.
pub const MAX_PFNS_PER_ELEMENT: usize = 16 * PFN_CHUNK;

/// The largest pending inflate range before it is discarded (bounds the time of one discard
/// on the event loop thread).
pub const PENDING_CAP: u64 = 256 << 20;

/// Host pages tracked at once while only some of their 4 KiB pieces were inflated.
pub const PARTIAL_SLOTS: usize = 16;

/// Counters of the memory side of the balloon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageMetrics {
    /// Inflate elements handled.
    pub inflate_elements: u64,
    /// Deflate elements handled.
    pub deflate_elements: u64,
    /// 4 KiB pages inflated inside guest RAM. PFNs are merged per chunk of [`PFN_CHUNK`]: a
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
}

/// Why a PFN array could not be read to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PfnStop {
    /// The element holds more than [`MAX_PFNS_PER_ELEMENT`] PFNs.
    OverLimit,
    /// A descriptor points outside guest memory.
    Unreadable,
}

/// Reads the PFN array in the device-readable descriptors of `chain` (a byte stream: a PFN
/// may straddle two descriptors; 1-3 trailing bytes are ignored) and calls `f` with chunks
/// of at most [`PFN_CHUNK`] PFNs. Returns the number of PFNs read and why it stopped early.
pub(crate) fn for_each_pfn_chunk<M>(
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
pub(crate) fn for_each_run(pfns: &mut [u32], mut f: impl FnMut(u64, u64)) {
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

/// A host range for `[gpa, gpa + len)`, which lies inside `region`.
fn host_range<R: GuestMemoryRegion>(region: &R, gpa: u64, len: u64) -> Option<HostRange<'_>> {
    let offset = gpa.checked_sub(region.start_addr().0)?;
    let host_addr = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
    Some(HostRange {
        gpa: GuestAddress(gpa),
        len,
        host_addr,
        region_offset: offset,
        file_offset: region.file_offset(),
    })
}

/// Host pages of which only some 4 KiB pieces were inflated. A fixed number of slots, each
/// with one bit per piece; the oldest slot is dropped when a new page needs one (its pieces
/// are then simply never discarded, which is always safe).
#[derive(Debug)]
struct PartialPages {
    pieces: u64,
    slots: Vec<PartialSlot>,
    clock: u64,
}

#[derive(Debug)]
struct PartialSlot {
    /// The guest address of the host page; `None` when the slot is free.
    base: Option<u64>,
    bits: Vec<u64>,
    stamp: u64,
}

impl PartialPages {
    fn new(host_page: u64) -> Self {
        let pieces = host_page / PAGE_SIZE;
        let words = usize::try_from(pieces.div_ceil(64)).unwrap_or(1);
        let slots = if pieces > 1 { PARTIAL_SLOTS } else { 0 };
        PartialPages {
            pieces,
            slots: (0..slots)
                .map(|_| PartialSlot {
                    base: None,
                    bits: vec![0; words],
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

    /// Marks pieces `[first, first + count)` of the host page at `base` inflated; returns
    /// true (and forgets the page) once every piece of it was.
    fn add(&mut self, base: u64, first: u64, count: u64) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        self.clock += 1;
        let idx = match self.slots.iter().position(|s| s.base == Some(base)) {
            Some(i) => i,
            None => {
                let i = self
                    .slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| (s.base.is_some(), s.stamp))
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                let slot = &mut self.slots[i];
                slot.base = Some(base);
                slot.bits.iter_mut().for_each(|w| *w = 0);
                i
            }
        };
        let slot = &mut self.slots[idx];
        slot.stamp = self.clock;
        for p in first..first.saturating_add(count).min(self.pieces) {
            slot.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        let whole_words = (self.pieces / 64) as usize;
        let rest = self.pieces % 64;
        let full = slot.bits[..whole_words].iter().all(|&w| w == u64::MAX)
            && (rest == 0 || slot.bits[whole_words] == (1u64 << rest) - 1);
        if full {
            slot.base = None;
        }
        full
    }

    /// Forgets the pieces in `[start, end)` (they were deflated).
    fn remove(&mut self, start: u64, end: u64, host_page: u64) {
        for slot in &mut self.slots {
            let Some(base) = slot.base else { continue };
            let page_end = base + host_page;
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

/// Turns inflated, deflated and reported pages into backend calls.
pub(crate) struct PageEngine {
    backend: Arc<dyn MemoryBackend>,
    host_page: u64,
    pending: Option<(u64, u64)>,
    partial: PartialPages,
    inhibited: bool,
    pub(crate) metrics: PageMetrics,
}

impl std::fmt::Debug for PageEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageEngine")
            .field("host_page", &self.host_page)
            .field("pending", &self.pending)
            .field("inhibited", &self.inhibited)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl PageEngine {
    pub(crate) fn new(backend: Arc<dyn MemoryBackend>) -> Self {
        let size = backend.host_page_size();
        let host_page = if size.is_power_of_two() && size >= PAGE_SIZE {
            size
        } else {
            PAGE_SIZE
        };
        PageEngine {
            backend,
            host_page,
            pending: None,
            partial: PartialPages::new(host_page),
            inhibited: false,
            metrics: PageMetrics::default(),
        }
    }

    pub(crate) fn host_page(&self) -> u64 {
        self.host_page
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub(crate) fn inhibited(&self) -> bool {
        self.inhibited
    }

    /// Stops (or allows again) every discard. Inhibiting drops the pending range.
    pub(crate) fn set_inhibited(&mut self, on: bool) {
        self.inhibited = on;
        if on {
            if let Some((s, e)) = self.pending.take() {
                self.metrics.discards_inhibited_bytes += e - s;
            }
            self.partial.clear();
        }
    }

    /// Ends an inflate element. Unless the driver promised to tell the device before it
    /// reuses a page (`must_tell_host`), everything inflated so far is discarded now, before
    /// the element is acknowledged, and partially inflated host pages are forgotten (as QEMU
    /// does): such a driver may reuse a page as soon as it *posted* its deflate, which the
    /// device may not have seen yet.
    pub(crate) fn end_inflate_element<Mem>(&mut self, mem: &Mem, must_tell_host: bool)
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        if !must_tell_host {
            self.flush(mem);
            self.partial.clear();
        }
    }

    /// Forgets everything not yet discarded (device reset: the new driver owns the pages).
    pub(crate) fn reset(&mut self) {
        self.pending = None;
        self.partial.clear();
    }

    /// Records the inflated pages `[pfn, pfn + count)`; returns how many are outside RAM.
    pub(crate) fn inflate<Mem>(&mut self, mem: &Mem, pfn: u64, count: u64) -> u64
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
        match self.pending {
            Some((ps, pe)) if s <= pe && e >= ps => self.pending = Some((ps.min(s), pe.max(e))),
            Some(_) => {
                self.flush(mem);
                self.pending = Some((s, e));
            }
            None => self.pending = Some((s, e)),
        }
        if let Some((ps, pe)) = self.pending {
            if pe - ps >= PENDING_CAP {
                self.flush(mem);
            }
        }
    }

    /// Discards the pending inflated range.
    pub(crate) fn flush<Mem>(&mut self, mem: &Mem)
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        let Some((s, e)) = self.pending.take() else {
            return;
        };
        if self.inhibited {
            self.metrics.discards_inhibited_bytes += e - s;
            return;
        }
        let page = self.host_page;
        for_each_region_piece(mem, s, e, |region, gpa, len, host| {
            let (a, b) = (host.next_multiple_of(page), (host + len) / page * page);
            if a > b {
                // Inside one host page.
                self.add_partial(region, gpa.checked_sub(host % page), gpa, len);
                return;
            }
            if a > host {
                self.add_partial(region, gpa.checked_sub(host % page), gpa, a - host);
            }
            if b > a {
                if let Some(r) = host_range(region, gpa + (a - host), b - a) {
                    self.discard(&r);
                }
            }
            if host + len > b {
                let t = gpa + (b - host);
                self.add_partial(region, Some(t), t, host + len - b);
            }
        });
    }

    /// Records the inflated part `[at, at + len)` of the host page at guest address `base`
    /// and discards the page once it is whole (and entirely inside `region`). `base` is
    /// `None` when the host page would start below guest address 0 (a region whose host
    /// mapping is not aligned to the host page size): such a page is never whole.
    fn add_partial<R: GuestMemoryRegion>(
        &mut self,
        region: &R,
        base: Option<u64>,
        at: u64,
        len: u64,
    ) {
        let page = self.host_page;
        let region_start = region.start_addr().0;
        let region_end = region_start.saturating_add(region.len());
        let Some(base) = base
            .filter(|&b| b >= region_start && b.checked_add(page).is_some_and(|e| e <= region_end))
        else {
            return;
        };
        let first = (at - base) / PAGE_SIZE;
        if self.partial.add(base, first, len / PAGE_SIZE) {
            if let Some(r) = host_range(region, base, page) {
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
    /// the pending range first, so nothing discards these pages later.
    pub(crate) fn deflate<Mem>(&mut self, mem: &Mem, pfn: u64, count: u64) -> u64
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        let start = pfn << PAGE_SHIFT;
        let end = (pfn + count) << PAGE_SHIFT;
        let page = self.host_page;
        self.partial.remove(start, end, page);
        let mut inside = 0u64;
        let outside = for_each_region_piece(mem, start, end, |region, gpa, len, host| {
            inside += len >> PAGE_SHIFT;
            // Populate whole host pages, clipped to the region.
            let region_start = region.start_addr().0;
            let region_end = region_start.saturating_add(region.len());
            let lo = gpa.saturating_sub(host % page).max(region_start);
            let hi = (gpa + ((host + len).next_multiple_of(page) - host)).min(region_end);
            if let Some(r) = host_range(region, lo, hi - lo) {
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
    /// pages and clipped to each region. Returns the bytes discarded.
    pub(crate) fn report<Mem>(&mut self, mem: &Mem, gpa: u64, len: u64) -> u64
    where
        Mem: GuestMemoryBackend + ?Sized,
    {
        let Some(end) = gpa.checked_add(len) else {
            return 0;
        };
        let page = self.host_page;
        let mut done = 0u64;
        for_each_region_piece(mem, gpa, end, |region, gpa, len, host| {
            let (a, b) = (host.next_multiple_of(page), (host + len) / page * page);
            if a >= b {
                return;
            }
            if let Some(r) = host_range(region, gpa + (a - host), b - a) {
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
pub(crate) fn log_pfn_stop(queue: &str, stop: PfnStop) {
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
        let mut none = PartialPages::new(PAGE_SIZE);
        assert!(!none.add(0, 0, 1), "4 KiB host pages need no table");
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
}
