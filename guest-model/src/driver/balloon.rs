// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The traditional balloon of Linux's `drivers/virtio/virtio_balloon.c` (6.12): the guest
//! page allocator balloon pages come from, inflate and deflate (`fill_balloon`,
//! `leak_balloon`, `tell_host`), the size work (`towards_target`, `update_balloon_size`,
//! `update_balloon_size_func`), deflate on OOM, the statistics queue
//! (`update_balloon_stats`, `stats_request`, `stats_handle_request`) and free page reporting
//! (`virtballoon_free_page_report`).
//!
//! Faithful details a device sees:
//!
//! * PFNs are 32-bit little-endian 4 KiB frame numbers, at most
//!   [`VIRTIO_BALLOON_ARRAY_PFNS_MAX`] per request, in one device-readable buffer (a fixed
//!   1 KiB array, `vb->pfns`, reused by every request).
//! * A guest page of `page_size` bytes becomes [`Driver::pages_per_page`] consecutive PFNs.
//! * `fill_balloon` allocates its pages first onto a local list with `list_add`, then walks
//!   that list: the PFN array holds the pages **in reverse allocation order** (ascending
//!   allocation gives a descending run of pages; the PFNs inside one guest page stay
//!   ascending). Each page goes to the head of the balloon list.
//! * `leak_balloon` takes pages from the head of the balloon list (LIFO), tells the host
//!   over deflateq, waits for the ack and only then gives the pages back to the allocator,
//!   whether or not MUST_TELL_HOST was negotiated.
//! * Neither writes `actual`: `update_balloon_size` does, after each request of
//!   `update_balloon_size_func`, and after the OOM notifier.
//! * `update_balloon_stats` rewrites the stats buffer in place *before* checking whether the
//!   device returned it, so it may rewrite the buffer the device still holds.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::{
    config, feature, lock, Driver, DriverError, Part, QueueRole, Result, RingError, DEADLINE,
    PAGE_REPORTING_CAPACITY, TOKEN_STATS,
};
use crate::Rng;

/// `VIRTIO_BALLOON_PFN_SHIFT`: PFNs count 4 KiB frames whatever the guest page size.
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;
/// The size of the frame a PFN names.
pub const BALLOON_PFN_BYTES: u64 = 1 << VIRTIO_BALLOON_PFN_SHIFT;
/// `VIRTIO_BALLOON_ARRAY_PFNS_MAX`: PFNs per inflate or deflate request.
pub const VIRTIO_BALLOON_ARRAY_PFNS_MAX: u64 = 256;
/// `VIRTIO_BALLOON_OOM_NR_PAGES`: 4 KiB pages the OOM notifier deflates per call.
pub const VIRTIO_BALLOON_OOM_NR_PAGES: u64 = 256;
/// Bytes of one statistics entry (packed le16 tag + le64 value).
pub const STAT_ENTRY_BYTES: usize = 10;

/// Statistics tags (`VIRTIO_BALLOON_S_*`).
pub mod stat {
    /// Amount of memory swapped in (bytes).
    pub const SWAP_IN: u16 = 0;
    /// Amount of memory swapped out (bytes).
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJFLT: u16 = 2;
    /// Minor page faults.
    pub const MINFLT: u16 = 3;
    /// Free memory (bytes).
    pub const MEMFREE: u16 = 4;
    /// Total memory (bytes).
    pub const MEMTOT: u16 = 5;
    /// Available memory (bytes).
    pub const AVAIL: u16 = 6;
    /// Disk caches (bytes).
    pub const CACHES: u16 = 7;
    /// Hugetlb page allocations.
    pub const HTLB_PGALLOC: u16 = 8;
    /// Hugetlb page allocation failures.
    pub const HTLB_PGFAIL: u16 = 9;
    /// OOM killer invocations (Linux 6.12).
    pub const OOM_KILL: u16 = 10;
    /// Allocation stalls (Linux 6.12).
    pub const ALLOC_STALL: u16 = 11;
    /// Memory scanned asynchronously (bytes, Linux 6.12).
    pub const ASYNC_SCAN: u16 = 12;
    /// Memory scanned directly (bytes, Linux 6.12).
    pub const DIRECT_SCAN: u16 = 13;
    /// Memory reclaimed asynchronously (bytes, Linux 6.12).
    pub const ASYNC_RECLAIM: u16 = 14;
    /// Memory reclaimed directly (bytes, Linux 6.12).
    pub const DIRECT_RECLAIM: u16 = 15;
    /// `VIRTIO_BALLOON_S_NR`.
    pub const NR: u16 = 16;
}

/// The order in which Linux 6.12's `update_balloon_stats` writes its 16 entries (with
/// `CONFIG_VM_EVENT_COUNTERS` and `CONFIG_HUGETLB_PAGE`): the vm events first, then the
/// meminfo values. Not sorted by tag.
pub const LINUX_STATS_ORDER: [u16; 16] = [
    stat::SWAP_IN,
    stat::SWAP_OUT,
    stat::MAJFLT,
    stat::MINFLT,
    stat::OOM_KILL,
    stat::ALLOC_STALL,
    stat::ASYNC_SCAN,
    stat::DIRECT_SCAN,
    stat::ASYNC_RECLAIM,
    stat::DIRECT_RECLAIM,
    stat::HTLB_PGALLOC,
    stat::HTLB_PGFAIL,
    stat::MEMFREE,
    stat::MEMTOT,
    stat::AVAIL,
    stat::CACHES,
];

/// The value the model reports for a tag no test has set: distinct per tag.
pub fn default_stat_value(tag: u16) -> u64 {
    u64::from(tag) * 4096
}

/// The order in which the model's page allocator hands out never-used pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageOrder {
    /// Ascending guest-physical addresses: long contiguous runs, as right after boot.
    Ascending,
    /// A deterministic shuffle of the whole pool (xorshift from `seed`).
    Scattered {
        /// The shuffle's seed.
        seed: u64,
    },
}

/// One request the driver posted on inflateq, deflateq or reporting_vq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonRequest {
    /// Global order of the requests (also the ring token).
    pub seq: u64,
    /// The queue's role.
    pub role: QueueRole,
    /// The queue's transport index.
    pub queue: u16,
    /// The head descriptor used.
    pub head: u16,
    /// Inflate and deflate: the PFNs, in buffer order.
    pub pfns: Vec<u32>,
    /// Reporting: the (address, length) entries, in chain order.
    pub ranges: Vec<(GuestAddress, u64)>,
    /// The chain went through an indirect table.
    pub indirect: bool,
    /// When the buffer was published.
    pub posted: Instant,
    /// When the driver saw it on the used ring (`virtqueue_get_buf` returned it).
    pub acked: Option<Instant>,
    /// The used length the device wrote.
    pub used_len: Option<u32>,
    /// Deflate: when the pages went back to the allocator (always after `acked`).
    pub released: Option<Instant>,
}

/// Why [`Driver::update_balloon_size_func`] stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SizeEnd {
    /// `towards_target` is 0.
    Reached,
    /// The allocator had no page left for `fill_balloon` (Linux would retry every 200 ms).
    OutOfMemory,
    /// `leak_balloon` found nothing to deflate.
    NothingToLeak,
    /// The background threads were stopped.
    Aborted,
    /// A request failed (no ack before the deadline, ring error).
    Error(String),
}

/// What one [`Driver::update_balloon_size_func`] did (the work item plus its requeues).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeUpdate {
    /// The last `num_pages` read from config space.
    pub num_pages: u32,
    /// The balloon size (4 KiB pages) when it stopped; the last `actual` written if any
    /// request ran.
    pub actual: u32,
    /// PFNs inflated.
    pub inflated: u64,
    /// PFNs deflated.
    pub deflated: u64,
    /// Inflate or deflate requests sent.
    pub requests: usize,
    /// Why it stopped.
    pub end: SizeEnd,
}

/// The guest's page allocator for balloon pages: a pool of `page_size` pages, handed out in
/// [`PageOrder`] the first time and LIFO once freed (Linux frees to the head of the per-CPU
/// list and allocates from it).
#[derive(Debug, Default)]
pub(super) struct PageAlloc {
    page_size: u64,
    /// Ascending mode: the aligned pool ranges [start, end) and the next fresh page.
    ranges: Vec<(u64, u64)>,
    cursor: (usize, u64),
    /// Scattered mode: the fresh pages left, taken from the end.
    shuffled: Option<Vec<u64>>,
    fresh_left: u64,
    /// Pages given back; the last one is handed out first.
    freed: Vec<u64>,
}

impl PageAlloc {
    pub(super) fn new(pool: &[(u64, u64)], page_size: u64, order: PageOrder) -> Self {
        let ranges: Vec<(u64, u64)> = pool.to_vec();
        let fresh_left: u64 = ranges.iter().map(|&(s, e)| (e - s) / page_size).sum();
        let shuffled = match order {
            PageOrder::Ascending => None,
            PageOrder::Scattered { seed } => {
                let mut v: Vec<u64> = ranges
                    .iter()
                    .flat_map(|&(s, e)| (s..e).step_by(page_size as usize))
                    .collect();
                let mut rng = Rng::new(seed);
                for i in (1..v.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    v.swap(i, j);
                }
                Some(v)
            }
        };
        let cursor = (0, ranges.first().map_or(0, |r| r.0));
        PageAlloc {
            page_size,
            ranges,
            cursor,
            shuffled,
            fresh_left,
            freed: Vec::new(),
        }
    }

    pub(super) fn alloc(&mut self) -> Option<u64> {
        if let Some(p) = self.freed.pop() {
            return Some(p);
        }
        if let Some(v) = self.shuffled.as_mut() {
            let p = v.pop()?;
            self.fresh_left -= 1;
            return Some(p);
        }
        while let Some(&(_, end)) = self.ranges.get(self.cursor.0) {
            if self.cursor.1 + self.page_size <= end {
                let p = self.cursor.1;
                self.cursor.1 += self.page_size;
                self.fresh_left -= 1;
                return Some(p);
            }
            self.cursor.0 += 1;
            self.cursor.1 = self.ranges.get(self.cursor.0).map_or(0, |r| r.0);
        }
        None
    }

    pub(super) fn free(&mut self, page: u64) {
        self.freed.push(page);
    }

    pub(super) fn available(&self) -> u64 {
        self.fresh_left + self.freed.len() as u64
    }
}

/// `vb_dev_info->pages` and `vb->num_pages`, under `balloon_lock`.
#[derive(Debug, Default)]
pub(super) struct BalloonList {
    /// Pages in the balloon; the last one is the head of Linux's list.
    pub(super) pages: Vec<u64>,
    /// `vb->num_pages`: 4 KiB pages in the balloon.
    pub(super) num_pages: u32,
}

/// The statistics the guest reports.
#[derive(Debug, Default)]
pub(super) struct StatsState {
    pub(super) values: BTreeMap<u16, u64>,
    pub(super) updates: u64,
    pub(super) refills: u64,
    pub(super) requests: u64,
}

/// Checks the balloon options; returns the pool ranges aligned inward to whole pages.
pub(super) fn check_balloon_options(opts: &super::DriverOptions) -> Result<Vec<(u64, u64)>> {
    let ps = opts.page_size;
    if !ps.is_power_of_two()
        || ps < BALLOON_PFN_BYTES
        || ps / BALLOON_PFN_BYTES > VIRTIO_BALLOON_ARRAY_PFNS_MAX
    {
        return Err(DriverError::Probe(format!(
            "guest page size {ps:#x} must be a power of two from 4 KiB to 1 MiB"
        )));
    }
    if opts.num_stats > opts.stats_tags.len() {
        return Err(DriverError::Probe(format!(
            "num_stats {} but only {} stats_tags",
            opts.num_stats,
            opts.stats_tags.len()
        )));
    }
    if opts.num_stats * STAT_ENTRY_BYTES > super::STATS_BUF_MAX {
        return Err(DriverError::Probe(format!(
            "{} stats entries do not fit the {}-byte stats buffer",
            opts.num_stats,
            super::STATS_BUF_MAX
        )));
    }
    let (area, area_len) = opts.driver_area;
    let overlaps = |s: u64, e: u64, a: u64, b: u64| s < b && a < e;
    let mut out = Vec::new();
    for &(start, len) in &opts.balloon_pool {
        let s = start.0.checked_add(ps - 1).map(|v| v & !(ps - 1));
        let e = start.0.checked_add(len).map(|v| v & !(ps - 1));
        let (Some(s), Some(e)) = (s, e) else {
            return Err(DriverError::Probe(format!(
                "balloon pool range {start:?}+{len:#x} overflows"
            )));
        };
        if e <= s {
            continue;
        }
        if (e - 1) >> VIRTIO_BALLOON_PFN_SHIFT > u64::from(u32::MAX) {
            return Err(DriverError::Probe(format!(
                "balloon pool range {s:#x}..{e:#x} has PFNs past 32 bits"
            )));
        }
        if overlaps(s, e, area.0, area.0 + area_len) {
            return Err(DriverError::Probe(format!(
                "balloon pool range {s:#x}..{e:#x} overlaps the driver area"
            )));
        }
        for b in &opts.free_blocks {
            if overlaps(s, e, b.0, b.0 + opts.block_size) {
                return Err(DriverError::Probe(format!(
                    "balloon pool range {s:#x}..{e:#x} overlaps the hint block {b:?}"
                )));
            }
        }
        if out.iter().any(|&(a, b)| overlaps(s, e, a, b)) {
            return Err(DriverError::Probe(format!(
                "balloon pool range {s:#x}..{e:#x} overlaps another pool range"
            )));
        }
        out.push((s, e));
    }
    Ok(out)
}

/// `set_page_pfns`: the PFNs of one guest page, the first one at its start.
fn set_page_pfns(pfns: &mut Vec<u32>, page: u64, per_page: u32) {
    // page_to_balloon_pfn; the pool check keeps every PFN within 32 bits.
    let first = (page >> VIRTIO_BALLOON_PFN_SHIFT) as u32;
    pfns.extend((0..per_page).map(|i| first + i));
}

impl Driver {
    // ----------------------------------------------------------------------------------
    // The guest page allocator.

    /// `VIRTIO_BALLOON_PAGES_PER_PAGE`: 4 KiB PFNs per guest page.
    pub fn pages_per_page(&self) -> u32 {
        (self.inner.opts.page_size / BALLOON_PFN_BYTES) as u32
    }

    /// Guest pages the allocator can still hand out.
    pub fn pool_free_pages(&self) -> u64 {
        lock(&self.inner.pages).available()
    }

    /// The guest allocates `n` pages for itself (memory pressure); returns those it got.
    pub fn guest_alloc_pages(&self, n: usize) -> Vec<GuestAddress> {
        let mut a = lock(&self.inner.pages);
        (0..n).map_while(|_| a.alloc()).map(GuestAddress).collect()
    }

    /// The guest frees pages (in this order; the last one is reused first).
    pub fn guest_free_pages(&self, pages: &[GuestAddress]) {
        let mut a = lock(&self.inner.pages);
        for p in pages {
            a.free(p.0);
        }
    }

    /// The pages in the balloon, head first (the order `leak_balloon` takes them).
    pub fn balloon_pages(&self) -> Vec<GuestAddress> {
        lock(&self.inner.balloon)
            .pages
            .iter()
            .rev()
            .map(|&p| GuestAddress(p))
            .collect()
    }

    /// `vb->num_pages`: the balloon size in 4 KiB pages.
    pub fn balloon_num_pages(&self) -> u32 {
        lock(&self.inner.balloon).num_pages
    }

    /// Probe: a fresh `vb` (an empty balloon); pages a previous instance left in it go back
    /// to the allocator.
    pub(super) fn reset_balloon(&self) {
        let mut b = lock(&self.inner.balloon);
        let mut a = lock(&self.inner.pages);
        for p in b.pages.drain(..) {
            a.free(p);
        }
        b.num_pages = 0;
    }

    // ----------------------------------------------------------------------------------
    // Inflate and deflate.

    /// The fixed `vb->pfns` array in the driver area.
    pub fn pfns_slot(&self) -> GuestAddress {
        lock(&self.inner.area).pfns
    }

    /// Every request posted on inflateq, deflateq and reporting_vq so far, in order.
    pub fn balloon_requests(&self) -> Vec<BalloonRequest> {
        lock(&self.inner.requests).clone()
    }

    /// The requests posted on the queue with `role`.
    pub fn requests_on(&self, role: QueueRole) -> Vec<BalloonRequest> {
        lock(&self.inner.requests)
            .iter()
            .filter(|r| r.role == role)
            .cloned()
            .collect()
    }

    /// `balloon_ack`, the callback of inflateq, deflateq and reporting_vq: wakes whoever
    /// waits in `tell_host` (`wake_up(&vb->acked)`).
    pub fn balloon_ack(&self) {
        let mut n = lock(&self.inner.acked);
        *n += 1;
        self.inner.acked_cv.notify_all();
    }

    /// How many times `balloon_ack` ran.
    pub fn balloon_acks(&self) -> u64 {
        *lock(&self.inner.acked)
    }

    /// Posts one chain on queue `role`, kicks and waits for its used element, as `tell_host`
    /// and `virtballoon_free_page_report` do. The request is logged.
    fn post_and_wait(
        &self,
        role: QueueRole,
        parts: &[Part],
        indirect: bool,
        pfns: Vec<u32>,
        ranges: Vec<(GuestAddress, u64)>,
    ) -> Result<u64> {
        let q = self.role_index(role)?;
        let seq = self.inner.req_seq.fetch_add(1, Ordering::SeqCst);
        let head = self.with_ring(q, |r, m| r.add(m, parts, indirect, seq))?;
        lock(&self.inner.requests).push(BalloonRequest {
            seq,
            role,
            queue: q,
            head,
            pfns,
            ranges,
            indirect,
            posted: Instant::now(),
            acked: None,
            used_len: None,
            released: None,
        });
        self.kick(q)?;
        self.wait_for_ack(q, seq, head)?;
        Ok(seq)
    }

    /// `wait_event(vb->acked, virtqueue_get_buf(vq, &len))`, with the model's deadline. In
    /// step mode pending interrupts are delivered meanwhile (if
    /// [`async_irq_in_step_mode`](super::DriverOptions::async_irq_in_step_mode)).
    fn wait_for_ack(&self, q: u16, seq: u64, head: u16) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        let mut spins = 0u32;
        loop {
            while let Some(b) = self.with_ring(q, |r, m| r.get_buf(m))? {
                let now = Instant::now();
                let mut log = lock(&self.inner.requests);
                if let Some(req) = log.iter_mut().rev().find(|r| r.seq == b.token) {
                    req.acked = Some(now);
                    req.used_len = Some(b.len);
                }
                if b.token == seq {
                    return Ok(());
                }
            }
            if self.inner.abort.load(Ordering::SeqCst) {
                return Err(DriverError::Aborted(format!(
                    "queue {q}: stopped waiting for the ack of head {head}"
                )));
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "queue {q}: head {head} not acked in {DEADLINE:?}: {}",
                    self.diag(q)
                );
                self.error(msg.clone());
                return Err(DriverError::Timeout(msg));
            }
            if self.is_background() {
                let n = lock(&self.inner.acked);
                let _ = self
                    .inner
                    .acked_cv
                    .wait_timeout(n, Duration::from_millis(1))
                    .unwrap_or_else(|e| e.into_inner());
            } else {
                if self.inner.opts.async_irq_in_step_mode {
                    if let Err(e) = self.deliver_pending_interrupts() {
                        self.error(format!("interrupt delivery: {e}"));
                    }
                }
                spins += 1;
                if spins < 100 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    /// `tell_host`: copies `pfns` into `vb->pfns`, posts it as one device-readable buffer on
    /// inflateq or deflateq, kicks, and waits for the used buffer. Returns the request's seq.
    pub fn tell_host(&self, role: QueueRole, pfns: &[u32]) -> Result<u64> {
        if !matches!(role, QueueRole::Inflate | QueueRole::Deflate) {
            return Err(DriverError::NoQueue(format!(
                "tell_host on {role:?} (only inflateq and deflateq)"
            )));
        }
        if pfns.is_empty() || pfns.len() as u64 > VIRTIO_BALLOON_ARRAY_PFNS_MAX {
            return Err(DriverError::Ring(RingError::Memory(format!(
                "{} PFNs do not fit vb->pfns",
                pfns.len()
            ))));
        }
        let slot = self.pfns_slot();
        let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.inner
            .mem
            .write_slice(&raw, slot)
            .map_err(|e| DriverError::Ring(RingError::Memory(format!("{e:?}"))))?;
        let len = raw.len() as u32;
        self.post_and_wait(
            role,
            &[Part::out(slot, len)],
            false,
            pfns.to_vec(),
            Vec::new(),
        )
    }

    /// `fill_balloon`: allocates up to `min(num, 256)` PFNs worth of guest pages, puts them in
    /// the balloon and tells the host over inflateq. Returns the PFNs inflated (0: nothing was
    /// allocated and nothing was sent). Does not write `actual`. If the ack never comes the
    /// pages stay in the balloon (they were enqueued before `tell_host`, as in Linux).
    pub fn fill_balloon(&self, num: u64) -> Result<u32> {
        let per_page = self.pages_per_page();
        let num = num.min(VIRTIO_BALLOON_ARRAY_PFNS_MAX);
        let mut allocated = Vec::new();
        let mut num_pfns = 0u64;
        while num_pfns < num {
            let page = lock(&self.inner.pages).alloc();
            let Some(page) = page else {
                lock(&self.inner.kernel_log)
                    .push(format!("Out of puff! Can't get {per_page} pages"));
                let nap = self.inner.opts.out_of_puff_sleep;
                if !nap.is_zero() {
                    std::thread::sleep(nap);
                }
                break;
            };
            // list_add(&page->lru, &pages): the newest page is the head.
            allocated.push(page);
            num_pfns += u64::from(per_page);
        }
        let mut b = lock(&self.inner.balloon);
        let mut pfns = Vec::with_capacity(allocated.len() * per_page as usize);
        for &page in allocated.iter().rev() {
            // balloon_page_enqueue: to the head of the balloon list.
            b.pages.push(page);
            set_page_pfns(&mut pfns, page, per_page);
            b.num_pages += per_page;
        }
        if !pfns.is_empty() {
            self.tell_host(QueueRole::Inflate, &pfns)?;
        }
        Ok(pfns.len() as u32)
    }

    /// `leak_balloon`: takes up to `min(num, 256, vb->num_pages)` PFNs worth of pages from the
    /// head of the balloon, tells the host over deflateq, waits for the ack, then gives the
    /// pages back to the allocator. Returns the PFNs deflated. Does not write `actual`. If the
    /// ack never comes the pages are not given back.
    pub fn leak_balloon(&self, num: u64) -> Result<u32> {
        let per_page = self.pages_per_page();
        let num = num.min(VIRTIO_BALLOON_ARRAY_PFNS_MAX);
        let mut b = lock(&self.inner.balloon);
        let num = num.min(u64::from(b.num_pages));
        let mut taken = Vec::new();
        let mut pfns = Vec::new();
        let mut num_pfns = 0u64;
        while num_pfns < num {
            let Some(page) = b.pages.pop() else { break };
            set_page_pfns(&mut pfns, page, per_page);
            taken.push(page);
            b.num_pages -= per_page;
            num_pfns += u64::from(per_page);
        }
        if pfns.is_empty() {
            return Ok(0);
        }
        // With MUST_TELL_HOST this order is required; Linux keeps it either way.
        let seq = self.tell_host(QueueRole::Deflate, &pfns)?;
        // release_pages_balloon walks its list_add-built list: the last page taken is freed
        // first, so the first page taken ends up at the head of the free list.
        {
            let mut a = lock(&self.inner.pages);
            for &page in taken.iter().rev() {
                a.free(page);
            }
        }
        let now = Instant::now();
        if let Some(r) = lock(&self.inner.requests)
            .iter_mut()
            .rev()
            .find(|r| r.seq == seq)
        {
            r.released = Some(now);
        }
        Ok(pfns.len() as u32)
    }

    /// `towards_target`: `num_pages` from config space, aligned up to whole guest pages,
    /// minus `vb->num_pages`.
    pub fn towards_target(&self) -> i64 {
        self.towards_target_with().0
    }

    fn towards_target_with(&self) -> (i64, u32) {
        let num_pages = self.read_config32(config::NUM_PAGES);
        let per_page = u64::from(self.pages_per_page());
        let target = u64::from(num_pages).div_ceil(per_page) * per_page;
        let have = i64::from(self.balloon_num_pages());
        (target as i64 - have, num_pages)
    }

    /// `update_balloon_size`: writes `vb->num_pages` to `actual` (one 4-byte write).
    pub fn update_balloon_size(&self) {
        let actual = self.balloon_num_pages();
        self.write_config(config::ACTUAL, 4, u64::from(actual));
    }

    /// `update_balloon_size_func`, with its requeues run in place: fill or leak towards the
    /// target, writing `actual` after each request, until the target is reached, the
    /// allocator runs dry, nothing is left to leak, a request fails, or the background
    /// threads stop.
    pub fn update_balloon_size_func(&self) -> SizeUpdate {
        let mut out = SizeUpdate {
            num_pages: 0,
            actual: self.balloon_num_pages(),
            inflated: 0,
            deflated: 0,
            requests: 0,
            end: SizeEnd::Reached,
        };
        loop {
            if self.inner.abort.load(Ordering::SeqCst) {
                out.end = SizeEnd::Aborted;
                break;
            }
            let (diff, num_pages) = self.towards_target_with();
            out.num_pages = num_pages;
            if diff == 0 {
                out.end = SizeEnd::Reached;
                break;
            }
            let r = if diff > 0 {
                self.fill_balloon(diff as u64)
            } else {
                self.leak_balloon(diff.unsigned_abs())
            };
            let done = match r {
                Ok(n) => n,
                Err(e) => {
                    out.end = match e {
                        DriverError::Aborted(_) => SizeEnd::Aborted,
                        e => SizeEnd::Error(e.to_string()),
                    };
                    break;
                }
            };
            self.update_balloon_size();
            out.actual = self.balloon_num_pages();
            if done == 0 {
                out.end = if diff > 0 {
                    SizeEnd::OutOfMemory
                } else {
                    SizeEnd::NothingToLeak
                };
                break;
            }
            out.requests += 1;
            if diff > 0 {
                out.inflated += u64::from(done);
            } else {
                out.deflated += u64::from(done);
            }
        }
        lock(&self.inner.size_updates).push(out.clone());
        out
    }

    /// Every [`update_balloon_size_func`](Self::update_balloon_size_func) run so far.
    pub fn size_updates(&self) -> Vec<SizeUpdate> {
        lock(&self.inner.size_updates).clone()
    }

    /// `virtio_balloon_oom_notify`: with DEFLATE_ON_OOM negotiated (else no notifier is
    /// registered and nothing happens), deflate up to `VIRTIO_BALLOON_OOM_NR_PAGES` and write
    /// `actual`. Returns the guest pages freed (what Linux adds to `*freed`).
    pub fn oom_notify(&self) -> Result<u64> {
        if !self.has_feature(feature::DEFLATE_ON_OOM) {
            return Ok(0);
        }
        let r = self.leak_balloon(VIRTIO_BALLOON_OOM_NR_PAGES);
        // Linux writes actual in every case; the leak above cannot fail there.
        self.update_balloon_size();
        Ok(u64::from(r?) / u64::from(self.pages_per_page()))
    }

    // ----------------------------------------------------------------------------------
    // Statistics.

    /// Sets the value the guest reports for `tag` from the next `update_balloon_stats` on.
    pub fn set_stat(&self, tag: u16, value: u64) {
        lock(&self.inner.stats).values.insert(tag, value);
    }

    /// The entries `update_balloon_stats` writes now: the first `num_stats` of `stats_tags`
    /// with their values.
    pub fn stats_entries(&self) -> Vec<(u16, u64)> {
        let s = lock(&self.inner.stats);
        self.inner
            .opts
            .stats_tags
            .iter()
            .take(self.inner.opts.num_stats)
            .map(|&t| {
                (
                    t,
                    s.values.get(&t).copied().unwrap_or(default_stat_value(t)),
                )
            })
            .collect()
    }

    /// Where the stats buffer (`vb->stats`) lives.
    pub fn stats_buf(&self) -> GuestAddress {
        lock(&self.inner.area).stats_buf
    }

    /// Parses `n` entries of the stats buffer as guest memory holds them now.
    pub fn read_stats_buf(&self, n: usize) -> Result<Vec<(u16, u64)>> {
        let mut raw = vec![0u8; n * STAT_ENTRY_BYTES];
        self.inner
            .mem
            .read_slice(&mut raw, self.stats_buf())
            .map_err(|e| DriverError::Ring(RingError::Memory(format!("{e:?}"))))?;
        Ok(raw
            .chunks_exact(STAT_ENTRY_BYTES)
            .map(|c| {
                let tag = u16::from_le_bytes([c[0], c[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&c[2..10]);
                (tag, u64::from_le_bytes(v))
            })
            .collect())
    }

    /// `update_balloon_stats`: writes the entries into `vb->stats` (10 bytes each, packed)
    /// and returns how many.
    pub fn update_balloon_stats(&self) -> Result<usize> {
        let entries = self.stats_entries();
        let mut raw = Vec::with_capacity(entries.len() * STAT_ENTRY_BYTES);
        for (tag, val) in &entries {
            raw.extend_from_slice(&tag.to_le_bytes());
            raw.extend_from_slice(&val.to_le_bytes());
        }
        self.inner
            .mem
            .write_slice(&raw, self.stats_buf())
            .map_err(|e| DriverError::Ring(RingError::Memory(format!("{e:?}"))))?;
        lock(&self.inner.stats).updates += 1;
        Ok(entries.len())
    }

    /// `stats_handle_request`: refresh the stats, and if the device returned the buffer,
    /// re-add it and kick. Returns whether a buffer came back and was re-added.
    pub fn stats_handle_request(&self) -> Result<bool> {
        let q = self.role_index(QueueRole::Stats)?;
        let n = self.update_balloon_stats()?;
        if self.with_ring(q, |r, m| r.get_buf(m))?.is_none() {
            return Ok(false);
        }
        let len = (n * STAT_ENTRY_BYTES) as u32;
        let buf = self.stats_buf();
        self.with_ring(q, |r, m| {
            r.add(m, &[Part::out(buf, len)], false, TOKEN_STATS)
        })?;
        self.kick(q)?;
        lock(&self.inner.stats).refills += 1;
        Ok(true)
    }

    /// `stats_request`, statsq's callback: queues the stats work (unless the driver is being
    /// removed). In step mode the work stays pending until
    /// [`run_stats_work`](Self::run_stats_work).
    pub fn stats_request(&self) {
        lock(&self.inner.stats).requests += 1;
        if !self.inner.stop_update.load(Ordering::SeqCst) {
            self.queue_work_of(super::WorkKind::UpdateStats);
        }
    }

    /// Times `stats_handle_request` re-added the stats buffer.
    pub fn stats_refills(&self) -> u64 {
        lock(&self.inner.stats).refills
    }

    /// Times `update_balloon_stats` ran (the probe's priming included).
    pub fn stats_updates(&self) -> u64 {
        lock(&self.inner.stats).updates
    }

    /// Times statsq's callback ran.
    pub fn stats_requests(&self) -> u64 {
        lock(&self.inner.stats).requests
    }

    // ----------------------------------------------------------------------------------
    // Free page reporting.

    /// `virtballoon_free_page_report`: posts `sg` (at most `PAGE_REPORTING_CAPACITY` entries)
    /// as one chain of device-writable buffers on reporting_vq (through an indirect table
    /// when negotiated, more than one entry, and the model's table is big enough, as Linux's
    /// `virtqueue_use_indirect`), kicks and waits for the ack. Returns the request's seq.
    pub fn virtballoon_free_page_report(&self, sg: &[(GuestAddress, u64)]) -> Result<u64> {
        if sg.is_empty() || sg.len() > usize::from(PAGE_REPORTING_CAPACITY) {
            return Err(DriverError::Ring(RingError::Memory(format!(
                "{} report entries (1..={PAGE_REPORTING_CAPACITY})",
                sg.len()
            ))));
        }
        let mut parts = Vec::with_capacity(sg.len());
        for &(addr, len) in sg {
            let Ok(l) = u32::try_from(len) else {
                return Err(DriverError::Ring(RingError::Memory(format!(
                    "report entry {addr:?}+{len:#x} longer than a descriptor"
                ))));
            };
            parts.push(Part::input(addr, l));
        }
        let q = self.role_index(QueueRole::Reporting)?;
        let indirect = self.has_feature(feature::RING_INDIRECT_DESC)
            && sg.len() > 1
            && sg.len() <= usize::from(self.inner.opts.indirect_per_head)
            && self.num_free(q)? > 0;
        self.post_and_wait(
            QueueRole::Reporting,
            &parts,
            indirect,
            Vec::new(),
            sg.to_vec(),
        )
    }

    /// Reports `ranges` as `page_reporting_drain` does: batches of up to
    /// `PAGE_REPORTING_CAPACITY` entries, one chain each, each acked before the next. Returns
    /// the seqs of the requests.
    pub fn report_free_pages(&self, ranges: &[(GuestAddress, u64)]) -> Result<Vec<u64>> {
        ranges
            .chunks(usize::from(PAGE_REPORTING_CAPACITY))
            .map(|c| self.virtballoon_free_page_report(c))
            .collect()
    }
}
