// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The traditional-balloon edge cases 30–39 of `docs/protocol.md` ("Edge cases":
//! configuration space, page poison, inflate/deflate PFN arrays, statistics), one or more
//! named tests each, plus a few gaps around them (deflate ordering, reset, host pages larger
//! than 4 KiB, the flush timer).
//!
//! Every test sets the device up through the virtio-mmio registers the way a driver does
//! (status, features, queue registers, DRIVER_OK), writes split rings into guest memory by
//! hand and drives the device synchronously with `process_queue`, the method the event loop
//! calls (one test runs the real `EventManager` for the flush timer, with a hang guard only).
//! The device gets a recording [`MemoryBackend`], so each test sees exactly which host ranges
//! were discarded and populated, and in which order.
//!
//! Guest memory (the default; two tests use one 128 MiB region instead):
//!
//! ```text
//! [0, 16 MiB)        R0   rings at 1 MiB, buffers from 2 MiB, inflate targets from 8 MiB
//! [16 MiB, 32 MiB)   R1   adjacent to R0 (a region boundary inside RAM)
//! [32 MiB, 48 MiB)        hole
//! [48 MiB, 64 MiB)   R2
//! ```

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use guest_model::ring::{GuestMem, Part, SplitRing};
use virtio_balloon::defs::stats_tag as tag;
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::{MmioTransport, VirtioDevice};
use virtio_balloon::{
    Balloon, BalloonConfig, BalloonEvents, BalloonMetrics, HintState, QueueLayout, QueueRole,
    StatsReport,
};
use virtio_balloon::{MAX_PFNS_PER_ELEMENT, PENDING_RANGES};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

type Mem = GuestMem;
type Dev = Balloon<Arc<Mem>>;
type Mmio = MmioTransport<Dev>;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// RAM regions as (start, length).
const R0: (u64, u64) = (0, 16 * MIB);
const R1: (u64, u64) = (16 * MIB, 16 * MIB);
const HOLE: (u64, u64) = (32 * MIB, 16 * MIB);
const R2: (u64, u64) = (48 * MIB, 16 * MIB);
const RAM_END: u64 = 64 * MIB;

/// Queue `i` is laid out at `RING_BASE + i * RING_STRIDE`.
const RING_BASE: u64 = MIB;
const RING_STRIDE: u64 = 0x1_0000;
/// Buffers (PFN arrays, statistics) are allocated in `[BUF_BASE, BUF_END)`.
const BUF_BASE: u64 = 2 * MIB;
const BUF_END: u64 = 8 * MIB;
/// Inflate targets start here (PFN 0x800, inside R0).
const TARGETS: u64 = 8 * MIB;

/// VIRTIO_F_RING_EVENT_IDX: not accepted, so every used buffer raises an interrupt.
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

/// The guest model's virtio-mmio definitions, written independently of the crate's constants.
use guest_model::bring_up;
use guest_model::mmio as guest_mmio;

/// virtio-mmio registers (virtio 1.x, 4.2.2) and status bits.
mod reg {
    pub use super::guest_mmio::reg::*;
    pub use super::guest_mmio::status::*;
}

/// Balloon configuration space offsets (`docs/protocol.md`, "Configuration space").
const NUM_PAGES: u64 = 0x0;
const ACTUAL: u64 = 0x4;
const CMD_ID: u64 = 0x8;
const POISON: u64 = 0xc;

/// Interrupt status: used buffer.
const ISR_USED: u32 = 1;

// ----------------------------------------------------------------------------------------
// Guest memory helpers
// ----------------------------------------------------------------------------------------

/// Three regions: R0 and R1 adjacent, a hole, R2.
fn ram() -> Mem {
    Mem::from_ranges(&[
        (GuestAddress(R0.0), R0.1 as usize),
        (GuestAddress(R1.0), R1.1 as usize),
        (GuestAddress(R2.0), R2.1 as usize),
    ])
    .expect("guest memory")
}

/// One region of 128 MiB (room for 10,000 scattered PFNs).
fn big_ram() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), (128 * MIB) as usize)]).expect("memory")
}

/// The PFN (4 KiB units) of a guest address.
fn pfn(gpa: u64) -> u32 {
    u32::try_from(gpa / PAGE).expect("PFN fits 32 bits")
}

/// The host virtual address of a guest address.
fn host_of(mem: &Mem, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).expect("gpa in RAM") as u64
}

/// The first guest address at or above `from` whose host address is aligned to `page` (the
/// device aligns discards by host address, and vm-memory's mappings are only 4 KiB aligned).
fn host_aligned_gpa(mem: &Mem, from: u64, page: u64) -> u64 {
    let h = host_of(mem, from);
    from + (h.next_multiple_of(page) - h)
}

/// A PFN array as the driver writes it (le32).
fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Statistics entries as the driver writes them (le16 tag, le64 value, packed).
fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|&(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

/// A deterministic permutation (Fisher-Yates with a fixed LCG).
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = ((seed >> 33) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

// The recording memory backend: `guest_model::backend::RecordingBackend`.
use guest_model::backend::{BackendCall, BackendOp, RecordingBackend};

// ----------------------------------------------------------------------------------------
// The guest driver model
// ----------------------------------------------------------------------------------------

/// A device-readable descriptor.
fn out(addr: u64, len: usize) -> Part {
    Part::out(
        GuestAddress(addr),
        u32::try_from(len).expect("descriptor length"),
    )
}

/// A device-writable descriptor.
fn inp(addr: u64, len: u64) -> Part {
    Part::input(
        GuestAddress(addr),
        u32::try_from(len).expect("descriptor length"),
    )
}

/// A balloon behind virtio-mmio with a recording backend, its guest memory and the guest's
/// rings (by queue index).
struct Rig {
    t: Arc<Mutex<Mmio>>,
    mem: Arc<Mem>,
    rec: Arc<RecordingBackend>,
    layout: QueueLayout,
    rings: Vec<SplitRing>,
    next_buf: u64,
}

/// Statistics, free page hinting, page poison and reporting offered; small queues.
fn cfg() -> BalloonConfig {
    BalloonConfig::default()
        .with_stats(true)
        .with_free_page_hint(true)
        .with_page_poison(true)
        .with_reporting(true)
        .with_queue_size(256)
        .with_free_page_queue_size(64)
        .with_reporting_queue_size(32)
}

impl Rig {
    /// A device at status 0 over `mem`, whose backend has `host_page` pages.
    fn new(cfg: BalloonConfig, mem: Mem, host_page: u64) -> Self {
        let mem = Arc::new(mem);
        let rec = RecordingBackend::new(host_page);
        let dev = Balloon::with_backend(
            cfg,
            mem.clone(),
            Arc::new(RecordingSink::default()),
            rec.clone(),
        )
        .expect("balloon");
        assert_eq!(dev.host_page_size(), host_page);
        let layout = dev.queue_layout().clone();
        Rig {
            t: Arc::new(Mutex::new(MmioTransport::new(dev))),
            mem,
            rec,
            layout,
            rings: Vec::new(),
            next_buf: BUF_BASE,
        }
    }

    /// A device probed by the driver model (DRIVER_OK set).
    fn ready(cfg: BalloonConfig, mem: Mem, host_page: u64) -> Self {
        let mut r = Self::new(cfg, mem, host_page);
        r.negotiate();
        r.driver_ok();
        r
    }

    fn t(&self) -> MutexGuard<'_, Mmio> {
        self.t.lock().unwrap()
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t().read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&self, off: u64, v: u32) {
        self.t().write(off, &v.to_le_bytes());
    }

    /// Runs `f` on the device.
    fn dev<R>(&self, f: impl FnOnce(&mut Dev) -> R) -> R {
        f(self.t().device_mut())
    }

    fn metrics(&self) -> BalloonMetrics {
        self.dev(|d| d.metrics())
    }

    fn take_events(&self) -> BalloonEvents {
        self.dev(|d| d.take_events())
    }

    /// ACKNOWLEDGE, DRIVER, every offered feature but EVENT_IDX, FEATURES_OK, and every
    /// queue laid out in fresh ring memory. Config writes are accepted from here on.
    fn negotiate(&mut self) {
        assert_eq!(self.r32(reg::STATUS), 0, "probe starts from a reset device");
        let mut t = self.t.lock().unwrap();
        let acked = bring_up::device_features(&mut t) & !F_EVENT_IDX;
        assert_ne!(acked & F_VERSION_1, 0);
        assert!(bring_up::negotiate(&mut t, acked), "FEATURES_OK refused");
        let negotiated = reg::ACKNOWLEDGE | reg::DRIVER | reg::FEATURES_OK;
        assert_eq!(bring_up::read32(&t, reg::STATUS), negotiated);
        self.rings = (0..self.layout.len())
            .map(|i| {
                let base = GuestAddress(RING_BASE + i as u64 * RING_STRIDE);
                bring_up::set_up_queue(&mut t, &self.mem, i, base, RING_STRIDE, true)
            })
            .collect();
    }

    fn driver_ok(&mut self) {
        let live = reg::ACKNOWLEDGE | reg::DRIVER | reg::FEATURES_OK | reg::DRIVER_OK;
        self.w32(reg::STATUS, live);
        assert_eq!(self.r32(reg::STATUS), live, "DRIVER_OK refused");
        assert!(self.t().device().is_activated());
    }

    /// Writing 0 to the status register.
    fn reset(&mut self) {
        self.w32(reg::STATUS, 0);
        assert_eq!(self.r32(reg::STATUS), 0);
        assert!(!self.t().device().is_activated());
    }

    fn cfg_read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.t().read(reg::CONFIG + off, &mut b);
        b
    }

    fn cfg_r32(&self, off: u64) -> u32 {
        self.r32(reg::CONFIG + off)
    }

    fn cfg_write(&self, off: u64, data: &[u8]) {
        self.t().write(reg::CONFIG + off, data);
    }

    fn q(&self, role: QueueRole) -> usize {
        self.layout.index(role).expect("queue offered")
    }

    fn ring(&self, role: QueueRole) -> &SplitRing {
        &self.rings[self.q(role)]
    }

    /// Copies `bytes` into the buffer area (16-byte aligned, followed by 16 guard bytes that
    /// would read as in-RAM PFN 0xc40 or a statistics entry). Returns the address.
    fn put(&mut self, bytes: &[u8]) -> u64 {
        let at = self.next_buf;
        let end = at + bytes.len() as u64 + 16;
        assert!(end <= BUF_END, "buffer area exhausted");
        self.mem
            .write_slice(bytes, GuestAddress(at))
            .expect("buffer");
        self.mem
            .write_slice(
                &[0x40, 0x0c, 0, 0].repeat(4),
                GuestAddress(at + bytes.len() as u64),
            )
            .expect("guard");
        self.next_buf = end.next_multiple_of(16);
        at
    }

    /// Copies `bytes` as readable pieces of the given lengths, each in its own buffer.
    fn scatter(&mut self, bytes: &[u8], lens: &[usize]) -> Vec<Part> {
        assert_eq!(lens.iter().sum::<usize>(), bytes.len());
        let mut segs = Vec::new();
        let mut at = 0;
        for &n in lens {
            let addr = self.put(&bytes[at..at + n]);
            segs.push(out(addr, n));
            at += n;
        }
        segs
    }

    fn post(&mut self, role: QueueRole, segs: &[Part]) -> u16 {
        let i = self.q(role);
        // Tests post fewer chains than the queue has entries and never reclaim, so a buffer
        // the device still holds is never overwritten.
        self.rings[i]
            .add(&self.mem, segs, false, 0)
            .expect("test ring out of descriptors")
    }

    /// One wakeup of the queue's handler.
    fn process(&self, role: QueueRole) {
        let i = self.q(role);
        self.dev(|d| d.process_queue(i));
    }

    fn used_idx(&self, role: QueueRole) -> u16 {
        self.ring(role).used_idx(&self.mem).expect("used index")
    }

    fn used(&self, role: QueueRole, i: u16) -> (u32, u32) {
        self.ring(role)
            .used_elem(&self.mem, i)
            .expect("used element")
    }

    /// Posts one chain, serves the queue once and checks the chain came back as the next
    /// used entry with used length 0. Returns its head.
    fn element(&mut self, role: QueueRole, segs: &[Part]) -> u16 {
        let before = self.used_idx(role);
        let head = self.post(role, segs);
        self.process(role);
        assert_eq!(
            self.used_idx(role),
            before.wrapping_add(1),
            "{role:?} element acked"
        );
        assert_eq!(
            self.used(role, before),
            (u32::from(head), 0),
            "{role:?} used entry: the head, length 0"
        );
        head
    }

    /// An inflate element holding `pfns` in one readable descriptor.
    fn inflate(&mut self, pfns: &[u32]) -> u16 {
        let bytes = pfn_bytes(pfns);
        let addr = self.put(&bytes);
        self.element(QueueRole::Inflate, &[out(addr, bytes.len())])
    }

    /// A deflate element holding `pfns` in one readable descriptor.
    fn deflate(&mut self, pfns: &[u32]) -> u16 {
        let bytes = pfn_bytes(pfns);
        let addr = self.put(&bytes);
        self.element(QueueRole::Deflate, &[out(addr, bytes.len())])
    }

    /// Posts a statistics buffer and serves the queue once.
    fn stats(&mut self, segs: &[Part]) -> u16 {
        let head = self.post(QueueRole::Stats, segs);
        self.process(QueueRole::Stats);
        head
    }

    fn latest_stats(&self) -> StatsReport {
        self.dev(|d| *d.latest_stats().expect("statistics received"))
    }

    fn flush(&self) {
        self.dev(|d| d.flush_discards());
    }

    /// Every backend call so far, each checked against the guest memory layout.
    fn calls(&self) -> Vec<BackendCall> {
        let calls = self.rec.all();
        for c in &calls {
            self.check_call(c);
        }
        calls
    }

    /// The backend calls so far, forgotten.
    fn take_calls(&self) -> Vec<BackendCall> {
        let calls = self.calls();
        self.rec.clear();
        calls
    }

    /// What every backend call must satisfy: a non-empty range inside one guest memory
    /// region, with the host address and region offset of its first byte; discards are made
    /// of whole host pages.
    fn check_call(&self, c: &BackendCall) {
        assert!(c.len > 0, "{c:?}: empty range");
        let region = self
            .mem
            .find_region(GuestAddress(c.gpa))
            .unwrap_or_else(|| panic!("{c:?}: starts outside RAM"));
        let start = region.start_addr().0;
        assert!(
            c.end() <= start + region.len(),
            "{c:?}: crosses the end of its region"
        );
        assert_eq!(c.region_offset, c.gpa - start, "{c:?}: region offset");
        assert_eq!(
            c.host_addr,
            host_of(&self.mem, c.gpa),
            "{c:?}: host address"
        );
        if c.op == BackendOp::Discard {
            assert_eq!(
                c.host_addr % self.rec.page(),
                0,
                "{c:?}: discard not host aligned"
            );
            assert_eq!(
                c.len % self.rec.page(),
                0,
                "{c:?}: discard of a partial host page"
            );
        }
    }

    /// Watches the used index of `role`'s ring from inside the backend.
    fn watch_used(&self, role: QueueRole) {
        let used = self.ring(role).layout.used;
        self.rec.watch_used(self.mem.clone(), used, used);
    }
}

/// The 4 KiB pages (PFNs) covered by the calls of kind `op`, with multiplicity checked: a
/// page covered twice panics.
fn pages_once(calls: &[BackendCall], op: BackendOp) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for c in calls.iter().filter(|c| c.op == op) {
        for p in c.pfns() {
            assert!(
                set.insert(p),
                "page {p:#x} covered twice by {op:?}: {calls:x?}"
            );
        }
    }
    set
}

/// The 4 KiB pages covered by the calls of kind `op` (repeats allowed).
fn pages(calls: &[BackendCall], op: BackendOp) -> BTreeSet<u64> {
    calls
        .iter()
        .filter(|c| c.op == op)
        .flat_map(|c| c.pfns())
        .collect()
}

fn set_of(pfns: &[u32]) -> BTreeSet<u64> {
    pfns.iter().map(|&p| u64::from(p)).collect()
}

/// The (gpa, len) of each call of kind `op`, in order.
fn ranges(calls: &[BackendCall], op: BackendOp) -> Vec<(u64, u64)> {
    calls
        .iter()
        .filter(|c| c.op == op)
        .map(|c| (c.gpa, c.len))
        .collect()
}

// ----------------------------------------------------------------------------------------
// Edge cases 30–39 of `docs/protocol.md`.
// ----------------------------------------------------------------------------------------

/// Edge case 30 "A config write of the wrong width (1 or 2 bytes, or unaligned)" — accept it and
/// merge it into a shadow. The device acts on the merged `actual`: TARGET_REACHED (and the
/// flush of the pending inflate range that comes with it) happens exactly when the merged
/// value equals `num_pages`, never on a partial value.
#[test]
fn edge_30_narrow_and_unaligned_config_writes_merge_into_actual() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    r.inflate(&[a, a + 1, a + 2, a + 3]);
    assert!(r.calls().is_empty(), "inflated pages wait to be merged");

    const T: u32 = 0x1234_5678;
    r.dev(|d| d.set_target(T));
    assert!(!r.take_events().contains(BalloonEvents::TARGET_REACHED));
    let cmd_id = r.cfg_r32(CMD_ID);
    let generation = r.r32(reg::CONFIG_GENERATION);

    // Two bytes at offset 3: the top byte of num_pages (dropped) and the low byte of actual.
    r.cfg_write(NUM_PAGES + 3, &[0xee, 0x78]);
    assert_eq!(r.dev(|d| d.actual()), 0x78);
    assert_eq!(r.cfg_r32(NUM_PAGES), T, "num_pages is device-owned");
    let ev = r.take_events();
    assert!(ev.contains(BalloonEvents::ACTUAL_CHANGED));
    assert!(!ev.contains(BalloonEvents::TARGET_REACHED));

    // One byte at offset 6.
    r.cfg_write(ACTUAL + 2, &[0x34]);
    assert_eq!(r.dev(|d| d.actual()), 0x0034_0078);
    // Two bytes at offset 7: actual's top byte and cmd_id's low byte (dropped).
    r.cfg_write(ACTUAL + 3, &[0x12, 0x99]);
    assert_eq!(r.dev(|d| d.actual()), 0x1234_0078);
    assert_eq!(r.cfg_r32(CMD_ID), cmd_id, "cmd_id is device-owned");
    let ev = r.take_events();
    assert!(ev.contains(BalloonEvents::ACTUAL_CHANGED));
    assert!(!ev.contains(BalloonEvents::TARGET_REACHED));
    assert!(!r.dev(|d| d.target_reached()));
    assert!(
        r.calls().is_empty(),
        "no flush before the target is reached"
    );

    // The last missing byte makes actual == num_pages.
    r.cfg_write(ACTUAL + 1, &[0x56]);
    assert_eq!(r.cfg_r32(ACTUAL), T);
    let ev = r.take_events();
    assert!(ev.contains(BalloonEvents::ACTUAL_CHANGED | BalloonEvents::TARGET_REACHED));
    assert!(r.dev(|d| d.target_reached()));
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(TARGETS, 4 * PAGE)],
        "reaching the target flushes the pending range"
    );

    // Writing the same byte again changes nothing and raises nothing.
    r.cfg_write(ACTUAL + 1, &[0x56]);
    assert!(r.take_events().is_empty());
    // A 2-byte write moving actual away: changed, not reached.
    r.cfg_write(ACTUAL, &[0x79, 0x56]);
    assert_eq!(r.dev(|d| d.actual()), T + 1);
    let ev = r.take_events();
    assert!(ev.contains(BalloonEvents::ACTUAL_CHANGED));
    assert!(!ev.contains(BalloonEvents::TARGET_REACHED));
    assert!(!r.dev(|d| d.target_reached()));
    // An unaligned 4-byte write over num_pages' top half and actual's low half brings it
    // back: only actual's bytes count.
    r.cfg_write(NUM_PAGES + 2, &[0, 0, 0x78, 0x56]);
    assert_eq!(r.dev(|d| d.actual()), T);
    assert_eq!(r.dev(|d| d.num_pages()), T);
    assert!(r.take_events().contains(BalloonEvents::TARGET_REACHED));
    // Driver writes never bump the configuration generation.
    assert_eq!(r.r32(reg::CONFIG_GENERATION), generation);
}

/// Edge case 31 "A config access past the end (offset ≥ length)" — reads give all-ones, writes are
/// dropped, for each of the three lengths (8, 12 and 16 bytes).
#[test]
fn edge_31_config_access_past_the_end() {
    let cases = [
        (
            cfg().with_free_page_hint(false).with_page_poison(false),
            8usize,
        ),
        (cfg().with_page_poison(false), 12),
        (cfg(), 16),
    ];
    for (c, len) in cases {
        assert_eq!(c.config_len(), len);
        let mut r = Rig::new(c, ram(), PAGE);
        r.negotiate();
        r.dev(|d| d.set_target(0xa1a2_a3a4));
        r.cfg_write(ACTUAL, &0xb1b2_b3b4u32.to_le_bytes());
        if len == 16 {
            r.cfg_write(POISON, &0xc1c2_c3c4u32.to_le_bytes());
        }
        let cmd = if len >= 12 { r.cfg_r32(CMD_ID) } else { 0 };
        let mut image = Vec::new();
        for v in [0xa1a2_a3a4u32, 0xb1b2_b3b4, cmd, 0xc1c2_c3c4] {
            image.extend_from_slice(&v.to_le_bytes());
        }
        image.truncate(len);
        r.take_events();

        let check_reads = |r: &Rig, image: &[u8]| {
            for off in 0..len as u64 + 12 {
                let got = r.cfg_read(off, 1)[0];
                let want = image.get(off as usize).copied().unwrap_or(0xff);
                assert_eq!(got, want, "len {len}: byte read at {off}");
            }
            // Reads straddling the end, and far past it.
            let mut want = image[len - 2..].to_vec();
            want.extend([0xff, 0xff]);
            assert_eq!(r.cfg_read(len as u64 - 2, 4), want, "len {len}");
            assert_eq!(r.cfg_read(len as u64, 8), [0xff; 8], "len {len}");
            assert_eq!(r.cfg_r32(0xe00), u32::MAX, "len {len}");
            assert_eq!(r.cfg_read(0, len), image, "len {len}");
        };
        check_reads(&r, &image);

        // Writes entirely past the end are dropped.
        r.cfg_write(len as u64, &[0x11; 4]);
        r.cfg_write(len as u64 + 1, &[0x22; 2]);
        r.cfg_write(16, &[0x33; 8]);
        r.cfg_write(0xe00, &[0x44; 4]);
        check_reads(&r, &image);
        assert_eq!(r.dev(|d| d.actual()), 0xb1b2_b3b4, "len {len}");
        assert_eq!(
            r.dev(|d| d.poison_val()),
            if len == 16 { 0xc1c2_c3c4 } else { 0 },
            "len {len}"
        );
        assert!(r.take_events().is_empty(), "len {len}: no event");

        // A write straddling the end keeps only the bytes inside (and only those of the
        // driver's fields).
        r.cfg_write(len as u64 - 2, &[0x55; 4]);
        match len {
            8 => {
                image[6..8].copy_from_slice(&[0x55, 0x55]);
                assert_eq!(r.dev(|d| d.actual()), 0x5555_b3b4);
                assert!(r.take_events().contains(BalloonEvents::ACTUAL_CHANGED));
            }
            12 => {
                // cmd_id's top half: device-owned.
                assert_eq!(r.dev(|d| d.actual()), 0xb1b2_b3b4);
                assert!(r.take_events().is_empty());
            }
            _ => {
                image[14..16].copy_from_slice(&[0x55, 0x55]);
                assert_eq!(r.dev(|d| d.poison_val()), 0x5555_c3c4);
            }
        }
        check_reads(&r, &image);

        // After DRIVER_OK the same holds, and a write past the end of a 16-byte space does not
        // count as a late poison_val write.
        r.driver_ok();
        r.cfg_write(len as u64, &[0x66; 4]);
        r.cfg_write(len as u64 + 4, &[0x77]);
        if len >= 12 {
            // cmd_id reads what the hint state says; refresh it after activation.
            let cmd = r.cfg_r32(CMD_ID);
            image[8..12].copy_from_slice(&cmd.to_le_bytes());
        }
        check_reads(&r, &image);
        assert_eq!(r.metrics().late_poison_writes, 0, "len {len}");
    }
}

/// Edge case 32 "Driver writes to `num_pages` or `free_page_hint_cmd_id`" — ignored: the device
/// keeps its target (a write that would make `num_pages == actual` reaches nothing) and its
/// hint state, at any width.
#[test]
fn edge_32_writes_to_num_pages_and_cmd_id_are_ignored() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    r.inflate(&[a, a + 1]);
    r.dev(|d| d.set_target(100));
    r.take_events();
    let generation = r.r32(reg::CONFIG_GENERATION);

    // actual is 0: a num_pages of 0 would be "target reached".
    r.cfg_write(NUM_PAGES, &0u32.to_le_bytes());
    r.cfg_write(NUM_PAGES, &[0]);
    r.cfg_write(NUM_PAGES + 1, &[0, 0]);
    r.cfg_write(NUM_PAGES + 3, &[0]);
    assert_eq!(r.dev(|d| d.num_pages()), 100);
    assert_eq!(r.cfg_r32(NUM_PAGES), 100);
    assert!(
        r.take_events().is_empty(),
        "no event from a num_pages write"
    );
    assert!(!r.dev(|d| d.target_reached()));
    assert!(r.calls().is_empty(), "no flush: the target is not reached");

    // cmd_id, in REQUESTED: STOP, DONE, the next id, byte-wise.
    let hints = r.dev(|d| d.hint_control());
    let id = hints.start_round();
    assert_eq!(r.cfg_r32(CMD_ID), id);
    let generation_after_round = r.r32(reg::CONFIG_GENERATION);
    assert_ne!(
        generation_after_round, generation,
        "the device's own change"
    );
    for v in [0u32, 1, id + 1, u32::MAX] {
        r.cfg_write(CMD_ID, &v.to_le_bytes());
    }
    r.cfg_write(CMD_ID, &[0]);
    r.cfg_write(CMD_ID + 2, &[0xff, 0xff]);
    assert_eq!(r.cfg_r32(CMD_ID), id);
    assert_eq!(hints.status().state, HintState::Requested);
    assert_eq!(hints.status().cmd_id, id);
    assert!(r.take_events().is_empty());

    // An 8-byte write of num_pages = 0 and actual = 100: actual is taken, num_pages is not,
    // so the target (100) is reached and the pending range discarded.
    let mut both = 0u32.to_le_bytes().to_vec();
    both.extend(100u32.to_le_bytes());
    r.cfg_write(NUM_PAGES, &both);
    assert_eq!(r.dev(|d| d.num_pages()), 100);
    assert_eq!(r.dev(|d| d.actual()), 100);
    assert!(r.take_events().contains(BalloonEvents::TARGET_REACHED));
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(TARGETS, 2 * PAGE)]
    );
    assert_eq!(
        r.r32(reg::CONFIG_GENERATION),
        generation_after_round,
        "driver writes do not bump the generation"
    );
}

/// Edge case 33 "`poison_val` written after DRIVER_OK, or never written" — latched at DRIVER_OK
/// (the last write before it wins), later writes ignored and counted, never written means 0
/// (reporting then discards), cleared on reset.
#[test]
fn edge_33_poison_val_latched_late_writes_ignored_cleared_on_reset() {
    let mut r = Rig::new(cfg(), ram(), PAGE);
    r.negotiate();
    r.cfg_write(POISON, &0x1111_1111u32.to_le_bytes());
    r.cfg_write(POISON, &0xaaaa_aaaau32.to_le_bytes());
    r.cfg_write(POISON + 3, &[0x55]);
    assert_eq!(r.metrics().late_poison_writes, 0, "before DRIVER_OK");
    r.driver_ok();
    assert_eq!(r.dev(|d| d.poison_val()), 0x55aa_aaaa);
    assert_eq!(r.cfg_r32(POISON), 0x55aa_aaaa);

    // Late writes: 4 bytes, 1 byte, and an unaligned write over cmd_id and poison_val.
    r.cfg_write(POISON, &0u32.to_le_bytes());
    assert_eq!(r.metrics().late_poison_writes, 1);
    r.cfg_write(POISON + 1, &[0]);
    assert_eq!(r.metrics().late_poison_writes, 2);
    // A write to actual and cmd_id only does not touch poison_val.
    r.cfg_write(ACTUAL, &[0; 8]);
    assert_eq!(r.metrics().late_poison_writes, 2);
    r.cfg_write(CMD_ID + 2, &[0; 4]);
    assert_eq!(r.metrics().late_poison_writes, 3);
    assert_eq!(r.dev(|d| d.poison_val()), 0x55aa_aaaa, "latched");
    assert_eq!(r.cfg_r32(POISON), 0x55aa_aaaa);

    // With a poison value the device must not change reported pages: the element is acked
    // and skipped as a whole.
    let x = TARGETS + 2 * MIB;
    r.element(
        QueueRole::Reporting,
        &[inp(x, 0x4000), inp(x + 0x10_0000, 0x2000)],
    );
    assert!(r.calls().is_empty(), "no discard with poison_val != 0");
    let m = r.metrics().pages;
    assert_eq!((m.reporting_elements, m.reporting_elements_skipped), (1, 1));
    assert_eq!(m.reported_bytes, 0);

    // Reset clears it; a new driver that never writes it gets 0 and discards.
    r.reset();
    assert_eq!(r.dev(|d| d.poison_val()), 0);
    assert_eq!(r.cfg_r32(POISON), 0);
    r.negotiate();
    r.driver_ok();
    assert_eq!(r.dev(|d| d.poison_val()), 0, "never written");
    assert_eq!(r.cfg_r32(POISON), 0);
    r.element(
        QueueRole::Reporting,
        &[inp(x, 0x4000), inp(x + 0x10_0000, 0x2000)],
    );
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(x, 0x4000), (x + 0x10_0000, 0x2000)]
    );
    let m = r.metrics().pages;
    assert_eq!(m.reporting_elements_skipped, 1, "not skipped this time");
    assert_eq!(m.reported_bytes, 0x6000);

    // A fresh device that negotiated PAGE_POISON but never wrote it also reports.
    let mut fresh = Rig::ready(cfg(), ram(), PAGE);
    assert_eq!(fresh.dev(|d| d.poison_val()), 0);
    fresh.element(QueueRole::Reporting, &[inp(x, 0x1000)]);
    assert_eq!(ranges(&fresh.calls(), BackendOp::Discard), [(x, 0x1000)]);
}

/// Edge case 34 "Inflate payload not a multiple of 4 bytes" — the trailing 1–3 bytes are ignored
/// (neither zero-padded nor completed from the memory behind the descriptor) and the whole
/// PFNs are inflated, also when a PFN straddles descriptors.
#[test]
fn edge_34_inflate_payload_not_a_multiple_of_four() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    // The bytes after the payload: PFN 0xc40 (in RAM). Zero-padding its first 1-3 bytes gives
    // PFN 0x40 or 0xc40, also in RAM: either misreading would show up as a discard.
    let tail = 0x0000_0c40u32.to_le_bytes();
    let wanted = [a, a + 2, a + 4];
    for k in 1..=3usize {
        let mut bytes = pfn_bytes(&wanted);
        bytes.extend_from_slice(&tail);
        let addr = r.put(&bytes);
        let before = r.metrics().pages;
        r.element(QueueRole::Inflate, &[out(addr, 12 + k)]);
        r.flush();
        let calls = r.take_calls();
        assert_eq!(
            pages_once(&calls, BackendOp::Discard),
            set_of(&wanted),
            "k = {k}"
        );
        let m = r.metrics().pages;
        assert_eq!(m.inflated_pages - before.inflated_pages, 3, "k = {k}");
        assert_eq!(m.pfns_outside_ram, 0);
        assert_eq!(m.malformed_elements, 0);
    }

    // Three PFNs and 2 trailing bytes, split 3 + 1 + 5 + 5 over separate buffers: the second
    // and third PFNs straddle descriptors; a writable descriptor in the chain (holding an
    // in-RAM PFN) is not part of the array.
    let b = a + 64;
    let wanted = [b, b + 1, b + 7];
    let mut bytes = pfn_bytes(&wanted);
    bytes.extend_from_slice(&tail[..2]);
    let mut segs = r.scatter(&bytes, &[3, 1, 5, 5]);
    let junk = r.put(&pfn_bytes(&[a + 100]));
    segs.push(inp(junk, 4));
    r.element(QueueRole::Inflate, &segs);
    r.flush();
    let calls = r.take_calls();
    assert_eq!(
        ranges(&calls, BackendOp::Discard),
        [
            (u64::from(b) * PAGE, 2 * PAGE),
            (u64::from(b + 7) * PAGE, PAGE)
        ]
    );

    // Payloads of 1-3 bytes only: acked, nothing inflated.
    for k in 1..=3usize {
        let addr = r.put(&tail);
        r.element(QueueRole::Inflate, &[out(addr, k)]);
    }
    r.flush();
    assert!(r.calls().is_empty());
    assert_eq!(r.metrics().pages.inflate_elements, 7);
    assert_eq!(r.metrics().pages.inflated_pages, 12);
}

/// Edge case 35 "An inflate PFN for non-RAM, ROM, or memory out of range" — skipped and counted,
/// the element still acked with used length 0; the backend never sees an address outside
/// RAM (runs crossing a region end or into a hole are clipped).
#[test]
fn edge_35_pfns_outside_ram_are_skipped_and_acked() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    let r1_last = pfn(R1.0 + R1.1) - 1;
    let r0_last = pfn(R0.0 + R0.1) - 1;
    let inside = [
        a,
        r0_last,
        r0_last + 1,
        r1_last,
        pfn(R2.0),
        pfn(RAM_END) - 1,
    ];
    let outside = [
        pfn(HOLE.0),
        pfn(HOLE.0) + 0x800,
        pfn(HOLE.0 + HOLE.1) - 1,
        pfn(RAM_END),
        0x10_0000,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
    ];
    let mut all: Vec<u32> = inside.iter().chain(&outside).copied().collect();
    shuffle(&mut all, 35);
    r.inflate(&all);
    let m = r.metrics().pages;
    assert_eq!(m.pfns_outside_ram, outside.len() as u64);
    assert_eq!(m.inflated_pages, inside.len() as u64);
    r.flush();
    let calls = r.take_calls();
    assert_eq!(pages_once(&calls, BackendOp::Discard), set_of(&inside));
    // The run across the R0/R1 boundary is two calls, one per region; the run from the end
    // of R1 into the hole is clipped at the end of R1.
    let got = ranges(&calls, BackendOp::Discard);
    assert!(got.contains(&(R1.0 - PAGE, PAGE)), "{got:x?}");
    assert!(got.contains(&(R1.0, PAGE)), "{got:x?}");
    assert!(got.contains(&(R1.0 + R1.1 - PAGE, PAGE)), "{got:x?}");
    for c in &calls {
        assert!(
            c.end() <= HOLE.0 || c.gpa >= HOLE.0 + HOLE.1,
            "{c:x?} in the hole"
        );
        assert!(c.end() <= RAM_END, "{c:x?} past RAM");
    }

    // Only PFNs outside RAM: acked, no backend call at all.
    r.inflate(&[pfn(HOLE.0), 0xffff_ffff, pfn(RAM_END), pfn(RAM_END) + 1]);
    r.flush();
    assert!(r.calls().is_empty());
    assert_eq!(r.metrics().pages.pfns_outside_ram, outside.len() as u64 + 4);

    // Deflate: the same rule.
    r.deflate(&[pfn(HOLE.0) + 5, pfn(R2.0) + 1, 0xffff_ffff]);
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Populate),
        [(R2.0 + PAGE, PAGE)]
    );
    let m = r.metrics().pages;
    assert_eq!(m.pfns_outside_ram, outside.len() as u64 + 6);
    assert_eq!(m.deflated_pages, 1);
    assert_eq!(m.malformed_elements, 0);
}

/// Edge case 36 "A repeated inflate PFN" — harmless: repeats within one element merge into one
/// discard per page; repeats across elements merge into the pending range, or are simply
/// discarded again once it was flushed.
#[test]
fn edge_36_repeated_pfns_within_and_across_elements() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    r.inflate(&[a + 2, a, a + 1, a, a + 2, a + 1, a]);
    assert_eq!(r.metrics().pages.inflated_pages, 3, "a repeat counts once");
    // Overlapping and adjacent: merged with the pending range.
    r.inflate(&[a + 1, a + 3, a + 3]);
    assert!(r.calls().is_empty());
    r.flush();
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(TARGETS, 4 * PAGE)],
        "one discard for both elements"
    );
    // The same page once more, after the flush: discarded again (no memory of it).
    r.inflate(&[a, a]);
    r.flush();
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(TARGETS, PAGE)]
    );

    // A Linux-sized element (256 PFNs): 8 scattered pages, each 32 times, shuffled. Every
    // page is discarded exactly once.
    let b = a + 0x100;
    let distinct: Vec<u32> = (0..8).map(|k| b + 2 * k).collect();
    let mut element: Vec<u32> = distinct.iter().flat_map(|&p| [p; 32]).collect();
    shuffle(&mut element, 36);
    assert_eq!(element.len(), 256);
    r.inflate(&element);
    r.flush();
    let calls = r.take_calls();
    assert_eq!(calls.len(), 8, "{calls:x?}");
    assert_eq!(pages_once(&calls, BackendOp::Discard), set_of(&distinct));
    assert_eq!(r.metrics().pages.inflated_pages, 3 + 2 + 1 + 8);
}

/// Edge case 36, longer elements: a PFN repeated in different 256-PFN chunks of one element is
/// still only ever discarded inside the set the element inflated, and the element's pages
/// are all discarded.
#[test]
fn edge_36_repeats_across_chunks_of_one_long_element() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    // Chunk 1: a..a+256. Chunk 2: a lower far page, then a and a+5 again.
    let mut element: Vec<u32> = (a..a + 256).collect();
    element.extend([a - 0x80, a, a + 5]);
    r.inflate(&element);
    r.flush();
    let calls = r.take_calls();
    let mut want: BTreeSet<u64> = (u64::from(a)..u64::from(a) + 256).collect();
    want.insert(u64::from(a - 0x80));
    assert_eq!(pages(&calls, BackendOp::Discard), want);
}

/// Edge case 36 in an element longer than one 256-PFN chunk (Linux never sends one): runs are
/// merged per chunk, so a PFN repeated in a later chunk is counted again, as `inflated_pages`
/// documents; while its run still waits to be discarded the repeat joins it and is
/// discarded once (were the run discarded already, it would be discarded again: harmless, as
/// in QEMU, and bounded by the element cap). Every page of the element is discarded, nothing
/// outside it.
#[test]
fn edge_36_repeat_in_a_later_chunk_is_discarded_again() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    let mut element: Vec<u32> = (a..a + 256).collect();
    element.extend([a - 0x80, a, a + 5]);
    r.inflate(&element);
    r.flush();
    let calls = r.take_calls();
    let mut want: BTreeSet<u64> = (u64::from(a)..u64::from(a) + 256).collect();
    want.insert(u64::from(a - 0x80));
    assert_eq!(pages(&calls, BackendOp::Discard), want);
    let covered: u64 = calls
        .iter()
        .filter(|c| c.op == BackendOp::Discard)
        .map(|c| c.pfns().count() as u64)
        .sum();
    assert_eq!(
        covered, 257,
        "the two repeats of the second chunk join the run still waiting, discarded once"
    );
    assert_eq!(r.metrics().pages.inflated_pages, 259);
}

/// Edge case 36 "a deflate of a never-inflated PFN" — harmless: populated (a hint), never
/// discarded, acked; inflating it afterwards works as usual.
#[test]
fn edge_36_deflate_of_never_inflated_pfns() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let n = pfn(TARGETS) + 0x200;
    r.deflate(&[n + 5, n, n + 1]);
    r.deflate(&[n, n]);
    let calls = r.take_calls();
    assert_eq!(
        ranges(&calls, BackendOp::Populate),
        [
            (u64::from(n) * PAGE, 2 * PAGE),
            (u64::from(n + 5) * PAGE, PAGE),
            (u64::from(n) * PAGE, PAGE)
        ]
    );
    assert!(ranges(&calls, BackendOp::Discard).is_empty());
    let m = r.metrics().pages;
    assert_eq!((m.deflate_elements, m.deflated_pages), (2, 4));
    r.inflate(&[n]);
    r.flush();
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(u64::from(n) * PAGE, PAGE)]
    );
}

/// Edge case 36 "Keep no per-page state that could grow without bound" — 10,000 distinct scattered
/// PFNs in three elements: the device discards as it goes (only a bounded set of
/// [`PENDING_RANGES`] runs waits), remembers
/// nothing about them (inflating them again discards them again, deflating them populates
/// them), and only counters change.
#[test]
fn edge_36_no_per_page_state_for_10000_scattered_pfns() {
    let mut r = Rig::ready(cfg(), big_ram(), PAGE);
    let base = pfn(16 * MIB);
    let mut all: Vec<u32> = (0..10_000).map(|k| base + 2 * k).collect();
    shuffle(&mut all, 10_000);
    let before = r.metrics();
    for chunk in all.chunks(3334) {
        assert!(chunk.len() <= MAX_PFNS_PER_ELEMENT);
        r.inflate(chunk);
    }
    let calls = r.take_calls();
    assert_eq!(
        calls.len(),
        10_000 - PENDING_RANGES,
        "all but the pending runs discarded already"
    );
    assert!(calls
        .iter()
        .all(|c| c.op == BackendOp::Discard && c.len == PAGE));
    let seen = pages_once(&calls, BackendOp::Discard);
    let want = set_of(&all);
    assert!(seen.is_subset(&want));
    r.flush();
    let last = r.take_calls();
    assert_eq!(last.len(), PENDING_RANGES);
    let mut seen = seen;
    seen.extend(pages_once(&last, BackendOp::Discard));
    assert_eq!(seen, want);

    // Only counters moved.
    let after = r.metrics();
    let mut expected = before;
    expected.pages.inflate_elements += 3;
    expected.pages.inflated_pages += 10_000;
    expected.pages.discard_calls += 10_000;
    expected.pages.discarded_bytes += 10_000 * PAGE;
    assert_eq!(after, expected);

    // Again: discarded again, page by page.
    for chunk in all.chunks(3334) {
        r.inflate(chunk);
    }
    r.flush();
    let calls = r.take_calls();
    assert_eq!(pages_once(&calls, BackendOp::Discard), want);
    // Deflating them populates each and discards nothing.
    for chunk in all.chunks(3334) {
        r.deflate(chunk);
    }
    r.flush();
    let calls = r.take_calls();
    assert!(ranges(&calls, BackendOp::Discard).is_empty());
    assert_eq!(pages_once(&calls, BackendOp::Populate), want);
}

/// Edge case 36, host pages of 64 KiB: 10,000 scattered PFNs touching 1,000 host pages, none of
/// them whole. The partial-page table is bounded: a page inflated long ago and completed now
/// is no longer tracked (never discarded, which is safe), the most recent one still is.
#[test]
fn edge_36_partial_page_table_is_bounded() {
    const HP: u64 = 64 * KIB;
    let mut r = Rig::ready(cfg(), big_ram(), HP);
    let g0 = host_aligned_gpa(&r.mem, 16 * MIB, HP);
    let host_page = |k: u64| g0 + k * HP;
    let present = [0u32, 1, 2, 3, 4, 6, 8, 10, 12, 14];
    let missing = [5u32, 7, 9, 11, 13, 15];
    let all: Vec<u32> = (0..1000)
        .flat_map(|k| present.map(|s| pfn(host_page(k)) + s))
        .collect();
    assert_eq!(all.len(), 10_000);
    for chunk in all.chunks(3334) {
        r.inflate(chunk);
    }
    r.flush();
    assert!(r.calls().is_empty(), "no host page is whole");
    assert_eq!(r.metrics().pages.inflated_pages, 10_000);

    // The oldest page, completed now: forgotten long ago.
    r.inflate(&missing.map(|s| pfn(host_page(0)) + s));
    r.flush();
    assert!(r.calls().is_empty(), "host page 0 is no longer tracked");
    // The newest one: still tracked, discarded whole.
    r.inflate(&missing.map(|s| pfn(host_page(999)) + s));
    r.flush();
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(host_page(999), HP)]
    );
}

/// Edge case 36 "a deflated page is never discarded afterwards" — by the pending range: the
/// device flushes before it takes pages back, so no discard after the populate covers it.
#[test]
fn edge_36_deflated_page_not_discarded_by_pending_range() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    r.inflate(&[a, a + 1, a + 2, a + 3]);
    assert!(r.calls().is_empty());
    r.deflate(&[a + 1]);
    r.inflate(&[a + 4, a + 5, a + 6, a + 7]);
    r.inflate(&[a + 2, a + 3]);
    r.flush();
    let calls = r.take_calls();
    let deflated = u64::from(a + 1) * PAGE;
    let populate_at = calls
        .iter()
        .position(|c| c.op == BackendOp::Populate && c.covers(deflated))
        .expect("populated");
    for c in &calls[populate_at..] {
        assert!(
            !(c.op == BackendOp::Discard && c.covers(deflated)),
            "{c:x?} discards a deflated page: {calls:x?}"
        );
    }
    // What was inflated before the deflate was discarded before it.
    assert_eq!(calls[0].op, BackendOp::Discard);
    assert!(calls[0].covers(deflated));
    assert!(populate_at > 0);
}

/// Edge case 36 "a deflated page is never discarded afterwards" — by the partial-page table (2 MiB
/// host pages): a deflated 4 KiB piece leaves the table, so completing the rest of its host
/// page does not discard it; only re-inflating the piece does.
#[test]
fn edge_36_deflated_piece_not_discarded_by_partial_table() {
    const HP: u64 = 2 * MIB;
    let mut r = Rig::ready(cfg(), ram(), HP);
    let h1 = host_aligned_gpa(&r.mem, TARGETS, HP);
    let h2 = h1 + HP;
    assert!(h2 + HP <= R0.1);
    for (h, explicit_flush) in [(h1, true), (h2, false)] {
        let p = pfn(h);
        let first: Vec<u32> = (p..p + 256).collect();
        let second: Vec<u32> = (p + 256..p + 512).collect();
        r.inflate(&first);
        if explicit_flush {
            r.flush();
        }
        // Without the explicit flush, the deflate flushes the pending half first.
        r.deflate(&[p + 10]);
        r.inflate(&second);
        r.flush();
        let calls = r.take_calls();
        assert!(
            ranges(&calls, BackendOp::Discard).is_empty(),
            "host page {h:#x}: a deflated piece was discarded: {calls:x?}"
        );
        assert_eq!(
            ranges(&calls, BackendOp::Populate),
            [(h, HP)],
            "populate covers the whole host page"
        );
        // The piece comes back: the page is whole now.
        r.inflate(&[p + 10]);
        r.flush();
        assert_eq!(ranges(&r.take_calls(), BackendOp::Discard), [(h, HP)]);
    }
}

/// Edge case 37 "Stats buffer not a multiple of 10 bytes" — whole entries are parsed and the
/// trailing fragment ignored, whatever its length, also when entries straddle descriptors.
#[test]
fn edge_37_stats_buffer_not_a_multiple_of_ten() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let fragment = stats_bytes(&[(tag::MEMFREE, 0xdead_beef)]);
    let mut held: Option<u16> = None;
    for frag in 1..=9usize {
        let mut bytes = stats_bytes(&[
            (tag::SWAP_IN, 1000 + frag as u64),
            (tag::MEMTOT, 2000),
            (tag::AVAIL, 3000),
        ]);
        bytes.extend_from_slice(&fragment[..frag]);
        let addr = r.put(&bytes);
        let used_before = r.used_idx(QueueRole::Stats);
        let head = r.stats(&[out(addr, bytes.len())]);
        let s = r.latest_stats();
        assert_eq!((s.entries, s.unknown_tags), (3, 0), "fragment {frag}");
        assert_eq!(s.stats.get(tag::SWAP_IN), Some(1000 + frag as u64));
        assert_eq!(s.stats.get(tag::MEMTOT), Some(2000));
        assert_eq!(s.stats.available_memory(), Some(3000));
        assert_eq!(s.stats.free_memory(), None, "fragment {frag} ignored");
        assert!(r.take_events().contains(BalloonEvents::STATS_UPDATED));
        // The buffer is held; the previous one came back.
        match held {
            None => assert_eq!(r.used_idx(QueueRole::Stats), used_before),
            Some(prev) => {
                assert_eq!(r.used_idx(QueueRole::Stats), used_before + 1);
                assert_eq!(r.used(QueueRole::Stats, used_before), (u32::from(prev), 0));
            }
        }
        held = Some(head);
    }
    assert_eq!(r.metrics().stats_updates, 9);
    assert_eq!(r.metrics().stats_malformed, 0);

    // Three entries and a 4-byte fragment split 15 + 1 + 9 + 9: the second entry straddles
    // three descriptors. A writable descriptor at the end (holding a whole entry) is not
    // part of the buffer.
    let mut bytes = stats_bytes(&[
        (tag::MEMFREE, 11),
        (tag::MEMTOT, 0x0102_0304_0506_0708),
        (tag::CACHES, 33),
    ]);
    bytes.extend_from_slice(&fragment[..4]);
    let mut segs = r.scatter(&bytes, &[15, 1, 9, 9]);
    let junk = r.put(&stats_bytes(&[(tag::SWAP_OUT, 44)]));
    segs.push(inp(junk, 10));
    r.stats(&segs);
    let s = r.latest_stats();
    assert_eq!((s.entries, s.unknown_tags), (3, 0));
    assert_eq!(
        s.stats.iter().collect::<Vec<_>>(),
        [
            (tag::MEMFREE, 11),
            (tag::MEMTOT, 0x0102_0304_0506_0708),
            (tag::CACHES, 33)
        ]
    );

    // Shorter than one entry: nothing parsed (the fragment's tag is not taken).
    let addr = r.put(&fragment);
    r.stats(&[out(addr, 9)]);
    let s = r.latest_stats();
    assert_eq!(s.entries, 0);
    assert_eq!(s.stats.free_memory(), None);
    assert_eq!(s.stats.iter().count(), 0);
    assert_eq!(r.metrics().stats_malformed, 0);
}

/// Edge case 38 "A stats tag above the known range" — tags ≥ 16 (up to 0xffff) are ignored and
/// counted in `unknown_tags`; at most 256 entries are parsed per buffer.
#[test]
fn edge_38_unknown_stats_tags_and_entry_limit() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let bytes = stats_bytes(&[
        (tag::MEMFREE, 100),
        (16, 7),
        (0xffff, 9),
        (tag::DIRECT_RECLAIM, 5),
        (17, 1),
        (0x8000, 3),
        (tag::MEMTOT, 200),
    ]);
    let addr = r.put(&bytes);
    r.stats(&[out(addr, bytes.len())]);
    let s = r.latest_stats();
    assert_eq!((s.entries, s.unknown_tags), (7, 4));
    assert_eq!(
        s.stats.iter().collect::<Vec<_>>(),
        [
            (tag::MEMFREE, 100),
            (tag::MEMTOT, 200),
            (tag::DIRECT_RECLAIM, 5)
        ]
    );
    for t in [16u16, 17, 0x8000, 0xffff] {
        assert_eq!(s.stats.get(t), None);
        assert_eq!(tag::name(t), None);
    }
    assert!(tag::name(tag::DIRECT_RECLAIM).is_some());

    // 300 entries over two descriptors (split inside entry 150): entry i < 256 has tag
    // i % 16 and value i; the rest would overwrite MEMFREE or add unknown tags.
    let entries: Vec<(u16, u64)> = (0..300u64)
        .map(|i| match i {
            0..=255 => ((i % 16) as u16, i),
            _ if i % 2 == 0 => (tag::MEMFREE, 0xdead_0000 + i),
            _ => (0xffff, i),
        })
        .collect();
    let bytes = stats_bytes(&entries);
    let segs = r.scatter(&bytes, &[1505, 1495]);
    r.stats(&segs);
    let s = r.latest_stats();
    assert_eq!((s.entries, s.unknown_tags), (256, 0));
    assert_eq!(
        s.stats.free_memory(),
        Some(244),
        "the last MEMFREE of the first 256"
    );
    assert_eq!(s.stats.get(tag::DIRECT_RECLAIM), Some(255));
    assert_eq!(s.stats.get(tag::SWAP_IN), Some(240));
    assert_eq!(s.stats.iter().count(), tag::COUNT);
    assert_eq!(r.metrics().stats_updates, 2);
}

/// Edge case 39 "The driver puts a second stats buffer while the device holds one" — the older one
/// is returned (used length 0, interrupt), the new one is held and parsed; also when both
/// arrive in one wakeup.
#[test]
fn edge_39_second_stats_buffer_returns_the_older_one() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let irq = r.dev(|d| d.interrupt_handle());
    let buf = |r: &mut Rig, v: u64| {
        let bytes = stats_bytes(&[(tag::MEMFREE, v)]);
        let addr = r.put(&bytes);
        out(addr, bytes.len())
    };
    let s1 = buf(&mut r, 1);
    let first = r.stats(&[s1]);
    assert_eq!(r.used_idx(QueueRole::Stats), 0, "held");
    assert_eq!(r.latest_stats().stats.free_memory(), Some(1));
    assert_eq!(irq.eventfd().read().unwrap_or(0), 0, "no interrupt");

    let s2 = buf(&mut r, 2);
    let second = r.stats(&[s2]);
    assert_eq!(r.used_idx(QueueRole::Stats), 1);
    assert_eq!(r.used(QueueRole::Stats, 0), (u32::from(first), 0));
    assert_eq!(r.latest_stats().stats.free_memory(), Some(2));
    assert_eq!(irq.eventfd().read().unwrap_or(0), 1);
    assert_eq!(r.r32(reg::INTERRUPT_STATUS) & ISR_USED, ISR_USED);
    r.w32(reg::INTERRUPT_ACK, ISR_USED);

    // The held one is the second: asking for fresh numbers returns it, then nothing is held.
    assert!(r.dev(|d| d.request_stats()));
    assert_eq!(r.used_idx(QueueRole::Stats), 2);
    assert_eq!(r.used(QueueRole::Stats, 1), (u32::from(second), 0));
    assert!(!r.dev(|d| d.request_stats()), "nothing held");

    // Two buffers in one wakeup: the first comes back, the second is held and parsed.
    let s3 = buf(&mut r, 3);
    let s4 = buf(&mut r, 4);
    let third = r.post(QueueRole::Stats, &[s3]);
    let fourth = r.post(QueueRole::Stats, &[s4]);
    r.process(QueueRole::Stats);
    assert_eq!(r.used_idx(QueueRole::Stats), 3);
    assert_eq!(r.used(QueueRole::Stats, 2), (u32::from(third), 0));
    assert_eq!(r.latest_stats().stats.free_memory(), Some(4));
    assert!(r.dev(|d| d.request_stats()));
    assert_eq!(r.used(QueueRole::Stats, 3), (u32::from(fourth), 0));
    let m = r.metrics();
    assert_eq!((m.stats_updates, m.stats_requests), (4, 2));
}

// ----------------------------------------------------------------------------------------
// Beyond the list
// ----------------------------------------------------------------------------------------

/// Deflate: the device flushes the pending inflate range and populates the deflated pages
/// before it writes the used entry (the driver may touch the pages once it sees the ack).
/// The backend samples the deflate ring's used index on every call.
#[test]
fn deflate_populates_before_the_used_entry_is_written() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    r.inflate(&[a, a + 1, a + 2, a + 3]);
    r.watch_used(QueueRole::Deflate);
    let d1 = pfn_bytes(&[a + 1]);
    let d2 = pfn_bytes(&[a + 9, a + 10]);
    let (x1, x2) = (r.put(&d1), r.put(&d2));
    let h1 = r.post(QueueRole::Deflate, &[out(x1, 4)]);
    let h2 = r.post(QueueRole::Deflate, &[out(x2, 8)]);
    r.process(QueueRole::Deflate);
    assert_eq!(r.used_idx(QueueRole::Deflate), 2);
    assert_eq!(r.used(QueueRole::Deflate, 0), (u32::from(h1), 0));
    assert_eq!(r.used(QueueRole::Deflate, 1), (u32::from(h2), 0));
    let calls = r.take_calls();
    let seen: Vec<(BackendOp, u64, u64, Option<u16>)> = calls
        .iter()
        .map(|c| (c.op, c.gpa, c.len, c.used_idx))
        .collect();
    assert_eq!(
        seen,
        [
            (BackendOp::Discard, TARGETS, 4 * PAGE, Some(0)),
            (BackendOp::Populate, TARGETS + PAGE, PAGE, Some(0)),
            (BackendOp::Populate, TARGETS + 9 * PAGE, 2 * PAGE, Some(1)),
        ]
    );
}

/// A device reset drops the pending inflate range: the new driver owns those pages, and no
/// later flush (explicit, pause, save, the next inflate) discards them.
#[test]
fn reset_drops_the_pending_inflate_range() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    r.inflate(&(a..a + 8).collect::<Vec<_>>());
    assert!(r.calls().is_empty());
    r.reset();
    assert!(r.calls().is_empty(), "reset discards nothing");
    r.flush();
    r.negotiate();
    r.driver_ok();
    r.flush();
    r.dev(|d| {
        d.pause();
        d.resume();
        let _ = d.save_state();
    });
    r.process(QueueRole::Inflate);
    assert!(r.calls().is_empty(), "the old range is gone");
    // Adjacent to the dropped range: discarded on its own.
    r.inflate(&[a + 8]);
    r.flush();
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(u64::from(a + 8) * PAGE, PAGE)]
    );
}

/// 64 KiB host pages: a host page is discarded once all 16 of its PFNs were inflated, across
/// two elements — whether the pieces arrive as adjacent runs (merged in the pending range) or
/// interleaved (collected in the partial-page table) — and not before.
#[test]
fn host_page_of_64k_discarded_once_all_16_pfns_are_inflated() {
    const HP: u64 = 64 * KIB;
    let mut r = Rig::ready(cfg(), ram(), HP);
    let h = host_aligned_gpa(&r.mem, TARGETS, HP);
    let p = pfn(h);

    // Interleaved: even pieces, then odd pieces.
    let even: Vec<u32> = (0..16).step_by(2).map(|s| p + s).collect();
    let odd: Vec<u32> = (1..16).step_by(2).map(|s| p + s).collect();
    r.inflate(&even);
    r.flush();
    assert!(r.calls().is_empty(), "8 of 16 pieces: nothing discarded");
    r.inflate(&odd);
    assert!(r.calls().is_empty(), "the last run still waits");
    r.flush();
    assert_eq!(ranges(&r.take_calls(), BackendOp::Discard), [(h, HP)]);

    // Adjacent halves in two elements, the second half first.
    let h2 = h + 4 * HP;
    let p2 = pfn(h2);
    r.inflate(&(p2 + 8..p2 + 16).collect::<Vec<_>>());
    r.flush();
    assert!(r.calls().is_empty());
    r.inflate(&(p2..p2 + 8).collect::<Vec<_>>());
    r.flush();
    assert_eq!(ranges(&r.take_calls(), BackendOp::Discard), [(h2, HP)]);

    // 15 of 16 (the piece in the middle missing), in two elements: never discarded.
    let h3 = h + 8 * HP;
    let p3 = pfn(h3);
    r.inflate(&(p3..p3 + 7).collect::<Vec<_>>());
    r.inflate(&(p3 + 8..p3 + 16).collect::<Vec<_>>());
    r.flush();
    assert!(r.calls().is_empty());
    assert_eq!(r.metrics().pages.inflated_pages, 16 + 16 + 15);
}

/// An element with more than `MAX_PFNS_PER_ELEMENT` PFNs: the first 4096 are inflated, the
/// rest ignored and counted; the element is acked.
#[test]
fn inflate_element_is_capped_at_max_pfns() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    let mut element: Vec<u32> = (a..a + MAX_PFNS_PER_ELEMENT as u32).collect();
    let extra = pfn(R2.0);
    element.push(extra);
    r.inflate(&element);
    r.flush();
    let calls = r.take_calls();
    let want: BTreeSet<u64> = (u64::from(a)..u64::from(a) + MAX_PFNS_PER_ELEMENT as u64).collect();
    assert_eq!(pages_once(&calls, BackendOp::Discard), want);
    let m = r.metrics().pages;
    assert_eq!(m.inflated_pages, MAX_PFNS_PER_ELEMENT as u64);
    assert_eq!(m.pfns_over_limit, 1);
}

/// While discards are inhibited, inflate elements are acked and nothing is discarded (also
/// not later), reporting elements are skipped, deflates still populate.
#[test]
fn inhibited_discards_ack_without_discarding() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let a = pfn(TARGETS);
    r.inflate(&[a, a + 1]);
    r.dev(|d| d.set_discards_inhibited(true));
    assert!(r.dev(|d| d.discards_inhibited()));
    r.inflate(&[a + 2, a + 3]);
    r.element(QueueRole::Reporting, &[inp(TARGETS + MIB, 0x4000)]);
    r.deflate(&[a + 9]);
    r.flush();
    r.dev(|d| d.set_discards_inhibited(false));
    r.flush();
    let calls = r.take_calls();
    assert!(ranges(&calls, BackendOp::Discard).is_empty(), "{calls:x?}");
    assert_eq!(
        ranges(&calls, BackendOp::Populate),
        [(TARGETS + 9 * PAGE, PAGE)]
    );
    let m = r.metrics().pages;
    assert_eq!(m.discards_inhibited_bytes, 4 * PAGE);
    assert_eq!(m.reporting_elements_skipped, 1);
    // Allowed again.
    r.inflate(&[a + 4]);
    r.flush();
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(TARGETS + 4 * PAGE, PAGE)]
    );
}

/// Through the real event loop: a QueueNotify serves the inflate queue, and the one-shot
/// flush timer discards the pending range with no further guest action. (The waits are hang
/// guards, not timing assertions.)
#[test]
fn flush_timer_discards_the_pending_range_through_the_event_loop() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let mut em: EventManager<Arc<Mutex<Mmio>>> = EventManager::new().expect("event manager");
    em.add_subscriber(r.t.clone());
    let a = pfn(TARGETS);
    let bytes = pfn_bytes(&[a, a + 1, a + 2]);
    let addr = r.put(&bytes);
    let head = r.post(QueueRole::Inflate, &[out(addr, bytes.len())]);
    let q = r.q(QueueRole::Inflate) as u32;
    r.w32(reg::QUEUE_NOTIFY, q);
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.rec.is_empty() {
        assert!(Instant::now() < deadline, "the flush timer never fired");
        em.run_with_timeout(1000).expect("event loop");
    }
    assert_eq!(r.used_idx(QueueRole::Inflate), 1);
    assert_eq!(r.used(QueueRole::Inflate, 0), (u32::from(head), 0));
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(TARGETS, 3 * PAGE)]
    );
    // Nothing more is pending.
    r.flush();
    assert!(r.calls().is_empty());
}

/// Inflate, deflate and statistics buffers whose descriptors point outside guest memory:
/// acked (or held, for statistics) and counted as malformed; nothing reaches the backend.
#[test]
fn unreadable_elements_are_acked_and_counted() {
    let mut r = Rig::ready(cfg(), ram(), PAGE);
    let outside = 0x7000_0000_0000u64;
    r.element(QueueRole::Inflate, &[out(outside, 8)]);
    r.element(QueueRole::Deflate, &[out(outside, 4)]);
    // A readable PFN first, then the unreadable rest: the first one still counts.
    let a = pfn(TARGETS);
    let addr = r.put(&pfn_bytes(&[a]));
    r.element(QueueRole::Inflate, &[out(addr, 4), out(outside, 4)]);
    r.flush();
    let m = r.metrics();
    assert_eq!(m.pages.malformed_elements, 3);
    assert_eq!(m.pages.inflated_pages, 1);
    assert_eq!(
        ranges(&r.take_calls(), BackendOp::Discard),
        [(u64::from(a) * PAGE, PAGE)]
    );
    let first = r.stats(&[out(outside, 10)]);
    assert_eq!(r.metrics().stats_malformed, 1);
    assert_eq!(r.metrics().stats_updates, 0);
    assert!(r.dev(|d| d.latest_stats().is_none()));
    // Still held: a request gives it back.
    assert!(r.dev(|d| d.request_stats()));
    assert_eq!(r.used(QueueRole::Stats, 0), (u32::from(first), 0));
}

/// `request_stats` does nothing without a held buffer, before DRIVER_OK, while paused and
/// on a device without a statistics queue; `set_target_bytes` rounds down to pages and a
/// target equal to `actual` is reached at once.
#[test]
fn stats_requests_and_targets_in_every_state() {
    let mut r = Rig::new(cfg(), ram(), PAGE);
    assert!(!r.dev(|d| d.request_stats()), "not activated");
    r.negotiate();
    r.driver_ok();
    assert!(!r.dev(|d| d.request_stats()), "nothing held");
    let addr = r.put(&stats_bytes(&[(4, 1), (5, 2)]));
    let head = r.stats(&[out(addr, 20)]);
    r.dev(|d| d.pause());
    assert!(!r.dev(|d| d.request_stats()), "paused");
    r.dev(|d| d.resume());
    assert!(r.dev(|d| d.request_stats()));
    assert_eq!(r.used(QueueRole::Stats, 0), (u32::from(head), 0));
    assert!(!r.dev(|d| d.request_stats()), "given back already");
    assert_eq!(r.take_events(), BalloonEvents::STATS_UPDATED);

    r.dev(|d| d.set_target_bytes((5 << 12) + 123));
    assert_eq!(r.dev(|d| d.num_pages()), 5);
    r.cfg_write(4, &5u32.to_le_bytes());
    let events = r.take_events();
    assert!(events.contains(BalloonEvents::TARGET_REACHED));
    assert!(events.contains(BalloonEvents::ACTUAL_CHANGED));
    assert_eq!(events.bits(), 3);
    // Setting the target to where the driver already is reports it reached.
    r.dev(|d| d.set_target(5));
    assert!(r.take_events().contains(BalloonEvents::TARGET_REACHED));
    r.dev(|d| d.set_target_bytes(u64::MAX));
    assert_eq!(r.dev(|d| d.num_pages()), u32::MAX);
    assert!(r.take_events().is_empty());

    let no_stats = cfg().with_stats(false);
    let r = Rig::ready(no_stats, ram(), PAGE);
    assert!(!r.dev(|d| d.request_stats()), "no statistics queue");
}
