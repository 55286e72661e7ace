// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The free page hinting edge cases 1–29 and 40 of `docs/protocol.md` ("Edge cases"), one
//! test each, and the start-buffer fence ("Stale ids and the start-buffer fence").
//!
//! Every test sets the device up through the virtio-mmio registers the way a driver does
//! (status, features, queue registers, DRIVER_OK), writes its rings into guest memory by hand
//! and drives the device synchronously with `process_queue`, the method the event loop calls.
//! Nothing here depends on timing: the only threads are in the concurrency test of item 40,
//! and they are joined.
//!
//! Guest memory: three regions, two of them adjacent, with a hole before the last one.
//!
//! ```text
//! [0, 16 MiB)        R0   rings at 1 MiB, command slots at 2.5 MiB, indirect tables at
//!                         3 MiB, hint targets from 4 MiB
//! [16 MiB, 32 MiB)   R1   adjacent to R0 (a region boundary inside RAM)
//! [32 MiB, 48 MiB)        hole
//! [48 MiB, 64 MiB)   R2
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use guest_model::ring::{self, Desc, GuestMem, RingLayout, SplitRing};
use virtio_balloon::migration::{
    MigrationBitmap, MigrationState, PrecopyEvent, PrecopyNotifierChain,
};
use virtio_balloon::sink::{FreePageSink, RecordedHint, RecordingSink};
use virtio_balloon::transport::{MmioTransport, VirtioDevice};
use virtio_balloon::{
    Balloon, BalloonConfig, BalloonError, FreePageHinting, HintMetrics, HintState, QueueRole,
};
use vm_memory::{Bytes, FileOffset, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

type Mem = GuestMem;
type Dev = Balloon<Arc<Mem>>;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// RAM regions as (start, length).
const R0: (u64, u64) = (0, 16 * MIB);
const R1: (u64, u64) = (16 * MIB, 16 * MIB);
const HOLE: u64 = 32 * MIB;
const R2: (u64, u64) = (48 * MIB, 16 * MIB);
const RAM_END: u64 = 64 * MIB;

/// Queue `i` is laid out at `RING_BASE + i * RING_STRIDE`.
const RING_BASE: u64 = MIB;
const RING_STRIDE: u64 = 0x4_0000;
/// Linux's one reused start slot (`cmd_id_active`) and its separate stop slot.
const START_SLOT: u64 = 0x28_0000;
const STOP_SLOT: u64 = 0x28_0010;
/// Scratch memory for odd commands.
const SCRATCH: u64 = 0x28_1000;
/// Indirect descriptor tables.
const INDIRECT_BASE: u64 = 3 * MIB;
/// Where hint targets start (inside R0).
const HINT_BASE: u64 = 4 * MIB;

/// Descriptor flags.
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Feature bits the guest model may accept.
const F_STATS_VQ: u64 = 1 << 1;
const F_FREE_PAGE_HINT: u64 = 1 << 3;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
/// What a Linux guest accepts from the default test device.
const LINUX_FEATURES: u64 =
    F_VERSION_1 | F_STATS_VQ | F_FREE_PAGE_HINT | F_INDIRECT_DESC | F_EVENT_IDX;

/// The guest model's virtio-mmio definitions, written independently of the crate's constants.
use guest_model::bring_up;
use guest_model::mmio as guest_mmio;

/// virtio-mmio registers (virtio 1.x, 4.2.2).
mod reg {
    pub use super::guest_mmio::reg::*;

    /// `free_page_hint_cmd_id` in the configuration space.
    pub const CMD_ID: u64 = CONFIG + super::guest_mmio::config::FREE_PAGE_HINT_CMD_ID;
}

/// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 64;
/// Interrupt status: configuration change.
const ISR_CONFIG: u32 = 2;

/// Reserved command ids.
const CMD_STOP: u32 = 0;
const CMD_DONE: u32 = 1;

/// The address of hint target page `n` (inside R0).
fn page(n: u64) -> u64 {
    HINT_BASE + n * PAGE
}

/// Three regions: R0 and R1 adjacent, a hole, R2.
fn ram() -> Mem {
    Mem::from_ranges(&[
        (GuestAddress(R0.0), R0.1 as usize),
        (GuestAddress(R1.0), R1.1 as usize),
        (GuestAddress(R2.0), R2.1 as usize),
    ])
    .expect("guest memory")
}

/// The test device: the default features (statistics, free page hinting, page poison) with
/// small queues.
fn cfg() -> BalloonConfig {
    BalloonConfig::default()
        .with_queue_size(16)
        .with_free_page_queue_size(64)
}

/// A device-readable part.
fn out(addr: u64, len: u32) -> Desc {
    Desc::out(addr, len)
}

/// A device-writable part (a hint on the free page queue).
fn inp(addr: u64, len: u64) -> Desc {
    Desc::input(addr, u32::try_from(len).expect("descriptor length"))
}

/// A descriptor pointing to an indirect table of `entries` descriptors.
fn indirect(table: u64, entries: u32) -> Desc {
    Desc::indirect(table, entries)
}

fn write_u32(mem: &Mem, addr: u64, v: u32) {
    mem.write_slice(&v.to_le_bytes(), GuestAddress(addr))
        .expect("guest write");
}

/// Writes one raw descriptor at `addr`.
fn store_desc(mem: &Mem, addr: u64, d_addr: u64, len: u32, flags: u16, next: u16) {
    ring::write_desc_at(mem, GuestAddress(addr), Desc::new(d_addr, len, flags, next))
        .expect("descriptor write");
}

/// Writes `segs` as one chain into an indirect table at `table` (entry 0 first).
fn write_table(mem: &Mem, table: u64, segs: &[Desc]) {
    ring::write_table(mem, GuestAddress(table), segs).expect("indirect table");
}

/// The driver side of queue `index`'s ring of `size` entries, laid out as Linux's
/// `vring_init` does at `RING_BASE + index * RING_STRIDE` and cleared, as a driver does with
/// fresh ring memory.
///
/// Not `MockSplitQueue::create`: in virtio-queue 0.18 its `SplitQueueRing::end()` adds the
/// number of ring *entries* rather than bytes, so the used ring it places overlaps the
/// available ring (an entry near the middle of the available ring shares its bytes with the
/// used index) and a ring more than half full corrupts itself.
fn new_ring(mem: &Mem, index: usize, size: u16) -> SplitRing {
    let base = RING_BASE + index as u64 * RING_STRIDE;
    let layout = RingLayout::linux(GuestAddress(base), size);
    assert!(
        layout.end() <= base + RING_STRIDE,
        "ring of {size} entries too big"
    );
    SplitRing::new(mem, index as u16, layout, false, true, None).expect("ring memory")
}

/// `virtqueue_get_buf` until the used ring is empty. Panics on a used entry for a chain the
/// device does not own (never posted, or used twice) and on a used length other than 0.
/// Returns the heads in used order.
fn reclaim(ring: &mut SplitRing, mem: &Mem) -> Vec<u16> {
    let used = ring
        .reclaim_all(mem)
        .unwrap_or_else(|e| panic!("a used entry names a chain the device does not own: {e}"));
    used.iter()
        .map(|b| {
            assert_eq!(b.len, 0, "free page queue used length for chain {}", b.head);
            b.head
        })
        .collect()
}

/// Counts sink calls and lets a thread wait for a number of them.
#[derive(Default)]
struct Counter {
    n: Mutex<usize>,
    cv: Condvar,
}

impl Counter {
    fn bump(&self) {
        *self.n.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    /// A bounded wait (a liveness guard, not a timing assertion).
    fn wait_at_least(&self, n: usize, timeout: Duration) -> bool {
        let g = self.n.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, timeout, |c| *c < n).unwrap();
        *g >= n
    }
}

/// The sink the device gets: records every hint, counts them, and forwards them to an
/// optional second sink (a migration bitmap).
struct Tee {
    rec: Arc<RecordingSink>,
    count: Arc<Counter>,
    extra: Option<Arc<dyn FreePageSink>>,
}

impl FreePageSink for Tee {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        self.rec.free_page_hint(cmd_id, gpa, len);
        if let Some(e) = &self.extra {
            e.free_page_hint(cmd_id, gpa, len);
        }
        self.count.bump();
    }
}

/// How the guest model sets up the free page queue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FreeQueue {
    /// Size, addresses, QueueReady = 1.
    Ready,
    /// Size and addresses, but QueueReady stays 0.
    NotReady,
    /// Not touched at all.
    Absent,
}

/// A balloon behind virtio-mmio, the guest memory, and the guest's free page ring.
struct Vm {
    mem: Arc<Mem>,
    mmio: MmioTransport<Dev>,
    rec: Arc<RecordingSink>,
    count: Arc<Counter>,
    ctl: FreePageHinting,
    fpq: usize,
    ring: SplitRing,
}

impl Vm {
    /// A device over `mem`, not probed yet.
    fn with(cfg: BalloonConfig, mem: Mem, extra: Option<Arc<dyn FreePageSink>>) -> Self {
        let mem = Arc::new(mem);
        let rec = Arc::new(RecordingSink::default());
        let count = Arc::new(Counter::default());
        let sink = Arc::new(Tee {
            rec: rec.clone(),
            count: count.clone(),
            extra,
        });
        let dev = Balloon::new(cfg, mem.clone(), sink).expect("balloon");
        let fpq = dev
            .queue_layout()
            .index(QueueRole::FreePage)
            .expect("a free page queue");
        let ctl = dev.hint_control();
        let ring = new_ring(&mem, fpq, 2);
        Vm {
            mem,
            mmio: MmioTransport::new(dev),
            rec,
            count,
            ctl,
            fpq,
            ring,
        }
    }

    /// The default test device, probed by a Linux-like driver.
    fn ready() -> Self {
        Self::ready_with(cfg())
    }

    fn ready_with(cfg: BalloonConfig) -> Self {
        let mut vm = Self::with(cfg, ram(), None);
        vm.probe(LINUX_FEATURES, FreeQueue::Ready);
        vm
    }

    fn r32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, offset: u64, v: u32) {
        self.mmio.write(offset, &v.to_le_bytes());
    }

    /// Driver initialisation (virtio 1.x, 3.1.1) from status 0: ACKNOWLEDGE, DRIVER, the
    /// features `want` & offered, FEATURES_OK, every queue (the free page queue only if the
    /// driver accepted FREE_PAGE_HINT, and as `fq` says), DRIVER_OK.
    fn probe(&mut self, want: u64, fq: FreeQueue) {
        assert_eq!(self.r32(reg::STATUS), 0, "probe starts from a reset device");
        let acked = want & bring_up::device_features(&mut self.mmio);
        assert_ne!(acked & F_VERSION_1, 0, "the device offers VERSION_1");
        assert!(
            bring_up::negotiate(&mut self.mmio, acked),
            "FEATURES_OK refused"
        );

        let layout = self.mmio.device().queue_layout().clone();
        for i in 0..layout.len() {
            let is_fpq = layout.role(i) == Some(QueueRole::FreePage);
            if is_fpq && (acked & F_FREE_PAGE_HINT == 0 || fq == FreeQueue::Absent) {
                continue;
            }
            let base = GuestAddress(RING_BASE + i as u64 * RING_STRIDE);
            let ready = !is_fpq || fq == FreeQueue::Ready;
            let ring =
                bring_up::set_up_queue(&mut self.mmio, &self.mem, i, base, RING_STRIDE, ready);
            if is_fpq {
                self.ring = ring;
            }
        }
        self.w32(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            self.r32(reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            "DRIVER_OK refused"
        );
    }

    /// Writing 0 to the status register.
    fn reset(&mut self) {
        self.w32(reg::STATUS, 0);
        assert_eq!(self.r32(reg::STATUS), 0);
    }

    /// What the guest reads in `free_page_hint_cmd_id`.
    fn cmd_id(&self) -> u32 {
        self.r32(reg::CMD_ID)
    }

    /// The device serves the free page queue once (one event loop wakeup).
    fn process(&mut self) {
        let i = self.fpq;
        self.mmio.device_mut().process_queue(i);
    }

    fn post(&mut self, segs: &[Desc]) -> u16 {
        self.ring
            .add_descs(&self.mem, segs, 0)
            .expect("guest model: post")
    }

    fn post_hint(&mut self, gpa: u64, len: u64) -> u16 {
        self.post(&[inp(gpa, len)])
    }

    /// Linux's start buffer: the id in the one reused slot, then a 4-byte out-buffer.
    fn post_start(&mut self, id: u32) -> u16 {
        write_u32(&self.mem, START_SLOT, id);
        self.post(&[out(START_SLOT, 4)])
    }

    /// Linux's stop buffer, from its own slot.
    fn post_stop(&mut self) -> u16 {
        write_u32(&self.mem, STOP_SLOT, CMD_STOP);
        self.post(&[out(STOP_SLOT, 4)])
    }

    /// A 4-byte out-buffer holding `v`, from scratch slot `k`.
    fn post_command(&mut self, k: u64, v: u32) -> u16 {
        write_u32(&self.mem, SCRATCH + 16 * k, v);
        self.post(&[out(SCRATCH + 16 * k, 4)])
    }

    /// The migration publishes a round and the guest starts it. Returns the id.
    fn begin_round(&mut self) -> u32 {
        let id = self.ctl.start_round();
        assert_eq!(self.cmd_id(), id, "the guest reads the new id");
        self.post_start(id);
        self.process();
        assert_eq!(self.state(), HintState::Start, "round {id} started");
        self.reclaim();
        id
    }

    fn used_idx(&self) -> u16 {
        self.ring.used_idx(&self.mem).expect("used index")
    }

    fn pending(&self) -> u16 {
        self.ring.pending(&self.mem).expect("used index")
    }

    fn reclaim(&mut self) -> Vec<u16> {
        reclaim(&mut self.ring, &self.mem)
    }

    /// Asserts every posted chain came back (once, with used length 0) and reclaims them.
    fn assert_all_returned(&mut self) {
        assert_eq!(self.pending(), 0, "chains still owned by the device");
        self.reclaim();
    }

    fn state(&self) -> HintState {
        self.ctl.status().state
    }

    fn metrics(&self) -> HintMetrics {
        self.ctl.status().metrics
    }

    /// The hints the sink got, as (cmd_id, gpa, len).
    fn hints(&self) -> Vec<(u32, u64, u64)> {
        self.rec
            .hints()
            .iter()
            .map(|h: &RecordedHint| (h.cmd_id, h.gpa.0, h.len))
            .collect()
    }

    fn free_queue_event_fired(&self) -> bool {
        self.mmio
            .device()
            .queue_event(self.fpq)
            .expect("queue eventfd")
            .read()
            .is_ok()
    }

    fn irq_fired(&self) -> bool {
        self.mmio.device().interrupt().eventfd().read().is_ok()
    }

    /// Acknowledges every interrupt and drains the irqfd.
    fn ack_interrupts(&mut self) {
        let isr = self.r32(reg::INTERRUPT_STATUS);
        self.w32(reg::INTERRUPT_ACK, isr);
        let _ = self.irq_fired();
    }
}

// ----------------------------------------------------------------------------------------
// Edge cases 1–29 and 40 of `docs/protocol.md`.
// ----------------------------------------------------------------------------------------

use guest_model::log as log_all;
use log_all::log_everything;

/// Edge case 1 "A zero-length descriptor in any balloon chain" — skip zero-length in-descriptors;
/// a zero-length out-part is "no command".
#[test]
fn edge_01_zero_length_descriptor() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();

    // A zero-length hint next to a real one: the real one is applied, the empty one skipped.
    vm.post(&[inp(page(0), 0), inp(page(1), PAGE)]);
    // A zero-length out part is no command: the round goes on and the hint behind it counts.
    vm.post(&[out(STOP_SLOT, 0), inp(page(2), PAGE)]);
    // A lone zero-length out part, and a lone zero-length hint: nothing at all.
    vm.post(&[out(STOP_SLOT, 0)]);
    vm.post(&[inp(page(3), 0)]);
    vm.process();

    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(id, page(1), PAGE), (id, page(2), PAGE)]);
    let m = vm.metrics();
    assert_eq!(m.hints_zero_length, 2);
    assert_eq!(m.malformed_elements, 0);
    assert_eq!(m.rounds_stopped_by_guest, 0);
    vm.assert_all_returned();

    // In REQUESTED a zero-length out part does not count as a start buffer either, even
    // when the slot it points at holds the id.
    vm.ctl.stop_round();
    let id2 = vm.ctl.start_round();
    write_u32(&vm.mem, START_SLOT, id2);
    vm.post(&[out(START_SLOT, 0)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    vm.assert_all_returned();
}

/// Edge case 2 "Free-page out-buffer shorter than 4 bytes in total" — this device ignores the
/// element (state unchanged, no hint from it) and still returns it.
#[test]
fn edge_02_short_command() {
    log_everything();
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    write_u32(&vm.mem, SCRATCH, CMD_STOP);

    vm.post(&[out(SCRATCH, 3)]);
    vm.post(&[out(SCRATCH, 2), inp(page(0), PAGE)]);
    vm.post(&[out(SCRATCH, 1), out(SCRATCH + 1, 2)]);
    vm.process();

    assert_eq!(vm.state(), HintState::Start, "a short command ends nothing");
    assert!(vm.hints().is_empty(), "no hint from an ignored element");
    assert_eq!(vm.metrics().malformed_elements, 3);
    assert_eq!(vm.r32(reg::STATUS) & NEEDS_RESET, 0, "no NEEDS_RESET");
    vm.assert_all_returned();

    // The round goes on.
    vm.post_hint(page(1), PAGE);
    vm.process();
    assert_eq!(vm.hints(), [(id, page(1), PAGE)]);

    // In REQUESTED the first 3 bytes of the right id do not start the round.
    vm.ctl.stop_round();
    let id2 = vm.ctl.start_round();
    write_u32(&vm.mem, START_SLOT, id2);
    vm.post(&[out(START_SLOT, 3)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    vm.assert_all_returned();
}

/// Edge case 3 "Out-buffer longer than 4 bytes, or 4 bytes split over several descriptors" —
/// gather the first 4 readable bytes across out descriptors and ignore the rest.
#[test]
fn edge_03_long_or_split_command() {
    let mut vm = Vm::ready();

    // 8 bytes: the id, then garbage.
    let id = vm.ctl.start_round();
    let mut bytes = id.to_le_bytes().to_vec();
    bytes.extend([0xff; 4]);
    vm.mem.write_slice(&bytes, GuestAddress(SCRATCH)).unwrap();
    vm.post(&[out(SCRATCH, 8)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Start, "8-byte start buffer");

    // 1 + 3 bytes in two descriptors far apart.
    vm.ctl.stop_round();
    let id = vm.ctl.start_round();
    let b = id.to_le_bytes();
    vm.mem.write_slice(&b[..1], GuestAddress(SCRATCH)).unwrap();
    vm.mem
        .write_slice(&b[1..], GuestAddress(SCRATCH + 0x800))
        .unwrap();
    vm.post(&[out(SCRATCH, 1), out(SCRATCH + 0x800, 3)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Start, "start buffer split 1 + 3");

    // 2 + 2 bytes, then 4 bytes of garbage (a STOP value) that must be ignored, then a hint.
    vm.ctl.stop_round();
    let id = vm.ctl.start_round();
    let b = id.to_le_bytes();
    vm.mem.write_slice(&b[..2], GuestAddress(SCRATCH)).unwrap();
    vm.mem
        .write_slice(&b[2..], GuestAddress(SCRATCH + 0x100))
        .unwrap();
    write_u32(&vm.mem, SCRATCH + 0x200, CMD_STOP);
    vm.post(&[
        out(SCRATCH, 2),
        out(SCRATCH + 0x100, 2),
        out(SCRATCH + 0x200, 4),
        inp(page(0), PAGE),
    ]);
    vm.process();
    assert_eq!(
        vm.state(),
        HintState::Start,
        "start buffer split 2 + 2 + tail"
    );
    assert_eq!(vm.hints(), [(id, page(0), PAGE)]);
    vm.assert_all_returned();
}

/// Edge case 4 "A 4-byte device-writable descriptor" — decide by descriptor direction, never by
/// length.
#[test]
fn edge_04_writable_four_bytes_is_not_a_command() {
    let mut vm = Vm::ready();
    let id = vm.ctl.start_round();

    // A 4-byte writable descriptor holding the id does not start the round.
    write_u32(&vm.mem, page(0), id);
    vm.post(&[inp(page(0), 4)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);

    vm.post_start(id);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);

    // In START a 4-byte writable descriptor is a hint (too small to cover a page), not the
    // guest's STOP.
    write_u32(&vm.mem, page(1), CMD_STOP);
    vm.post(&[inp(page(1), 4)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert!(vm.hints().is_empty());
    let m = vm.metrics();
    assert_eq!(m.hints_misaligned, 1);
    assert_eq!(m.rounds_stopped_by_guest, 0);
    vm.assert_all_returned();
}

/// Edge case 5 "Hint data in a device-readable (out) descriptor" — only writable descriptors are
/// hints; a readable descriptor is at most a command (here: any out-buffer in START ends the
/// round, as in QEMU).
#[test]
fn edge_05_readable_descriptor_is_never_a_hint() {
    let mut vm = Vm::ready();
    vm.begin_round();

    vm.mem
        .write_slice(&[0xab; PAGE as usize], GuestAddress(page(0)))
        .unwrap();
    vm.post(&[out(page(0), PAGE as u32)]);
    vm.post_hint(page(1), PAGE);
    vm.process();

    assert!(
        vm.hints().is_empty(),
        "a readable page is never a free range"
    );
    assert_eq!(vm.state(), HintState::Stop, "it was taken as a command");
    assert_eq!(vm.metrics().rounds_stopped_by_guest, 1);
    vm.assert_all_returned();
}

/// Edge case 6 "One chain with a command and hints" — the command first, then the hints under the
/// new state.
#[test]
fn edge_06_command_and_hints_in_one_chain() {
    let mut vm = Vm::ready();
    let id = vm.ctl.start_round();

    write_u32(&vm.mem, START_SLOT, id);
    vm.post(&[out(START_SLOT, 4), inp(page(0), PAGE), inp(page(1), PAGE)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(id, page(0), PAGE), (id, page(1), PAGE)]);

    // STOP with hints behind it: the command ends the round, so the hints are dropped.
    write_u32(&vm.mem, STOP_SLOT, CMD_STOP);
    vm.post(&[out(STOP_SLOT, 4), inp(page(2), PAGE)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Stop);
    assert_eq!(vm.hints().len(), 2);
    assert!(vm.ctl.status().round_complete);
    vm.assert_all_returned();
}

/// Edge case 7 "Writable descriptor before a readable one (order violation)" — reject the chain;
/// no partial hints from it.
#[test]
fn edge_07_writable_before_readable() {
    log_everything();
    let mut vm = Vm::ready();
    vm.begin_round();

    write_u32(&vm.mem, STOP_SLOT, CMD_STOP);
    vm.post(&[inp(page(0), PAGE), out(STOP_SLOT, 4)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Start, "the command was not taken");
    assert!(vm.hints().is_empty(), "no partial hints");
    assert_eq!(vm.metrics().malformed_elements, 1);
    vm.assert_all_returned();

    // Nor does a start buffer after a writable part start a round.
    vm.ctl.stop_round();
    let id = vm.ctl.start_round();
    write_u32(&vm.mem, START_SLOT, id);
    vm.post(&[inp(page(1), PAGE), out(START_SLOT, 4), inp(page(2), PAGE)]);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    assert!(vm.hints().is_empty());
    vm.assert_all_returned();
}

/// Edge case 8 "Looped, out-of-range or over-long chains, bad indirect tables" — rely on
/// virtio-queue validation; nothing from a bad chain is applied, every element comes back.
#[test]
fn edge_08_malformed_chains() {
    log_everything();
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    let size = vm.ring.size();
    let mem = vm.mem.clone();

    // A descriptor pointing to itself.
    let ids = vm.ring.alloc(1).unwrap();
    vm.ring
        .write_desc_raw(
            &mem,
            ids[0],
            Desc::new(page(0), PAGE as u32, WRITE | NEXT, ids[0]),
        )
        .unwrap();
    vm.ring.publish_chain(&mem, &ids, 0).unwrap();
    // A loop of two.
    let ids = vm.ring.alloc(2).unwrap();
    vm.ring
        .write_desc_raw(
            &mem,
            ids[0],
            Desc::new(page(1), PAGE as u32, WRITE | NEXT, ids[1]),
        )
        .unwrap();
    vm.ring
        .write_desc_raw(
            &mem,
            ids[1],
            Desc::new(page(2), PAGE as u32, WRITE | NEXT, ids[0]),
        )
        .unwrap();
    vm.ring.publish_chain(&mem, &ids, 0).unwrap();
    // `next` past the table.
    let ids = vm.ring.alloc(1).unwrap();
    vm.ring
        .write_desc_raw(
            &mem,
            ids[0],
            Desc::new(page(3), PAGE as u32, WRITE | NEXT, size + 3),
        )
        .unwrap();
    vm.ring.publish_chain(&mem, &ids, 0).unwrap();
    // An indirect table whose length is not a multiple of 16.
    let t0 = INDIRECT_BASE;
    write_table(&mem, t0, &[inp(page(4), PAGE), inp(page(5), PAGE)]);
    vm.post(&[Desc::new(t0, 20, INDIRECT, 0)]);
    // An indirect table in the MMIO hole.
    vm.post(&[indirect(HOLE + MIB, 2)]);
    // An indirect table that refers to another one.
    let t1 = INDIRECT_BASE + 0x1000;
    write_table(&mem, t1, &[inp(page(6), PAGE), indirect(t0, 2)]);
    vm.post(&[indirect(t1, 2)]);
    // A loop inside an indirect table.
    let t2 = INDIRECT_BASE + 0x2000;
    store_desc(&mem, t2, page(7), PAGE as u32, WRITE | NEXT, 0);
    vm.post(&[indirect(t2, 1)]);
    // More than 4 GiB in one chain.
    vm.post(&[inp(page(8), 0x8000_0000), inp(page(8), 0x8000_1000)]);
    vm.process();

    assert!(
        vm.hints().is_empty(),
        "hints from bad chains: {:x?}",
        vm.hints()
    );
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.metrics().malformed_elements, 8);
    vm.assert_all_returned();

    // Well-formed chains still work: an indirect table, and a direct chain as long as the
    // queue.
    let t3 = INDIRECT_BASE + 0x3000;
    write_table(
        &mem,
        t3,
        &[
            inp(page(10), PAGE),
            inp(page(11), PAGE),
            inp(page(12), PAGE),
        ],
    );
    vm.post(&[indirect(t3, 3)]);
    vm.process();
    assert_eq!(
        vm.hints(),
        [
            (id, page(10), PAGE),
            (id, page(11), PAGE),
            (id, page(12), PAGE)
        ]
    );
    vm.reclaim();
    let long: Vec<Desc> = (0..u64::from(size))
        .map(|i| inp(page(100 + i), PAGE))
        .collect();
    vm.post(&long);
    vm.process();
    assert_eq!(vm.hints().len(), 3 + usize::from(size));
    vm.assert_all_returned();
}

/// Edge case 8 "Looped, out-of-range or over-long chains, bad indirect tables" — "Cap the chain
/// length at the queue size": an indirect table longer than the queue must not deliver more
/// descriptors than the queue size (virtio 1.x 2.7.5.3.1: a driver MUST NOT create a chain
/// longer than the Queue Size).
#[test]
fn edge_08_indirect_chain_longer_than_queue_is_capped() {
    log_everything();
    let mut vm = Vm::ready();
    vm.begin_round();
    let size = u64::from(vm.ring.size());
    let entries = 4 * size;
    let table: Vec<Desc> = (0..entries).map(|i| inp(page(i), PAGE)).collect();
    write_table(&vm.mem, INDIRECT_BASE, &table);
    vm.post(&[indirect(INDIRECT_BASE, entries as u32)]);
    vm.process();
    vm.assert_all_returned();
    let got = vm.hints().len() as u64;
    assert!(
        got <= size,
        "an indirect chain of {entries} descriptors on a {size}-entry queue delivered {got} \
         hints"
    );
}

/// Edge case 9 "Hint start is not page-aligned, or the length is not a page multiple" — round the
/// start up and the end down; drop ranges that become empty.
#[test]
fn edge_09_unaligned_hint() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();

    vm.post_hint(page(0) + 0x800, 0x3000); // [0.5, 3.5) pages → pages 1 and 2
    vm.post_hint(page(8), 0x1800); // 1.5 pages → page 8
    vm.post_hint(page(16) + 1, PAGE); // no whole page
    vm.post_hint(page(20), PAGE - 1); // no whole page
    vm.process();

    assert_eq!(vm.hints(), [(id, page(1), 2 * PAGE), (id, page(8), PAGE)]);
    assert_eq!(vm.metrics().hints_misaligned, 2);
    assert_eq!(vm.state(), HintState::Start);
    vm.assert_all_returned();
}

/// Edge case 10 "`addr + len` overflows u64" — checked arithmetic; drop the descriptor.
#[test]
fn edge_10_overflowing_hint() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();

    vm.post(&[inp(u64::MAX - 0xfff, 2 * PAGE), inp(page(0), PAGE)]);
    vm.post_hint(u64::MAX, 1);
    vm.post_hint(u64::MAX - PAGE + 1, 0xffff_f000);
    vm.process();

    assert_eq!(vm.hints(), [(id, page(0), PAGE)]);
    assert_eq!(vm.metrics().hints_overflow, 3);
    assert_eq!(vm.state(), HintState::Start);
    vm.assert_all_returned();
}

/// Edge case 11 "A hint range crossing a memory-region or RAMBlock boundary" — split per guest
/// memory region and handle each piece on its own.
#[test]
fn edge_11_hint_crosses_region_boundary() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    let b = R1.0; // R0 ends here and R1 starts here

    vm.post_hint(b - 2 * PAGE, 4 * PAGE);
    vm.post_hint(b - PAGE - 0x800, 3 * PAGE); // rounded to [b - PAGE, b + PAGE)
    vm.process();

    assert_eq!(
        vm.hints(),
        [
            (id, b - 2 * PAGE, 2 * PAGE),
            (id, b, 2 * PAGE),
            (id, b - PAGE, PAGE),
            (id, b, PAGE),
        ]
    );
    assert_eq!(vm.metrics().hints_outside_ram, 0);
    vm.assert_all_returned();
}

/// Edge case 12 "A hint range partly or wholly outside guest RAM (MMIO hole, beyond the end of
/// RAM)" — hint only the parts in RAM; ignore the rest with no device error.
#[test]
fn edge_12_hint_outside_ram() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();

    vm.post_hint(HOLE - PAGE, 2 * PAGE); // tail in the hole
    vm.post_hint(HOLE + MIB, PAGE); // wholly in the hole
    vm.post_hint(HOLE - PAGE, (R2.0 - HOLE) + 2 * PAGE); // across the hole
    vm.post_hint(RAM_END, PAGE); // beyond the end of RAM
    vm.post_hint(RAM_END - PAGE, 2 * PAGE); // runs past the end
    vm.post_hint(RAM_END + 100 * MIB, 16 * MIB); // far away
    vm.process();

    assert_eq!(
        vm.hints(),
        [
            (id, HOLE - PAGE, PAGE),
            (id, HOLE - PAGE, PAGE),
            (id, R2.0, PAGE),
            (id, RAM_END - PAGE, PAGE),
        ]
    );
    assert_eq!(vm.metrics().hints_outside_ram, 6);
    assert_eq!(vm.state(), HintState::Start, "no device error");
    assert_eq!(vm.r32(reg::STATUS) & NEEDS_RESET, 0);
    vm.assert_all_returned();

    vm.post_hint(page(0), PAGE);
    vm.process();
    assert_eq!(vm.hints().last(), Some(&(id, page(0), PAGE)));
}

/// Edge case 13 "A hint into RAM that migration does not track (ignored, shared, or
/// device-private blocks)" — skip it: the migration bitmap leaves R1 out, and hints into R1
/// change nothing while hints into tracked RAM clear their pages.
#[test]
fn edge_13_untracked_ram() {
    let bitmap = Arc::new(
        MigrationBitmap::from_ranges(&[(GuestAddress(R0.0), R0.1), (GuestAddress(R2.0), R2.1)])
            .unwrap(),
    );
    let all = bitmap.mark_all_dirty();
    assert_eq!(all, (R0.1 + R2.1) / PAGE);
    let mut vm = Vm::with(cfg(), ram(), Some(bitmap.clone()));
    vm.probe(LINUX_FEATURES, FreeQueue::Ready);
    vm.begin_round();

    // Untracked only: nothing changes.
    vm.post_hint(R1.0 + 4 * PAGE, 8 * PAGE);
    vm.process();
    assert_eq!(bitmap.dirty_pages(), all, "a hint into untracked RAM");
    assert_eq!(bitmap.hinted_pages(), 0);

    // Tracked pages clear; the untracked part of a range across the boundary does nothing.
    vm.post_hint(page(0), 2 * PAGE);
    vm.post_hint(R1.0 - PAGE, 2 * PAGE);
    vm.post_hint(R2.0, PAGE);
    vm.process();
    assert_eq!(bitmap.dirty_pages(), all - 4);
    assert_eq!(bitmap.hinted_pages(), 4);
    for gpa in [page(0), page(1), R1.0 - PAGE, R2.0] {
        assert!(!bitmap.is_dirty(GuestAddress(gpa)), "{gpa:#x} still dirty");
    }
    assert!(bitmap.is_dirty(GuestAddress(page(2))));
    assert!(bitmap.is_dirty(GuestAddress(R2.0 + PAGE)));
    vm.assert_all_returned();
}

/// RAM with an anonymous R0 and a file-backed (shared) 2 MiB region at 16 MiB.
fn ram_with_file() -> Mem {
    let tmp = TempFile::new_with_prefix("/tmp/virtio-balloon-edge14-").expect("temp file");
    let file = tmp.into_file();
    file.set_len(2 * MIB).expect("file size");
    Mem::from_ranges_with_files([
        (GuestAddress(R0.0), R0.1 as usize, None),
        (
            GuestAddress(R1.0),
            (2 * MIB) as usize,
            Some(FileOffset::new(file, 0)),
        ),
    ])
    .expect("file-backed guest memory")
}

/// Edge case 14 "A hint into ROM, read-only, DAX/pmem or file-backed shared regions" — skip it by
/// default; `hint_file_backed_memory: true` accepts it.
#[test]
fn edge_14_file_backed_region() {
    let mut vm = Vm::with(cfg(), ram_with_file(), None);
    vm.probe(LINUX_FEATURES, FreeQueue::Ready);
    let id = vm.begin_round();
    vm.post_hint(R1.0, 4 * PAGE);
    vm.post_hint(R1.0 - PAGE, 2 * PAGE); // anonymous page + file page
    vm.post_hint(page(0), PAGE);
    vm.process();
    assert_eq!(
        vm.hints(),
        [(id, R1.0 - PAGE, PAGE), (id, page(0), PAGE)],
        "file-backed memory is skipped by default"
    );
    assert_eq!(vm.metrics().hints_outside_ram, 2);
    vm.assert_all_returned();

    let opt_in = cfg().with_hint_file_backed_memory(true);
    let mut vm = Vm::with(opt_in, ram_with_file(), None);
    vm.probe(LINUX_FEATURES, FreeQueue::Ready);
    let id = vm.begin_round();
    vm.post_hint(R1.0, 4 * PAGE);
    vm.post_hint(R1.0 - PAGE, 2 * PAGE);
    vm.process();
    assert_eq!(
        vm.hints(),
        [
            (id, R1.0, 4 * PAGE),
            (id, R1.0 - PAGE, PAGE),
            (id, R1.0, PAGE)
        ],
        "accepted when the VMM opts in"
    );
    vm.assert_all_returned();
}

/// Edge case 15 "A hint that arrives while no migration runs" — ignore it (the state is STOP or
/// DONE).
#[test]
fn edge_15_hint_without_round() {
    let mut vm = Vm::ready();
    assert_eq!(vm.state(), HintState::Stop);
    assert_eq!(vm.cmd_id(), CMD_STOP);

    // Never started: hints and even a start buffer with a plausible id change nothing.
    vm.post_hint(page(0), PAGE);
    vm.post_command(0, 2);
    vm.post_command(1, 0x8000_0001);
    vm.post_hint(page(1), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Stop);
    assert!(vm.hints().is_empty());
    let m = vm.metrics();
    assert_eq!(m.hints_wrong_state, 2);
    assert_eq!(m.ignored_commands, 2);
    vm.assert_all_returned();

    // After the migration said DONE.
    let id = vm.begin_round();
    vm.ctl.done();
    assert_eq!(vm.state(), HintState::Done);
    assert_eq!(vm.cmd_id(), CMD_DONE);
    vm.post_hint(page(2), PAGE);
    vm.post_command(2, id);
    vm.process();
    assert_eq!(vm.state(), HintState::Done);
    assert!(vm.hints().is_empty());
    vm.assert_all_returned();
}

/// Edge case 16 "Hints popped in REQUESTED (before the matching start)" — ignore and return them.
#[test]
fn edge_16_hints_before_start_buffer() {
    let mut vm = Vm::ready();
    let id = vm.ctl.start_round();
    vm.post_hint(page(0), PAGE);
    vm.post_hint(page(1), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    assert!(vm.hints().is_empty());
    assert_eq!(vm.metrics().hints_wrong_state, 2);
    vm.assert_all_returned();

    vm.post_start(id);
    vm.post_hint(page(2), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(id, page(2), PAGE)]);
    vm.assert_all_returned();
}

/// Edge case 17 "A start buffer with a stale id, DONE, STOP or garbage while REQUESTED" — stay
/// REQUESTED.
#[test]
fn edge_17_bad_start_buffer_while_requested() {
    let mut vm = Vm::ready();
    let old = vm.begin_round();
    vm.ctl.stop_round();
    let id = vm.ctl.start_round();
    assert_ne!(old, id);

    for (k, v) in [old, CMD_DONE, CMD_STOP, 0xdead_beef, id.wrapping_add(1)]
        .into_iter()
        .enumerate()
    {
        vm.post_command(k as u64, v);
        vm.post_hint(page(k as u64), PAGE);
    }
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    assert_eq!(vm.cmd_id(), id);
    assert!(vm.hints().is_empty());
    assert_eq!(vm.metrics().stale_commands, 5);
    vm.assert_all_returned();

    vm.post_start(id);
    vm.post_hint(page(9), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(id, page(9), PAGE)]);
}

/// Edge case 18 "A second start buffer with the current id while START" — QEMU moves to STOP; so
/// does this device.
#[test]
fn edge_18_second_start_buffer_ends_round() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    vm.post_hint(page(0), PAGE);
    vm.post_start(id);
    vm.post_hint(page(1), PAGE);
    vm.process();

    assert_eq!(vm.state(), HintState::Stop);
    assert_eq!(vm.cmd_id(), CMD_STOP);
    assert_eq!(
        vm.hints(),
        [(id, page(0), PAGE)],
        "nothing after the second start"
    );
    assert_eq!(vm.metrics().rounds_stopped_by_guest, 1);
    vm.assert_all_returned();
}

/// Edge case 19 "A guest that guesses the next id and sends it early" — accepted only once the
/// device is REQUESTED with that id; with the position fence, only if made available after
/// the id was published.
#[test]
fn edge_19_guessed_next_id() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    vm.post_stop();
    vm.process();
    assert_eq!(vm.state(), HintState::Stop);
    let guess = id + 1;

    // Consumed while STOP: ignored.
    vm.post_command(0, guess);
    vm.post_hint(page(0), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Stop);

    // Posted early, still on the ring when the id is published: the fence refuses it.
    vm.post_command(1, guess);
    vm.post_hint(page(1), PAGE);
    let next = vm.ctl.start_round();
    assert_eq!(next, guess, "the guess was right");
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    assert!(vm.hints().is_empty());
    assert_eq!(vm.metrics().stale_commands, 1);

    // A start buffer posted after publication starts the round.
    vm.post_start(next);
    vm.post_hint(page(2), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(next, page(2), PAGE)]);
    vm.assert_all_returned();
}

/// Edge case 20 "A guest that never answers a REQUESTED id" — do not wait for the guest at any
/// migration step.
#[test]
fn edge_20_guest_never_answers() {
    let mut vm = Vm::ready();
    let id = vm.ctl.start_round();
    assert_eq!(vm.state(), HintState::Requested);
    assert_eq!(vm.cmd_id(), id);

    // A bounded wait for the guest comes back false; nothing changed.
    assert!(!vm.ctl.wait_round_complete(Duration::from_millis(20)));
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);

    // stop_round does not need the guest.
    vm.ctl.stop_round();
    assert_eq!(vm.state(), HintState::Stop);
    assert_eq!(vm.cmd_id(), CMD_STOP);
    // No round runs now: the wait reports false.
    assert!(!vm.ctl.wait_round_complete(Duration::from_millis(20)));

    let next = vm.ctl.start_round();
    assert!(next > id);
    vm.ctl.done();
    assert_eq!(vm.state(), HintState::Done);
}

/// Edge case 21 "A guest that keeps hinting forever (never sends STOP)" — bound the per-wakeup
/// work so migration can always stop the round.
#[test]
fn edge_21_endless_hinting_is_bounded() {
    let mut vm = Vm::ready_with(cfg().with_chains_per_wakeup(8));
    let id = vm.begin_round();
    let _ = vm.free_queue_event_fired();

    for i in 0..40 {
        vm.post_hint(page(i), PAGE);
    }
    let start = vm.used_idx();
    vm.process();
    assert_eq!(
        vm.used_idx().wrapping_sub(start),
        8,
        "one wakeup, one budget"
    );
    assert!(vm.free_queue_event_fired(), "re-armed for the rest");
    vm.process();
    assert_eq!(vm.used_idx().wrapping_sub(start), 16);
    assert_eq!(vm.hints().len(), 16);

    // The migration stops the round; the rest is consumed without being applied.
    vm.ctl.stop_round();
    assert_eq!(vm.state(), HintState::Stop);
    assert_eq!(vm.hints().len(), 16);
    assert!(vm.hints().iter().all(|h| h.0 == id));
    assert_eq!(vm.metrics().drained, 24);
    vm.assert_all_returned();
}

/// Edge case 22 "A config interrupt for another reason (for example a resize) while START" —
/// show the current id in START (and REQUESTED).
#[test]
fn edge_22_config_shows_id_in_start() {
    let mut vm = Vm::ready();
    let id = vm.ctl.start_round();
    assert_eq!(vm.cmd_id(), id, "REQUESTED shows the id");
    vm.post_start(id);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.cmd_id(), id, "START shows the id");

    // An unrelated configuration change: the guest re-reads and still sees its round.
    vm.ack_interrupts();
    let gen = vm.r32(reg::CONFIG_GENERATION);
    assert!(vm.mmio.device().interrupt_handle().signal_config_change());
    assert_ne!(vm.r32(reg::INTERRUPT_STATUS) & ISR_CONFIG, 0);
    assert_ne!(vm.r32(reg::CONFIG_GENERATION), gen);
    assert_eq!(vm.cmd_id(), id);
    assert_eq!(vm.state(), HintState::Start);

    vm.ctl.stop_round();
    assert_eq!(vm.cmd_id(), CMD_STOP);
    vm.ctl.done();
    assert_eq!(vm.cmd_id(), CMD_DONE);
}

/// Edge case 23 "A device reset during hinting" — go to STOP, keep the id counter, drop queue
/// state, and raise no config interrupt before DRIVER_OK.
#[test]
fn edge_23_reset_during_hinting() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    vm.post_hint(page(0), PAGE);
    vm.post_hint(page(1), PAGE);
    vm.ack_interrupts();

    vm.reset();
    let st = vm.ctl.status();
    assert_eq!(st.state, HintState::Stop);
    assert_eq!(st.cmd_id, id, "the id counter is kept");
    assert_eq!(vm.cmd_id(), CMD_STOP);
    assert_eq!(vm.r32(reg::INTERRUPT_STATUS), 0);
    assert!(!vm.irq_fired(), "no interrupt on reset");

    // The old ring is gone: nothing from it is applied.
    vm.process();
    assert!(vm.hints().is_empty());

    // A round requested before the new driver is ready raises no interrupt yet...
    let next = vm.ctl.start_round();
    assert!(next > id);
    assert_eq!(vm.r32(reg::INTERRUPT_STATUS), 0);
    assert!(!vm.irq_fired());

    // ...but tells the driver at DRIVER_OK. The fresh ring starts from scratch.
    vm.probe(LINUX_FEATURES, FreeQueue::Ready);
    assert_ne!(vm.r32(reg::INTERRUPT_STATUS) & ISR_CONFIG, 0);
    assert!(vm.irq_fired());
    assert_eq!(vm.cmd_id(), next);
    vm.post_start(next);
    vm.post_hint(page(2), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(next, page(2), PAGE)]);
    vm.assert_all_returned();
}

/// Edge case 24 "A reset or driver unload mid-migration, then a new driver that does not
/// negotiate FPH" — the notifier checks the negotiated features on every hook and does
/// nothing.
#[test]
fn edge_24_reprobe_without_fph() {
    let mut vm = Vm::ready();
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Arc::new(vm.ctl.clone()));
    let running = MigrationState {
        vm_running: true,
        postcopy: false,
    };
    let stopped = MigrationState {
        vm_running: false,
        postcopy: false,
    };

    // With FPH the notifier drives rounds.
    chain
        .notify(PrecopyEvent::AfterBitmapSync, running)
        .unwrap();
    assert_eq!(vm.state(), HintState::Requested);
    let id = vm.ctl.status().cmd_id;

    // The driver goes away mid-migration; a new one does not take FPH.
    vm.reset();
    vm.probe(LINUX_FEATURES & !F_FREE_PAGE_HINT, FreeQueue::Ready);
    assert!(!vm.ctl.negotiated());
    assert!(!vm.mmio.device().has_feature(3));
    vm.ack_interrupts();

    for (ev, st) in [
        (PrecopyEvent::Setup, running),
        (PrecopyEvent::BeforeBitmapSync, running),
        (PrecopyEvent::AfterBitmapSync, running),
        (PrecopyEvent::BeforeBitmapSync, stopped),
        (PrecopyEvent::AfterBitmapSync, stopped),
        (PrecopyEvent::Complete, stopped),
        (PrecopyEvent::Cleanup, stopped),
    ] {
        chain.notify(ev, st).unwrap();
        let s = vm.ctl.status();
        assert_eq!(s.state, HintState::Stop, "after {ev}");
        assert_eq!(s.cmd_id, id, "after {ev}");
        assert_eq!(vm.r32(reg::INTERRUPT_STATUS), 0, "after {ev}");
    }
    assert!(!vm.irq_fired());
}

/// Edge case 25 "A new driver instance seeing an id it cached before" — never re-publish the id of
/// the previous round; keep the counter monotonic across reset.
#[test]
fn edge_25_ids_never_reused() {
    let mut vm = Vm::ready();
    let mut ids = vec![vm.begin_round()];
    for _ in 0..3 {
        vm.post_stop();
        vm.process();
        vm.reset();
        vm.probe(LINUX_FEATURES, FreeQueue::Ready);
        let id = vm.ctl.start_round();
        assert_eq!(vm.cmd_id(), id);
        ids.push(id);
        vm.post_start(id);
        vm.process();
        assert_eq!(vm.state(), HintState::Start);
    }
    assert!(ids.iter().all(|&i| i >= 2), "ids {ids:?}");
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "ids {ids:?}");
}

/// Edge case 26 "The VM paused while the worker is mid-queue" — park: no element moves on the
/// ring while paused; everything is handled after resume.
#[test]
fn edge_26_pause_parks_the_queue() {
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    let _ = vm.free_queue_event_fired();

    vm.mmio.device_mut().pause();
    assert!(vm.mmio.device().is_paused());
    vm.post_hint(page(0), PAGE);
    vm.post_hint(page(1), PAGE);
    let used = vm.used_idx();
    vm.process();
    vm.process();
    assert_eq!(vm.used_idx(), used, "the ring moved while paused");
    assert_eq!(vm.pending(), 2);
    assert!(vm.hints().is_empty());

    vm.mmio.device_mut().resume();
    assert!(
        vm.free_queue_event_fired(),
        "resume looks at the queue again"
    );
    vm.process();
    assert_eq!(vm.hints(), [(id, page(0), PAGE), (id, page(1), PAGE)]);
    vm.assert_all_returned();

    // A migration step while paused changes the state but does not touch the ring.
    vm.mmio.device_mut().pause();
    vm.post_hint(page(2), PAGE);
    vm.ctl.stop_round();
    assert_eq!(vm.state(), HintState::Stop);
    assert_eq!(vm.pending(), 1, "stop_round moved the ring while paused");
    vm.mmio.device_mut().resume();
    vm.process();
    assert_eq!(
        vm.hints().len(),
        2,
        "the hint was posted in the stopped round"
    );
    vm.assert_all_returned();
}

/// Edge case 27 "A queue not set up or not enabled (size 0, ready = 0) while FPH is negotiated" —
/// treat it as empty; config-side state changes still happen.
#[test]
fn edge_27_queue_not_ready() {
    for fq in [FreeQueue::NotReady, FreeQueue::Absent] {
        let mut vm = Vm::with(cfg(), ram(), None);
        if fq == FreeQueue::Absent {
            // The ring memory exists, but the device was never told where it is.
            vm.ring = new_ring(&vm.mem, vm.fpq, 64);
        }
        vm.probe(LINUX_FEATURES, fq);
        assert!(vm.ctl.negotiated());
        let fpq = vm.fpq as u32;
        vm.w32(reg::QUEUE_SEL, fpq);
        assert_eq!(vm.r32(reg::QUEUE_READY), 0);

        let id = vm.ctl.start_round();
        assert_eq!(vm.state(), HintState::Requested);
        assert_eq!(vm.cmd_id(), id);
        vm.post_start(id);
        vm.post_hint(page(0), PAGE);
        vm.process();
        assert_eq!(vm.pending(), 2, "an unready queue is not served");
        assert_eq!(vm.state(), HintState::Requested);
        assert!(vm.hints().is_empty());

        vm.ctl.stop_round();
        assert_eq!(vm.cmd_id(), CMD_STOP);
        vm.ctl.done();
        assert_eq!(vm.cmd_id(), CMD_DONE);
        assert_eq!(vm.pending(), 2);
        assert_eq!(vm.metrics().elements, 0);
    }
}

/// Edge case 28 "free_page_vq ring smaller than 2, or reporting ring smaller than 32" — offer at
/// least 2 (QEMU: 1024) and at least 32.
#[test]
fn edge_28_minimum_ring_sizes() {
    let mem = Arc::new(ram());
    let sink = Arc::new(RecordingSink::default());
    let tiny = cfg().with_free_page_queue_size(1);
    assert!(matches!(
        Balloon::new(tiny, mem.clone(), sink.clone()),
        Err(BalloonError::QueueTooSmall {
            role: QueueRole::FreePage,
            size: 1
        })
    ));
    let small_reporting = cfg().with_reporting(true).with_reporting_queue_size(16);
    assert!(matches!(
        Balloon::new(small_reporting, mem.clone(), sink.clone()),
        Err(BalloonError::QueueTooSmall {
            role: QueueRole::Reporting,
            size: 16
        })
    ));

    // The defaults offer QEMU's sizes.
    let dflt = BalloonConfig::default().with_reporting(true);
    let dev = Balloon::new(dflt, mem, sink).unwrap();
    let layout = dev.queue_layout().clone();
    let mut mmio = MmioTransport::new(dev);
    for (role, min) in [(QueueRole::FreePage, 1024), (QueueRole::Reporting, 32)] {
        let i = layout.index(role).unwrap() as u32;
        mmio.write(reg::QUEUE_SEL, &i.to_le_bytes());
        let mut b = [0u8; 4];
        mmio.read(reg::QUEUE_NUM_MAX, &mut b);
        assert!(u32::from_le_bytes(b) >= min, "{role:?} QueueNumMax");
    }

    // The smallest free page queue Linux accepts works: one slot for the command, one hint.
    let mut vm = Vm::ready_with(cfg().with_free_page_queue_size(2));
    let id = vm.begin_round();
    for i in 0..4 {
        vm.post_hint(page(i), PAGE);
        vm.process();
        vm.assert_all_returned();
    }
    vm.post_stop();
    vm.process();
    assert_eq!(vm.hints().len(), 4);
    assert!(vm.hints().iter().all(|h| h.0 == id));
    assert!(vm.ctl.status().round_complete);
}

/// Edge case 29 "The guest never reclaims used entries and so runs out of free descriptors" —
/// every pop is matched by exactly one used entry; no element is used twice (with and
/// without `VIRTIO_F_RING_EVENT_IDX`).
#[test]
fn edge_29_used_entries_match_pops() {
    used_entries_match_pops(LINUX_FEATURES);
    used_entries_match_pops(LINUX_FEATURES & !F_EVENT_IDX);
}

fn used_entries_match_pops(features: u64) {
    let mut vm = Vm::with(
        cfg()
            .with_free_page_queue_size(256)
            .with_chains_per_wakeup(256),
        ram(),
        None,
    );
    vm.probe(features, FreeQueue::Ready);
    let id = vm.begin_round();
    let size = vm.ring.size();
    let base_used = vm.used_idx();

    // The guest fills every descriptor and never reclaims.
    let heads: Vec<u16> = (0..u64::from(size))
        .map(|i| vm.post_hint(page(i), PAGE))
        .collect();
    assert_eq!(usize::from(vm.ring.num_free()), 0);
    vm.process();
    vm.process();
    vm.process();
    assert_eq!(vm.used_idx().wrapping_sub(base_used), size);
    let used: Vec<(u32, u32)> = (0..size)
        .map(|k| {
            vm.ring
                .used_elem(&vm.mem, base_used.wrapping_add(k))
                .unwrap()
        })
        .collect();
    let expect: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    assert_eq!(used, expect, "one used entry per pop, in order");
    assert_eq!(vm.hints().len(), usize::from(size));
    assert!(vm.hints().iter().all(|h| h.0 == id));

    // Nothing new: nothing more is used.
    vm.process();
    assert_eq!(vm.used_idx().wrapping_sub(base_used), size);
    let reclaimed = vm.reclaim();
    assert_eq!(reclaimed, heads);

    // Many laps, past the 16-bit wrap of the ring indexes, with chains of 1 to 3
    // descriptors: every chain comes back exactly once (`reclaim` checks it).
    let mut posted = 0u64;
    let mut returned = 0u64;
    while posted < 70_000 {
        let mut k = 0u64;
        while usize::from(vm.ring.num_free()) >= 3 {
            let n = 1 + (k % 3);
            let segs: Vec<Desc> = (0..n).map(|j| inp(page(j), PAGE)).collect();
            vm.post(&segs);
            k += 1;
        }
        posted += k;
        vm.process();
        assert_eq!(vm.pending(), 0);
        returned += vm.reclaim().len() as u64;
        vm.rec.take();
    }
    assert_eq!(returned, posted);
    let m = vm.metrics();
    assert_eq!(m.elements, 1 + u64::from(size) + posted);
}

/// Edge case 40 "A huge or hostile number of hint descriptors, each 4 KiB" — batch and bound the
/// time spent: all hints are applied, and each wakeup handles at most `chains_per_wakeup`.
#[test]
fn edge_40_flood_of_small_hints() {
    const BUDGET: u16 = 32;
    let mut vm = Vm::ready_with(
        cfg()
            .with_free_page_queue_size(256)
            .with_chains_per_wakeup(BUDGET),
    );
    let id = vm.begin_round();
    let total = R1.1 / PAGE; // every page of R1: 4096 hints
    let mut next = 0u64;
    let mut wakeups = 0;
    while next < total || vm.pending() > 0 {
        while next < total && usize::from(vm.ring.num_free()) > 0 {
            vm.post_hint(R1.0 + next * PAGE, PAGE);
            next += 1;
        }
        let pending = vm.pending();
        let before = vm.used_idx();
        let _ = vm.free_queue_event_fired();
        vm.process();
        let done = vm.used_idx().wrapping_sub(before);
        assert_eq!(done, pending.min(BUDGET), "one wakeup");
        let rearmed = vm.free_queue_event_fired();
        if pending > BUDGET {
            assert!(
                rearmed,
                "more than one budget waiting: the queue must be re-armed"
            );
        } else if pending < BUDGET {
            assert!(!rearmed, "the ring was drained: no re-arm");
        }
        vm.reclaim();
        wakeups += 1;
    }
    assert!(wakeups >= total / u64::from(BUDGET));

    let hints = vm.hints();
    assert_eq!(hints.len() as u64, total);
    for (i, h) in hints.iter().enumerate() {
        assert_eq!(*h, (id, R1.0 + i as u64 * PAGE, PAGE));
    }
    let m = vm.metrics();
    assert_eq!(m.hints_accepted, total);
    assert_eq!(m.bytes_accepted, R1.1);
}

/// Edge case 40 "A huge or hostile number of hint descriptors, each 4 KiB" — "bound the time
/// spent": with indirect tables a guest packs many descriptors into one chain, so one
/// wakeup must still handle at most `chains_per_wakeup` chains of at most the queue size
/// each.
#[test]
fn edge_40_hostile_indirect_tables_are_bounded() {
    const BUDGET: u16 = 4;
    let mut vm = Vm::ready_with(cfg().with_chains_per_wakeup(BUDGET));
    vm.begin_round();
    let size = u64::from(vm.ring.size());
    // One table of 1024 hints, shared by every element (one ring slot each).
    let entries = 1024u64;
    let table: Vec<Desc> = (0..entries).map(|i| inp(page(i), PAGE)).collect();
    write_table(&vm.mem, INDIRECT_BASE, &table);
    for _ in 0..2 * BUDGET {
        vm.post(&[indirect(INDIRECT_BASE, entries as u32)]);
    }
    let before = vm.used_idx();
    vm.process();
    assert_eq!(vm.used_idx().wrapping_sub(before), BUDGET);
    let got = vm.hints().len() as u64;
    let bound = u64::from(BUDGET) * size;
    assert!(
        got <= bound,
        "one wakeup ({BUDGET} chains, queue size {size}) delivered {got} hints, more than \
         {bound}"
    );
}

/// Edge case 40 "A huge or hostile number of hint descriptors, each 4 KiB" — `stop_round` from the
/// migration thread while a guest thread floods the ring returns, and nothing reaches the
/// sink after it returns until the next `start_round`.
#[test]
fn edge_40_stop_round_while_guest_floods() {
    const AFTER_STOP: u32 = 3000;
    let mut vm = Vm::ready_with(
        cfg()
            .with_free_page_queue_size(256)
            .with_chains_per_wakeup(16),
    );
    let id = vm.begin_round();
    let Vm {
        mem,
        mut mmio,
        rec,
        count,
        ctl,
        fpq,
        mut ring,
    } = vm;
    let stopped = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));

    // The device's event loop.
    let device = {
        let quit = quit.clone();
        thread::spawn(move || {
            while !quit.load(Ordering::Acquire) {
                mmio.device_mut().process_queue(fpq);
                thread::yield_now();
            }
            mmio
        })
    };
    // The guest: hints without end, reclaiming whenever the ring is full.
    let guest = {
        let mem = mem.clone();
        let stopped = stopped.clone();
        thread::spawn(move || {
            let mut after = 0;
            let mut i = 0u64;
            while after < AFTER_STOP {
                if ring.num_free() == 0 {
                    reclaim(&mut ring, &mem);
                    thread::yield_now();
                    continue;
                }
                let late = stopped.load(Ordering::Acquire);
                ring.add_descs(&mem, &[inp(R1.0 + (i % 4096) * PAGE, PAGE)], 0)
                    .unwrap();
                i += 1;
                if late {
                    after += 1;
                }
            }
            ring
        })
    };

    // The migration thread.
    assert!(
        count.wait_at_least(500, Duration::from_secs(120)),
        "the device never applied the guest's hints"
    );
    ctl.stop_round();
    let at_stop = rec.hints().len();
    stopped.store(true, Ordering::Release);
    assert_eq!(ctl.status().state, HintState::Stop);

    let ring = guest.join().expect("guest thread");
    quit.store(true, Ordering::Release);
    let mmio = device.join().expect("device thread");
    let mut vm = Vm {
        mem,
        mmio,
        rec,
        count,
        ctl,
        fpq,
        ring,
    };
    while vm.pending() > 0 {
        vm.process();
    }
    vm.reclaim();

    let hints = vm.hints();
    assert_eq!(
        hints.len(),
        at_stop,
        "hints reached the sink after stop_round"
    );
    assert!(hints.iter().all(|h| h.0 == id));
    assert!(vm.metrics().hints_wrong_state >= u64::from(AFTER_STOP));

    // The next round gets hints again.
    let next = vm.ctl.start_round();
    vm.post_start(next);
    vm.post_hint(page(0), PAGE);
    vm.process();
    assert_eq!(vm.hints().last(), Some(&(next, page(0), PAGE)));
    assert_eq!(vm.hints().len(), at_stop + 1);
}

// ---------------------------------------------------------------------------------------- The
// start-buffer fence (`docs/protocol.md`, "Stale ids and the start-buffer fence"): a start buffer
// counts only if the guest made it available after the id was published.
// ----------------------------------------------------------------------------------------

/// The fence: the guest's start buffer for round N (Linux's one reused slot) and its hints are
/// still on the ring when the migration moves to round N+1 and the guest overwrites the
/// slot with N+1. The old buffer must not start N+1; a fresh one does.
#[test]
fn fence_old_start_buffer_does_not_start_the_next_round() {
    let mut vm = Vm::ready();
    let n = vm.ctl.start_round();
    vm.post_start(n);
    vm.post_hint(page(0), PAGE);
    vm.post_hint(page(1), PAGE);

    vm.ctl.stop_round();
    let n1 = vm.ctl.start_round();
    assert_ne!(n1, n);
    write_u32(&vm.mem, START_SLOT, n1);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    assert!(
        vm.hints().is_empty(),
        "old round's hints: {:x?}",
        vm.hints()
    );
    vm.assert_all_returned();

    vm.post_start(n1);
    vm.post_hint(page(2), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(n1, page(2), PAGE)]);
}

/// The fence, a slow guest: it read N, but makes its start buffer available only after
/// `stop_round` (so `stop_round` had nothing to consume) and before N+1 is published, then
/// overwrites the slot with N+1.
#[test]
fn fence_start_buffer_posted_between_stop_and_start() {
    let mut vm = Vm::ready();
    let n = vm.ctl.start_round();
    assert_eq!(vm.cmd_id(), n);
    vm.ctl.stop_round();
    vm.post_start(n);
    vm.post_hint(page(0), PAGE);
    vm.post_hint(page(1), PAGE);
    let n1 = vm.ctl.start_round();
    write_u32(&vm.mem, START_SLOT, n1);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    assert!(
        vm.hints().is_empty(),
        "old round's hints: {:x?}",
        vm.hints()
    );
    assert_eq!(vm.metrics().stale_commands, 1);
    vm.assert_all_returned();

    vm.post_start(n1);
    vm.post_hint(page(2), PAGE);
    vm.process();
    assert_eq!(vm.hints(), [(n1, page(2), PAGE)]);
}

/// The fence with the VM paused across the sync: `stop_round` cannot consume the ring, so only
/// the fence keeps the old start buffer (slot now N+1) from starting round N+1.
#[test]
fn fence_old_start_buffer_while_paused() {
    let mut vm = Vm::ready();
    let n = vm.ctl.start_round();
    vm.post_start(n);
    vm.post_hint(page(0), PAGE);

    vm.mmio.device_mut().pause();
    vm.ctl.stop_round();
    let n1 = vm.ctl.start_round();
    vm.mmio.device_mut().resume();

    write_u32(&vm.mem, START_SLOT, n1);
    vm.post_hint(page(1), PAGE);
    vm.post_start(n1);
    vm.post_hint(page(2), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(n1, page(2), PAGE)]);
    vm.assert_all_returned();
}

/// The fence without a `stop_round` in between (two `start_round`s in a row).
#[test]
fn fence_two_start_rounds_in_a_row() {
    let mut vm = Vm::ready();
    let n = vm.ctl.start_round();
    vm.post_start(n);
    vm.post_hint(page(0), PAGE);
    let n1 = vm.ctl.start_round();
    write_u32(&vm.mem, START_SLOT, n1);
    vm.process();
    assert_eq!(vm.state(), HintState::Requested);
    assert!(vm.hints().is_empty());

    vm.post_start(n1);
    vm.post_hint(page(1), PAGE);
    vm.process();
    assert_eq!(vm.hints(), [(n1, page(1), PAGE)]);
    vm.assert_all_returned();
}

/// The fence compares ring positions modulo 2^16: it holds when the available index wraps
/// between the old start buffer, the fence and the new start buffer.
#[test]
fn fence_survives_avail_index_wrap() {
    let mut vm = Vm::ready();
    // Move the available index to 0xfffd with elements the device ignores (STOP).
    let target = 0xfffd_u16;
    while vm.ring.avail_idx() != target {
        let room = usize::from(vm.ring.num_free()) as u16;
        let left = target.wrapping_sub(vm.ring.avail_idx());
        for _ in 0..room.min(left) {
            vm.post_hint(page(0), PAGE);
        }
        vm.process();
        vm.reclaim();
    }
    assert!(vm.hints().is_empty());

    // The old start buffer at 0xfffd, paused across the sync, fence at 0xfffe.
    let n = vm.ctl.start_round();
    vm.post_start(n);
    vm.mmio.device_mut().pause();
    vm.ctl.stop_round();
    let n1 = vm.ctl.start_round();
    vm.mmio.device_mut().resume();
    write_u32(&vm.mem, START_SLOT, n1);

    // Hints at 0xfffe and 0xffff (ignored), the new start buffer at 0 (after the wrap), a
    // hint at 1.
    vm.post_hint(page(1), PAGE);
    vm.post_hint(page(2), PAGE);
    vm.post_start(n1);
    assert_eq!(vm.ring.avail_idx(), 1);
    vm.post_hint(page(3), PAGE);
    vm.process();
    assert_eq!(vm.state(), HintState::Start);
    assert_eq!(vm.hints(), [(n1, page(3), PAGE)]);
    assert_eq!(vm.metrics().stale_commands, 1);
    vm.assert_all_returned();
}

/// Found by the `hint_desc` fuzzer: an available index more than a queue size ahead of the
/// device made `process_queue` (and `stop_round`'s drain) loop forever. The device must
/// return, apply nothing, and serve the queue again once the driver repairs its index.
#[test]
fn edge_08_available_index_far_ahead_does_not_hang() {
    log_everything();
    let mut vm = Vm::ready();
    let id = vm.begin_round();
    vm.post_hint(page(0), PAGE);
    let good_idx = vm.ring.avail_idx();
    // The driver publishes an index 250 entries ahead of a 64-entry ring.
    let bad_idx = good_idx.wrapping_add(250);
    vm.mem
        .write_slice(
            &bad_idx.to_le_bytes(),
            GuestAddress(vm.ring.layout.avail.0 + 2),
        )
        .unwrap();
    vm.process();
    vm.ctl.stop_round();
    assert!(
        vm.hints().is_empty(),
        "nothing is applied from a broken ring"
    );

    // The driver repairs its index: the queued element is served (in STOP, so ignored).
    vm.mem
        .write_slice(
            &good_idx.to_le_bytes(),
            GuestAddress(vm.ring.layout.avail.0 + 2),
        )
        .unwrap();
    vm.process();
    assert_eq!(vm.pending(), 0);
    let next = vm.ctl.start_round();
    assert!(next > id);
    vm.post_start(next);
    vm.post_hint(page(1), PAGE);
    vm.process();
    assert_eq!(vm.hints(), vec![(next, page(1), PAGE)]);
}
