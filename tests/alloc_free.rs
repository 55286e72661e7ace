// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The free page hint path allocates nothing on the heap in steady state.
//!
//! A counting global allocator wraps `System` and counts allocations (`alloc`,
//! `alloc_zeroed`, `realloc`) made by the current thread while that thread has counting
//! switched on, so the test harness and tests running in parallel do not disturb the count.
//! Counting is on only around `Balloon::process_queue`, the event loop's call; the guest's
//! side (writing descriptors and rings) and the device setup are free to allocate.
//!
//! The device is set up as a driver does (virtio-mmio registers, features `VERSION_1` +
//! `FREE_PAGE_HINT`), a round is started and the guest's start buffer puts it in START, with a
//! [`MigrationBitmap`] as the sink, all pages dirty so hints really clear bits.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guest_model::ring::{
    self, Desc, RingLayout, SplitRing, VRING_DESC_F_INDIRECT as F_INDIRECT,
    VRING_DESC_F_NEXT as F_NEXT, VRING_DESC_F_WRITE as F_WRITE,
};
use virtio_balloon::migration::MigrationBitmap;
use virtio_balloon::transport::MmioTransport;
use virtio_balloon::{Balloon, BalloonConfig, FreePageHinting, HintMetrics, HintState, QueueRole};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// ---------------------------------------------------------------------------------------
// The counting allocator.

thread_local! {
    // Const-initialised `Cell`s of plain integers: no destructor to register and no lazy
    // initialisation, so touching them from inside the allocator never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct CountingAlloc;

impl CountingAlloc {
    fn record() {
        // `try_with`: during thread teardown the slots may be gone; nothing is counted then.
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; the counting touches only
// thread-local integers and never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::record();
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::record();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::record();
        // SAFETY: `ptr` was allocated by this allocator, that is by `System`, with `layout`;
        // the caller upholds the rest of `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` with this thread's allocations counted; returns how many it made.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn the_counter_sees_allocations() {
    let n = allocations_in(|| {
        let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(4));
        drop(v);
        let mut s = String::new();
        s.push('x');
        std::hint::black_box(&s);
    });
    assert_eq!(n, 2);
}

// ---------------------------------------------------------------------------------------
// A logger that formats every record without allocating.

/// Formats into nothing: evaluates every argument's `Display`/`Debug` code, keeps no text.
struct Discard;

impl std::fmt::Write for Discard {
    fn write_str(&mut self, _: &str) -> std::fmt::Result {
        Ok(())
    }
}

struct CountingLogger {
    records: AtomicU64,
}

impl log::Log for CountingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let _ = write!(Discard, "{}", record.args());
        self.records.fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&self) {}
}

static LOGGER: CountingLogger = CountingLogger {
    records: AtomicU64::new(0),
};

// ---------------------------------------------------------------------------------------
// Guest memory, the driver's side of the free page queue, and the device.

use guest_model::bring_up;
type Mem = GuestMemoryMmap<AtomicBitmap>;
type Device = Balloon<Arc<Mem>>;

const MIB: u64 = 1 << 20;
/// Linux reports free pages in 4 MiB blocks.
const BLOCK: u64 = 4 * MIB;
/// RAM: [0, 32 MiB) and [64 MiB, 96 MiB), a hole in between.
const LOW_END: u64 = 32 * MIB;
const HIGH_START: u64 = 64 * MIB;
const HIGH_END: u64 = 96 * MIB;
/// The hint blocks, reused round-robin: the 8 blocks of the low region.
const HINT_BLOCKS: u64 = LOW_END / BLOCK;

const QUEUE_SIZE: u16 = 256;
/// The rings, the command buffer and an indirect table, at the top of the high region.
const DESC_TABLE: u64 = HIGH_END - MIB;
const AVAIL: u64 = DESC_TABLE + 0x1000;
const USED: u64 = DESC_TABLE + 0x2000;
const CMD_BUF: u64 = DESC_TABLE + 0x4000;
const INDIRECT: u64 = DESC_TABLE + 0x5000;

/// The guest's side of the free page queue: Linux's ring writer. The device uses every
/// chain of a batch before the next one, and the chains are reclaimed after each batch.
struct Guest {
    mem: Arc<Mem>,
    ring: SplitRing,
    /// Chains added since the last batch.
    posted: u16,
}

fn hint(addr: u64, len: u32) -> Desc {
    Desc::input(addr, len)
}

fn out(addr: u64, len: u32) -> Desc {
    Desc::out(addr, len)
}

impl Guest {
    /// Adds a chain of `parts`, linked with NEXT.
    fn chain(&mut self, parts: &[Desc]) {
        self.ring.add_descs(&self.mem, parts, 0).unwrap();
        self.posted += 1;
    }

    /// Adds a one-descriptor chain written as is (its flags and `next` untouched); `next`
    /// gets the descriptor's own index when `None` (a loop).
    fn raw(&mut self, d: Desc, next: Option<u16>) {
        let ids = self.ring.alloc(1).unwrap();
        let d = Desc {
            next: next.unwrap_or(ids[0]),
            ..d
        };
        self.ring.write_desc_raw(&self.mem, ids[0], d).unwrap();
        self.ring.publish_chain(&self.mem, &ids, 0).unwrap();
        self.posted += 1;
    }

    /// The chains added since the last call (all published already).
    fn publish(&mut self) -> u16 {
        std::mem::take(&mut self.posted)
    }

    fn used_idx(&self) -> u16 {
        self.ring.used_idx(&self.mem).unwrap()
    }

    /// The 4 MiB block `i` of the low region (round-robin).
    fn block(i: u64) -> u64 {
        (i % HINT_BLOCKS) * BLOCK
    }

    fn start_buffer(&mut self, id: u32) {
        self.mem
            .write_obj(id.to_le(), GuestAddress(CMD_BUF))
            .unwrap();
        self.chain(&[out(CMD_BUF, 4)]);
    }
}

struct Setup {
    transport: MmioTransport<Device>,
    queue: usize,
    guest: Guest,
    sink: Arc<MigrationBitmap>,
    control: FreePageHinting,
}

impl Setup {
    /// A device in START, driven there through its registers and a start buffer.
    fn new() -> Self {
        let mem = Arc::new(
            Mem::from_ranges(&[
                (GuestAddress(0), LOW_END as usize),
                (GuestAddress(HIGH_START), (HIGH_END - HIGH_START) as usize),
            ])
            .unwrap(),
        );
        let sink = Arc::new(MigrationBitmap::new(&*mem).unwrap());
        sink.mark_all_dirty();
        let cfg = BalloonConfig::default()
            .with_stats(false)
            .with_free_page_queue_size(QUEUE_SIZE)
            .with_chains_per_wakeup(QUEUE_SIZE);
        let balloon = Balloon::new(cfg, mem.clone(), sink.clone()).unwrap();
        let queue = balloon.queue_layout().index(QueueRole::FreePage).unwrap();
        let control = balloon.hint_control();
        let mut t = MmioTransport::new(balloon);
        bring_up::bring_up_hinting(&mut t, &[(queue, QUEUE_SIZE, [DESC_TABLE, AVAIL, USED])]);

        // An indirect table one descriptor longer than the queue: 4 KiB hints, chained.
        let table: Vec<Desc> = (0..=QUEUE_SIZE)
            .map(|i| hint(Guest::block(u64::from(i)), 0x1000))
            .collect();
        ring::write_table(&mem, GuestAddress(INDIRECT), &table).unwrap();
        let layout = RingLayout::linux(GuestAddress(DESC_TABLE), QUEUE_SIZE);
        assert_eq!((layout.avail.0, layout.used.0), (AVAIL, USED));
        let ring = SplitRing::new(&mem, queue as u16, layout, false, true, None).unwrap();

        let mut s = Setup {
            transport: t,
            queue,
            guest: Guest {
                mem,
                ring,
                posted: 0,
            },
            sink,
            control,
        };
        let id = s.control.start_round();
        s.guest.start_buffer(id);
        s.run_batch();
        assert_eq!(s.control.status().state, HintState::Start);
        s
    }

    /// Publishes the chains the guest added and lets the device handle them in one
    /// `process_queue` call. Returns the allocations made inside that call.
    fn run_batch(&mut self) -> u64 {
        let posted = self.guest.publish();
        let before = self.guest.used_idx();
        let (transport, queue) = (&mut self.transport, self.queue);
        let n = allocations_in(|| transport.device_mut().process_queue(queue));
        assert_eq!(
            self.guest.used_idx().wrapping_sub(before),
            posted,
            "every chain is used"
        );
        let g = &mut self.guest;
        let used = g.ring.reclaim_all(&g.mem).unwrap();
        assert_eq!(used.len(), usize::from(posted));
        n
    }

    /// `count` 4 MiB hints in batches of at most `QUEUE_SIZE - 1`. Returns the allocations.
    fn hint_blocks(&mut self, count: u64) -> u64 {
        let batch = u64::from(QUEUE_SIZE - 1);
        let mut allocations = 0;
        let mut done = 0;
        while done < count {
            let n = batch.min(count - done);
            self.sink.mark_all_dirty();
            let hinted = self.sink.hinted_pages();
            for i in done..done + n {
                self.guest.chain(&[hint(Guest::block(i), BLOCK as u32)]);
            }
            allocations += self.run_batch();
            // The bitmap was all dirty: the first hint of each distinct block cleared it.
            assert_eq!(
                self.sink.hinted_pages() - hinted,
                n.min(HINT_BLOCKS) * (BLOCK >> 12)
            );
            done += n;
        }
        allocations
    }

    fn metrics(&self) -> HintMetrics {
        self.control.status().metrics
    }

    /// Everything the device must refuse or trim, `repeat` times over (13 chains, 15
    /// descriptors each time).
    fn post_rejects(&mut self, repeat: usize) {
        for _ in 0..repeat {
            let g = &mut self.guest;
            // Malformed elements.
            g.chain(&[hint(Guest::block(0), BLOCK as u32), out(CMD_BUF, 4)]); // order
            g.chain(&[out(CMD_BUF, 2), hint(Guest::block(1), BLOCK as u32)]); // short command
            g.chain(&[out(HIGH_END + MIB, 4)]); // unreadable command
            let looped = Desc::new(Guest::block(2), BLOCK as u32, F_WRITE | F_NEXT, 0);
            g.raw(looped, None); // a loop
            let past = Desc::new(Guest::block(3), BLOCK as u32, F_WRITE | F_NEXT, QUEUE_SIZE);
            g.raw(past, Some(QUEUE_SIZE)); // next past the table
                                           // An indirect table of 3 bytes is not a table: an empty chain.
            g.raw(Desc::new(INDIRECT, 3, F_INDIRECT, 0), Some(0));
            let long = Desc::indirect(INDIRECT, u32::from(QUEUE_SIZE) + 1);
            g.raw(long, Some(0)); // a chain longer than the queue, through an indirect table

            // Well-formed elements whose hints are refused or trimmed.
            g.chain(&[hint(HIGH_END + BLOCK, BLOCK as u32)]); // outside RAM
            let over_hole = (HIGH_START - LOW_END + 2 * MIB) as u32;
            g.chain(&[hint(LOW_END - MIB, over_hole)]); // across the hole
            g.chain(&[hint(HIGH_END - BLOCK / 2, BLOCK as u32)]); // past the end of RAM
            g.chain(&[hint(Guest::block(4), 0)]); // zero length
            g.chain(&[hint(u64::MAX - 0xfff, 0x2000)]); // overflow
            g.chain(&[hint(Guest::block(5) + 1, 0x1000)]); // no whole page
        }
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn steady_state_hints_allocate_nothing() {
    let mut s = Setup::new();
    // Warm up with one full batch.
    s.hint_blocks(u64::from(QUEUE_SIZE - 1));

    let before = s.metrics();
    let small = s.hint_blocks(100);
    let large = s.hint_blocks(1000);
    let after = s.metrics();
    assert_eq!(after.hints_accepted - before.hints_accepted, 1100);
    assert_eq!(after.bytes_accepted - before.bytes_accepted, 1100 * BLOCK);
    assert_eq!(after.elements - before.elements, 1100);
    assert_eq!(
        (small, large),
        (0, 0),
        "allocations for 100 and for 1000 hint descriptors"
    );
}

#[test]
fn rejected_elements_allocate_nothing() {
    let mut s = Setup::new();
    s.hint_blocks(u64::from(QUEUE_SIZE - 1));
    log::set_max_level(log::LevelFilter::Off);

    // START: malformed elements, hints outside RAM, empty, overflowing, sub-page.
    let before = s.metrics();
    s.post_rejects(1);
    let first = s.run_batch(); // the first occurrence of each warning
    s.post_rejects(16);
    let in_start = s.run_batch();
    let m = s.metrics();
    let reps = 17;
    assert_eq!(m.malformed_elements - before.malformed_elements, 7 * reps);
    assert_eq!(m.hints_outside_ram - before.hints_outside_ram, 3 * reps);
    assert_eq!(m.hints_zero_length - before.hints_zero_length, reps);
    assert_eq!(m.hints_overflow - before.hints_overflow, reps);
    assert_eq!(m.hints_misaligned - before.hints_misaligned, reps);
    assert_eq!(m.rounds_started, 1, "no malformed element ends the round");
    assert_eq!(s.control.status().state, HintState::Start);

    // REQUESTED: hints before the start buffer, and a stale start buffer.
    let old_id = s.control.status().cmd_id;
    s.control.start_round();
    for i in 0..100 {
        s.guest.chain(&[hint(Guest::block(i), BLOCK as u32)]);
    }
    s.guest.start_buffer(old_id);
    let in_requested = s.run_batch();

    // STOP: hints and commands after the migration stopped the round.
    s.control.stop_round();
    for i in 0..100 {
        s.guest.chain(&[hint(Guest::block(i), BLOCK as u32)]);
    }
    s.guest.start_buffer(old_id);
    let in_stop = s.run_batch();

    // DONE.
    s.control.done();
    for i in 0..100 {
        s.guest.chain(&[hint(Guest::block(i), BLOCK as u32)]);
    }
    let in_done = s.run_batch();
    let m2 = s.metrics();
    assert_eq!(m2.hints_wrong_state - m.hints_wrong_state, 300);
    assert_eq!(m2.stale_commands - m.stale_commands, 1);
    assert_eq!(m2.ignored_commands - m.ignored_commands, 1);

    assert_eq!(
        (first, in_start, in_requested, in_stop, in_done),
        (0, 0, 0, 0, 0),
        "allocations with no logger: first rejects, more rejects, REQUESTED, STOP, DONE"
    );

    // The same with a logger that formats every record: the warnings' arguments are
    // formatted and still nothing is allocated. The warnings are rate-limited (1st, 2nd, 4th,
    // ... occurrence); 224 more malformed elements cross at least one power of two.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
    let id = s.control.start_round();
    s.guest.start_buffer(id);
    s.post_rejects(16);
    let logged_start = s.run_batch();
    s.post_rejects(16);
    let logged_more = s.run_batch();
    for i in 0..100 {
        s.guest.chain(&[hint(Guest::block(i), BLOCK as u32)]);
    }
    let logged_hints = s.run_batch();
    log::set_max_level(log::LevelFilter::Off);
    assert!(
        LOGGER.records.load(Ordering::Relaxed) > 0,
        "the warnings were logged"
    );
    assert_eq!(s.control.status().state, HintState::Start);
    assert_eq!(
        (logged_start, logged_more, logged_hints),
        (0, 0, 0),
        "allocations with a logger installed"
    );
}
