// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzzes the whole balloon device through its MMIO transport: every queue, the
//! configuration space, the VMM's API, reset and snapshot/restore, interleaved.
//!
//! * Guest memory: 1 to 4 small regions (at most 256 pages each) with holes, partial last
//!   pages and unaligned starts, placed low, anywhere or right below the top of the address
//!   space. Each region is mapped at a host address on a 2 MiB boundary, or a chosen number
//!   of 4 KiB pages past one. One region holds the five split rings (one page each) and a
//!   scratch area for element data and indirect tables.
//! * The device: a `Balloon` offering every feature (MUST_TELL_HOST, STATS_VQ,
//!   DEFLATE_ON_OOM, FREE_PAGE_HINT, PAGE_POISON, REPORTING) with small queues (1 to 16
//!   entries; 2 to 16 for the free page queue, 32 for reporting) and a budget of 1 to 4 or
//!   256 chains per wakeup, behind `MmioTransport`, over a recording `MemoryBackend` whose
//!   host page size is 4 KiB, 64 KiB or 2 MiB, and a recording `FreePageSink`.
//! * The guest: MMIO register reads and writes of any offset and width, configuration space
//!   accesses of any offset and width, driver bring-ups (any accepted feature set, queues
//!   left out or with their rings anywhere, poison and actual written, buffers posted before
//!   DRIVER_OK), and elements on
//!   any queue: PFN arrays (inside RAM, outside, huge, at region edges, runs, trailing bytes,
//!   split across descriptors), statistics entries (any tags, trailing bytes), commands,
//!   writable buffers (reporting, hints) of any address and length, direct or through an
//!   indirect table, and raw descriptor tables (loops, bad indexes, nested tables); available
//!   indexes far ahead.
//! * The VMM: `process_queue(i)` for any i, `set_target`, `set_target_bytes`,
//!   `request_stats`, `set_stats_interval` (zero or an hour), `set_discards_inhibited`,
//!   `flush_discards`, `pause`, `resume`, reset, `save_state` then `Balloon::restore` into a
//!   fresh device (with the state intact or corrupted; the old device stays if it fails),
//!   and the hint rounds (`start_round`, `stop_round`, `done`).
//!
//! After every operation:
//!
//! * every discard and populate is non-empty, lies inside one RAM region, and its
//!   `host_addr` and `region_offset` are what vm-memory gives for its `gpa`; a discard
//!   covers whole host pages (host address and length, and the offset in the region when the
//!   region's mapping starts on a host page boundary); a populate is host page aligned except
//!   where it is clipped to its region;
//! * no discard while discards are inhibited; no reporting discard while `poison_val != 0`;
//! * safety of discards: every 4 KiB page a discard touches was given up by the driver (a
//!   model follows the driver's inflated and deflated PFNs, re-reading each element the way
//!   the device does; without MUST_TELL_HOST only pages of the inflate elements just
//!   handled count); a reporting discard lies inside a writable descriptor of a reporting
//!   element just handled; a populate touches a page of a deflate element just handled;
//!   only inflate, deflate and reporting elements and flushes cause backend calls;
//! * every inflate, deflate and reporting element popped with a valid head gets one used
//!   entry, in order, with used length 0; the latest statistics are those of the last
//!   statistics buffer the device could parse (read the device's way), and the events
//!   (`STATS_UPDATED`, `ACTUAL_CHANGED`, `TARGET_REACHED`) are signalled when due;
//! * the configuration space reads back the model: `num_pages` (the last target), `actual`
//!   and `poison_val` (driver writes merged byte by byte, `poison_val` latched), the hint id
//!   the state shows, 16 bytes, then `0xff`; MMIO registers read back their values;
//! * hints are non-empty, 4 KiB aligned, inside one region, under the current id; an intact
//!   snapshot restores (same activation, status, hint id; DONE if hinting was negotiated).
//!
//! The model reads what the device is about to pop before each `process_queue`, with the
//! same vm-memory calls as the device and virtio-queue, so it fails where they fail. When
//! something the device reads overlaps the used ring it writes during the batch, the model
//! cannot know what the device read and skips the checks that depend on it.
//!
//! At the end, a reset and a clean bring-up over fresh rings must still work: an inflate of
//! one page is acknowledged (used length 0) and, with 4 KiB host pages, discarded on flush,
//! and a free page hint round (start buffer, one hinted page, STOP) delivers that page under
//! its id and completes.

use crate::input::balloon_device::*;
use std::collections::HashSet;
use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::desc::{
    desc_from_bytes, raw_head, walk, writable, write_chain, write_raw, Desc, Table, F_NEXT, F_WRITE,
};
use crate::hint::{next_cmd_id, CmdChoice, Hint, RecordingSink};
use crate::layout::{
    guest_write, len_of, Addr, Layout, Len, RegionSpec, Scratch, MAX_REGIONS, PAGE,
    RING_REGION_PAGES, TABLE_ENTRIES,
};
use crate::ring::{write_table_desc, DriverRing};
use guest_model::mmio::reg;
use guest_model::ring::{GuestMem, RingLayout};
use std::num::NonZeroUsize;
use virtio_balloon::backend::{HostRange, MemoryBackend};
use virtio_balloon::defs::features as f;
use virtio_balloon::transport::{MmioTransport, VirtioDevice};
use virtio_balloon::{
    Balloon, BalloonConfig, BalloonEvents, BalloonMetrics, BalloonState, HintState, QueueRole,
};
use virtio_queue::QueueT;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion};

// The ring region (at least `RING_REGION_PAGES`): one page of rings per queue, then scratch
// pages.
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const FPQ: usize = 3;
const REPORTING: usize = 4;
/// Offsets inside a queue's ring page.
const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 0x400;
const USED_OFF: u64 = 0x800;
/// The first byte the guest model may write with raw addresses.
const SCRATCH_OFF: u64 = QUEUES as u64 * PAGE;
const SCRATCH_LEN: u64 = (RING_REGION_PAGES - QUEUES as u64) * PAGE;
/// Element data slots (1 KiB each) from the first scratch page.
const DATA_OFF: u64 = SCRATCH_OFF;
const DATA_SLOT: u64 = 1024;
const DATA_SLOTS: u64 = 32;
/// Indirect table slots (16 entries each) after the data slots.
const TABLE_OFF: u64 = DATA_OFF + DATA_SLOT * DATA_SLOTS;
const TABLE_SLOTS: u64 = (RING_REGION_PAGES * PAGE - TABLE_OFF) / (TABLE_ENTRIES as u64 * 16);
/// The scratch area as `Layout` sees it (`Addr::Slot` is a data slot).
const SCRATCH: Scratch = Scratch {
    off: SCRATCH_OFF,
    len: SCRATCH_LEN,
    slot_off: DATA_OFF,
    slot_size: DATA_SLOT,
    slots: DATA_SLOTS,
    table_off: TABLE_OFF,
    table_slots: TABLE_SLOTS,
};
/// Host mappings: region i is mapped in slot i of an arena aligned to 2 MiB.
const HUGE: u64 = 2 << 20;
/// The dirty bitmap's page size (the guest memory's, as in `guest_model`).
const PAGE_SIZE_4K: NonZeroUsize = NonZeroUsize::new(4096).unwrap();
const ARENA_SLOT: u64 = 4 << 20;
/// The same limits as the device's (pages.rs, stats.rs).
const MAX_PFNS_PER_ELEMENT: usize = 4096;
const PFN_STAGE: u64 = 1024;
const STATS_ENTRY: usize = 10;
const MAX_STATS_ENTRIES: usize = 256;
const KNOWN_TAGS: u16 = 16;

const MAX_OPS: usize = 256;
const MAX_PFNS: usize = 250;
const MAX_RUN: u32 = 64;
const MAX_STATS: usize = 100;
const MAX_WRITABLE: usize = 8;
const MAX_CUTS: usize = 3;
const MAX_RAW_BYTES: usize = 4;
const MAX_PREPOST: usize = 4;
const MAX_ROUND_ELEMENTS: usize = 4;
const MAX_GUEST_WRITE: usize = 64;

/// Everything the device offers.
const OFFERED: u64 = f::bit(f::VIRTIO_BALLOON_F_MUST_TELL_HOST)
    | f::bit(f::VIRTIO_BALLOON_F_STATS_VQ)
    | f::bit(f::VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    | f::bit(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT)
    | f::bit(f::VIRTIO_BALLOON_F_PAGE_POISON)
    | f::bit(f::VIRTIO_BALLOON_F_REPORTING)
    | f::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
    | f::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    | f::bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
const CONFIG_LEN: u64 = 16;

/// The registers below the configuration space.
const REGS: [u64; 23] = [
    reg::MAGIC,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_AVAIL_LOW,
    reg::QUEUE_AVAIL_HIGH,
    reg::QUEUE_USED_LOW,
    reg::QUEUE_USED_HIGH,
    reg::CONFIG_GENERATION,
];

// ---------------------------------------------------------------------------------------
// Input.

impl AsRef<RegionSpec> for MappedRegionSpec {
    fn as_ref(&self) -> &RegionSpec {
        &self.region
    }
}

impl HostPage {
    fn size(self) -> u64 {
        match self {
            HostPage::Small => 4 << 10,
            HostPage::Medium => 64 << 10,
            HostPage::Huge => 2 << 20,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Guest memory layout.

/// Pages past a 2 MiB boundary at which each region's mapping starts.
fn host_shifts(input: &Input, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| match input.regions.get(i) {
            Some(spec) if spec.host_shift & 0x8000 != 0 => {
                u64::from(spec.host_shift) % (HUGE / PAGE)
            }
            _ => 0,
        })
        .collect()
}

/// The rings of the queues and the PFNs of the input, in a layout.
trait BalloonLayout {
    /// Queue `q`'s descriptor table in the ring region.
    fn desc_addr(&self, q: usize) -> u64;
    /// Queue `q`'s available ring in the ring region.
    fn avail_addr(&self, q: usize) -> u64;
    /// Queue `q`'s used ring in the ring region.
    fn used_addr(&self, q: usize) -> u64;
    /// The PFNs `p` stands for.
    fn pfn(&self, p: Pfn) -> Vec<u32>;
}

impl BalloonLayout for Layout {
    fn desc_addr(&self, q: usize) -> u64 {
        self.ring + q as u64 * PAGE + DESC_OFF
    }

    fn avail_addr(&self, q: usize) -> u64 {
        self.ring + q as u64 * PAGE + AVAIL_OFF
    }

    fn used_addr(&self, q: usize) -> u64 {
        self.ring + q as u64 * PAGE + USED_OFF
    }

    fn pfn(&self, p: Pfn) -> Vec<u32> {
        match p {
            Pfn::Ram { region, page } => {
                let (s, _) = self.region(region);
                vec![((s >> 12) + u64::from(page)) as u32]
            }
            Pfn::Run {
                region,
                page,
                count,
            } => {
                let (s, _) = self.region(region);
                let first = ((s >> 12) + u64::from(page)) as u32;
                (0..1 + u32::from(count) % MAX_RUN)
                    .map(|k| first.wrapping_add(k))
                    .collect()
            }
            Pfn::Edge { region, end, delta } => {
                let (s, l) = self.region(region);
                let base = if end { (s + l) >> 12 } else { s >> 12 };
                vec![(base as u32).wrapping_add_signed(i32::from(delta))]
            }
            Pfn::Huge(x) => vec![u32::MAX - u32::from(x)],
            Pfn::Raw(x) => vec![x],
        }
    }
}

/// The anonymous mapping every region is carved from (dropped after the guest memory).
struct Arena {
    _map: MmapRegion<()>,
}

fn build_memory(lay: &Layout, host_shift: &[u64]) -> (Arena, GuestMem) {
    let size = MAX_REGIONS as u64 * ARENA_SLOT + HUGE;
    let map = MmapRegion::<()>::new(size as usize).expect("arena mapping");
    let base = (map.as_ptr() as u64).next_multiple_of(HUGE);
    let regions = lay
        .regions
        .iter()
        .zip(host_shift)
        .enumerate()
        .map(|(i, (&(start, len), &shift))| {
            let host = base + i as u64 * ARENA_SLOT + shift * PAGE;
            // SAFETY: `host..host + len` lies inside `map`: slot `i` starts at most 2 MiB past
            // the arena's start and holds less than 2 MiB of shift plus at most 1 MiB of
            // region, inside its 4 MiB. The mapping is anonymous, page aligned, readable and
            // writable, is used by nothing else, and outlives the guest memory built on it
            // (the harness drops the arena after the device and the memory).
            let mapping = unsafe {
                MmapRegionBuilder::new_with_bitmap(
                    len as usize,
                    AtomicBitmap::new(len as usize, PAGE_SIZE_4K),
                )
                .with_raw_mmap_pointer(host as *mut u8)
            }
            .build()
            .expect("region mapping");
            GuestRegionMmap::new(mapping, GuestAddress(start)).expect("region")
        })
        .collect();
    let mem = GuestMem::from_regions(regions).expect("valid layout");
    (Arena { _map: map }, mem)
}

// ---------------------------------------------------------------------------------------
// Guest memory access. The walker uses the same vm-memory calls as the device and
// virtio-queue (`load` for ring indexes, `read_slice` for descriptors and PFN stages), so it
// fails exactly where they fail.

fn load_u16(mem: &GuestMem, addr: u64) -> Option<u16> {
    mem.load::<u16>(GuestAddress(addr), Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

fn read_u32(mem: &GuestMem, addr: u64) -> Option<u32> {
    mem.read_obj::<u32>(GuestAddress(addr))
        .ok()
        .map(u32::from_le)
}

/// Zeroes what RAM there is in `[addr, addr + len)`.
fn zero(mem: &GuestMem, addr: u64, len: u64) {
    let zeros = vec![0u8; len as usize];
    if mem.write_slice(&zeros, GuestAddress(addr)).is_err() {
        for i in 0..len {
            if let Some(a) = addr.checked_add(i) {
                let _ = mem.write_obj(0u8, GuestAddress(a));
            }
        }
    }
}

fn read_desc(mem: &GuestMem, addr: u64) -> Option<Desc> {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
    Some(desc_from_bytes(b))
}

/// The device's `check_chain`: at least one descriptor, at most a queue size of them, and
/// the last one without NEXT.
fn chain_ok(descs: &[Desc], size: u16) -> bool {
    match descs.last() {
        Some(last) => descs.len() <= usize::from(size) && last.flags & F_NEXT == 0,
        None => false,
    }
}

/// The PFNs of an element, read as the device does (readable descriptors as one byte
/// stream, in stages of 1 KiB per descriptor, trailing bytes ignored, at most 4096).
/// Returns the PFNs and whether the device reads them all (no stage failed).
fn pfns_of(mem: &GuestMem, descs: &[Desc], reads: &mut Vec<(u64, u64)>) -> (Vec<u32>, bool) {
    let mut out = Vec::new();
    let mut carry = [0u8; 4];
    let mut have = 0usize;
    let mut stage = [0u8; PFN_STAGE as usize];
    for d in descs.iter().filter(|d| !writable(d)) {
        let len = u64::from(d.len);
        let mut off = 0u64;
        while off < len {
            let want = (len - off).min(PFN_STAGE);
            let Some(a) = d.addr.checked_add(off) else {
                return (out, false);
            };
            reads.push((a, want));
            if mem
                .read_slice(&mut stage[..want as usize], GuestAddress(a))
                .is_err()
            {
                return (out, false);
            }
            for &b in &stage[..want as usize] {
                carry[have] = b;
                have += 1;
                if have < 4 {
                    continue;
                }
                have = 0;
                if out.len() == MAX_PFNS_PER_ELEMENT {
                    return (out, true);
                }
                out.push(u32::from_le_bytes(carry));
            }
            off += want;
        }
    }
    (out, true)
}

/// What the device parses from a statistics buffer: `(tag, value)` for every whole 10-byte
/// entry of the readable descriptors (a byte stream, at most 256 entries), read with the
/// device's calls; `None` if one fails.
fn stats_of(
    mem: &GuestMem,
    descs: &[Desc],
    reads: &mut Vec<(u64, u64)>,
) -> Option<Vec<(u16, u64)>> {
    let mut out = Vec::new();
    let mut entry = [0u8; STATS_ENTRY];
    let mut have = 0usize;
    for d in descs.iter().filter(|d| !writable(d)) {
        let len = u64::from(d.len);
        let mut off = 0u64;
        while off < len && out.len() < MAX_STATS_ENTRIES {
            let want = (STATS_ENTRY - have).min((len - off) as usize);
            let a = d.addr.checked_add(off)?;
            reads.push((a, want as u64));
            mem.read_slice(&mut entry[have..have + want], GuestAddress(a))
                .ok()?;
            have += want;
            off += want as u64;
            if have == STATS_ENTRY {
                have = 0;
                let tag = u16::from_le_bytes([entry[0], entry[1]]);
                out.push((tag, u64::from_le_bytes(entry[2..].try_into().unwrap())));
            }
        }
    }
    Some(out)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    let (a0, a1) = (u128::from(a.0), u128::from(a.0) + u128::from(a.1));
    let (b0, b1) = (u128::from(b.0), u128::from(b.0) + u128::from(b.1));
    a1 > b0 && b1 > a0
}

// ---------------------------------------------------------------------------------------
// The recording backend.

#[derive(Debug, Clone, Copy)]
struct Call {
    discard: bool,
    gpa: u64,
    len: u64,
    host: u64,
    region_offset: u64,
    file_backed: bool,
}

struct RecordingBackend {
    page: u64,
    calls: Mutex<Vec<Call>>,
}

impl RecordingBackend {
    fn record(&self, discard: bool, r: &HostRange<'_>) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call {
            discard,
            gpa: r.gpa.0,
            len: r.len,
            host: r.host_addr as u64,
            region_offset: r.region_offset,
            file_backed: r.file_offset.is_some(),
        });
        Ok(())
    }
}

impl MemoryBackend for RecordingBackend {
    fn host_page_size(&self) -> u64 {
        self.page
    }

    fn discard(&self, range: &HostRange<'_>) -> io::Result<()> {
        self.record(true, range)
    }

    fn populate(&self, range: &HostRange<'_>) -> io::Result<()> {
        self.record(false, range)
    }
}

// ---------------------------------------------------------------------------------------
// The harness.

type Mem = Arc<GuestMem>;
type Transport = MmioTransport<Balloon<Mem>>;

/// What the device is expected to hold in its configuration space, and the discard model.
#[derive(Debug, Default)]
struct Model {
    num_pages: u32,
    actual: u32,
    poison: u32,
    inhibited: bool,
    /// PFNs the driver gave up (inflated and not deflated since) that the device may still
    /// discard. A superset: it never misses a page the device may discard legitimately.
    given_up: HashSet<u64>,
    /// The device may hold inflated pages the model could not read reliably: the subset
    /// check of discards is off until the next reset.
    unknown: bool,
    /// Events the device must have signalled since the last check.
    events: BalloonEvents,
}

/// What one `process_queue` call may pop, read from guest memory before the call.
#[derive(Debug, Default)]
struct Batch {
    /// Well-formed chains the device may pop (every one up to the available index).
    candidates: Vec<Vec<Desc>>,
    /// Well-formed chains the device certainly pops (within its budget), with their PFNs
    /// if the device reads them all.
    popped: Vec<(Vec<Desc>, Option<Vec<u32>>)>,
    /// The PFNs of every candidate (as far as they are readable).
    pfns: HashSet<u64>,
    /// What the device parses from each chain it certainly pops (statistics queue).
    stats: Vec<Option<Vec<(u16, u64)>>>,
    /// The head of every chain the device pops (well formed or not).
    heads: Vec<u16>,
    /// The queue's size and used ring, and the device's used index before the batch.
    size: u16,
    used_ring: u64,
    next_used: Wrapping<u16>,
    /// Something the device reads overlaps the used ring it writes during the batch: what
    /// the model read may not be what the device reads.
    uncertain: bool,
}

/// Where backend calls come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Inflate,
    Deflate,
    Reporting,
    /// Anything but processing a queue: flushes.
    Other,
    /// Nothing may reach the backend.
    None,
}

struct Harness {
    lay: Layout,
    mem: Mem,
    sink: Arc<RecordingSink>,
    backend: Arc<RecordingBackend>,
    cfg: BalloonConfig,
    t: Transport,
    max_sizes: [u16; QUEUES],
    /// The driver's side of each queue (`None`: not set up by the driver, or its rings
    /// are not all in RAM).
    rings: [Option<DriverRing>; QUEUES],
    next_data: u64,
    model: Model,
    /// Dropped last: the guest memory lives in it.
    _arena: Arena,
}

impl Harness {
    fn dev(&self) -> &Balloon<Mem> {
        self.t.device()
    }

    fn dev_mut(&mut self) -> &mut Balloon<Mem> {
        self.t.device_mut()
    }

    fn has_feature(&self, bit: u32) -> bool {
        self.dev().has_feature(bit)
    }

    // -----------------------------------------------------------------------------------
    // MMIO and the configuration space, with the model following.

    fn expected_config(&self) -> [u8; CONFIG_LEN as usize] {
        let st = self.dev().hint_control().status();
        let cmd = match st.state {
            HintState::Stop => 0,
            HintState::Done => 1,
            HintState::Requested | HintState::Start => st.cmd_id,
        };
        let m = &self.model;
        let mut img = [0u8; CONFIG_LEN as usize];
        for (i, v) in [m.num_pages, m.actual, cmd, m.poison]
            .into_iter()
            .enumerate()
        {
            img[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        img
    }

    fn model_reset(&mut self) {
        self.model.actual = 0;
        self.model.poison = 0;
        self.model.given_up.clear();
        self.model.unknown = false;
        for r in &mut self.rings {
            *r = None;
        }
    }

    /// A configuration space write at `off` (from the start of the configuration space).
    fn config_write(&mut self, off: u64, data: &[u8]) {
        let st = self.t.status();
        let accepted = st & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER as u8 != 0
            && st & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED as u8 == 0;
        let mut actual_changed = false;
        if accepted {
            let poison_ok =
                self.has_feature(f::VIRTIO_BALLOON_F_PAGE_POISON) && !self.dev().is_activated();
            let mut img = self.expected_config();
            for (i, &b) in data.iter().enumerate() {
                let Some(o) = off.checked_add(i as u64).filter(|&o| o < CONFIG_LEN) else {
                    continue;
                };
                let field = o / 4 * 4;
                if field == 4 || (field == 12 && poison_ok) {
                    img[o as usize] = b;
                }
            }
            let actual = u32::from_le_bytes(img[4..8].try_into().unwrap());
            actual_changed = actual != self.model.actual;
            self.model.actual = actual;
            if poison_ok {
                self.model.poison = u32::from_le_bytes(img[12..16].try_into().unwrap());
            }
        }
        self.t.write(reg::CONFIG + off, data);
        if actual_changed {
            self.model.events |= BalloonEvents::ACTUAL_CHANGED;
            if self.dev().is_activated() && self.model.actual == self.model.num_pages {
                self.model.events |= BalloonEvents::TARGET_REACHED;
            }
        }
    }

    /// An MMIO write at any offset and width.
    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.config_write(offset - reg::CONFIG, data);
            return;
        }
        let before = self.t.status();
        self.t.write(offset, data);
        let after = self.t.status();
        if offset == reg::STATUS && data == [0, 0, 0, 0] {
            assert_eq!(after, 0, "status after a reset");
            assert!(!self.dev().is_activated(), "active after a reset");
            self.model_reset();
        }
        if before & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0
            && after & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0
            && !self.has_feature(f::VIRTIO_BALLOON_F_PAGE_POISON)
        {
            // The device drops a poison value written while the feature was still accepted.
            self.model.poison = 0;
        }
    }

    fn write_reg(&mut self, reg: u64, v: u32) {
        self.mmio_write(reg, &v.to_le_bytes());
    }

    fn read_reg(&self, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn mmio_read(&self, offset: u64, width: usize) {
        let mut b = [0u8; 8];
        let data = &mut b[..width];
        self.t.read(offset, data);
        if offset >= reg::CONFIG {
            let img = self.expected_config();
            for (i, &got) in data.iter().enumerate() {
                let o = (offset - reg::CONFIG)
                    .checked_add(i as u64)
                    .filter(|&o| o < CONFIG_LEN);
                let want = o.map_or(0xff, |o| img[o as usize]);
                assert_eq!(
                    got, want,
                    "config byte {i} of a {width}-byte read at {offset:#x}"
                );
            }
            return;
        }
        if width != 4 {
            assert!(
                data.iter().all(|&x| x == 0),
                "{width}-byte register read at {offset:#x} gave {data:x?}"
            );
            return;
        }
        let got = u32::from_le_bytes(b[..4].try_into().unwrap());
        let sel = self.t.save_state();
        let dev = self.dev();
        let queue = dev.queue(sel.queue_select as usize);
        let want = match offset {
            r if r == reg::MAGIC => virtio_balloon::transport::MMIO_MAGIC_VALUE,
            r if r == reg::VERSION => 2,
            r if r == reg::DEVICE_ID => 5,
            r if r == reg::VENDOR_ID => 0,
            r if r == reg::DEVICE_FEATURES => match sel.device_features_select {
                0 => OFFERED as u32,
                1 => (OFFERED >> 32) as u32,
                _ => 0,
            },
            r if r == reg::QUEUE_NUM_MAX => self
                .max_sizes
                .get(sel.queue_select as usize)
                .map_or(0, |&m| u32::from(m)),
            r if r == reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            r if r == reg::INTERRUPT_STATUS => u32::from(dev.interrupt().status()),
            r if r == reg::STATUS => u32::from(self.t.status()),
            r if r == reg::CONFIG_GENERATION => dev.interrupt().config_generation(),
            _ => 0,
        };
        assert_eq!(got, want, "register {offset:#x}");
    }

    // -----------------------------------------------------------------------------------
    // The driver.

    fn driver_size(&self, q: usize, x: u8) -> u16 {
        (self.max_sizes[q] >> (x % 3)).max(1)
    }

    /// The driver's probe: fresh rings, features, queues, DRIVER_OK. Only from status 0.
    fn setup(&mut self, spec: &SetupSpec) {
        if self.t.status() != 0 {
            return;
        }
        // After a restore from a corrupted snapshot the transport can show status 0 while
        // the device is active, or has ready queues (which this bring-up may leave alone)
        // pointing anywhere; activation then fails, which is not checked.
        let dev = self.dev();
        let fresh =
            !dev.is_activated() && (0..QUEUES).all(|q| dev.queue(q).is_some_and(|q| !q.ready()));
        let zeros = [0u8; (QUEUES as u64 * PAGE) as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(self.lay.ring))
            .unwrap();
        for r in &mut self.rings {
            *r = None;
        }

        self.write_reg(
            reg::STATUS,
            u32::from(virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8),
        );
        self.write_reg(
            reg::STATUS,
            u32::from(
                virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8
                    | virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER as u8,
            ),
        );
        self.write_reg(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read_reg(reg::DEVICE_FEATURES);
        self.write_reg(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read_reg(reg::DEVICE_FEATURES);
        assert_eq!(u64::from(lo) | (u64::from(hi) << 32), OFFERED, "offer");
        let mut features =
            (spec.features & OFFERED) | f::bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
        // Keep the offered queue numbering: a later queue feature needs the earlier ones.
        if features & f::bit(f::VIRTIO_BALLOON_F_REPORTING) != 0 {
            features |= f::bit(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        }
        if features & f::bit(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT) != 0 {
            features |= f::bit(f::VIRTIO_BALLOON_F_STATS_VQ);
        }
        for page in 0..2u32 {
            self.write_reg(reg::DRIVER_FEATURES_SEL, page);
            self.write_reg(reg::DRIVER_FEATURES, (features >> (32 * page)) as u32);
        }
        if let Some(p) = spec.poison {
            // Before FEATURES_OK: taken while PAGE_POISON is accepted.
            self.config_write(12, &p.to_le_bytes());
        }
        let s = u32::from(
            virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8
                | virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER as u8
                | virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8,
        );
        self.write_reg(reg::STATUS, s);
        if fresh {
            assert_eq!(self.read_reg(reg::STATUS), s, "FEATURES_OK refused");
            assert_eq!(self.dev().driver_features(), features, "accepted features");
        }

        // Activation checks that every ready queue's rings are in RAM.
        let mut rings_in_ram = true;
        for q in 0..QUEUES {
            if spec.skip & 0x80 != 0 && spec.skip & (1 << q) != 0 {
                continue;
            }
            let size = self.driver_size(q, spec.sizes[q]);
            let (desc, avail, used) =
                match spec.place.iter().find(|p| usize::from(p.0) % QUEUES == q) {
                    Some(&(_, d, a, u)) => (
                        self.lay.addr(d) & !15,
                        self.lay.addr(a) & !1,
                        self.lay.addr(u) & !3,
                    ),
                    None => (
                        self.lay.desc_addr(q),
                        self.lay.avail_addr(q),
                        self.lay.used_addr(q),
                    ),
                };
            let n = u64::from(size);
            for (at, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
                // Fresh rings (rings placed elsewhere may overlap anything).
                zero(&self.mem, at, len);
                rings_in_ram &= self.lay.in_ram(at, len);
            }
            self.write_reg(reg::QUEUE_SEL, q as u32);
            assert_eq!(
                self.read_reg(reg::QUEUE_NUM_MAX),
                u32::from(self.max_sizes[q]),
                "queue {q} maximum size"
            );
            self.write_reg(reg::QUEUE_NUM, u32::from(size));
            for (lo, addr) in [
                (reg::QUEUE_DESC_LOW, desc),
                (reg::QUEUE_AVAIL_LOW, avail),
                (reg::QUEUE_USED_LOW, used),
            ] {
                self.write_reg(lo, addr as u32);
                self.write_reg(lo + 4, (addr >> 32) as u32);
            }
            self.write_reg(reg::QUEUE_READY, 1);
            if fresh {
                assert_eq!(self.read_reg(reg::QUEUE_READY), 1, "queue {q} ready");
            }
            let layout = RingLayout {
                size,
                desc: GuestAddress(desc),
                avail: GuestAddress(avail),
                used: GuestAddress(used),
            };
            self.rings[q] = DriverRing::new(&self.mem, q as u16, layout);
        }
        // Before DRIVER_OK the device looks at nothing; it serves these once active.
        for (q, el) in spec.prepost.iter().take(MAX_PREPOST) {
            self.post(usize::from(*q) % QUEUES, el);
        }
        if let Some(a) = spec.actual {
            self.config_write(4, &a.to_le_bytes());
        }
        self.write_reg(
            reg::STATUS,
            s | u32::from(virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8),
        );
        if fresh && rings_in_ram {
            assert_eq!(
                self.read_reg(reg::STATUS),
                s | u32::from(virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8),
                "activation failed"
            );
            assert!(self.dev().is_activated());
        }
    }

    fn reset(&mut self) {
        self.write_reg(reg::STATUS, 0);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.rings[q]
            .as_ref()
            .and_then(|r| r.used_idx(&self.mem))
            .expect("a set up queue")
    }

    /// Writes a descriptor into queue `q`'s table or an indirect table, anywhere.
    fn write_desc(&self, q: usize, table: Table, index: u16, d: Desc) {
        match (table, &self.rings[q]) {
            (Table::Ring, Some(r)) => {
                let _ = r.write_desc(&self.mem, index, d);
            }
            (Table::Ring, None) => {}
            (Table::At(t), _) => {
                let _ = write_table_desc(&self.mem, t, index, d);
            }
        }
    }

    fn resolve(&self, c: CmdChoice) -> u32 {
        c.resolve(self.dev().hint_control().status().cmd_id)
    }

    fn payload_bytes(&self, p: &Payload, tail: u8) -> Vec<u8> {
        let mut out = Vec::new();
        match p {
            Payload::None => {}
            Payload::Pfns(v) => {
                let pfns = v.iter().flat_map(|&p| self.lay.pfn(p)).take(MAX_PFNS);
                for pfn in pfns {
                    out.extend_from_slice(&pfn.to_le_bytes());
                }
                out.extend(std::iter::repeat_n(tail, usize::from(tail % 4)));
            }
            Payload::Stats(v) => {
                for &(tag, value) in v.iter().take(MAX_STATS) {
                    let tag = if tag & 0x8000 == 0 { tag % 18 } else { tag };
                    out.extend_from_slice(&tag.to_le_bytes());
                    out.extend_from_slice(&value.to_le_bytes());
                }
                out.extend(std::iter::repeat_n(tail, usize::from(tail % 10)));
            }
            Payload::Cmd(c) => out.extend_from_slice(&self.resolve(*c).to_le_bytes()),
            Payload::Bytes(b) => out.extend_from_slice(&b[..b.len().min(DATA_SLOT as usize)]),
        }
        out
    }

    /// Lays an element out on queue `q` and publishes it, like a driver (unless the queue
    /// is not set up or is full).
    fn post(&mut self, q: usize, el: &Element) {
        let Some(ring) = &self.rings[q] else {
            return;
        };
        let size = ring.size();
        let Some(used) = ring.used_idx(&self.mem) else {
            return;
        };
        if (ring.avail_idx() - Wrapping(used)).0 >= size {
            return;
        }
        let next_desc = ring.next_desc();
        let head = match el {
            Element::Good(g) => {
                // (addr, len, flags without NEXT)
                let mut readable = Vec::new();
                let bytes = self.payload_bytes(&g.payload, g.tail);
                if !bytes.is_empty() {
                    let at = match g.at {
                        Some(a) => self.lay.addr(a),
                        None => {
                            self.next_data += 1;
                            self.lay.slot(self.next_data)
                        }
                    };
                    guest_write(&self.lay, &self.mem, at, &bytes);
                    let mut bounds: Vec<u64> = g
                        .cuts
                        .iter()
                        .take(MAX_CUTS)
                        .map(|&c| u64::from(c) % (bytes.len() as u64 + 1))
                        .collect();
                    bounds.sort_unstable();
                    bounds.dedup();
                    bounds.insert(0, 0);
                    bounds.push(bytes.len() as u64);
                    for w in bounds.windows(2) {
                        readable.push((at.wrapping_add(w[0]), (w[1] - w[0]) as u32, 0u16));
                    }
                }
                let writable = g
                    .writable
                    .iter()
                    .take(MAX_WRITABLE)
                    .map(|&(a, l)| (self.lay.addr(a), len_of(l), F_WRITE));
                let mut parts: Vec<(u64, u32, u16)> = Vec::new();
                if g.writable_first {
                    parts.extend(writable);
                    parts.extend(readable);
                } else {
                    parts.extend(readable);
                    parts.extend(writable);
                }
                let start = next_desc % size;
                let indirect = g.indirect.map(|slot| self.lay.table_slot(u64::from(slot)));
                let next = write_chain(parts, size, start, indirect, |t, i, d| {
                    self.write_desc(q, t, i, d)
                });
                if let Some(r) = &mut self.rings[q] {
                    r.set_next_desc(next);
                }
                start
            }
            Element::Raw {
                head,
                writes,
                tables,
                bytes,
            } => {
                write_raw(&self.lay, &self.mem, size, writes, tables, |t, i, d| {
                    self.write_desc(q, t, i, d)
                });
                for (a, b) in bytes.iter().take(MAX_RAW_BYTES) {
                    guest_write(&self.lay, &self.mem, self.lay.addr(*a), b);
                }
                raw_head(*head, size)
            }
        };
        if let Some(r) = &mut self.rings[q] {
            r.publish(&self.mem, head);
        }
    }

    // -----------------------------------------------------------------------------------
    // Processing, with the discard model.

    /// Reads what `process_queue(q)` is going to pop, as the device will.
    fn batch(&self, q: usize) -> Option<Batch> {
        let dev = self.dev();
        if !dev.is_activated() || dev.is_paused() {
            return None;
        }
        let queue = dev.queue(q)?;
        if !queue.ready() || queue.avail_ring() == 0 {
            return None;
        }
        let size = queue.size();
        let used_range = (queue.used_ring(), 6 + 8 * u64::from(size));
        let mut reads = vec![(queue.avail_ring() + 2, 2)];
        let avail_idx = load_u16(&self.mem, queue.avail_ring() + 2)?;
        let next = Wrapping(queue.next_avail());
        let n = (Wrapping(avail_idx) - next).0;
        if n > size {
            return None;
        }
        let budget = usize::from(self.cfg.chains_per_wakeup);
        let mut b = Batch {
            size,
            used_ring: queue.used_ring(),
            next_used: Wrapping(queue.next_used()),
            ..Batch::default()
        };
        for k in 0..n {
            let pos = next + Wrapping(k);
            let slot = queue.avail_ring() + 4 + 2 * u64::from(pos.0 % size);
            reads.push((slot, 2));
            // The device stops at an unreadable head.
            let Some(head) = load_u16(&self.mem, slot) else {
                break;
            };
            if usize::from(k) < budget {
                b.heads.push(head);
            }
            // Stops after a queue size and one (enough to tell a chain longer than the queue);
            // `reads` gets the guest address of every table entry read.
            let descs = walk(
                queue.desc_table(),
                size,
                head,
                usize::from(size) + 1,
                |at| {
                    reads.push((at, 16));
                    read_desc(&self.mem, at)
                },
            );
            if !chain_ok(&descs, size) {
                continue;
            }
            let (pfns, complete) = pfns_of(&self.mem, &descs, &mut reads);
            b.pfns.extend(pfns.iter().map(|&p| u64::from(p)));
            if usize::from(k) < budget {
                if q == STATS {
                    b.stats.push(stats_of(&self.mem, &descs, &mut reads));
                }
                b.popped.push((descs.clone(), complete.then_some(pfns)));
            }
            b.candidates.push(descs);
        }
        b.uncertain = reads.iter().any(|&r| overlaps(r, used_range));
        Some(b)
    }

    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.backend.calls.lock().unwrap())
    }

    fn take_hints(&self) -> Vec<Hint> {
        self.sink.take()
    }

    /// Checks what any backend call must satisfy.
    fn check_call(&self, c: &Call) {
        let page = self.backend.page;
        assert!(c.len > 0, "empty backend call {c:x?}");
        let Some(i) = self.lay.containing(c.gpa, c.len) else {
            panic!(
                "backend call {c:x?} is not inside one RAM region of {:x?}",
                self.lay.regions
            );
        };
        let (start, len) = self.lay.regions[i];
        let host = self.mem.get_host_address(GuestAddress(c.gpa)).unwrap() as u64;
        assert_eq!(c.host, host, "host address of {c:x?}");
        assert_eq!(c.region_offset, c.gpa - start, "region offset of {c:x?}");
        assert!(!c.file_backed, "file offset of {c:x?}");
        let region_host = self.mem.get_host_address(GuestAddress(start)).unwrap() as u64;
        if c.discard {
            assert_eq!(c.host % page, 0, "discard {c:x?} starts inside a host page");
            assert_eq!(c.len % page, 0, "discard {c:x?} ends inside a host page");
            if region_host.is_multiple_of(page) {
                assert_eq!(
                    c.region_offset % page,
                    0,
                    "discard {c:x?} is not host page aligned in its region"
                );
            }
        } else {
            let end = u128::from(c.gpa) + u128::from(c.len);
            assert!(
                c.host.is_multiple_of(page) || c.gpa == start,
                "populate {c:x?} starts inside a host page and not at its region's start"
            );
            assert!(
                (c.host + c.len).is_multiple_of(page) || end == u128::from(start) + u128::from(len),
                "populate {c:x?} ends inside a host page and not at its region's end"
            );
        }
    }

    /// Every 4 KiB page `c` touches is in `allowed`.
    fn check_given_up(&self, c: &Call, allowed: &HashSet<u64>, what: &str) {
        let first = c.gpa >> 12;
        let last = (c.gpa + c.len - 1) >> 12;
        for p in first..=last {
            assert!(
                allowed.contains(&p),
                "{what} discard {c:x?} touches page {p:#x}, which the driver did not give up"
            );
        }
    }

    /// Checks the backend calls made since the last check, all from `source`.
    fn check_calls(&mut self, source: Source, batch: Option<&Batch>) {
        let calls = self.take_calls();
        if calls.is_empty() {
            return;
        }
        for c in &calls {
            self.check_call(c);
        }
        let discards = calls.iter().filter(|c| c.discard);
        let populates = calls.iter().filter(|c| !c.discard);
        if self.model.inhibited {
            assert!(
                calls.iter().all(|c| !c.discard),
                "discard while discards are inhibited: {calls:x?}"
            );
        }
        match source {
            Source::None => panic!("backend calls where none may happen: {calls:x?}"),
            Source::Reporting => {
                assert!(
                    populates.count() == 0,
                    "populate while handling reports: {calls:x?}"
                );
                assert_eq!(
                    self.model.poison, 0,
                    "reporting discard while poison_val is set: {calls:x?}"
                );
                let b = batch.expect("a batch");
                if !b.uncertain {
                    for c in discards {
                        assert!(
                            b.candidates.iter().flatten().any(|d| writable(d)
                                && c.gpa >= d.addr
                                && u128::from(c.gpa) + u128::from(c.len)
                                    <= u128::from(d.addr) + u128::from(d.len)),
                            "reporting discard {c:x?} outside every writable descriptor of the elements {:x?}",
                            b.candidates
                        );
                    }
                }
            }
            Source::Inflate => {
                assert!(populates.count() == 0, "populate on inflate: {calls:x?}");
                let b = batch.expect("a batch");
                if !b.uncertain && !self.model.unknown {
                    let mth = self.has_feature(f::VIRTIO_BALLOON_F_MUST_TELL_HOST);
                    let allowed: HashSet<u64> = if mth {
                        self.model.given_up.union(&b.pfns).copied().collect()
                    } else {
                        b.pfns.clone()
                    };
                    for c in discards {
                        self.check_given_up(c, &allowed, "inflate");
                    }
                }
            }
            Source::Deflate => {
                let b = batch.expect("a batch");
                if !self.model.unknown {
                    for c in discards {
                        self.check_given_up(c, &self.model.given_up, "pending");
                    }
                }
                if !b.uncertain {
                    for c in populates {
                        let (first, last) = (c.gpa >> 12, (c.gpa + c.len - 1) >> 12);
                        assert!(
                            (first..=last).any(|p| b.pfns.contains(&p)),
                            "populate {c:x?} touches no deflated page"
                        );
                    }
                }
            }
            Source::Other => {
                assert!(
                    populates.count() == 0,
                    "populate outside deflate: {calls:x?}"
                );
                if !self.model.unknown {
                    for c in discards {
                        self.check_given_up(c, &self.model.given_up, "pending");
                    }
                }
            }
        }
    }

    /// Serves queue `q` once and checks what it did; returns the hints delivered.
    fn process(&mut self, q: usize) -> Vec<Hint> {
        let role = self.dev().queue_layout().role(q);
        let batch = match role {
            Some(
                QueueRole::Inflate | QueueRole::Deflate | QueueRole::Reporting | QueueRole::Stats,
            ) => self.batch(q),
            _ => None,
        };
        let state_before = self.dev().hint_control().status().state;
        self.dev_mut().process_queue(q);
        let source = match (role, &batch) {
            (Some(QueueRole::Inflate), Some(_)) => Source::Inflate,
            (Some(QueueRole::Deflate), Some(_)) => Source::Deflate,
            (Some(QueueRole::Reporting), Some(_)) => Source::Reporting,
            _ => Source::None,
        };
        self.check_calls(source, batch.as_ref());
        let hints = self.take_hints();
        if !hints.is_empty() {
            assert_eq!(role, Some(QueueRole::FreePage), "hints from queue {q}");
            let st = self.dev().hint_control().status();
            assert!(
                matches!(state_before, HintState::Requested | HintState::Start),
                "hints {hints:x?} in state {state_before:?}"
            );
            for h in &hints {
                assert_eq!(h.cmd_id, st.cmd_id, "hint {h:x?} under a stale id");
            }
        }
        let Some(b) = batch else { return hints };
        if role == Some(QueueRole::Stats) && !b.uncertain {
            self.check_stats(&b);
        }
        if role != Some(QueueRole::Stats) && !b.uncertain {
            self.check_used(q, &b);
        }
        // Follow what the driver gave up.
        match role {
            Some(QueueRole::Inflate) => {
                if self.has_feature(f::VIRTIO_BALLOON_F_MUST_TELL_HOST) {
                    self.model.given_up.extend(b.pfns.iter().copied());
                    self.model.unknown |= b.uncertain;
                } else {
                    // Everything inflated was discarded (or dropped) before the ack.
                    self.model.given_up.clear();
                    self.model.unknown = false;
                }
            }
            Some(QueueRole::Deflate) if !b.uncertain => {
                for (_, pfns) in &b.popped {
                    for p in pfns.iter().flatten() {
                        self.model.given_up.remove(&u64::from(*p));
                    }
                }
            }
            _ => {}
        }
        hints
    }

    /// Every popped chain with a valid head got one used entry, in order, with length 0.
    fn check_used(&self, q: usize, b: &Batch) {
        let queue = self.dev().queue(q).expect("queue");
        let heads: Vec<u16> = b.heads.iter().copied().filter(|&h| h < b.size).collect();
        let next_used = Wrapping(queue.next_used());
        assert_eq!(
            (next_used - b.next_used).0 as usize,
            heads.len(),
            "queue {q}: used entries for the popped heads {:?}",
            b.heads
        );
        for (i, &head) in heads.iter().enumerate() {
            let pos = (b.next_used + Wrapping(i as u16)).0 % b.size;
            let e = b.used_ring + 4 + 8 * u64::from(pos);
            assert_eq!(
                read_u32(&self.mem, e),
                Some(u32::from(head)),
                "queue {q}: used id"
            );
            assert_eq!(
                read_u32(&self.mem, e + 4),
                Some(0),
                "queue {q}: used length"
            );
        }
        if !heads.is_empty() {
            assert_eq!(
                load_u16(&self.mem, b.used_ring + 2),
                Some(next_used.0),
                "queue {q}: used index in guest memory"
            );
        }
    }

    /// The latest statistics are those of the last buffer the device could parse.
    fn check_stats(&mut self, b: &Batch) {
        let Some(entries) = b.stats.iter().rev().flatten().next() else {
            return;
        };
        self.model.events |= BalloonEvents::STATS_UPDATED;
        let report = self
            .dev()
            .latest_stats()
            .expect("statistics after a buffer");
        assert_eq!(report.entries as usize, entries.len(), "statistics entries");
        let unknown = entries.iter().filter(|e| e.0 >= KNOWN_TAGS).count();
        assert_eq!(
            report.unknown_tags as usize, unknown,
            "unknown statistics tags"
        );
        for tag in 0..KNOWN_TAGS + 2 {
            let want = entries
                .iter()
                .rev()
                .find(|e| e.0 == tag && tag < KNOWN_TAGS)
                .map(|e| e.1);
            assert_eq!(report.stats.get(tag), want, "statistic {tag}");
        }
    }

    // -----------------------------------------------------------------------------------
    // Snapshot and restore.

    fn save_restore(&mut self, pause: bool, corrupt: &[Corruption]) {
        if pause {
            self.dev_mut().pause();
            self.check_calls(Source::Other, None);
        }
        let mut state = self.dev_mut().save_state();
        self.check_calls(Source::Other, None);
        let mut mmio_state = self.t.save_state();
        let intact = corrupt.is_empty();
        for c in corrupt.iter().take(4) {
            corrupt_state(&mut state, &mut mmio_state.status, *c);
        }
        let old = self.dev().hint_control().status();
        let activated = self.dev().is_activated();
        let restored = Balloon::restore(
            self.cfg,
            self.mem.clone(),
            self.sink.clone(),
            self.backend.clone(),
            &state,
        );
        let dev = match restored {
            Ok(dev) => dev,
            Err(e) => {
                assert!(!intact, "restoring an intact snapshot failed: {e}");
                return;
            }
        };
        assert!(self.take_calls().is_empty(), "backend calls on restore");
        self.t = MmioTransport::restore(dev, mmio_state);
        let m = &mut self.model;
        m.num_pages = state.num_pages;
        m.actual = state.actual;
        m.poison = if state.acked_features & f::bit(f::VIRTIO_BALLOON_F_PAGE_POISON) != 0 {
            state.poison_val
        } else {
            0
        };
        m.inhibited = state.discards_inhibited;
        if intact {
            let dev = self.t.device();
            assert_eq!(dev.is_activated(), activated, "restored activation");
            // The transport drops a status that disagrees with the device (possible after an
            // earlier corrupted restore).
            let driver_ok = mmio_state.status
                & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8
                != 0;
            let want = if driver_ok == activated {
                mmio_state.status
            } else {
                0
            };
            assert_eq!(self.t.status(), want, "restored status");
            let st = dev.hint_control().status();
            assert_eq!(st.cmd_id, old.cmd_id, "restored hint id");
            let negotiated =
                activated && state.acked_features & f::bit(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT) != 0;
            let want = if negotiated {
                HintState::Done
            } else {
                HintState::Stop
            };
            assert_eq!(st.state, want, "restored hint state");
        }
    }

    // -----------------------------------------------------------------------------------
    // Checks after every operation.

    fn check_state(&mut self) {
        self.check_calls(Source::Other, None);
        assert!(
            self.take_hints().is_empty(),
            "hints outside free page queue processing"
        );
        let dev = self.dev();
        assert_eq!(dev.num_pages(), self.model.num_pages, "num_pages");
        assert_eq!(dev.actual(), self.model.actual, "actual");
        assert_eq!(dev.poison_val(), self.model.poison, "poison_val");
        assert_eq!(dev.discards_inhibited(), self.model.inhibited, "inhibited");
        assert_eq!(dev.host_page_size(), self.backend.page, "host page size");
        let mut b = [0u8; CONFIG_LEN as usize + 8];
        self.t.read(reg::CONFIG, &mut b);
        assert_eq!(
            b[..CONFIG_LEN as usize],
            self.expected_config(),
            "configuration space"
        );
        assert!(
            b[CONFIG_LEN as usize..].iter().all(|&x| x == 0xff),
            "bytes past the configuration space: {b:x?}"
        );
        let want = self.model.events;
        let got = self.dev_mut().take_events();
        assert!(
            got.contains(want),
            "events {got:?}, expected at least {want:?}"
        );
        self.model.events = BalloonEvents::empty();
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::MmioWrite { reg, value, width } => {
                let offset = reg_offset(*reg);
                let w = width_of(*width);
                let b = u64::from(*value).wrapping_mul(0x1_0000_0001).to_le_bytes();
                self.mmio_write(offset, &b[..w]);
            }
            Op::MmioRead { reg, width } => self.mmio_read(reg_offset(*reg), width_of(*width)),
            Op::ConfigWrite {
                offset,
                raw,
                data,
                len,
            } => {
                let n = usize::from(*len) % 9;
                let off = raw.map_or(u64::from(*offset) % 24, config_raw);
                self.config_write(off, &data[..n]);
            }
            Op::ConfigRead { offset, raw, len } => {
                let off = raw.map_or(u64::from(*offset), config_raw);
                self.mmio_read(reg::CONFIG + off, 1 + usize::from(*len) % 8)
            }
            Op::Post { queue, element } => self.post(usize::from(*queue) % QUEUES, element),
            Op::Process(q) => {
                self.process(usize::from(*q) % (QUEUES + 2));
            }
            Op::PostProcess { queue, element } => {
                let q = usize::from(*queue) % QUEUES;
                self.post(q, element);
                self.process(q);
            }
            Op::AvailIdx { queue, idx } => {
                let q = usize::from(*queue) % QUEUES;
                let Some(ring) = &mut self.rings[q] else {
                    return;
                };
                let Some(used) = ring.used_idx(&self.mem) else {
                    return;
                };
                let idx = if idx & 1 == 1 {
                    *idx
                } else {
                    used.wrapping_add(idx % (ring.size() + 1))
                };
                ring.set_avail_idx(&self.mem, idx);
            }
            Op::SetTarget(p) => self.set_target(*p, |d| d.set_target(*p)),
            Op::SetTargetBytes(b) => {
                let pages = u32::try_from(b >> 12).unwrap_or(u32::MAX);
                self.set_target(pages, |d| d.set_target_bytes(*b));
            }
            Op::Actual(a) => self.config_write(4, &a.to_le_bytes()),
            Op::RequestStats => {
                // The device's used position, not the guest's copy: the driver may have put
                // other things over its used ring.
                let dev = self.dev();
                let running = dev.is_activated() && !dev.is_paused();
                let used = dev
                    .queue(STATS)
                    .map(|q| (q.used_ring(), q.size(), q.next_used()));
                let given = self.dev_mut().request_stats();
                let after = self.dev().queue(STATS).map(|q| q.next_used());
                if given {
                    assert!(running, "statistics requested from a stopped device");
                    let (u, size, before) = used.unwrap();
                    let want = before.wrapping_add(1);
                    assert_eq!(after, Some(want), "used position after request_stats");
                    assert_eq!(load_u16(&self.mem, u + 2), Some(want), "used index");
                    let e = u + 4 + 8 * u64::from(before % size);
                    assert_eq!(read_u32(&self.mem, e + 4), Some(0), "used length");
                } else {
                    assert_eq!(
                        after,
                        used.map(|u| u.2),
                        "used position after a refused request_stats"
                    );
                }
            }
            Op::StatsInterval(long) => {
                let d = if *long {
                    Duration::from_secs(3600)
                } else {
                    Duration::ZERO
                };
                self.dev_mut().set_stats_interval(d).unwrap();
                assert_eq!(self.dev().stats_interval(), d);
            }
            Op::Inhibit(on) => {
                let was = self.model.inhibited;
                self.dev_mut().set_discards_inhibited(*on);
                self.model.inhibited = *on;
                assert!(
                    self.take_calls().is_empty(),
                    "backend calls when discards were {} (inhibited before: {was})",
                    if *on { "inhibited" } else { "allowed" }
                );
            }
            Op::Flush => self.dev_mut().flush_discards(),
            Op::Pause => self.dev_mut().pause(),
            Op::Resume => self.dev_mut().resume(),
            Op::Reset => self.reset(),
            Op::Setup(spec) => self.setup(spec),
            Op::ResetSetup(spec) => {
                self.reset();
                self.setup(spec);
            }
            Op::SaveRestore { pause, corrupt } => self.save_restore(*pause, corrupt),
            Op::StartRound => {
                let before = self.dev().hint_control().status().cmd_id;
                let id = self.dev().hint_control().start_round();
                assert_eq!(id, next_cmd_id(before), "start_round id");
            }
            Op::StopRound => self.dev().hint_control().stop_round(),
            Op::Done => self.dev().hint_control().done(),
            Op::LinuxRound { hints, stop } => {
                let mut chains = vec![simple(Payload::Cmd(CmdChoice::Current), Vec::new())];
                for h in hints.iter().take(MAX_ROUND_ELEMENTS) {
                    chains.push(simple(Payload::None, h.clone()));
                }
                if *stop {
                    chains.push(simple(Payload::Cmd(CmdChoice::Stop), Vec::new()));
                }
                for chain in &chains {
                    self.post(FPQ, chain);
                    self.process(FPQ);
                }
            }
            Op::GuestWrite { at, bytes } => {
                let n = bytes.len().min(MAX_GUEST_WRITE);
                guest_write(&self.lay, &self.mem, self.lay.addr(*at), &bytes[..n]);
            }
        }
    }

    fn set_target(&mut self, pages: u32, f: impl FnOnce(&mut Balloon<Mem>)) {
        f(self.dev_mut());
        self.model.num_pages = pages;
        if self.dev().is_activated() && self.model.actual == pages {
            self.model.events |= BalloonEvents::TARGET_REACHED;
        }
    }

    // -----------------------------------------------------------------------------------
    // The end: a clean driver must still get its work done.

    fn final_check(&mut self) {
        self.reset();
        self.check_state();
        let spec = SetupSpec {
            features: OFFERED,
            sizes: [0; QUEUES],
            skip: 0,
            poison: None,
            actual: None,
            prepost: Vec::new(),
            place: Vec::new(),
        };
        self.setup(&spec);
        assert!(self.dev().is_activated(), "clean bring-up");
        assert!(!self.dev().is_paused(), "paused after a reset");
        self.check_state();

        // One inflated page is acknowledged, and discarded once flushed if it is a whole
        // host page (and a 32-bit PFN reaches it).
        let page = self.lay.ring + (RING_REGION_PAGES - 1) * PAGE;
        let pfn = ((page >> 12) as u32).to_le_bytes().to_vec();
        self.post(INFLATE, &simple(Payload::Bytes(pfn), Vec::new()));
        let inflate = self.rings[INFLATE].as_ref().expect("inflate queue set up");
        let layout = inflate.layout();
        let head = load_u16(&self.mem, layout.avail.0 + 4).unwrap();
        self.process(INFLATE);
        self.check_state();
        assert_eq!(self.used_idx(INFLATE), 1, "inflate not acknowledged");
        let e = layout.used.0 + 4;
        assert_eq!(read_u32(&self.mem, e), Some(u32::from(head)), "used id");
        assert_eq!(read_u32(&self.mem, e + 4), Some(0), "used length");
        self.run(&Op::Inhibit(false));
        self.dev_mut().flush_discards();
        let calls: Vec<(bool, u64, u64)> = self
            .backend
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.discard, c.gpa, c.len))
            .collect();
        if page >> 12 > u64::from(u32::MAX) {
            // Above 16 TiB: a 32-bit PFN cannot name the page (it named another one).
        } else if self.backend.page == PAGE {
            assert_eq!(calls, [(true, page, PAGE)], "discard of the inflated page");
        } else {
            assert_eq!(calls, [], "a 4 KiB piece of a larger host page discarded");
        }
        self.check_state();

        // A free page hint round.
        let before = self.dev().hint_control().status().cmd_id;
        let id = self.dev().hint_control().start_round();
        assert_eq!(id, next_cmd_id(before), "start_round id");
        let hint_page = self.lay.ring + (RING_REGION_PAGES - 2) * PAGE;
        self.post(FPQ, &simple(Payload::Cmd(CmdChoice::Current), Vec::new()));
        assert_eq!(self.process(FPQ), [], "hints from the start buffer");
        assert_eq!(
            self.dev().hint_control().status().state,
            HintState::Start,
            "start buffer refused"
        );
        let one = vec![(Addr::Raw(hint_page), Len::Raw(PAGE as u32))];
        self.post(FPQ, &simple(Payload::None, one));
        let want = Hint {
            cmd_id: id,
            gpa: hint_page,
            len: PAGE,
        };
        assert_eq!(self.process(FPQ), [want], "the hinted page");
        self.post(FPQ, &simple(Payload::Cmd(CmdChoice::Stop), Vec::new()));
        assert_eq!(self.process(FPQ), [], "hints from STOP");
        let st = self.dev().hint_control().status();
        assert!(st.round_complete, "round not complete: {st:?}");
        assert_eq!(st.state, HintState::Stop);
        assert_eq!(self.used_idx(FPQ), 3, "free page queue elements used");
        self.check_state();
    }
}

/// A well-formed element: the payload in one readable descriptor, then `writable`.
fn simple(payload: Payload, writable: Vec<(Addr, Len)>) -> Element {
    Element::Good(Good {
        payload,
        tail: 0,
        cuts: Vec::new(),
        writable,
        writable_first: false,
        at: None,
        indirect: None,
    })
}

fn reg_offset(r: Reg) -> u64 {
    match r {
        Reg::Known(i) => REGS[usize::from(i) % REGS.len()],
        Reg::Raw(x) => u64::from(x),
        Reg::Config(x) => reg::CONFIG + u64::from(x) % 24,
    }
}

/// A raw configuration offset, kept where the MMIO offset does not overflow.
fn config_raw(x: u64) -> u64 {
    x.min(u64::MAX - reg::CONFIG)
}

fn width_of(w: u8) -> usize {
    match w % 8 {
        5 => 1,
        6 => 2,
        7 => 8,
        _ => 4,
    }
}

fn corrupt_state(s: &mut BalloonState, mmio_status: &mut u8, c: Corruption) {
    match c {
        Corruption::Acked(x) => s.acked_features ^= x,
        Corruption::Activated => s.activated = !s.activated,
        Corruption::NumPages(x) => s.num_pages = x,
        Corruption::Actual(x) => s.actual = x,
        Corruption::Poison(x) => s.poison_val = x,
        Corruption::Queue { index, field } => {
            let n = s.queues.len();
            if n == 0 {
                return;
            }
            let q = &mut s.queues[usize::from(index) % n];
            match field {
                QueueField::MaxSize(x) => q.max_size = x,
                QueueField::Size(x) => q.size = x,
                QueueField::Ready => q.ready = !q.ready,
                QueueField::Desc(x) => q.desc_table = x,
                QueueField::Avail(x) => q.avail_ring = x,
                QueueField::Used(x) => q.used_ring = x,
                QueueField::NextAvail(x) => q.next_avail = x,
                QueueField::NextUsed(x) => q.next_used = x,
                QueueField::EventIdx => q.event_idx_enabled = !q.event_idx_enabled,
            }
        }
        Corruption::DropQueue => {
            s.queues.pop();
        }
        Corruption::CmdId(x) => s.hint_cmd_id = x,
        Corruption::HintState(x) => {
            s.hint_state = [
                HintState::Stop,
                HintState::Requested,
                HintState::Start,
                HintState::Done,
            ][usize::from(x) % 4]
        }
        Corruption::StatsHeld(x) => s.stats_held = x,
        Corruption::Inhibited => s.discards_inhibited = !s.discards_inhibited,
        Corruption::DeviceFeatures(x) => s.device_features ^= x,
        Corruption::MmioStatus(x) => *mmio_status = x,
    }
}

fn build(input: &Input) -> Harness {
    let lay = Layout::new(&input.placement, &input.regions, input.ring_region, SCRATCH);
    let (arena, mem) = build_memory(&lay, &host_shifts(input, lay.regions.len()));
    let mem = Arc::new(mem);
    let sink = Arc::new(RecordingSink::new(lay.regions.clone()));
    let backend = Arc::new(RecordingBackend {
        page: input.host_page.size(),
        calls: Mutex::new(Vec::new()),
    });
    let queue_size = 1u16 << (input.queue_size_log % 5);
    let fpq_size = 2u16 << (input.fpq_size_log % 4);
    let budget = if input.budget & 0x80 != 0 {
        256
    } else {
        1 + u16::from(input.budget) % 4
    };
    let cfg = BalloonConfig::default()
        .with_must_tell_host(true)
        .with_stats(true)
        .with_deflate_on_oom(true)
        .with_free_page_hint(true)
        .with_page_poison(true)
        .with_reporting(true)
        .with_queue_size(queue_size)
        .with_free_page_queue_size(fpq_size)
        .with_reporting_queue_size(32)
        .with_chains_per_wakeup(budget)
        .with_hint_file_backed_memory(false)
        .with_stall_timeout(None);
    let balloon = Balloon::with_backend(cfg, mem.clone(), sink.clone(), backend.clone())
        .expect("valid config");
    assert_eq!(balloon.device_features(), OFFERED, "offer");
    let ql = balloon.queue_layout();
    for (q, role) in [
        (INFLATE, QueueRole::Inflate),
        (DEFLATE, QueueRole::Deflate),
        (STATS, QueueRole::Stats),
        (FPQ, QueueRole::FreePage),
        (REPORTING, QueueRole::Reporting),
    ] {
        assert_eq!(ql.index(role), Some(q), "queue layout");
    }
    let mut h = Harness {
        lay,
        mem,
        sink,
        backend,
        cfg,
        t: MmioTransport::new(balloon),
        max_sizes: [queue_size, queue_size, queue_size, fpq_size, 32],
        rings: Default::default(),
        next_data: 0,
        model: Model::default(),
        _arena: arena,
    };
    h.check_state();
    h
}

/// Runs one input, checking the device after every operation and at the end. Returns the
/// device's metrics as they were after the input's operations (before the final check).
pub fn run(input: &Input) -> BalloonMetrics {
    let mut h = build(input);
    if let Some(spec) = &input.setup {
        h.setup(spec);
        h.check_state();
    }
    for op in input.ops.iter().take(MAX_OPS) {
        h.run(op);
        h.check_state();
    }
    let metrics = h.dev().metrics();
    h.final_check();
    metrics
}
