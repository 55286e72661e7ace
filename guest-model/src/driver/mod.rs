// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A model of Linux's `drivers/virtio/virtio_balloon.c` (6.12) on top of `virtio_mmio.c`, plus
//! low-level access for hostile tests.
//!
//! The model talks to the device only as a guest would: 4-byte MMIO accesses through a [`Bus`],
//! split rings it lays out itself in guest memory, a kick per queue (ioeventfd write, or a
//! QueueNotify write), and the interrupt eventfd (irqfd) followed by InterruptStatus /
//! InterruptACK.
//!
//! The free page hinting part follows `report_free_page_func` and its helpers line by line; the
//! Linux function names are kept ([`Driver::cmd_id_received`], [`Driver::send_cmd_id_start`],
//! [`Driver::get_free_page_and_send`], [`Driver::send_free_pages`], [`Driver::send_cmd_id_stop`],
//! [`Driver::report_free_page_func`]) so a test can run a round step by step, or let background
//! threads (the interrupt handler and the workqueue) run it on their own.
//!
//! The traditional balloon (inflate, deflate, deflate on OOM, statistics, free page reporting)
//! lives in the child module `balloon` (`guest-model/src/driver/balloon.rs`), under the same Linux
//! names ([`Driver::fill_balloon`], [`Driver::leak_balloon`], [`Driver::tell_host`],
//! [`Driver::update_balloon_size_func`], [`Driver::stats_handle_request`], ...).
//!
//! Background mode runs Linux's three work items on their own threads: the free page work
//! (`balloon_wq`), and the size and stats works (`system_freezable_wq`). A config interrupt queues
//! the size work (and the free page work with FREE_PAGE_HINT); a used buffer interrupt runs the
//! callback of every queue with new used buffers: `balloon_ack` for inflateq, deflateq and
//! reporting_vq, `stats_request` (which queues the stats work) for statsq. In step mode the works
//! are only marked pending; a test runs them with [`Driver::run_free_page_work`],
//! [`Driver::run_size_work`] and [`Driver::run_stats_work`].

mod balloon;

pub use balloon::{
    default_stat_value, stat, BalloonRequest, PageOrder, SizeEnd, SizeUpdate, BALLOON_PFN_BYTES,
    LINUX_STATS_ORDER, STAT_ENTRY_BYTES, VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_OOM_NR_PAGES, VIRTIO_BALLOON_PFN_SHIFT,
};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::mmio::{cmd, config, feature, isr, reg, status, Bus, MMIO_MAGIC_VALUE};
use crate::ring::{align_up, Desc, GuestMem, Part, RingError, RingLayout, SplitRing, UsedBuf};

/// `VIRTIO_BALLOON_HINT_BLOCK_ORDER` on x86-64 with 4 KiB pages: 2^10 pages.
pub const HINT_BLOCK_BYTES: u64 = 4 << 20;
/// Balloon device id.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Linux `PAGE_REPORTING_CAPACITY`.
pub const PAGE_REPORTING_CAPACITY: u16 = 32;
/// Linux's `PAGE_POISON` byte repeated four times.
pub const PAGE_POISON_VAL: u32 = 0xaaaa_aaaa;
/// The generous deadline used for every wait in the model (a hang guard, not a timing
/// assertion).
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Token of the start buffer in the free page queue.
pub const TOKEN_START: u64 = u64::MAX - 1;
/// Token of the stop buffer in the free page queue.
pub const TOKEN_STOP: u64 = u64::MAX - 2;
/// Token of the stats buffer.
pub const TOKEN_STATS: u64 = u64::MAX - 3;
/// Token of chains posted through the low-level API.
pub const TOKEN_RAW: u64 = u64::MAX - 4;
/// Bytes reserved for the stats buffer in the driver area (204 entries).
pub const STATS_BUF_MAX: usize = 0x800;

/// The balloon queues in Linux's order; the index on the transport is this order with the
/// queues whose feature was not negotiated left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueRole {
    /// inflateq.
    Inflate = 0,
    /// deflateq.
    Deflate = 1,
    /// statsq (STATS_VQ).
    Stats = 2,
    /// free_page_vq (FREE_PAGE_HINT).
    FreePage = 3,
    /// reporting_vq (REPORTING).
    Reporting = 4,
}

impl QueueRole {
    /// All roles in Linux's order.
    pub const ALL: [QueueRole; 5] = [
        QueueRole::Inflate,
        QueueRole::Deflate,
        QueueRole::Stats,
        QueueRole::FreePage,
        QueueRole::Reporting,
    ];

    fn feature(self) -> Option<u32> {
        match self {
            QueueRole::Inflate | QueueRole::Deflate => None,
            QueueRole::Stats => Some(feature::STATS_VQ),
            QueueRole::FreePage => Some(feature::FREE_PAGE_HINT),
            QueueRole::Reporting => Some(feature::REPORTING),
        }
    }

    /// Linux gives every queue but free_page_vq a callback.
    fn has_callback(self) -> bool {
        self != QueueRole::FreePage
    }
}

/// How the model notifies a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KickMode {
    /// Write 1 to the queue's eventfd (what KVM's ioeventfd does for a QueueNotify write).
    IoEventFd,
    /// Write the queue index to the QueueNotify register.
    Mmio,
}

/// Knobs of the guest model.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Guest memory the model owns for its rings, command slots, stats buffer, indirect
    /// tables and scratch buffers: (base, length). Base 4 KiB aligned; at least 1 MiB.
    pub driver_area: (GuestAddress, u64),
    /// Blocks (each `block_size` long and aligned) the model's page allocator starts with.
    pub free_blocks: Vec<GuestAddress>,
    /// The hint block size (`VIRTIO_BALLOON_HINT_BLOCK_BYTES`).
    pub block_size: u64,
    /// Accept VIRTIO_RING_F_EVENT_IDX if offered.
    pub ack_event_idx: bool,
    /// Accept VIRTIO_RING_F_INDIRECT_DESC if offered.
    pub ack_indirect: bool,
    /// Entries per head in the model's indirect tables.
    pub indirect_per_head: u16,
    /// The guest poisons or zeroes freed pages: `Some(poison_val)` (0 for init_on_free,
    /// [`PAGE_POISON_VAL`] for page poisoning). `None`: neither, so `validate` clears
    /// PAGE_POISON.
    pub guest_poison: Option<u32>,
    /// How kicks reach the device.
    pub kick: KickMode,
    /// Pause after each hinted block (0 = as fast as possible).
    pub block_pace: Duration,
    /// How long the hint loop spins on a full ring before giving up (the real driver spins
    /// until the id changes).
    pub ring_full_give_up: Duration,
    /// In step mode (no background threads), deliver pending interrupts whenever the driver
    /// checks the received id, as an asynchronous interrupt would.
    pub async_irq_in_step_mode: bool,
    /// Number of 10-byte entries in the stats buffer: the first `num_stats` of
    /// `stats_tags` (Linux 6.12: all 16).
    pub num_stats: usize,
    /// The tags `update_balloon_stats` writes, in order (default [`LINUX_STATS_ORDER`]).
    pub stats_tags: Vec<u16>,
    /// Initial stats values by tag (a tag not listed reports [`default_stat_value`]).
    pub stat_values: Vec<(u16, u64)>,
    /// Cap queue sizes at this value (None: use QueueNumMax as Linux does).
    pub max_queue_size: Option<u16>,
    /// Guest memory the balloon's page allocator owns: (start, length) ranges, rounded inward
    /// to whole pages. Must not overlap the driver area, the hint blocks or each other, and
    /// must lie below 16 TiB (32-bit PFNs).
    pub balloon_pool: Vec<(GuestAddress, u64)>,
    /// The guest page size (4 KiB; 16 or 64 KiB guests put 4 or 16 consecutive PFNs per
    /// page). A power of two from 4 KiB to 1 MiB.
    pub page_size: u64,
    /// The order the allocator hands out never-used pool pages.
    pub page_order: PageOrder,
    /// How long `fill_balloon` sleeps when the allocator is dry (Linux: 200 ms; the model
    /// defaults to 0 because its size work stops instead of retrying).
    pub out_of_puff_sleep: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            driver_area: (GuestAddress(0x10_0000), 0x30_0000),
            free_blocks: Vec::new(),
            block_size: HINT_BLOCK_BYTES,
            ack_event_idx: false,
            ack_indirect: false,
            indirect_per_head: 8,
            guest_poison: None,
            kick: KickMode::IoEventFd,
            block_pace: Duration::ZERO,
            ring_full_give_up: DEADLINE,
            async_irq_in_step_mode: true,
            num_stats: LINUX_STATS_ORDER.len(),
            stats_tags: LINUX_STATS_ORDER.to_vec(),
            stat_values: Vec::new(),
            max_queue_size: None,
            balloon_pool: Vec::new(),
            page_size: 4096,
            page_order: PageOrder::Ascending,
            out_of_puff_sleep: Duration::ZERO,
        }
    }
}

/// Errors of the model.
#[derive(Debug)]
pub enum DriverError {
    /// The probe failed the way Linux's would.
    Probe(String),
    /// A ring operation failed.
    Ring(RingError),
    /// A queue the operation needs does not exist.
    NoQueue(String),
    /// A wait hit its deadline. The text has the ring and register evidence.
    Timeout(String),
    /// A wait was given up because the background threads were stopped.
    Aborted(String),
    /// An OS call failed.
    Io(std::io::Error),
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::Probe(s) => write!(f, "probe failed: {s}"),
            DriverError::Ring(e) => write!(f, "ring error: {e}"),
            DriverError::NoQueue(s) => write!(f, "no such queue: {s}"),
            DriverError::Timeout(s) => write!(f, "timed out: {s}"),
            DriverError::Aborted(s) => write!(f, "aborted: {s}"),
            DriverError::Io(e) => write!(f, "io error: {e}"),
        }
    }
}

impl std::error::Error for DriverError {}

impl From<RingError> for DriverError {
    fn from(e: RingError) -> Self {
        DriverError::Ring(e)
    }
}

impl From<std::io::Error> for DriverError {
    fn from(e: std::io::Error) -> Self {
        DriverError::Io(e)
    }
}

/// Result type of the model.
pub type Result<T> = std::result::Result<T, DriverError>;

/// What one interrupt delivery found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqReport {
    /// InterruptStatus as read (and acked).
    pub isr: u32,
}

impl IrqReport {
    /// A configuration change was signalled.
    pub fn config(&self) -> bool {
        self.isr & isr::CONFIG != 0
    }

    /// A used buffer notification was signalled.
    pub fn vring(&self) -> bool {
        self.isr & isr::VRING != 0
    }
}

/// What one `get_free_page_and_send` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// A block was posted (and kicked) and is now held.
    Block(GuestAddress),
    /// Only the reserved descriptor was free: the block went straight back.
    RingFull,
    /// The allocator had no block left.
    NoMemory,
}

/// Why a hint round ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoundEnd {
    /// The received id no longer matched the active id.
    IdChanged(u32),
    /// No free block was left.
    OutOfBlocks,
    /// The ring stayed full past [`DriverOptions::ring_full_give_up`].
    RingFullGaveUp,
    /// The model was told to stop (test teardown).
    Aborted,
    /// A ring or memory error.
    Error(String),
}

/// One completed round as the guest saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundReport {
    /// The id the round ran under.
    pub id: u32,
    /// Blocks posted.
    pub hinted: usize,
    /// Why it ended.
    pub end: RoundEnd,
}

/// What one run of the free page work did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkOutcome {
    /// The received id was DONE: this many blocks went back to the allocator.
    Done {
        /// Blocks given back.
        returned: usize,
    },
    /// The received id was STOP: nothing done.
    Stop,
    /// The received id equalled the active id: nothing done.
    SameId(u32),
    /// A round ran.
    Round(RoundReport),
}

/// One hint block the guest posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostedHint {
    /// Global posting order.
    pub seq: u64,
    /// The active id (the value in the start slot) when it was posted.
    pub active_id: u32,
    /// The block.
    pub gpa: GuestAddress,
    /// Its length.
    pub len: u64,
    /// The descriptor head used.
    pub head: u16,
}

#[derive(Debug, Default)]
struct Queues {
    rings: Vec<SplitRing>,
    roles: [Option<usize>; 5],
}

#[derive(Debug, Default)]
struct Fph {
    received_cache: u32,
}

#[derive(Debug, Default)]
struct Alloc {
    free: BTreeSet<u64>,
    /// Held hint blocks; the last one is the head of Linux's list.
    held: Vec<u64>,
}

/// Linux's work items.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkKind {
    /// `report_free_page_work` on `balloon_wq`: [`Driver::report_free_page_func`].
    FreePage = 0,
    /// `update_balloon_size_work`: [`Driver::update_balloon_size_func`].
    UpdateSize = 1,
    /// `update_balloon_stats_work`: [`Driver::stats_handle_request`].
    UpdateStats = 2,
}

impl WorkKind {
    /// All work items.
    pub const ALL: [WorkKind; 3] = [
        WorkKind::FreePage,
        WorkKind::UpdateSize,
        WorkKind::UpdateStats,
    ];
}

#[derive(Debug, Default)]
struct WorkState {
    pending: bool,
    running: bool,
    runs: u64,
}

/// One work item: queued at most once, re-queueable while it runs (`queue_work`).
#[derive(Debug, Default)]
struct WorkItem {
    state: Mutex<WorkState>,
    cv: Condvar,
}

impl WorkItem {
    fn state_mut(&self) -> MutexGuard<'_, WorkState> {
        lock(&self.state)
    }
}

#[derive(Debug)]
struct Area {
    slots: GuestAddress,
    stats_buf: GuestAddress,
    pfns: GuestAddress,
    rings_start: u64,
    rings_end: u64,
    scratch_next: u64,
    scratch_end: u64,
}

struct Inner {
    bus: Arc<dyn Bus>,
    mem: Arc<GuestMem>,
    irq: EventFd,
    epoll: Epoll,
    queue_evts: Vec<EventFd>,
    opts: DriverOptions,
    pace_ns: AtomicU64,
    offered: AtomicU64,
    negotiated: AtomicU64,
    queues: Mutex<Queues>,
    fph: Mutex<Fph>,
    /// VIRTIO_BALLOON_CONFIG_READ_CMD_ID in `config_read_bitmap`.
    read_cmd_id: AtomicBool,
    alloc: Mutex<Alloc>,
    posted: Mutex<Vec<PostedHint>>,
    seq: AtomicU64,
    rounds: Mutex<Vec<RoundReport>>,
    errors: Mutex<Vec<String>>,
    /// What Linux reports with `dev_err` or `dev_info` and then carries on from (a full ring
    /// when the start or stop id is sent: the device has not caught up yet; "Out of puff!"
    /// when `fill_balloon` finds no page).
    kernel_log: Mutex<Vec<String>>,
    config_irqs: AtomicU64,
    vring_irqs: AtomicU64,
    irq_lock: Mutex<()>,
    works: [WorkItem; 3],
    /// `vb->stop_update`: set by remove, no work is queued any more.
    stop_update: AtomicBool,
    /// The balloon page allocator.
    pages: Mutex<balloon::PageAlloc>,
    /// `balloon_lock` with the balloon list and `vb->num_pages`.
    balloon: Mutex<balloon::BalloonList>,
    requests: Mutex<Vec<BalloonRequest>>,
    req_seq: AtomicU64,
    /// `vb->acked`: `balloon_ack` calls.
    acked: Mutex<u64>,
    acked_cv: Condvar,
    stats: Mutex<balloon::StatsState>,
    size_updates: Mutex<Vec<SizeUpdate>>,
    background: AtomicBool,
    bg_stop: AtomicBool,
    abort: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    area: Mutex<Area>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest driver model. Cheap to clone; clones share one driver.
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("negotiated", &self.negotiated_features())
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver for the device behind `bus`, with guest memory `mem`, the interrupt eventfd
    /// `irq` and the per-queue kick eventfds `queue_evts` (index = queue index). Nothing is
    /// written to the device until [`probe`](Self::probe).
    pub fn new(
        bus: Arc<dyn Bus>,
        mem: Arc<GuestMem>,
        irq: EventFd,
        queue_evts: Vec<EventFd>,
        opts: DriverOptions,
    ) -> Result<Self> {
        let (base, len) = opts.driver_area;
        if base.0 % 4096 != 0 || len < 0x10_0000 {
            return Err(DriverError::Probe(format!(
                "driver area {base:?}+{len:#x} must be 4 KiB aligned and at least 1 MiB"
            )));
        }
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&irq),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        let pool = balloon::check_balloon_options(&opts)?;
        let pages = balloon::PageAlloc::new(&pool, opts.page_size, opts.page_order);
        let stats = balloon::StatsState {
            values: opts.stat_values.iter().copied().collect::<BTreeMap<_, _>>(),
            ..Default::default()
        };
        let mut alloc = Alloc::default();
        for b in &opts.free_blocks {
            alloc.free.insert(b.0);
        }
        // 0x100..0x900 stats, 0x900..0x908 command ids, 0xc00..0x1000 the PFN array.
        let area = Area {
            slots: GuestAddress(base.0 + 0x900),
            stats_buf: GuestAddress(base.0 + 0x100),
            pfns: GuestAddress(base.0 + 0xc00),
            rings_start: base.0 + 0x1000,
            rings_end: base.0 + len / 2,
            scratch_next: base.0 + len / 2,
            scratch_end: base.0 + len,
        };
        let pace_ns = opts.block_pace.as_nanos() as u64;
        Ok(Driver {
            inner: Arc::new(Inner {
                bus,
                mem,
                irq,
                epoll,
                queue_evts,
                opts,
                pace_ns: AtomicU64::new(pace_ns),
                offered: AtomicU64::new(0),
                negotiated: AtomicU64::new(0),
                queues: Mutex::new(Queues::default()),
                fph: Mutex::new(Fph::default()),
                read_cmd_id: AtomicBool::new(false),
                alloc: Mutex::new(alloc),
                posted: Mutex::new(Vec::new()),
                seq: AtomicU64::new(0),
                rounds: Mutex::new(Vec::new()),
                errors: Mutex::new(Vec::new()),
                kernel_log: Mutex::new(Vec::new()),
                config_irqs: AtomicU64::new(0),
                vring_irqs: AtomicU64::new(0),
                irq_lock: Mutex::new(()),
                works: Default::default(),
                stop_update: AtomicBool::new(false),
                pages: Mutex::new(pages),
                balloon: Mutex::new(balloon::BalloonList::default()),
                requests: Mutex::new(Vec::new()),
                req_seq: AtomicU64::new(0),
                acked: Mutex::new(0),
                acked_cv: Condvar::new(),
                stats: Mutex::new(stats),
                size_updates: Mutex::new(Vec::new()),
                background: AtomicBool::new(false),
                bg_stop: AtomicBool::new(false),
                abort: AtomicBool::new(false),
                threads: Mutex::new(Vec::new()),
                area: Mutex::new(area),
            }),
        })
    }

    // ----------------------------------------------------------------------------------
    // Registers and config space.

    /// A 4-byte register read.
    pub fn read_reg(&self, offset: u64) -> u32 {
        self.inner.bus.read32(offset)
    }

    /// A 4-byte register write.
    pub fn write_reg(&self, offset: u64, value: u32) {
        self.inner.bus.write32(offset, value)
    }

    /// A config space read of `width` bytes (1, 2, 4 or 8) at `offset` within config space.
    pub fn read_config(&self, offset: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        self.inner.bus.read(reg::CONFIG + offset, &mut b[..width]);
        u64::from_le_bytes(b)
    }

    /// A config space write of `width` bytes (1, 2, 4 or 8).
    pub fn write_config(&self, offset: u64, width: usize, value: u64) {
        let b = value.to_le_bytes();
        self.inner.bus.write(reg::CONFIG + offset, &b[..width]);
    }

    /// A raw MMIO read of any width at any offset.
    pub fn bus_read(&self, offset: u64, data: &mut [u8]) {
        self.inner.bus.read(offset, data)
    }

    /// A raw MMIO write of any width at any offset.
    pub fn bus_write(&self, offset: u64, data: &[u8]) {
        self.inner.bus.write(offset, data)
    }

    /// `virtio_cread_le` of a 32-bit field: one 4-byte read.
    pub fn read_config32(&self, offset: u64) -> u32 {
        self.inner.bus.read32(reg::CONFIG + offset)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.read_reg(reg::STATUS)
    }

    fn add_status(&self, bits: u32) {
        let s = self.status();
        self.write_reg(reg::STATUS, s | bits);
    }

    /// Features the device offered at the last probe.
    pub fn offered_features(&self) -> u64 {
        self.inner.offered.load(Ordering::SeqCst)
    }

    /// Features negotiated at the last probe.
    pub fn negotiated_features(&self) -> u64 {
        self.inner.negotiated.load(Ordering::SeqCst)
    }

    /// Whether feature bit `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.negotiated_features() & feature::bit(bit) != 0
    }

    /// Guest memory.
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.inner.mem
    }

    /// The model's options.
    pub fn options(&self) -> &DriverOptions {
        &self.inner.opts
    }

    // ----------------------------------------------------------------------------------
    // Probe, reset.

    /// Reads DeviceFeatures (both halves).
    pub fn read_device_features(&self) -> u64 {
        self.write_reg(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read_reg(reg::DEVICE_FEATURES);
        self.write_reg(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read_reg(reg::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Writes DriverFeatures (both halves).
    pub fn write_driver_features(&self, f: u64) {
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, (f >> 32) as u32);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, f as u32);
    }

    /// The features this model supports (`id_table` features plus the transport ones).
    pub fn supported_features(&self) -> u64 {
        let mut f = feature::bit(feature::MUST_TELL_HOST)
            | feature::bit(feature::STATS_VQ)
            | feature::bit(feature::DEFLATE_ON_OOM)
            | feature::bit(feature::FREE_PAGE_HINT)
            | feature::bit(feature::PAGE_POISON)
            | feature::bit(feature::REPORTING)
            | feature::bit(feature::VERSION_1);
        if self.inner.opts.ack_event_idx {
            f |= feature::bit(feature::RING_EVENT_IDX);
        }
        if self.inner.opts.ack_indirect {
            f |= feature::bit(feature::RING_INDIRECT_DESC);
        }
        f
    }

    /// Linux's probe: reset, ACKNOWLEDGE, DRIVER, feature negotiation (with the balloon's
    /// `validate`), FEATURES_OK and its read-back, queue setup (compacted indexes), stats
    /// priming, the free page and reporting ring size checks, poison_val, DRIVER_OK. On
    /// failure the status gets FAILED, as Linux does.
    pub fn probe(&self) -> Result<()> {
        let r = self.probe_inner();
        if r.is_err() {
            self.add_status(status::FAILED);
        }
        r
    }

    fn probe_inner(&self) -> Result<()> {
        // vm_probe.
        let magic = self.read_reg(reg::MAGIC);
        if magic != MMIO_MAGIC_VALUE {
            return Err(DriverError::Probe(format!("bad magic {magic:#x}")));
        }
        let version = self.read_reg(reg::VERSION);
        if version != 2 {
            return Err(DriverError::Probe(format!(
                "version {version}, the model speaks only version 2"
            )));
        }
        let id = self.read_reg(reg::DEVICE_ID);
        if id != VIRTIO_ID_BALLOON {
            return Err(DriverError::Probe(format!("device id {id}, expected 5")));
        }
        // register_virtio_device: reset, then ACKNOWLEDGE.
        self.reset_rings();
        // virtballoon_probe starts from a zeroed vb.
        self.reset_balloon();
        self.inner.stop_update.store(false, Ordering::SeqCst);
        self.write_reg(reg::STATUS, 0);
        self.add_status(status::ACKNOWLEDGE);
        // virtio_dev_probe.
        self.add_status(status::DRIVER);
        let offered = self.read_device_features();
        self.inner.offered.store(offered, Ordering::SeqCst);
        let mut f = offered & self.supported_features();
        // virtballoon_validate.
        if self.inner.opts.guest_poison.is_none() {
            f &= !feature::bit(feature::PAGE_POISON);
        } else if f & feature::bit(feature::PAGE_POISON) == 0 {
            f &= !feature::bit(feature::REPORTING);
        }
        f &= !feature::bit(feature::ACCESS_PLATFORM);
        // vm_finalize_features.
        if f & feature::bit(feature::VERSION_1) == 0 {
            return Err(DriverError::Probe(
                "version 2 device without VIRTIO_F_VERSION_1".into(),
            ));
        }
        self.write_driver_features(f);
        self.inner.negotiated.store(f, Ordering::SeqCst);
        self.add_status(status::FEATURES_OK);
        let s = self.status();
        if s & status::FEATURES_OK == 0 {
            return Err(DriverError::Probe(format!(
                "device did not accept features {f:#x} (status {s:#x})"
            )));
        }
        // virtballoon_probe -> init_vqs.
        self.setup_queues(f)?;
        // Linux: cmd_id_received_cache, cmd_id_active and cmd_id_stop all STOP.
        {
            let mut fph = lock(&self.inner.fph);
            fph.received_cache = cmd::STOP;
            self.inner.read_cmd_id.store(false, Ordering::SeqCst);
            let slots = lock(&self.inner.area).slots;
            self.write_u32(slots, cmd::STOP)?;
            self.write_u32(GuestAddress(slots.0 + 4), cmd::STOP)?;
        }
        if f & feature::bit(feature::FREE_PAGE_HINT) != 0 {
            let size = self.ring_size(QueueRole::FreePage)?;
            if size < 2 {
                return Err(DriverError::Probe(format!(
                    "free_page_vq has {size} entries (-ENOSPC)"
                )));
            }
        }
        if f & feature::bit(feature::PAGE_POISON) != 0 {
            let v = self.inner.opts.guest_poison.unwrap_or(0);
            self.write_config(config::POISON_VAL, 4, u64::from(v));
        }
        if f & feature::bit(feature::REPORTING) != 0 {
            let size = self.ring_size(QueueRole::Reporting)?;
            if size < PAGE_REPORTING_CAPACITY {
                return Err(DriverError::Probe(format!(
                    "reporting_vq has {size} entries (-ENOSPC)"
                )));
            }
        }
        self.add_status(status::DRIVER_OK);
        if self.towards_target() != 0 {
            self.virtballoon_changed();
        }
        Ok(())
    }

    /// Linux `virtballoon_remove` (with `remove_common` and `vm_del_vqs`): stop updates and
    /// the background work, deflate the whole balloon over deflateq, write `actual`, give
    /// every hinted block back, reset the device, then deactivate every queue (QueueSel,
    /// QueueReady = 0, which must read back 0).
    pub fn remove(&self) {
        self.inner.stop_update.store(true, Ordering::SeqCst);
        self.stop_background();
        // while (vb->num_pages) leak_balloon(vb, vb->num_pages);
        loop {
            let n = self.balloon_num_pages();
            if n == 0 {
                break;
            }
            match self.leak_balloon(u64::from(n)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.error(format!("remove: deflating the balloon: {e}"));
                    break;
                }
            }
        }
        self.update_balloon_size();
        self.return_free_pages_to_mm(usize::MAX);
        self.write_reg(reg::STATUS, 0);
        let n = self.num_queues();
        for i in 0..n {
            self.write_reg(reg::QUEUE_SEL, i as u32);
            self.write_reg(reg::QUEUE_READY, 0);
            let ready = self.read_reg(reg::QUEUE_READY);
            if ready != 0 {
                self.error(format!(
                    "queue {i}: QueueReady reads {ready} after reset and QueueReady = 0"
                ));
            }
        }
        self.reset_rings();
    }

    fn setup_queues(&self, f: u64) -> Result<()> {
        let mem = &self.inner.mem;
        let event_idx = f & feature::bit(feature::RING_EVENT_IDX) != 0;
        let indirect = f & feature::bit(feature::RING_INDIRECT_DESC) != 0;
        let mut queues = Queues::default();
        let (stats_buf, rings_start, rings_end) = {
            let a = lock(&self.inner.area);
            (a.stats_buf, a.rings_start, a.rings_end)
        };
        let mut next = rings_start;
        for role in QueueRole::ALL {
            if let Some(bit) = role.feature() {
                if f & feature::bit(bit) == 0 {
                    continue;
                }
            }
            let index = queues.rings.len() as u16;
            // vm_setup_vq.
            self.write_reg(reg::QUEUE_SEL, u32::from(index));
            if self.read_reg(reg::QUEUE_READY) != 0 {
                return Err(DriverError::Probe(format!(
                    "queue {index} ({role:?}) already ready (-ENOENT)"
                )));
            }
            let max = self.read_reg(reg::QUEUE_NUM_MAX);
            if max == 0 {
                return Err(DriverError::Probe(format!(
                    "queue {index} ({role:?}): QueueNumMax 0 (-ENOENT)"
                )));
            }
            let mut size = u16::try_from(max).unwrap_or(u16::MAX);
            if let Some(cap) = self.inner.opts.max_queue_size {
                size = size.min(cap);
            }
            if !size.is_power_of_two() {
                return Err(DriverError::Probe(format!(
                    "queue {index} ({role:?}): QueueNumMax {max} is not a power of two"
                )));
            }
            let layout = RingLayout::linux(GuestAddress(align_up(next, 4096)), size);
            next = align_up(layout.end(), 4096);
            let ind = if indirect {
                let per = self.inner.opts.indirect_per_head;
                let base = GuestAddress(next);
                next = align_up(next + u64::from(size) * u64::from(per) * 16, 4096);
                Some((base, per))
            } else {
                None
            };
            if next > rings_end {
                return Err(DriverError::Probe(format!(
                    "driver area too small for the rings (need up to {next:#x}, have {rings_end:#x})"
                )));
            }
            let ring = SplitRing::new(mem, index, layout, event_idx, role.has_callback(), ind)?;
            self.write_reg(reg::QUEUE_NUM, u32::from(size));
            self.write_reg(reg::QUEUE_DESC_LOW, layout.desc.0 as u32);
            self.write_reg(reg::QUEUE_DESC_HIGH, (layout.desc.0 >> 32) as u32);
            self.write_reg(reg::QUEUE_AVAIL_LOW, layout.avail.0 as u32);
            self.write_reg(reg::QUEUE_AVAIL_HIGH, (layout.avail.0 >> 32) as u32);
            self.write_reg(reg::QUEUE_USED_LOW, layout.used.0 as u32);
            self.write_reg(reg::QUEUE_USED_HIGH, (layout.used.0 >> 32) as u32);
            self.write_reg(reg::QUEUE_READY, 1);
            queues.roles[role as usize] = Some(queues.rings.len());
            queues.rings.push(ring);
        }
        // init_vqs: prime the stats queue with one buffer and kick (before DRIVER_OK).
        let stats = queues.roles[QueueRole::Stats as usize];
        *lock(&self.inner.queues) = queues;
        if let Some(q) = stats {
            let num_stats = self.update_balloon_stats()?;
            let len = (num_stats * STAT_ENTRY_BYTES) as u32;
            let mut qs = lock(&self.inner.queues);
            qs.rings[q].add(mem, &[Part::out(stats_buf, len)], false, TOKEN_STATS)?;
            let kick = qs.rings[q].kick_prepare(mem)?;
            drop(qs);
            if kick {
                self.notify(q as u16);
            }
        }
        Ok(())
    }

    fn reset_rings(&self) {
        *lock(&self.inner.queues) = Queues::default();
    }

    /// `virtio_reset_device`: writes 0 to Status and forgets the rings (as `del_vqs` does).
    /// The free page ids are kept (as across freeze/restore); held blocks stay held unless
    /// `give_back_held`. Balloon pages stay in the balloon until the next probe.
    pub fn reset(&self, give_back_held: bool) {
        self.write_reg(reg::STATUS, 0);
        self.reset_rings();
        if give_back_held {
            self.return_free_pages_to_mm(usize::MAX);
        }
    }

    // ----------------------------------------------------------------------------------
    // Queues: low-level access.

    /// The transport index of a role, if that queue exists.
    pub fn queue_index(&self, role: QueueRole) -> Option<u16> {
        lock(&self.inner.queues).roles[role as usize].map(|i| i as u16)
    }

    fn role_index(&self, role: QueueRole) -> Result<u16> {
        self.queue_index(role)
            .ok_or_else(|| DriverError::NoQueue(format!("{role:?}")))
    }

    /// The free page queue's index.
    pub fn free_page_queue(&self) -> Result<u16> {
        self.role_index(QueueRole::FreePage)
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> usize {
        lock(&self.inner.queues).rings.len()
    }

    fn with_ring<T>(
        &self,
        q: u16,
        f: impl FnOnce(&mut SplitRing, &GuestMem) -> std::result::Result<T, RingError>,
    ) -> Result<T> {
        let mut qs = lock(&self.inner.queues);
        let ring = qs
            .rings
            .get_mut(usize::from(q))
            .ok_or_else(|| DriverError::NoQueue(format!("index {q}")))?;
        Ok(f(ring, &self.inner.mem)?)
    }

    /// The ring layout of queue `q`.
    pub fn ring_layout(&self, q: u16) -> Result<RingLayout> {
        self.with_ring(q, |r, _| Ok(r.layout))
    }

    fn ring_size(&self, role: QueueRole) -> Result<u16> {
        let q = self.role_index(role)?;
        self.with_ring(q, |r, _| Ok(r.size()))
    }

    /// Adds a chain to queue `q` (optionally through an indirect table) and publishes it,
    /// without kicking. Returns the head.
    pub fn post(&self, q: u16, parts: &[Part], indirect: bool) -> Result<u16> {
        self.with_ring(q, |r, m| r.add(m, parts, indirect, TOKEN_RAW))
    }

    /// [`post`](Self::post) then [`kick`](Self::kick).
    pub fn post_and_kick(&self, q: u16, parts: &[Part], indirect: bool) -> Result<u16> {
        let head = self.post(q, parts, indirect)?;
        self.kick(q)?;
        Ok(head)
    }

    /// Writes descriptor `i` of queue `q` directly.
    pub fn write_desc(&self, q: u16, i: u16, d: Desc) -> Result<()> {
        self.with_ring(q, |r, m| r.write_desc_raw(m, i, d))
    }

    /// Reads descriptor `i` of queue `q`.
    pub fn read_desc(&self, q: u16, i: u16) -> Result<Desc> {
        self.with_ring(q, |r, m| r.read_desc(m, i))
    }

    /// Puts `head` in the next avail slot of queue `q` and publishes it (no bookkeeping).
    pub fn publish_head(&self, q: u16, head: u16) -> Result<()> {
        self.with_ring(q, |r, m| r.publish_head(m, head))
    }

    /// Linux `virtqueue_kick`: notify unless the device suppressed notifications.
    /// Returns whether a notification was sent.
    pub fn kick(&self, q: u16) -> Result<bool> {
        let need = self.with_ring(q, |r, m| r.kick_prepare(m))?;
        if need {
            self.notify(q);
        }
        Ok(need)
    }

    /// Notifies queue `q` unconditionally, by the configured [`KickMode`].
    pub fn notify(&self, q: u16) {
        match self.inner.opts.kick {
            KickMode::IoEventFd => match self.inner.queue_evts.get(usize::from(q)) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        self.error(format!("kick of queue {q} failed: {e}"));
                    }
                }
                None => self.write_reg(reg::QUEUE_NOTIFY, u32::from(q)),
            },
            KickMode::Mmio => self.write_reg(reg::QUEUE_NOTIFY, u32::from(q)),
        }
    }

    /// Writes 1 to the eventfd of queue `q` (for queues the model did not set up).
    pub fn notify_eventfd(&self, q: u16) -> Result<()> {
        let evt = self
            .inner
            .queue_evts
            .get(usize::from(q))
            .ok_or_else(|| DriverError::NoQueue(format!("eventfd {q}")))?;
        evt.write(1)?;
        Ok(())
    }

    /// The device's used index of queue `q`.
    pub fn used_idx(&self, q: u16) -> Result<u16> {
        self.with_ring(q, |r, m| r.used_idx(m))
    }

    /// The used ring flags of queue `q`.
    pub fn used_flags(&self, q: u16) -> Result<u16> {
        self.with_ring(q, |r, m| r.used_flags(m))
    }

    /// The avail index the driver published on queue `q`.
    pub fn avail_idx(&self, q: u16) -> Result<u16> {
        self.with_ring(q, |r, _| Ok(r.avail_idx()))
    }

    /// The driver's next used index to reclaim on queue `q`.
    pub fn last_used_idx(&self, q: u16) -> Result<u16> {
        self.with_ring(q, |r, _| Ok(r.last_used_idx()))
    }

    /// Used element at position `pos` of queue `q`: (id, len).
    pub fn used_elem(&self, q: u16, pos: u16) -> Result<(u32, u32)> {
        self.with_ring(q, |r, m| r.used_elem(m, pos))
    }

    /// Free descriptors of queue `q`.
    pub fn num_free(&self, q: u16) -> Result<u16> {
        self.with_ring(q, |r, _| Ok(r.num_free()))
    }

    /// `while (virtqueue_get_buf(vq))` on queue `q`.
    pub fn reclaim(&self, q: u16) -> Result<Vec<UsedBuf>> {
        self.with_ring(q, |r, m| r.reclaim_all(m))
    }

    /// Raw used elements of queue `q` since the last reclaim, with no bookkeeping.
    pub fn take_used_raw(&self, q: u16) -> Result<Vec<(u32, u32)>> {
        self.with_ring(q, |r, m| r.take_used_raw(m))
    }

    /// Ring and register state of queue `q`, for failure messages.
    pub fn diag(&self, q: u16) -> String {
        let ring = self.with_ring(q, |r, m| {
            Ok(format!(
                "queue {q}: size {} avail_idx {} used_idx {} used_flags {:#x} last_used {} \
                 num_free {} in_flight {} broken {:?}",
                r.size(),
                r.avail_idx(),
                r.used_idx(m)?,
                r.used_flags(m)?,
                r.last_used_idx(),
                r.num_free(),
                r.in_flight(),
                r.broken()
            ))
        });
        let ring = match ring {
            Ok(s) => s,
            Err(e) => format!("queue {q}: {e}"),
        };
        format!(
            "{ring}; status {:#x}; config cmd_id {:#x}; model errors {:?}",
            self.status(),
            self.read_config32(config::FREE_PAGE_HINT_CMD_ID),
            self.errors()
        )
    }

    /// Waits (polling guest memory) until the used index of queue `q` reaches `target`
    /// (wrapping compare), or [`DEADLINE`] passes. Returns the used index.
    pub fn wait_used_idx(&self, q: u16, target: u16) -> Result<u16> {
        self.wait_used_idx_for(q, target, DEADLINE)
    }

    /// [`wait_used_idx`](Self::wait_used_idx) with an explicit deadline.
    pub fn wait_used_idx_for(&self, q: u16, target: u16, timeout: Duration) -> Result<u16> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            let idx = self.used_idx(q)?;
            if (idx.wrapping_sub(target) as i16) >= 0 {
                return Ok(idx);
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout(format!(
                    "used idx of queue {q} never reached {target} in {timeout:?}: {}",
                    self.diag(q)
                )));
            }
            spins += 1;
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Waits until the device has used `n` more entries of queue `q` than it had at `from`.
    pub fn wait_used(&self, q: u16, from: u16, n: u16) -> Result<u16> {
        self.wait_used_idx(q, from.wrapping_add(n))
    }

    /// Waits until the device has used everything published on queue `q`.
    pub fn wait_all_used(&self, q: u16) -> Result<u16> {
        let avail = self.avail_idx(q)?;
        self.wait_used_idx(q, avail)
    }

    // ----------------------------------------------------------------------------------
    // Guest memory helpers.

    /// Stores a little-endian u32 in guest memory.
    pub fn write_u32(&self, at: GuestAddress, v: u32) -> Result<()> {
        self.inner
            .mem
            .write_slice(&v.to_le_bytes(), at)
            .map_err(|e| DriverError::Ring(RingError::Memory(format!("{e:?}"))))
    }

    /// Writes a descriptor table (for example a hand-made indirect table) at `at`.
    pub fn write_desc_table(&self, at: GuestAddress, descs: &[Desc]) -> Result<()> {
        let mut raw = Vec::with_capacity(descs.len() * 16);
        for d in descs {
            raw.extend_from_slice(&d.addr.to_le_bytes());
            raw.extend_from_slice(&d.len.to_le_bytes());
            raw.extend_from_slice(&d.flags.to_le_bytes());
            raw.extend_from_slice(&d.next.to_le_bytes());
        }
        self.inner
            .mem
            .write_slice(&raw, at)
            .map_err(|e| DriverError::Ring(RingError::Memory(format!("{e:?}"))))
    }

    /// Loads a little-endian u32 from guest memory.
    pub fn read_u32(&self, at: GuestAddress) -> Result<u32> {
        let mut b = [0u8; 4];
        self.inner
            .mem
            .read_slice(&mut b, at)
            .map_err(|e| DriverError::Ring(RingError::Memory(format!("{e:?}"))))?;
        Ok(u32::from_le_bytes(b))
    }

    /// Carves `len` bytes aligned to `align` out of the scratch part of the driver area.
    pub fn alloc_scratch(&self, len: u64, align: u64) -> Result<GuestAddress> {
        let mut a = lock(&self.inner.area);
        let at = align_up(a.scratch_next, align.max(1));
        if at + len > a.scratch_end {
            return Err(DriverError::Probe(
                "driver area scratch space exhausted".into(),
            ));
        }
        a.scratch_next = at + len;
        Ok(GuestAddress(at))
    }

    /// The fixed slot of `cmd_id_active` (the start buffer).
    pub fn cmd_id_active_slot(&self) -> GuestAddress {
        lock(&self.inner.area).slots
    }

    /// The fixed slot of `cmd_id_stop` (4 bytes after the active slot, as in Linux's struct).
    pub fn cmd_id_stop_slot(&self) -> GuestAddress {
        GuestAddress(self.cmd_id_active_slot().0 + 4)
    }

    // ----------------------------------------------------------------------------------
    // Interrupts.

    /// Waits up to `timeout` for the interrupt eventfd, then handles the interrupt as
    /// `vm_interrupt` does. `Ok(None)` if nothing arrived. Not for use while the background
    /// threads run.
    pub fn poll_interrupts(&self, timeout: Duration) -> Result<Option<IrqReport>> {
        if self.is_background() {
            return Err(DriverError::Probe(
                "poll_interrupts while the background interrupt thread runs".into(),
            ));
        }
        self.poll_interrupts_inner(timeout)
    }

    fn poll_interrupts_inner(&self, timeout: Duration) -> Result<Option<IrqReport>> {
        let _g = lock(&self.inner.irq_lock);
        let mut events = [EpollEvent::default()];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let n = match self.inner.epoll.wait(ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(None);
        }
        // Consume the irqfd signal first: an interrupt raised after the status read below
        // signals it again.
        match self.inner.irq.read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Some(self.vm_interrupt()))
    }

    /// Handles every interrupt already pending, without waiting.
    pub fn deliver_pending_interrupts(&self) -> Result<Vec<IrqReport>> {
        let mut out = Vec::new();
        while let Some(r) = self.poll_interrupts(Duration::ZERO)? {
            out.push(r);
        }
        Ok(out)
    }

    /// Waits until a configuration change interrupt is handled (handling any others on the
    /// way), or `DEADLINE`.
    pub fn wait_config_change(&self) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(format!(
                    "no config interrupt in {DEADLINE:?}; status {:#x}, cmd_id {:#x}",
                    self.status(),
                    self.read_config32(config::FREE_PAGE_HINT_CMD_ID)
                )));
            }
            if let Some(r) = self.poll_interrupts(left.min(Duration::from_millis(100)))? {
                if r.config() {
                    return Ok(());
                }
            }
        }
    }

    /// `vm_interrupt`: read InterruptStatus, ack exactly that, then the config handler and
    /// the vring callbacks.
    fn vm_interrupt(&self) -> IrqReport {
        let isr_val = self.read_reg(reg::INTERRUPT_STATUS);
        self.write_reg(reg::INTERRUPT_ACK, isr_val);
        if isr_val & isr::CONFIG != 0 {
            self.inner.config_irqs.fetch_add(1, Ordering::SeqCst);
            self.virtballoon_changed();
        }
        if isr_val & isr::VRING != 0 {
            self.inner.vring_irqs.fetch_add(1, Ordering::SeqCst);
            // vring_interrupt on every queue: the callback runs only if the queue has new
            // used buffers.
            for role in self.queues_with_new_used() {
                match role {
                    QueueRole::Inflate | QueueRole::Deflate | QueueRole::Reporting => {
                        self.balloon_ack()
                    }
                    QueueRole::Stats => self.stats_request(),
                    QueueRole::FreePage => {}
                }
            }
        }
        IrqReport { isr: isr_val }
    }

    /// The queues with a callback whose used index moved past what the driver reclaimed.
    fn queues_with_new_used(&self) -> Vec<QueueRole> {
        let qs = lock(&self.inner.queues);
        QueueRole::ALL
            .into_iter()
            .filter(|role| role.has_callback())
            .filter(|&role| {
                qs.roles[role as usize]
                    .and_then(|i| qs.rings.get(i))
                    .is_some_and(|r| {
                        r.used_idx(&self.inner.mem)
                            .is_ok_and(|u| u != r.last_used_idx())
                    })
            })
            .collect()
    }

    /// The config change handler `virtballoon_changed`: unless the driver is being removed,
    /// queue the size work and, with FREE_PAGE_HINT, set the "re-read cmd id" bit and queue
    /// the free page work.
    pub fn virtballoon_changed(&self) {
        if self.inner.stop_update.load(Ordering::SeqCst) {
            return;
        }
        self.queue_work_of(WorkKind::UpdateSize);
        if self.has_feature(feature::FREE_PAGE_HINT) {
            self.inner.read_cmd_id.store(true, Ordering::SeqCst);
            self.queue_work();
        }
    }

    /// Config change interrupts handled so far.
    pub fn config_interrupts(&self) -> u64 {
        self.inner.config_irqs.load(Ordering::SeqCst)
    }

    /// Used buffer interrupts handled so far.
    pub fn vring_interrupts(&self) -> u64 {
        self.inner.vring_irqs.load(Ordering::SeqCst)
    }

    // ----------------------------------------------------------------------------------
    // The page allocator.

    /// Blocks free in the model's allocator, ascending.
    pub fn free_blocks(&self) -> Vec<GuestAddress> {
        lock(&self.inner.alloc)
            .free
            .iter()
            .map(|&a| GuestAddress(a))
            .collect()
    }

    /// Blocks held as hints (not given back yet), ascending.
    pub fn held_blocks(&self) -> Vec<GuestAddress> {
        let mut v: Vec<GuestAddress> = lock(&self.inner.alloc)
            .held
            .iter()
            .map(|&a| GuestAddress(a))
            .collect();
        v.sort();
        v
    }

    /// Adds blocks to the allocator's free set.
    pub fn give_blocks(&self, blocks: &[GuestAddress]) {
        let mut a = lock(&self.inner.alloc);
        for b in blocks {
            a.free.insert(b.0);
        }
    }

    /// Allocates one block for the guest's own use: pops the highest free block, as
    /// `get_free_page_and_send` does. `None` when the free set is empty.
    pub fn alloc_block(&self) -> Option<GuestAddress> {
        lock(&self.inner.alloc).free.pop_last().map(GuestAddress)
    }

    /// Frees a block the guest allocated with [`alloc_block`](Self::alloc_block) back to the
    /// allocator's free set.
    pub fn free_block(&self, b: GuestAddress) {
        lock(&self.inner.alloc).free.insert(b.0);
    }

    /// Takes every free block out of the allocator (the guest "uses" them).
    pub fn take_free_blocks(&self) -> Vec<GuestAddress> {
        let mut a = lock(&self.inner.alloc);
        std::mem::take(&mut a.free)
            .into_iter()
            .map(GuestAddress)
            .collect()
    }

    /// `return_free_pages_to_mm`: gives up to `n` held blocks back, the most recent first.
    pub fn return_free_pages_to_mm(&self, n: usize) -> usize {
        let mut a = lock(&self.inner.alloc);
        let mut done = 0;
        while done < n {
            let Some(b) = a.held.pop() else { break };
            a.free.insert(b);
            done += 1;
        }
        done
    }

    /// The shrinker: hands `n` held blocks back to the allocator before DONE.
    pub fn shrink(&self, n: usize) -> usize {
        self.return_free_pages_to_mm(n)
    }

    /// How many hint blocks the guest has posted so far.
    pub fn posted_count(&self) -> usize {
        lock(&self.inner.posted).len()
    }

    /// Every hint block posted so far, in posting order.
    pub fn posted_hints(&self) -> Vec<PostedHint> {
        lock(&self.inner.posted).clone()
    }

    /// Rounds the free page work ran so far.
    pub fn rounds(&self) -> Vec<RoundReport> {
        lock(&self.inner.rounds).clone()
    }

    /// Problems the model noticed (ring violations by the device, failed kicks, rings that
    /// stayed full).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.inner.errors).clone()
    }

    fn error(&self, e: String) {
        lock(&self.inner.errors).push(e);
    }

    /// Messages Linux logs and survives (see `kernel_log` in the driver state).
    pub fn kernel_log(&self) -> Vec<String> {
        lock(&self.inner.kernel_log).clone()
    }

    /// `dev_err` for a command buffer that did not fit: Linux logs it and goes on, so the
    /// model does too. Any other failure is a model error.
    fn command_error(&self, what: &str, e: DriverError) {
        let msg = format!("failed to send a {what} id: {e}");
        if matches!(e, DriverError::Ring(RingError::NoSpace { .. })) {
            lock(&self.inner.kernel_log).push(msg);
        } else {
            self.error(msg);
        }
    }

    /// Changes the pause after each hinted block.
    pub fn set_block_pace(&self, d: Duration) {
        self.inner
            .pace_ns
            .store(d.as_nanos() as u64, Ordering::SeqCst);
    }

    // ----------------------------------------------------------------------------------
    // Free page hinting, as report_free_page_func does it.

    /// `virtio_balloon_cmd_id_received`: re-reads `free_page_hint_cmd_id` from config only if
    /// a config interrupt flagged it, else returns the cached value. In step mode it first
    /// delivers pending interrupts (see [`DriverOptions::async_irq_in_step_mode`]).
    pub fn cmd_id_received(&self) -> u32 {
        if !self.inner.background.load(Ordering::SeqCst) && self.inner.opts.async_irq_in_step_mode {
            if let Err(e) = self.deliver_pending_interrupts() {
                self.error(format!("interrupt delivery: {e}"));
            }
        }
        let mut fph = lock(&self.inner.fph);
        if self.inner.read_cmd_id.swap(false, Ordering::SeqCst) {
            fph.received_cache = self.read_config32(config::FREE_PAGE_HINT_CMD_ID);
        }
        fph.received_cache
    }

    /// The cached received id, without reading anything.
    pub fn cmd_id_received_cache(&self) -> u32 {
        lock(&self.inner.fph).received_cache
    }

    /// Sets the "must re-read the cmd id" bit, as a config interrupt does.
    pub fn flag_cmd_id_reread(&self) {
        self.inner.read_cmd_id.store(true, Ordering::SeqCst);
    }

    /// `cmd_id_active`, as stored in its guest memory slot.
    pub fn cmd_id_active(&self) -> u32 {
        self.read_u32(self.cmd_id_active_slot())
            .unwrap_or(cmd::STOP)
    }

    fn reclaim_free_page_vq(&self, q: u16) -> Result<()> {
        match self.reclaim(q) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.error(format!("free_page_vq reclaim: {e}"));
                Err(e)
            }
        }
    }

    /// `send_cmd_id_start`: reclaim used buffers, store the received id in the active slot,
    /// post a 4-byte out buffer pointing at it, kick. Returns the id sent.
    pub fn send_cmd_id_start(&self) -> Result<u32> {
        let q = self.free_page_queue()?;
        self.reclaim_free_page_vq(q)?;
        let id = self.cmd_id_received();
        let slot = self.cmd_id_active_slot();
        self.write_u32(slot, id)?;
        self.with_ring(q, |r, m| {
            r.add(m, &[Part::out(slot, 4)], false, TOKEN_START)
        })?;
        self.kick(q)?;
        Ok(id)
    }

    /// `send_cmd_id_stop`: store STOP in the stop slot, reclaim used buffers, post a 4-byte out
    /// buffer pointing at the stop slot, kick.
    pub fn send_cmd_id_stop(&self) -> Result<()> {
        let q = self.free_page_queue()?;
        let slot = self.cmd_id_stop_slot();
        self.write_u32(slot, cmd::STOP)?;
        self.reclaim_free_page_vq(q)?;
        self.with_ring(q, |r, m| r.add(m, &[Part::out(slot, 4)], false, TOKEN_STOP))?;
        self.kick(q)?;
        Ok(())
    }

    /// `get_free_page_and_send`: reclaim used buffers, allocate one block, and post it as one
    /// device-writable descriptor if more than one descriptor is free (else free it again).
    pub fn get_free_page_and_send(&self) -> Result<Sent> {
        let q = self.free_page_queue()?;
        self.reclaim_free_page_vq(q)?;
        let block = {
            let mut a = lock(&self.inner.alloc);
            a.free.pop_last()
        };
        let Some(block) = block else {
            return Ok(Sent::NoMemory);
        };
        let len = self.inner.opts.block_size;
        let active_id = self.cmd_id_active();
        let mut posted = lock(&self.inner.posted);
        let r = self.with_ring(q, |r, m| {
            if r.num_free() > 1 {
                r.add(
                    m,
                    &[Part::input(GuestAddress(block), len as u32)],
                    false,
                    block,
                )
                .map(Some)
            } else {
                Ok(None)
            }
        });
        match r {
            Ok(Some(head)) => {
                posted.push(PostedHint {
                    seq: self.inner.seq.fetch_add(1, Ordering::SeqCst),
                    active_id,
                    gpa: GuestAddress(block),
                    len,
                    head,
                });
                drop(posted);
                self.kick(q)?;
                lock(&self.inner.alloc).held.push(block);
                Ok(Sent::Block(GuestAddress(block)))
            }
            Ok(None) => {
                lock(&self.inner.alloc).free.insert(block);
                Ok(Sent::RingFull)
            }
            Err(e) => {
                lock(&self.inner.alloc).free.insert(block);
                Err(e)
            }
        }
    }

    /// `send_free_pages`: post blocks while the active id equals the received id and blocks
    /// are left.
    pub fn send_free_pages(&self) -> (usize, RoundEnd) {
        let mut hinted = 0;
        let mut full_since: Option<Instant> = None;
        loop {
            if self.inner.abort.load(Ordering::SeqCst) {
                return (hinted, RoundEnd::Aborted);
            }
            let received = self.cmd_id_received();
            if self.cmd_id_active() != received {
                return (hinted, RoundEnd::IdChanged(received));
            }
            match self.get_free_page_and_send() {
                Ok(Sent::NoMemory) => return (hinted, RoundEnd::OutOfBlocks),
                Ok(Sent::Block(_)) => {
                    hinted += 1;
                    full_since = None;
                    let pace = self.inner.pace_ns.load(Ordering::SeqCst);
                    if pace > 0 {
                        std::thread::sleep(Duration::from_nanos(pace));
                    }
                }
                Ok(Sent::RingFull) => {
                    let since = *full_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.inner.opts.ring_full_give_up {
                        let q = self.free_page_queue().unwrap_or(0);
                        self.error(format!(
                            "free_page_vq full for {:?}: {}",
                            self.inner.opts.ring_full_give_up,
                            self.diag(q)
                        ));
                        return (hinted, RoundEnd::RingFullGaveUp);
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(e) => return (hinted, RoundEnd::Error(e.to_string())),
            }
        }
    }

    /// `virtio_balloon_report_free_page`: start, blocks, stop.
    pub fn report_free_page(&self) -> RoundReport {
        let id = match self.send_cmd_id_start() {
            Ok(id) => id,
            Err(e) => {
                self.command_error("start", e);
                self.cmd_id_active()
            }
        };
        let (hinted, end) = self.send_free_pages();
        if let Err(e) = self.send_cmd_id_stop() {
            self.command_error("stop", e);
        }
        let report = RoundReport { id, hinted, end };
        lock(&self.inner.rounds).push(report.clone());
        report
    }

    /// `report_free_page_func`, the free page work item.
    pub fn report_free_page_func(&self) -> WorkOutcome {
        let received = self.cmd_id_received();
        if received == cmd::DONE {
            WorkOutcome::Done {
                returned: self.return_free_pages_to_mm(usize::MAX),
            }
        } else if received == cmd::STOP {
            WorkOutcome::Stop
        } else if received == self.cmd_id_active() {
            WorkOutcome::SameId(received)
        } else {
            WorkOutcome::Round(self.report_free_page())
        }
    }

    /// Step mode: runs the free page work once, now, on this thread (clearing the queued
    /// flag).
    pub fn run_free_page_work(&self) -> WorkOutcome {
        self.work_item(WorkKind::FreePage).state_mut().pending = false;
        self.report_free_page_func()
    }

    /// Step mode: runs the size work now, on this thread (clearing the queued flag).
    pub fn run_size_work(&self) -> SizeUpdate {
        self.work_item(WorkKind::UpdateSize).state_mut().pending = false;
        self.update_balloon_size_func()
    }

    /// Step mode: runs the stats work now, on this thread (clearing the queued flag).
    pub fn run_stats_work(&self) -> Result<bool> {
        self.work_item(WorkKind::UpdateStats).state_mut().pending = false;
        self.stats_handle_request()
    }

    /// `queue_work` of the free page work: in background mode the worker thread runs it; in
    /// step mode it only marks the work pending (see [`work_pending`](Self::work_pending)).
    pub fn queue_work(&self) {
        self.queue_work_of(WorkKind::FreePage);
    }

    /// `queue_work` of any work item (a no-op if it is already pending).
    pub fn queue_work_of(&self, kind: WorkKind) {
        let item = self.work_item(kind);
        item.state_mut().pending = true;
        item.cv.notify_all();
    }

    /// `start_update_balloon_size`: queues the size work.
    pub fn start_update_balloon_size(&self) {
        self.queue_work_of(WorkKind::UpdateSize);
    }

    /// Whether the free page work is queued and not run yet.
    pub fn work_pending(&self) -> bool {
        self.pending_work(WorkKind::FreePage)
    }

    /// Whether a work item is queued and not run yet.
    pub fn pending_work(&self, kind: WorkKind) -> bool {
        self.work_item(kind).state_mut().pending
    }

    /// Runs of the free page work completed by the background worker.
    pub fn work_runs(&self) -> u64 {
        self.work_runs_of(WorkKind::FreePage)
    }

    /// Runs of a work item completed by its background worker.
    pub fn work_runs_of(&self, kind: WorkKind) -> u64 {
        self.work_item(kind).state_mut().runs
    }

    fn work_item(&self, kind: WorkKind) -> &WorkItem {
        &self.inner.works[kind as usize]
    }

    // ----------------------------------------------------------------------------------
    // Background mode: an interrupt thread and one thread per work item.

    /// Starts the interrupt handler thread and the workqueue threads (free page work, size
    /// work, stats work).
    pub fn start_background(&self) {
        if self.inner.background.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.bg_stop.store(false, Ordering::SeqCst);
        self.inner.abort.store(false, Ordering::SeqCst);
        let mut threads = Vec::new();
        let d = self.clone();
        threads.push(
            std::thread::Builder::new()
                .name("guest-irq".into())
                .spawn(move || d.irq_thread())
                .expect("spawn the guest interrupt thread"),
        );
        for (kind, name) in [
            (WorkKind::FreePage, "guest-balloon-wq"),
            (WorkKind::UpdateSize, "guest-size-work"),
            (WorkKind::UpdateStats, "guest-stats-work"),
        ] {
            let d = self.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || d.work_thread(kind))
                    .expect("spawn a guest workqueue thread"),
            );
        }
        lock(&self.inner.threads).extend(threads);
    }

    /// Stops the background threads (a round in progress ends as if allocation failed, and
    /// still sends STOP; a size update stops after its current request, and a wait for an
    /// ack is given up) and joins them.
    pub fn stop_background(&self) {
        self.inner.bg_stop.store(true, Ordering::SeqCst);
        self.inner.abort.store(true, Ordering::SeqCst);
        for item in &self.inner.works {
            let _w = item.state_mut();
            item.cv.notify_all();
        }
        self.inner.acked_cv.notify_all();
        let threads: Vec<_> = lock(&self.inner.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        self.inner.background.store(false, Ordering::SeqCst);
        self.inner.abort.store(false, Ordering::SeqCst);
    }

    /// Whether the background threads run.
    pub fn is_background(&self) -> bool {
        self.inner.background.load(Ordering::SeqCst)
    }

    fn irq_thread(&self) {
        while !self.inner.bg_stop.load(Ordering::SeqCst) {
            if let Err(e) = self.poll_interrupts_inner(Duration::from_millis(20)) {
                self.error(format!("interrupt thread: {e}"));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn work_thread(&self, kind: WorkKind) {
        let item = self.work_item(kind);
        loop {
            {
                let mut w = item.state_mut();
                while !w.pending && !self.inner.bg_stop.load(Ordering::SeqCst) {
                    w = item.cv.wait(w).unwrap_or_else(|e| e.into_inner());
                }
                if self.inner.bg_stop.load(Ordering::SeqCst) {
                    return;
                }
                w.pending = false;
                w.running = true;
            }
            match kind {
                WorkKind::FreePage => {
                    self.report_free_page_func();
                }
                WorkKind::UpdateSize => {
                    if let SizeUpdate {
                        end: SizeEnd::Error(e),
                        ..
                    } = self.update_balloon_size_func()
                    {
                        self.error(format!("update_balloon_size_func: {e}"));
                    }
                }
                WorkKind::UpdateStats => {
                    if let Err(e) = self.stats_handle_request() {
                        self.error(format!("stats_handle_request: {e}"));
                    }
                }
            }
            let mut w = item.state_mut();
            w.running = false;
            w.runs += 1;
            item.cv.notify_all();
        }
    }

    /// Background mode: waits until the free page work is neither queued nor running, or
    /// `DEADLINE`.
    pub fn wait_work_idle(&self) -> Result<()> {
        self.wait_idle(WorkKind::FreePage)
    }

    /// Background mode: waits until a work item is neither queued nor running, or
    /// `DEADLINE`.
    pub fn wait_idle(&self, kind: WorkKind) -> Result<()> {
        let item = self.work_item(kind);
        let deadline = Instant::now() + DEADLINE;
        let mut w = item.state_mut();
        while w.pending || w.running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(format!(
                    "{kind:?} work still busy after {DEADLINE:?} (pending {}, running {})",
                    w.pending, w.running
                )));
            }
            w = item
                .cv
                .wait_timeout(w, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}
