// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of `balloon_device`: what `crate::balloon_device::run` drives. Variants and fields without a doc
//! comment are read where that module uses them.

#![allow(missing_docs)]

use arbitrary::Arbitrary;

use crate::desc::*;
use crate::hint::*;
use crate::layout::*;

/// The balloon's queues with every feature: inflate, deflate, statistics, free page hints,
/// reporting.
pub const QUEUES: usize = 5;

/// A region of the input, with where its host mapping starts.
#[derive(Arbitrary, Debug, PartialEq)]
pub struct MappedRegionSpec {
    pub region: RegionSpec,
    /// With the top bit set, the mapping starts `host_shift % 512` 4 KiB pages past a 2 MiB
    /// boundary instead of on it.
    pub host_shift: u16,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum HostPage {
    Small,
    Medium,
    Huge,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Pfn {
    /// A page of a region (may run past its end).
    Ram {
        region: u8,
        page: u8,
    },
    /// `1 + count % 64` consecutive pages from a page of a region.
    Run {
        region: u8,
        page: u8,
        count: u8,
    },
    /// Around the first (or last) page of a region.
    Edge {
        region: u8,
        end: bool,
        delta: i8,
    },
    /// `u32::MAX - x`.
    Huge(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Payload {
    None,
    /// Little-endian PFNs.
    Pfns(Vec<Pfn>),
    /// Statistics entries: tags with the top bit clear are taken modulo 18 (known tags and
    /// two unknown ones), others as they are.
    Stats(Vec<(u16, u64)>),
    /// A free page hint command.
    Cmd(CmdChoice),
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct Good {
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

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Element {
    /// What a driver would post.
    Good(Good),
    /// Anything: descriptor table writes, indirect tables and bytes anywhere.
    Raw {
        /// The head index; values with the top bit set are used as is (past the table).
        head: u16,
        writes: Vec<(u16, RawDesc)>,
        tables: Vec<RawTable>,
        bytes: Vec<(Addr, [u8; 8])>,
    },
}

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

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Reg {
    Known(u8),
    Raw(u16),
    Config(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum QueueField {
    MaxSize(u16),
    Size(u16),
    Ready,
    Desc(u64),
    Avail(u64),
    Used(u64),
    NextAvail(u16),
    NextUsed(u16),
    EventIdx,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Corruption {
    Acked(u64),
    Activated,
    NumPages(u32),
    Actual(u32),
    Poison(u32),
    Queue { index: u8, field: QueueField },
    DropQueue,
    CmdId(u32),
    HintState(u8),
    StatsHeld(Option<u16>),
    Inhibited,
    DeviceFeatures(u64),
    MmioStatus(u8),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Op {
    MmioWrite {
        reg: Reg,
        value: u32,
        width: u8,
    },
    MmioRead {
        reg: Reg,
        width: u8,
    },
    /// `offset % 24`, or a raw offset (up to where the MMIO offset would overflow).
    ConfigWrite {
        offset: u8,
        raw: Option<u64>,
        data: [u8; 8],
        len: u8,
    },
    ConfigRead {
        offset: u16,
        raw: Option<u64>,
        len: u8,
    },
    Post {
        queue: u8,
        element: Element,
    },
    Process(u8),
    PostProcess {
        queue: u8,
        element: Element,
    },
    /// Publish another available index: within a queue size of what the device used (even
    /// values), or the raw value (odd values).
    AvailIdx {
        queue: u8,
        idx: u16,
    },
    SetTarget(u32),
    SetTargetBytes(u64),
    /// The driver writes `actual` (4 bytes).
    Actual(u32),
    RequestStats,
    /// Zero or an hour.
    StatsInterval(bool),
    Inhibit(bool),
    Flush,
    Pause,
    Resume,
    Reset,
    Setup(SetupSpec),
    ResetSetup(SetupSpec),
    SaveRestore {
        pause: bool,
        corrupt: Vec<Corruption>,
    },
    StartRound,
    StopRound,
    Done,
    /// A Linux-like round: the start buffer with the current id, elements of hints, then (if
    /// `stop`) STOP, each processed as soon as it is posted.
    LinuxRound {
        hints: Vec<Vec<(Addr, Len)>>,
        stop: bool,
    },
    GuestWrite {
        at: Addr,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug, PartialEq)]
pub struct Input {
    pub placement: Placement,
    pub regions: Vec<MappedRegionSpec>,
    pub ring_region: u8,
    pub host_page: HostPage,
    /// Inflate, deflate and statistics queues: `1 << (x % 5)` entries.
    pub queue_size_log: u8,
    /// Free page queue: `2 << (x % 4)` entries.
    pub fpq_size_log: u8,
    /// Chains per wakeup: `1 + x % 4`, or 256 with the top bit set.
    pub budget: u8,
    /// A driver bring-up before the operations.
    pub setup: Option<SetupSpec>,
    pub ops: Vec<Op>,
}
