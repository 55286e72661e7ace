// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of `hint_desc`: what [`crate::hint_desc::run`] drives.

use arbitrary::Arbitrary;

use crate::desc::{RawDesc, RawTable};
use crate::hint::CmdChoice;
use crate::layout::{Addr, Len, Placement, RegionSpec};

/// How a command buffer (the readable part of an element) is laid out.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum CmdShape {
    /// One 4-byte readable descriptor.
    Whole,
    /// The 4 bytes split over two readable descriptors.
    Split(u8),
    /// A readable descriptor longer than 4 bytes.
    Long(u8),
    /// 1 to 3 bytes (or 0).
    Short(u8),
    /// A zero-length readable descriptor, then the 4 bytes.
    ZeroFirst,
    /// 4 bytes somewhere else (possibly outside RAM).
    At(Addr),
}

/// A command buffer: its value, where it is written and how it is cut.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub struct CmdSpec {
    /// The command id written.
    pub value: CmdChoice,
    /// The scratch slot it is written to.
    pub slot: u8,
    /// How its descriptors cover it.
    pub shape: CmdShape,
}

/// A device-writable buffer: one hint if the device accepts it.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub struct HintSpec {
    /// Its guest address.
    pub addr: Addr,
    /// Its length.
    pub len: Len,
}

/// One element of the free page queue, as the guest lays it out.
#[derive(Arbitrary, Debug, PartialEq)]
pub enum Chain {
    /// What a driver would post: a command and hints, in order, direct or indirect.
    Good {
        /// The descriptor table entry the chain starts at (modulo the queue size).
        start: u16,
        /// The command buffer, if any.
        cmd: Option<CmdSpec>,
        /// The writable buffers (at most `MAX_HINTS`).
        hints: Vec<HintSpec>,
        /// Through the indirect table in this slot.
        indirect: Option<u8>,
        /// Hints before the command (an order violation).
        hints_first: bool,
    },
    /// Anything: descriptor table writes, indirect tables and command bytes anywhere.
    Raw {
        /// The head index; values with the top bit set are used as is (past the table).
        head: u16,
        /// Descriptor table entries written, by index (modulo the queue size).
        writes: Vec<(u16, RawDesc)>,
        /// Indirect tables written anywhere.
        tables: Vec<RawTable>,
        /// Command ids written anywhere.
        cmds: Vec<(Addr, CmdChoice)>,
    },
}

/// One operation of the guest or the migration thread, checked after it.
#[derive(Arbitrary, Debug, PartialEq)]
pub enum Op {
    /// Post an element and leave it on the ring.
    Post(Chain),
    /// Process one element.
    Process,
    /// Post an element and process one.
    PostProcess(Chain),
    /// The migration thread starts a round (`start_round`).
    StartRound,
    /// The migration thread stops the round (`stop_round`).
    StopRound,
    /// The migration thread is done with hinting (`done`).
    Done,
    /// Write 0 to the status register.
    Reset,
    /// Set the driver up again (after a reset), posting some elements before DRIVER_OK.
    Setup(Vec<Chain>),
    /// Reset, then set up again.
    ResetSetup,
    /// The VMM pauses the device.
    Pause,
    /// The VMM resumes the device.
    Resume,
    /// Rewrite a command slot.
    WriteCmd {
        /// The scratch slot.
        slot: u8,
        /// The command id written.
        value: CmdChoice,
    },
    /// What the Linux driver does after reading a new id: a start buffer with the current
    /// id (in its own element), elements of hints, then (if `stop`) a STOP buffer, each
    /// processed as soon as it is posted.
    LinuxRound {
        /// The elements of hints.
        hints: Vec<Vec<HintSpec>>,
        /// Through indirect tables.
        indirect: bool,
        /// End with a STOP buffer.
        stop: bool,
    },
    /// Publish another available index: within a queue size of the device's position (even
    /// values), or the raw value (odd values).
    AvailIdx(u16),
}

/// One `hint_desc` case: a device over a layout, then the operations.
#[derive(Arbitrary, Debug, PartialEq)]
pub struct Input {
    /// Where the layout lies.
    pub placement: Placement,
    /// The guest memory regions (1 to `MAX_REGIONS`).
    pub regions: Vec<RegionSpec>,
    /// The region holding the rings and the scratch area (modulo the number of regions).
    pub ring_region: u8,
    /// The free page queue's maximum size is `2 << (x % 8)` (2..=256).
    pub max_size_log: u8,
    /// The driver's queue size is the maximum `>> (x % 3)`.
    pub size_shift: u8,
    /// The device offers the statistics queue (the free page queue's index moves).
    pub stats: bool,
    /// The device offers PAGE_POISON.
    pub page_poison: bool,
    /// The device offers free page reporting (and the driver accepts it).
    pub reporting: bool,
    /// The driver accepts EVENT_IDX.
    pub event_idx: bool,
    /// The driver accepts INDIRECT_DESC.
    pub indirect_desc: bool,
    /// The driver accepts PAGE_POISON (when offered).
    pub ack_poison: bool,
    /// The operations (at most `MAX_OPS`).
    pub ops: Vec<Op>,
}
