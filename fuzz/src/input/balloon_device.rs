// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of `balloon_device`: what [`crate::balloon_device::run`] drives.

use arbitrary::Arbitrary;

use crate::desc::{RawDesc, RawTable};
use crate::hint::CmdChoice;
use crate::layout::{Addr, Len, Placement, RegionSpec};

/// The balloon's queues with every feature: inflate, deflate, statistics, free page hints,
/// reporting.
pub const QUEUES: usize = 5;

/// A region of the input, with where its host mapping starts.
#[derive(Arbitrary, Debug, PartialEq)]
pub struct MappedRegionSpec {
    /// The region in the guest physical address space.
    pub region: RegionSpec,
    /// With the top bit set, the mapping starts `host_shift % 512` 4 KiB pages past a 2 MiB
    /// boundary instead of on it.
    pub host_shift: u16,
}

/// The memory backend's host page size.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum HostPage {
    /// 4 KiB.
    Small,
    /// 64 KiB.
    Medium,
    /// 2 MiB.
    Huge,
}

/// One or more PFNs of an inflate, deflate or raw payload.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Pfn {
    /// A page of a region (may run past its end).
    Ram {
        /// The region (modulo the number of regions).
        region: u8,
        /// Pages from its start.
        page: u8,
    },
    /// `1 + count % 64` consecutive pages from a page of a region.
    Run {
        /// The region (modulo the number of regions).
        region: u8,
        /// Pages from its start.
        page: u8,
        /// The run's length, as above.
        count: u8,
    },
    /// Around the first (or last) page of a region.
    Edge {
        /// The region (modulo the number of regions).
        region: u8,
        /// Around its last page rather than its first.
        end: bool,
        /// Pages from that page.
        delta: i8,
    },
    /// `u32::MAX - x`.
    Huge(u8),
    /// This PFN.
    Raw(u32),
}

/// The readable bytes of an element.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Payload {
    /// No readable bytes.
    None,
    /// Little-endian PFNs.
    Pfns(Vec<Pfn>),
    /// Statistics entries: tags with the top bit clear are taken modulo 18 (known tags and
    /// two unknown ones), others as they are.
    Stats(Vec<(u16, u64)>),
    /// A free page hint command.
    Cmd(CmdChoice),
    /// These bytes (at most a data slot's worth).
    Bytes(Vec<u8>),
}

/// An element a driver would post: readable bytes, then writable buffers.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct Good {
    /// The readable bytes.
    pub payload: Payload,
    /// Trailing bytes after the payload (`% 4` for PFNs, `% 10` for statistics).
    pub tail: u8,
    /// Where the readable bytes are split into descriptors.
    pub cuts: Vec<u16>,
    /// Device-writable buffers.
    pub writable: Vec<(Addr, Len)>,
    /// Writable descriptors before the readable ones (an order violation).
    pub writable_first: bool,
    /// Put the readable bytes here instead of a data slot (outside RAM, across an edge).
    pub at: Option<Addr>,
    /// Through the indirect table in this slot.
    pub indirect: Option<u8>,
}

/// One element on any queue, as the guest lays it out.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Element {
    /// What a driver would post.
    Good(Good),
    /// Anything: descriptor table writes, indirect tables and bytes anywhere.
    Raw {
        /// The head index; values with the top bit set are used as is (past the table).
        head: u16,
        /// Descriptor table entries written, by index (modulo the queue size).
        writes: Vec<(u16, RawDesc)>,
        /// Indirect tables written anywhere.
        tables: Vec<RawTable>,
        /// Bytes written anywhere.
        bytes: Vec<(Addr, [u8; 8])>,
    },
}

/// A driver bring-up (only from status 0).
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct SetupSpec {
    /// The features accepted (restricted to the offer, plus VERSION_1, and completed so the
    /// queue numbering stays the offered one).
    pub features: u64,
    /// The driver's queue sizes: the maximum `>> (x % 3)`.
    pub sizes: [u8; QUEUES],
    /// With the top bit set, the queues whose bit is set are left out.
    pub skip: u8,
    /// Written to `poison_val` before DRIVER_OK.
    pub poison: Option<u32>,
    /// Written to `actual` before DRIVER_OK.
    pub actual: Option<u32>,
    /// Elements posted before DRIVER_OK.
    pub prepost: Vec<(u8, Element)>,
    /// Rings placed elsewhere than in the ring region: `(queue, descriptor table,
    /// available ring, used ring)`, aligned down as the queue registers require.
    pub place: Vec<(u8, Addr, Addr, Addr)>,
}

/// An MMIO register offset.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Reg {
    /// One of the virtio-mmio registers (modulo their number).
    Known(u8),
    /// Any offset.
    Raw(u16),
    /// The configuration space, at `x % 24`.
    Config(u8),
}

/// A field of a queue's snapshot, overwritten (or toggled).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum QueueField {
    /// The maximum size.
    MaxSize(u16),
    /// The size.
    Size(u16),
    /// Ready, toggled.
    Ready,
    /// The descriptor table's address.
    Desc(u64),
    /// The available ring's address.
    Avail(u64),
    /// The used ring's address.
    Used(u64),
    /// The device's next available position.
    NextAvail(u16),
    /// The device's next used position.
    NextUsed(u16),
    /// EVENT_IDX enabled, toggled.
    EventIdx,
}

/// A change made to a snapshot before it is restored.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Corruption {
    /// The accepted features, XORed with this.
    Acked(u64),
    /// Activated, toggled.
    Activated,
    /// `num_pages`.
    NumPages(u32),
    /// `actual`.
    Actual(u32),
    /// `poison_val`.
    Poison(u32),
    /// A field of a queue.
    Queue {
        /// The queue (modulo the number of queues).
        index: u8,
        /// The field.
        field: QueueField,
    },
    /// The last queue removed.
    DropQueue,
    /// The hint command id.
    CmdId(u32),
    /// The hint state, `x % 4` of STOP, REQUESTED, START, DONE.
    HintState(u8),
    /// The statistics buffer held.
    StatsHeld(Option<u16>),
    /// Discards inhibited, toggled.
    Inhibited,
    /// The offered features, XORed with this.
    DeviceFeatures(u64),
    /// The transport's status.
    MmioStatus(u8),
}

/// One operation of the guest, the VMM or the migration thread, checked after it.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Op {
    /// An MMIO register write.
    MmioWrite {
        /// The register.
        reg: Reg,
        /// The value (repeated to fill an 8-byte access).
        value: u32,
        /// The width: `x % 8` of 5 gives 1 byte, 6 gives 2, 7 gives 8, others 4.
        width: u8,
    },
    /// An MMIO register read, checked against the expected value.
    MmioRead {
        /// The register.
        reg: Reg,
        /// The width, as for writes.
        width: u8,
    },
    /// A driver write to the configuration space.
    ConfigWrite {
        /// The offset, `% 24` (unless `raw`).
        offset: u8,
        /// A raw offset (up to where the MMIO offset would overflow).
        raw: Option<u64>,
        /// The bytes...
        data: [u8; 8],
        /// ...of which `len % 9` are written.
        len: u8,
    },
    /// A configuration space read, checked against the expected bytes.
    ConfigRead {
        /// The offset (unless `raw`).
        offset: u16,
        /// A raw offset (up to where the MMIO offset would overflow).
        raw: Option<u64>,
        /// `1 + len % 8` bytes are read.
        len: u8,
    },
    /// Post an element and leave it on its queue.
    Post {
        /// The queue (modulo the number of queues).
        queue: u8,
        /// The element.
        element: Element,
    },
    /// `process_queue(x % 7)`: any queue, or an index past them.
    Process(u8),
    /// Post an element and process its queue.
    PostProcess {
        /// The queue (modulo the number of queues).
        queue: u8,
        /// The element.
        element: Element,
    },
    /// Publish another available index: within a queue size of what the device used (even
    /// values), or the raw value (odd values).
    AvailIdx {
        /// The queue (modulo the number of queues).
        queue: u8,
        /// The index, as above.
        idx: u16,
    },
    /// The VMM's `set_target` (pages).
    SetTarget(u32),
    /// The VMM's `set_target_bytes`.
    SetTargetBytes(u64),
    /// The driver writes `actual` (4 bytes).
    Actual(u32),
    /// The VMM's `request_stats`.
    RequestStats,
    /// The VMM's `set_stats_interval`: zero or an hour.
    StatsInterval(bool),
    /// The VMM's `set_discards_inhibited`.
    Inhibit(bool),
    /// The VMM's `flush_discards`.
    Flush,
    /// The VMM pauses the device.
    Pause,
    /// The VMM resumes the device.
    Resume,
    /// The driver writes 0 to the status register.
    Reset,
    /// A driver bring-up (only from status 0).
    Setup(SetupSpec),
    /// A reset, then a bring-up.
    ResetSetup(SetupSpec),
    /// `save_state`, then `Balloon::restore` into a fresh device.
    SaveRestore {
        /// Pause the device before saving.
        pause: bool,
        /// Changes made to the snapshot before the restore.
        corrupt: Vec<Corruption>,
    },
    /// The migration thread starts a hint round.
    StartRound,
    /// The migration thread stops the round.
    StopRound,
    /// The migration thread is done with hinting.
    Done,
    /// A Linux-like round: the start buffer with the current id, elements of hints, then (if
    /// `stop`) STOP, each processed as soon as it is posted.
    LinuxRound {
        /// The elements of hints (writable buffers).
        hints: Vec<Vec<(Addr, Len)>>,
        /// End with a STOP buffer.
        stop: bool,
    },
    /// The guest writes bytes anywhere (at most `MAX_GUEST_WRITE`; never over the rings).
    GuestWrite {
        /// Where.
        at: Addr,
        /// What.
        bytes: Vec<u8>,
    },
}

/// One `balloon_device` case: a device over a layout, a bring-up, then the operations.
#[derive(Arbitrary, Debug, PartialEq)]
pub struct Input {
    /// Where the layout lies.
    pub placement: Placement,
    /// The guest memory regions (1 to `MAX_REGIONS`).
    pub regions: Vec<MappedRegionSpec>,
    /// The region holding the rings and the scratch area (modulo the number of regions).
    pub ring_region: u8,
    /// The memory backend's host page size.
    pub host_page: HostPage,
    /// Inflate, deflate and statistics queues: `1 << (x % 5)` entries.
    pub queue_size_log: u8,
    /// Free page queue: `2 << (x % 4)` entries.
    pub fpq_size_log: u8,
    /// Chains per wakeup: `1 + x % 4`, or 256 with the top bit set.
    pub budget: u8,
    /// A driver bring-up before the operations.
    pub setup: Option<SetupSpec>,
    /// The operations (at most `MAX_OPS`).
    pub ops: Vec<Op>,
}
