// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The hints of a copy: the sink that forwards them, the pages they named, and the dirty
//! log that sees which of those the guest wrote later.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon::migration::{
    DirtyBitmap, DirtyLog, DirtyLogError, HarvestedLog, MigrationBitmap, NotifierError,
    PrecopyContext, PrecopyEvent, PrecopyNotifier, RegionInfo,
};
use virtio_balloon::sink::{FreePageElement, FreePageSink};
use virtio_balloon::FreePageHinting;
use vm_memory::GuestAddress;

use crate::capture::HintCounter;
use crate::control::Fault;
use crate::device::lock;

/// A set of 4 KiB guest pages over fixed regions, safe to change from several threads.
#[derive(Debug)]
pub(super) struct PageSet {
    /// `(start, length, one bit per page)`, sorted by start, not overlapping.
    pub(super) regions: Vec<(u64, u64, DirtyBitmap)>,
}

impl PageSet {
    /// An empty set over `ranges` (`(start, length)`; regions too large for this host's
    /// `usize` get no bits).
    pub(super) fn new(ranges: &[(GuestAddress, u64)]) -> Self {
        let mut regions: Vec<(u64, u64, DirtyBitmap)> = ranges
            .iter()
            .map(|&(start, len)| {
                let pages = usize::try_from(len / PAGE_SIZE).unwrap_or(0);
                (start.0, len, DirtyBitmap::new(pages))
            })
            .collect();
        regions.sort_by_key(|r| r.0);
        PageSet { regions }
    }

    /// The region bitmap and bit of the page holding `addr`.
    pub(super) fn locate(&self, addr: u64) -> Option<(&DirtyBitmap, usize)> {
        let i = self
            .regions
            .partition_point(|r| r.0 <= addr)
            .checked_sub(1)?;
        let (start, _, bits) = &self.regions[i];
        let bit = usize::try_from((addr - start) / PAGE_SIZE).ok()?;
        (bit < bits.len()).then_some((bits, bit))
    }

    /// Adds every whole page of `[gpa, gpa + len)` inside the regions. Returns how many
    /// pages were not in the set before.
    pub(super) fn insert_range(&self, gpa: u64, len: u64) -> u64 {
        let end = gpa.saturating_add(len);
        let mut added = 0u64;
        for (start, rlen, bits) in &self.regions {
            let rend = start.saturating_add(*rlen);
            let lo = gpa.max(*start);
            let hi = end.min(rend);
            if lo >= hi {
                continue;
            }
            let first = (lo - start).div_ceil(PAGE_SIZE);
            let last = (hi - start) / PAGE_SIZE;
            if last <= first {
                continue;
            }
            let (Ok(first), Ok(n)) = (usize::try_from(first), usize::try_from(last - first)) else {
                continue;
            };
            added = added.saturating_add(bits.set_range(first, n) as u64);
        }
        added
    }

    /// Adds the page at `addr`; whether it was not in the set before.
    pub(super) fn insert(&self, addr: u64) -> bool {
        self.locate(addr).is_some_and(|(bits, bit)| !bits.set(bit))
    }

    /// Removes the page at `addr`; whether it was in the set.
    pub(super) fn remove(&self, addr: u64) -> bool {
        self.locate(addr)
            .is_some_and(|(bits, bit)| bits.test_and_clear(bit))
    }

    /// Whether the page at `addr` is in the set.
    pub(super) fn contains(&self, addr: u64) -> bool {
        self.locate(addr).is_some_and(|(bits, bit)| bits.test(bit))
    }

    /// Pages in the set.
    pub(super) fn count(&self) -> u64 {
        self.regions.iter().map(|r| r.2.count() as u64).sum()
    }

    /// `(start, length)` of each region.
    pub(super) fn ranges(&self) -> Vec<(GuestAddress, u64)> {
        self.regions
            .iter()
            .map(|r| (GuestAddress(r.0), r.1))
            .collect()
    }
}

/// The hints of one copy: the bitmap they clear, and which pages the guest called free.
///
/// A page is *hinted clean* from the hint that named it until a harvest of the copy's dirty
/// log reports it written ([`HintAwareLog`]); then it counts as *hinted later written*.
pub struct CopyHints {
    pub(super) bitmap: Arc<MigrationBitmap>,
    pub(super) fault: Option<Fault>,
    pub(super) hinted: PageSet,
    pub(super) later_written: PageSet,
    pub(super) hints: AtomicU64,
    pub(super) hinted_bytes: AtomicU64,
}

impl fmt::Debug for CopyHints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyHints")
            .field("fault", &self.fault)
            .field("hints", &self.hints)
            .finish_non_exhaustive()
    }
}

impl CopyHints {
    /// The hints of a copy of memory with the regions `ranges` (`(start, length)`), which
    /// clear `bitmap`, with the fault `fault` if any.
    pub fn new(
        ranges: &[(GuestAddress, u64)],
        bitmap: Arc<MigrationBitmap>,
        fault: Option<Fault>,
    ) -> Self {
        CopyHints {
            bitmap,
            fault,
            hinted: PageSet::new(ranges),
            later_written: PageSet::new(ranges),
            hints: AtomicU64::new(0),
            hinted_bytes: AtomicU64::new(0),
        }
    }

    /// The guest hinted `[gpa, gpa + len)` as free: clears it from the bitmap (shifted up by
    /// a page under [`Fault::ShiftHints`]) and records the range as the guest named it.
    pub fn hint(&self, gpa: GuestAddress, len: u64) {
        self.hints.fetch_add(1, Ordering::Relaxed);
        self.hinted_bytes.fetch_add(len, Ordering::Relaxed);
        self.hinted.insert_range(gpa.0, len);
        match self.fault {
            None | Some(Fault::ForgetLaterWrites) => {
                self.bitmap.clear_free_range(gpa, len);
            }
            Some(Fault::ShiftHints) => {
                if let Some(shifted) = gpa.0.checked_add(PAGE_SIZE) {
                    self.bitmap.clear_free_range(GuestAddress(shifted), len);
                }
            }
        }
    }

    /// A harvest of `region` reported `log`: every hinted clean page in it was written after
    /// its hint.
    pub(super) fn harvested(&self, region: &RegionInfo, log: &HarvestedLog) {
        let region_end = region.start.0.saturating_add(region.len);
        if log.page_size == 0 {
            // Cannot be placed: count the whole region as written.
            let mut addr = region.start.0;
            while addr < region_end {
                self.written(addr);
                addr = addr.saturating_add(PAGE_SIZE);
            }
            return;
        }
        for (w, &word) in log.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let Some(bit) = (w as u64).checked_mul(64).and_then(|x| x.checked_add(b)) else {
                    return;
                };
                let Some(first) = bit
                    .checked_mul(log.page_size)
                    .and_then(|off| region.start.0.checked_add(off))
                else {
                    return;
                };
                let last = first.saturating_add(log.page_size).min(region_end);
                let mut addr = first - first % PAGE_SIZE;
                while addr < last {
                    self.written(addr);
                    addr = addr.saturating_add(PAGE_SIZE);
                }
            }
        }
    }

    /// Under [`Fault::ForgetLaterWrites`]: drops from `log` (in 4 KiB pages) every page
    /// written after a hint of this copy.
    pub(super) fn forget_later_writes(&self, region: &RegionInfo, log: &mut HarvestedLog) {
        if log.page_size != PAGE_SIZE {
            return;
        }
        for (w, word) in log.words.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let addr = (w as u64)
                    .checked_mul(64)
                    .and_then(|x| x.checked_add(b))
                    .and_then(|bit| bit.checked_mul(PAGE_SIZE))
                    .and_then(|off| region.start.0.checked_add(off));
                if addr.is_some_and(|a| self.later_written.contains(a)) {
                    *word &= !(1u64 << b);
                }
            }
        }
    }

    /// The page at `addr` was found written.
    pub(super) fn written(&self, addr: u64) {
        if self.hinted.remove(addr) {
            self.later_written.insert(addr);
        }
    }

    /// Hints received.
    pub fn hints(&self) -> u64 {
        self.hints.load(Ordering::Relaxed)
    }

    /// Bytes the hints named.
    pub fn hinted_bytes(&self) -> u64 {
        self.hinted_bytes.load(Ordering::Relaxed)
    }

    /// Pages hinted and not seen written since.
    pub fn hinted_clean_pages(&self) -> u64 {
        self.hinted.count()
    }

    /// Whether the page at `addr` was hinted and not seen written since.
    pub fn is_hinted_clean(&self, addr: GuestAddress) -> bool {
        self.hinted.contains(addr.0)
    }

    /// Pages a harvest found written after a hint of this copy had named them.
    pub fn hinted_later_written(&self) -> u64 {
        self.later_written.count()
    }

    /// The regions, `(start, length)`.
    pub fn ranges(&self) -> Vec<(GuestAddress, u64)> {
        self.hinted.ranges()
    }
}

/// A dirty log that tells a copy's [`CopyHints`] which hinted pages its harvests report
/// written.
#[derive(Debug)]
pub struct HintAwareLog<L> {
    pub(super) inner: L,
    pub(super) hints: Arc<CopyHints>,
}

impl<L> HintAwareLog<L> {
    /// `inner`, reporting to `hints`.
    pub fn new(inner: L, hints: Arc<CopyHints>) -> Self {
        HintAwareLog { inner, hints }
    }

    /// The wrapped log.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L: DirtyLog> DirtyLog for HintAwareLog<L> {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        let mut log = self.inner.take_dirty_log(region)?;
        self.hints.harvested(region, &log);
        if self.hints.fault == Some(Fault::ForgetLaterWrites) {
            self.hints.forget_later_writes(region, &mut log);
        }
        Ok(log)
    }

    fn page_sent(&mut self, addr: GuestAddress, data: &[u8]) {
        self.inner.page_sent(addr, data);
    }
}

/// The daemon's hint sink: every hint goes to the [`HintCounter`] and, while a copy runs, to
/// that copy's [`CopyHints`].
#[derive(Debug)]
pub struct CopySink {
    pub(super) counter: Arc<HintCounter>,
    pub(super) copy: Mutex<Option<Arc<CopyHints>>>,
}

impl CopySink {
    /// A sink forwarding to `counter`, with no copy attached.
    pub fn new(counter: Arc<HintCounter>) -> Self {
        CopySink {
            counter,
            copy: Mutex::new(None),
        }
    }

    /// Sends the hints from now on to `hints` as well.
    pub fn attach(&self, hints: Arc<CopyHints>) {
        *lock(&self.copy) = Some(hints);
    }

    /// Stops sending hints to a copy. Once it returns no hint reaches the detached copy.
    pub fn detach(&self) {
        *lock(&self.copy) = None;
    }

    /// The counter.
    pub fn counter(&self) -> &Arc<HintCounter> {
        &self.counter
    }
}

impl FreePageSink for CopySink {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        self.counter.free_page_hint(cmd_id, gpa, len);
        // Applied under the lock, so `detach` waits for a hint in flight.
        if let Some(copy) = lock(&self.copy).as_ref() {
            copy.hint(gpa, len);
        }
    }

    fn records_elements(&self) -> bool {
        self.counter.records_elements()
    }

    fn free_page_element(&self, element: &FreePageElement) {
        self.counter.free_page_element(element);
    }
}

/// The balloon's hinting as a precopy notifier that starts at most a given number of hint
/// rounds; `None`: as many as the copy's syncs ask for.
pub(super) struct RoundLimit {
    pub(super) hinting: FreePageHinting,
    pub(super) limit: Option<u32>,
    pub(super) started: AtomicU32,
}

impl PrecopyNotifier for RoundLimit {
    fn name(&self) -> &str {
        PrecopyNotifier::name(&self.hinting)
    }

    fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
        if matches!(event, PrecopyEvent::AfterBitmapSync) && ctx.vm_running() {
            let started = self.started.load(Ordering::Relaxed);
            if self.limit.is_some_and(|l| started >= l) {
                // The round was stopped before the sync; no new one.
                return Ok(());
            }
            self.started
                .store(started.saturating_add(1), Ordering::Relaxed);
        }
        self.hinting.notify(event, ctx)
    }
}
