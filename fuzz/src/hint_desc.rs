// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzzes free page hint elements end to end, through the real device.
//!
//! * Guest memory: 1 to 4 small regions (at most 256 pages each) with holes, partial last
//!   pages and unaligned starts, placed low, anywhere, or right below the top of the address
//!   space. One of them holds the split ring of the free page queue and a scratch area for
//!   command buffers and indirect tables.
//! * The device: a `Balloon` with `chains_per_wakeup: 1` behind `MmioTransport`, set up by
//!   MMIO register writes the way a driver does it (ACKNOWLEDGE, DRIVER, features with
//!   VERSION_1 and FREE_PAGE_HINT, FEATURES_OK, queue registers, DRIVER_OK), with a sink
//!   that records every hint.
//! * The guest: well-formed elements (a command buffer, possibly split, short, long or
//!   outside RAM, and hint descriptors, directly or through an indirect table) and raw ones
//!   (any descriptor table contents, flags and next indices: loops, out-of-range indices,
//!   nested or misaligned indirect tables, heads past the table).
//! * The migration thread: `start_round`, `stop_round`, `done`, device reset and re-setup
//!   (optionally posting buffers before DRIVER_OK), pause and resume, interleaved with the
//!   guest's elements, each processed by `process_queue` one at a time.
//!
//! A reference model walks each element's descriptors the way virtio-queue does (from guest
//! memory, byte by byte, following indirect tables) and keeps its own copy of the hint state
//! machine (with the position fence on start buffers). After every operation:
//!
//! * every range given to the sink is non-empty, 4 KiB aligned, inside one RAM region,
//!   inside a device-writable descriptor of the element just processed, tagged with the
//!   current id, and only from an element accepted in START; the ranges are exactly the
//!   whole pages of RAM each writable descriptor covers;
//! * an element is well formed only if it has at most a queue size of descriptors (even
//!   through an indirect table), readable ones (none, or at least 4 bytes) first, and ends
//!   with a descriptor without NEXT;
//! * the state, the id, `round_complete`, the id shown in configuration space and the
//!   per-element counters equal the model's;
//! * the used ring got exactly one entry (the head, used length 0) per popped element whose
//!   head is a valid index.
//!
//! Half of the `AvailIdx` operations (odd values) publish the raw index, even one more than a
//! queue size ahead of the device: the device must neither hang nor panic on it.

use crate::input::hint_desc::*;
use std::num::Wrapping;
use std::sync::Arc;

use crate::desc::{
    desc_from_bytes, raw_head, walk, write_chain, write_raw, Desc, Table, F_NEXT, F_WRITE,
};
use crate::hint::{next_cmd_id, CmdChoice, Hint, RecordingSink};
use crate::layout::{
    align_down, align_up, guest_write, len_of, Layout, Scratch, PAGE, RING_REGION_PAGES,
};
use crate::ring::{write_table_desc, DriverRing};
use guest_model::mmio::reg;
use guest_model::ring::{GuestMem, RingLayout};
use virtio_balloon::defs::features as f;
use virtio_balloon::transport::MmioTransport;
use virtio_balloon::{Balloon, BalloonConfig, HintMetrics, HintState, QueueRole};
use vm_memory::{Bytes, GuestAddress};

// The ring region (at least `RING_REGION_PAGES`): descriptor table, available ring, used
// ring, then scratch pages.
const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
/// The first byte the guest model may write with raw addresses.
const SCRATCH_OFF: u64 = 0x3000;
const SCRATCH_LEN: u64 = (RING_REGION_PAGES - 3) * PAGE;
/// Command slots (8 bytes each) in the first scratch page.
const CMD_OFF: u64 = 0x3000;
const CMD_SLOTS: u64 = 64;
/// Indirect table slots (16 entries each) from the second scratch page.
const TABLE_OFF: u64 = 0x4000;
const TABLE_SLOTS: u64 = 32;
/// The scratch area as `Layout` sees it (`Addr::Slot` is a command slot).
const SCRATCH: Scratch = Scratch {
    off: SCRATCH_OFF,
    len: SCRATCH_LEN,
    slot_off: CMD_OFF,
    slot_size: 8,
    slots: CMD_SLOTS,
    table_off: TABLE_OFF,
    table_slots: TABLE_SLOTS,
};

const MAX_OPS: usize = 64;
const MAX_HINTS: usize = 8;
const MAX_RAW_CMDS: usize = 4;
const MAX_PREPOST: usize = 4;
const MAX_ROUND_ELEMENTS: usize = 4;

// ---------------------------------------------------------------------------------------
// Input.

// ---------------------------------------------------------------------------------------
// Guest memory reads for the guest model and the reference walker (byte by byte, so a
// read crossing into an adjacent region works and one crossing a hole fails, independently
// of vm-memory's multi-region helpers). The walker is the library's `walk` over
// `read_desc`; the guest model writes with the library's `guest_write`.

fn read_bytes(mem: &GuestMem, addr: u64, buf: &mut [u8]) -> bool {
    for (i, b) in buf.iter_mut().enumerate() {
        let Some(a) = addr.checked_add(i as u64) else {
            return false;
        };
        match mem.read_obj::<u8>(GuestAddress(a)) {
            Ok(v) => *b = v,
            Err(_) => return false,
        }
    }
    true
}

fn read_u16(mem: &GuestMem, addr: u64) -> u16 {
    let mut b = [0u8; 2];
    assert!(read_bytes(mem, addr, &mut b), "ring read at {addr:#x}");
    u16::from_le_bytes(b)
}

fn read_u32(mem: &GuestMem, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(read_bytes(mem, addr, &mut b), "ring read at {addr:#x}");
    u32::from_le_bytes(b)
}

/// The descriptor at `addr`, read byte by byte.
fn read_desc(mem: &GuestMem, addr: u64) -> Option<Desc> {
    let mut b = [0u8; 16];
    if !read_bytes(mem, addr, &mut b) {
        return None;
    }
    Some(desc_from_bytes(b))
}

// ---------------------------------------------------------------------------------------
// The reference walker: what a split-ring chain yields (virtio-queue's rules), and whether
// it is a well-formed free page element.

/// A well-formed element: at most as many descriptors as the queue has entries, readable
/// descriptors (at least 4 bytes, or none) before writable ones, and a last descriptor
/// without NEXT.
#[derive(Debug)]
struct Element {
    command: Option<u32>,
    writable: Vec<Desc>,
}

fn inspect(mem: &GuestMem, descs: &[Desc], queue_size: u16) -> Option<Element> {
    if descs.len() > usize::from(queue_size) {
        return None;
    }
    let last = descs.last()?;
    let mut cmd = [0u8; 4];
    let mut have = 0usize;
    let mut readable = 0u64;
    let mut writable = Vec::new();
    for d in descs {
        if d.flags & F_WRITE != 0 {
            writable.push(*d);
            continue;
        }
        if !writable.is_empty() {
            return None;
        }
        readable += u64::from(d.len);
        let take = (d.len as usize).min(4 - have);
        if take > 0 {
            if !read_bytes(mem, d.addr, &mut cmd[have..have + take]) {
                return None;
            }
            have += take;
        }
    }
    if last.flags & F_NEXT != 0 {
        return None;
    }
    let command = match readable {
        0 => None,
        1..=3 => return None,
        _ => Some(u32::from_le_bytes(cmd)),
    };
    Some(Element { command, writable })
}

/// The whole pages of RAM `[addr, addr + len)` covers, one piece per region.
fn pieces(lay: &Layout, addr: u64, len: u64) -> Vec<(u64, u64)> {
    let Some(end) = addr.checked_add(len) else {
        return Vec::new();
    };
    let (Some(s), e) = (align_up(addr), align_down(end)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for &(rs, rl) in &lay.regions {
        let Some(ps) = align_up(rs) else { continue };
        let (ps, pe) = (ps.max(s), align_down(rs + rl).min(e));
        if ps < pe {
            out.push((ps, pe - ps));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The reference model of the device.

/// What the per-element counters should have moved by.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    elements: u64,
    malformed_elements: u64,
    rounds_started: u64,
    rounds_stopped_by_guest: u64,
    stale_commands: u64,
    ignored_commands: u64,
    hints_accepted: u64,
    bytes_accepted: u64,
    hints_wrong_state: u64,
    hints_zero_length: u64,
    hints_overflow: u64,
    hints_misaligned: u64,
    hints_outside_ram: u64,
}

impl Counters {
    fn of(m: &HintMetrics) -> Self {
        Counters {
            elements: m.elements,
            malformed_elements: m.malformed_elements,
            rounds_started: m.rounds_started,
            rounds_stopped_by_guest: m.rounds_stopped_by_guest,
            stale_commands: m.stale_commands,
            ignored_commands: m.ignored_commands,
            hints_accepted: m.hints_accepted,
            bytes_accepted: m.bytes_accepted,
            hints_wrong_state: m.hints_wrong_state,
            hints_zero_length: m.hints_zero_length,
            hints_overflow: m.hints_overflow,
            hints_misaligned: m.hints_misaligned,
            hints_outside_ram: m.hints_outside_ram,
        }
    }

    fn delta(&self, before: &Self) -> Self {
        Counters {
            elements: self.elements - before.elements,
            malformed_elements: self.malformed_elements - before.malformed_elements,
            rounds_started: self.rounds_started - before.rounds_started,
            rounds_stopped_by_guest: self.rounds_stopped_by_guest - before.rounds_stopped_by_guest,
            stale_commands: self.stale_commands - before.stale_commands,
            ignored_commands: self.ignored_commands - before.ignored_commands,
            hints_accepted: self.hints_accepted - before.hints_accepted,
            bytes_accepted: self.bytes_accepted - before.bytes_accepted,
            hints_wrong_state: self.hints_wrong_state - before.hints_wrong_state,
            hints_zero_length: self.hints_zero_length - before.hints_zero_length,
            hints_overflow: self.hints_overflow - before.hints_overflow,
            hints_misaligned: self.hints_misaligned - before.hints_misaligned,
            hints_outside_ram: self.hints_outside_ram - before.hints_outside_ram,
        }
    }
}

struct Model {
    state: HintState,
    cmd_id: u32,
    fence: Option<Wrapping<u16>>,
    completed: Option<u32>,
    /// DRIVER_OK is set and the free page queue was handed to the device.
    active: bool,
    paused: bool,
    /// The driver's queue size.
    size: u16,
    /// The device's next available ring position.
    next_avail: Wrapping<u16>,
    /// The device's next used ring position.
    next_used: Wrapping<u16>,
    /// Heads expected in the used ring, from `checked_used` on.
    used_expected: Vec<u16>,
    checked_used: Wrapping<u16>,
}

impl Model {
    fn config_value(&self) -> u32 {
        match self.state {
            HintState::Stop => 0,
            HintState::Done => 1,
            HintState::Requested | HintState::Start => self.cmd_id,
        }
    }

    fn resolve(&self, c: CmdChoice) -> u32 {
        c.resolve(self.cmd_id)
    }
}

/// Everything about one fuzz case.
struct Harness {
    lay: Layout,
    mem: Arc<GuestMem>,
    sink: Arc<RecordingSink>,
    t: MmioTransport<Balloon<Arc<GuestMem>>>,
    fpq: usize,
    driver_features: u64,
    max_size: u16,
    /// The driver's side of the free page queue.
    ring: DriverRing,
    model: Model,
}

impl Harness {
    fn avail_addr(&self) -> u64 {
        self.lay.ring + AVAIL_OFF
    }

    fn used_addr(&self) -> u64 {
        self.lay.ring + USED_OFF
    }

    fn mmio_write(&mut self, reg: u64, v: u32) {
        self.t.write(reg, &v.to_le_bytes());
    }

    fn mmio_read(&self, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn reset(&mut self) {
        self.mmio_write(reg::STATUS, 0);
        assert_eq!(self.mmio_read(reg::STATUS), 0);
        let m = &mut self.model;
        m.state = HintState::Stop;
        m.fence = None;
        m.active = false;
        m.paused = false;
    }

    /// The driver's probe: fresh rings, features, the free page queue, DRIVER_OK.
    fn setup(&mut self, prepost: &[Chain]) {
        if self.t.status() != 0 {
            return;
        }
        // Fresh rings.
        let zeros = [0u8; 3 * PAGE as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(self.lay.ring))
            .unwrap();
        self.ring = fresh_ring(&self.mem, &self.lay, self.model.size, self.fpq);
        self.model.next_avail = Wrapping(0);
        self.model.next_used = Wrapping(0);
        self.model.checked_used = Wrapping(0);
        self.model.used_expected.clear();

        self.mmio_write(
            reg::STATUS,
            u32::from(virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8),
        );
        self.mmio_write(
            reg::STATUS,
            u32::from(
                virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8
                    | virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER as u8,
            ),
        );
        self.mmio_write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.mmio_read(reg::DEVICE_FEATURES);
        self.mmio_write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.mmio_read(reg::DEVICE_FEATURES);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        assert_eq!(
            self.driver_features & !offered,
            0,
            "features {:#x} not offered in {offered:#x}",
            self.driver_features
        );
        for page in 0..2u32 {
            self.mmio_write(reg::DRIVER_FEATURES_SEL, page);
            self.mmio_write(
                reg::DRIVER_FEATURES,
                (self.driver_features >> (32 * page)) as u32,
            );
        }
        let s = u32::from(
            virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8
                | virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER as u8
                | virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8,
        );
        self.mmio_write(reg::STATUS, s);
        assert_eq!(self.mmio_read(reg::STATUS), s, "FEATURES_OK refused");

        self.mmio_write(reg::QUEUE_SEL, self.fpq as u32);
        assert_eq!(self.mmio_read(reg::QUEUE_NUM_MAX), u32::from(self.max_size));
        self.mmio_write(reg::QUEUE_NUM, u32::from(self.model.size));
        let ring = self.lay.ring;
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, ring + DESC_OFF),
            (reg::QUEUE_AVAIL_LOW, ring + AVAIL_OFF),
            (reg::QUEUE_USED_LOW, ring + USED_OFF),
        ] {
            self.mmio_write(lo, addr as u32);
            self.mmio_write(lo + 4, (addr >> 32) as u32);
        }
        self.mmio_write(reg::QUEUE_READY, 1);
        assert_eq!(self.mmio_read(reg::QUEUE_READY), 1);

        // Buffers posted before DRIVER_OK (the device looks at them once activated).
        for chain in prepost.iter().take(MAX_PREPOST) {
            self.post(chain);
        }

        self.mmio_write(
            reg::STATUS,
            s | u32::from(virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8),
        );
        assert_eq!(
            self.mmio_read(reg::STATUS),
            s | u32::from(virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8),
            "activation failed"
        );
        let m = &mut self.model;
        m.active = true;
        if m.state == HintState::Requested {
            // The fence is taken at activation for a round requested while the driver was
            // away.
            m.fence = Some(self.ring.avail_idx());
        }
    }

    /// Writes a descriptor into the ring's table or an indirect table (both in the ring
    /// region, so in RAM).
    fn write_desc(&self, table: Table, index: u16, d: Desc) {
        let written = match table {
            Table::Ring => self.ring.write_desc(&self.mem, index, d),
            Table::At(t) => write_table_desc(&self.mem, t, index, d),
        };
        assert!(written, "descriptor outside the ring region");
    }

    /// Lays an element out and publishes it, like a driver (unless the ring is full).
    fn post(&mut self, chain: &Chain) {
        let size = self.model.size;
        if (self.ring.avail_idx() - self.model.next_avail).0 >= size {
            return;
        }
        let head = match chain {
            Chain::Good {
                start,
                cmd,
                hints,
                indirect,
                hints_first,
            } => {
                // (addr, len, flags without NEXT)
                let mut parts: Vec<(u64, u32, u16)> = Vec::new();
                let mut cmd_parts = Vec::new();
                if let Some(c) = cmd {
                    let value = self.model.resolve(c.value).to_le_bytes();
                    let slot = self.lay.slot(u64::from(c.slot));
                    let mut at = slot;
                    match c.shape {
                        CmdShape::Whole => cmd_parts.push((slot, 4)),
                        CmdShape::Split(k) => {
                            let a = 1 + u32::from(k) % 3;
                            cmd_parts.push((slot, a));
                            cmd_parts.push((slot + u64::from(a), 4 - a));
                        }
                        CmdShape::Long(x) => cmd_parts.push((slot, 4 + u32::from(x))),
                        CmdShape::Short(x) => cmd_parts.push((slot, u32::from(x) % 4)),
                        CmdShape::ZeroFirst => {
                            cmd_parts.push((slot, 0));
                            cmd_parts.push((slot, 4));
                        }
                        CmdShape::At(a) => {
                            at = self.lay.addr(a);
                            cmd_parts.push((at, 4));
                        }
                    }
                    guest_write(&self.lay, &self.mem, at, &value);
                }
                let hint_parts = hints
                    .iter()
                    .take(MAX_HINTS)
                    .map(|h| (self.lay.addr(h.addr), len_of(h.len), F_WRITE));
                let cmd_parts = cmd_parts.into_iter().map(|(a, l)| (a, l, 0));
                if *hints_first {
                    parts.extend(hint_parts);
                    parts.extend(cmd_parts);
                } else {
                    parts.extend(cmd_parts);
                    parts.extend(hint_parts);
                }
                let start = *start % size;
                let indirect = indirect.map(|slot| self.lay.table_slot(u64::from(slot)));
                write_chain(parts, size, start, indirect, |t, i, d| {
                    self.write_desc(t, i, d)
                });
                start
            }
            Chain::Raw {
                head,
                writes,
                tables,
                cmds,
            } => {
                write_raw(&self.lay, &self.mem, size, writes, tables, |t, i, d| {
                    self.write_desc(t, i, d)
                });
                for (a, c) in cmds.iter().take(MAX_RAW_CMDS) {
                    let v = self.model.resolve(*c).to_le_bytes();
                    guest_write(&self.lay, &self.mem, self.lay.addr(*a), &v);
                }
                raw_head(*head, size)
            }
        };
        self.ring.publish(&self.mem, head);
    }

    /// How many elements the device may pop (the guest model keeps this within a queue
    /// size except after a raw `AvailIdx`).
    fn outstanding(&self) -> u16 {
        (self.ring.avail_idx() - self.model.next_avail).0
    }

    /// The model pops one element: returns the hints it expects and the walked descriptors.
    fn model_pop(&mut self, counters: &mut Counters) -> (Vec<Hint>, Vec<Desc>) {
        let size = self.model.size;
        let pos = self.model.next_avail;
        let head = read_u16(
            &self.mem,
            self.avail_addr() + 4 + 2 * u64::from(pos.0 % size),
        );
        self.model.next_avail += 1;
        if head < size {
            self.model.used_expected.push(head);
            self.model.next_used += 1;
        }
        counters.elements += 1;
        let mem = &self.mem;
        let descs = walk(self.lay.ring + DESC_OFF, size, head, usize::MAX, |at| {
            read_desc(mem, at)
        });
        let mut expected = Vec::new();
        let Some(el) = inspect(&self.mem, &descs, size) else {
            counters.malformed_elements += 1;
            return (expected, descs);
        };
        let m = &mut self.model;
        if let Some(cmd) = el.command {
            match m.state {
                HintState::Requested => {
                    let fresh = m.fence.is_none_or(|f| (pos - f).0 < 0x8000);
                    if cmd == m.cmd_id && fresh {
                        m.state = HintState::Start;
                        counters.rounds_started += 1;
                    } else {
                        counters.stale_commands += 1;
                    }
                }
                HintState::Start => {
                    m.state = HintState::Stop;
                    m.completed = Some(m.cmd_id);
                    counters.rounds_stopped_by_guest += 1;
                }
                HintState::Stop | HintState::Done => counters.ignored_commands += 1,
            }
        }
        if el.writable.is_empty() {
            return (expected, descs);
        }
        if m.state != HintState::Start {
            counters.hints_wrong_state += el.writable.len() as u64;
            return (expected, descs);
        }
        for d in &el.writable {
            let len = u64::from(d.len);
            if len == 0 {
                counters.hints_zero_length += 1;
                continue;
            }
            let Some(end) = d.addr.checked_add(len) else {
                counters.hints_overflow += 1;
                continue;
            };
            let s = match align_up(d.addr) {
                Some(s) if s < align_down(end) => s,
                _ => {
                    counters.hints_misaligned += 1;
                    continue;
                }
            };
            let e = align_down(end);
            let p = pieces(&self.lay, d.addr, len);
            let accepted: u64 = p.iter().map(|&(_, l)| l).sum();
            if accepted > 0 {
                counters.hints_accepted += 1;
                counters.bytes_accepted += accepted;
            }
            if accepted < e - s {
                counters.hints_outside_ram += 1;
            }
            expected.extend(p.into_iter().map(|(gpa, len)| Hint {
                cmd_id: m.cmd_id,
                gpa,
                len,
            }));
        }
        (expected, descs)
    }

    /// `stop_round` or `done`: the state changes, then everything on the ring is consumed
    /// (in that state, so nothing is applied and nothing changes state).
    fn model_drain(&mut self, state: HintState) -> u64 {
        self.model.state = state;
        if !self.model.active || self.model.paused {
            return 0;
        }
        let n = self.outstanding();
        let size = self.model.size;
        for _ in 0..n {
            let pos = self.model.next_avail;
            let head = read_u16(
                &self.mem,
                self.avail_addr() + 4 + 2 * u64::from(pos.0 % size),
            );
            self.model.next_avail += 1;
            if head < size {
                self.model.used_expected.push(head);
                self.model.next_used += 1;
            }
        }
        u64::from(n)
    }

    fn metrics(&self) -> HintMetrics {
        self.t.device().hint_control().status().metrics
    }

    fn take_hints(&self) -> Vec<Hint> {
        self.sink.take()
    }

    fn process(&mut self) {
        let before = Counters::of(&self.metrics());
        let state_before = self.model.state;
        let mut want = Counters::default();
        let (expected, descs) = if self.model.active && !self.model.paused && self.outstanding() > 0
        {
            self.model_pop(&mut want)
        } else {
            (Vec::new(), Vec::new())
        };
        let fpq = self.fpq;
        self.t.device_mut().process_queue(fpq);
        let got = self.take_hints();
        // The safety properties, each on its own, before the exact comparison.
        let accepted_in_start = state_before == HintState::Start
            || (state_before == HintState::Requested && self.model.state == HintState::Start);
        for h in &got {
            assert!(
                accepted_in_start && self.model.state == HintState::Start,
                "hint {h:x?} from an element not accepted in START (state before {state_before:?}, descriptors {descs:x?})"
            );
            assert_eq!(h.cmd_id, self.model.cmd_id, "hint {h:x?} under a stale id");
            assert!(
                self.lay.containing(h.gpa, h.len).is_some(),
                "hint {h:x?} outside RAM"
            );
            let end = u128::from(h.gpa) + u128::from(h.len);
            assert!(
                descs.iter().any(|d| d.flags & F_WRITE != 0
                    && h.gpa >= d.addr
                    && end <= u128::from(d.addr) + u128::from(d.len)),
                "hint {h:x?} outside every writable descriptor of the element {descs:x?}"
            );
        }
        assert_eq!(
            got, expected,
            "hints differ from the whole RAM pages of the writable descriptors {descs:x?}"
        );
        let after = Counters::of(&self.metrics());
        assert_eq!(
            after.delta(&before),
            want,
            "counters of one element ({descs:x?})"
        );
    }

    fn drain_op(&mut self, state: HintState) {
        let before = self.metrics();
        let n = self.model_drain(state);
        let hc = self.t.device().hint_control();
        match state {
            HintState::Stop => hc.stop_round(),
            _ => hc.done(),
        }
        assert!(self.take_hints().is_empty(), "hints during a drain");
        let after = self.metrics();
        assert_eq!(after.elements - before.elements, n, "elements drained");
        assert_eq!(after.drained - before.drained, n, "drained counter");
    }

    /// Checks the state, the configuration space and the used ring against the model.
    fn check(&mut self) {
        let st = self.t.device().hint_control().status();
        let m = &self.model;
        assert_eq!(st.state, m.state, "state");
        assert_eq!(st.cmd_id, m.cmd_id, "cmd id");
        assert_eq!(
            st.round_complete,
            m.cmd_id != 0 && m.completed == Some(m.cmd_id),
            "round_complete"
        );
        assert_eq!(st.negotiated, m.active, "negotiated");
        let cfg = self.mmio_read(reg::CONFIG + 8);
        assert_eq!(cfg, m.config_value(), "config free_page_hint_cmd_id");
        if !m.active {
            return;
        }
        let size = m.size;
        let used_idx = read_u16(&self.mem, self.used_addr() + 2);
        assert_eq!(
            used_idx, m.next_used.0,
            "used index: one entry per popped element"
        );
        let mut pos = m.checked_used;
        for &head in &m.used_expected {
            let e = self.used_addr() + 4 + 8 * u64::from(pos.0 % size);
            assert_eq!(read_u32(&self.mem, e), u32::from(head), "used entry id");
            assert_eq!(read_u32(&self.mem, e + 4), 0, "used length");
            pos += 1;
        }
        self.model.checked_used = pos;
        self.model.used_expected.clear();
    }

    /// Runs one operation and checks the device against the model. False ends the case.
    fn run(&mut self, op: &Op) -> bool {
        match op {
            Op::Post(c) => {
                if self.model.active {
                    self.post(c)
                }
            }
            Op::Process => self.process(),
            Op::PostProcess(c) => {
                if self.model.active {
                    self.post(c);
                }
                self.process();
            }
            Op::LinuxRound {
                hints,
                indirect,
                stop,
            } => {
                let cmd = |value| {
                    Some(CmdSpec {
                        value,
                        slot: 0,
                        shape: CmdShape::Whole,
                    })
                };
                let mut chains = vec![(cmd(CmdChoice::Current), Vec::new())];
                for h in hints.iter().take(MAX_ROUND_ELEMENTS) {
                    chains.push((None, h.clone()));
                }
                if *stop {
                    chains.push((cmd(CmdChoice::Stop), Vec::new()));
                }
                for (i, (cmd, hints)) in chains.into_iter().enumerate() {
                    let chain = Chain::Good {
                        start: i as u16 * MAX_HINTS as u16,
                        cmd,
                        hints,
                        indirect: indirect.then_some(i as u8),
                        hints_first: false,
                    };
                    if self.model.active {
                        self.post(&chain);
                    }
                    self.process();
                    self.check();
                }
            }
            Op::StartRound => {
                let id = self.t.device().hint_control().start_round();
                let m = &mut self.model;
                m.cmd_id = next_cmd_id(m.cmd_id);
                assert_eq!(id, m.cmd_id, "start_round id");
                m.state = HintState::Requested;
                m.completed = None;
                m.fence = m.active.then_some(self.ring.avail_idx());
            }
            Op::StopRound => self.drain_op(HintState::Stop),
            Op::Done => self.drain_op(HintState::Done),
            Op::Reset => self.reset(),
            Op::Setup(pre) => self.setup(pre),
            Op::ResetSetup => {
                self.reset();
                self.setup(&[]);
            }
            Op::Pause => {
                self.t.device_mut().pause();
                self.model.paused = true;
            }
            Op::Resume => {
                self.t.device_mut().resume();
                self.model.paused = false;
            }
            Op::WriteCmd { slot, value } => {
                let v = self.model.resolve(*value).to_le_bytes();
                let at = self.lay.slot(u64::from(*slot));
                guest_write(&self.lay, &self.mem, at, &v);
            }
            Op::AvailIdx(x) => {
                if !self.model.active {
                    return true;
                }
                let idx = if *x & 1 == 1 {
                    *x
                } else {
                    (self.model.next_avail + Wrapping(*x % (self.model.size + 1))).0
                };
                self.ring.set_avail_idx(&self.mem, idx);
                if self.outstanding() > self.model.size {
                    // A raw index more than a queue ahead. What the device does with it is not
                    // modelled; it must not hang (libFuzzer's -timeout catches that) or panic.
                    // The case ends here.
                    let fpq = self.fpq;
                    self.t.device_mut().process_queue(fpq);
                    self.t.device().hint_control().stop_round();
                    return false;
                }
            }
        }
        self.check();
        true
    }
}

/// Fresh rings for the free page queue (their areas zeroed), in the ring region.
fn fresh_ring(mem: &GuestMem, lay: &Layout, size: u16, fpq: usize) -> DriverRing {
    let layout = RingLayout {
        size,
        desc: GuestAddress(lay.ring + DESC_OFF),
        avail: GuestAddress(lay.ring + AVAIL_OFF),
        used: GuestAddress(lay.ring + USED_OFF),
    };
    DriverRing::new(mem, fpq as u16, layout).expect("rings in the ring region")
}

fn build(input: &Input) -> Harness {
    let lay = Layout::new(&input.placement, &input.regions, input.ring_region, SCRATCH);
    let ranges: Vec<(GuestAddress, usize)> = lay
        .regions
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let mem = Arc::new(GuestMem::from_ranges(&ranges).expect("valid layout"));
    let sink = Arc::new(RecordingSink::new(lay.regions.clone()));
    let max_size = 2u16 << (input.max_size_log % 8);
    let size = (max_size >> (input.size_shift % 3)).max(1);
    let cfg = BalloonConfig::default()
        .with_chains_per_wakeup(1)
        .with_free_page_hint(true)
        .with_free_page_queue_size(max_size)
        .with_stats(input.stats)
        .with_page_poison(input.page_poison)
        .with_reporting(input.reporting);
    let balloon = Balloon::new(cfg, mem.clone(), sink.clone()).expect("valid config");
    let fpq = balloon
        .queue_layout()
        .index(QueueRole::FreePage)
        .expect("free page queue");
    let mut driver_features = f::bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
        | f::bit(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    if input.stats {
        driver_features |= f::bit(f::VIRTIO_BALLOON_F_STATS_VQ);
    }
    if input.reporting {
        driver_features |= f::bit(f::VIRTIO_BALLOON_F_REPORTING);
    }
    if input.page_poison && input.ack_poison {
        driver_features |= f::bit(f::VIRTIO_BALLOON_F_PAGE_POISON);
    }
    if input.event_idx {
        driver_features |= f::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    }
    if input.indirect_desc {
        driver_features |= f::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
    }
    let ring = fresh_ring(&mem, &lay, size, fpq);
    let mut h = Harness {
        lay,
        mem,
        sink,
        t: MmioTransport::new(balloon),
        fpq,
        driver_features,
        max_size,
        ring,
        model: Model {
            state: HintState::Stop,
            cmd_id: 0,
            fence: None,
            completed: None,
            active: false,
            paused: false,
            size,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            used_expected: Vec::new(),
            checked_used: Wrapping(0),
        },
    };
    h.setup(&[]);
    h.check();
    h
}

/// Runs one input, checking the device after every operation. Returns the free page
/// hinting metrics at the end.
pub fn run(input: &Input) -> HintMetrics {
    let mut h = build(input);
    for op in input.ops.iter().take(MAX_OPS) {
        if !h.run(op) {
            break;
        }
    }
    h.metrics()
}
