// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of `hint_desc`: what `crate::hint_desc::run` drives. Variants and fields without a doc
//! comment are read where that module uses them.

#![allow(missing_docs)]

use arbitrary::Arbitrary;

use crate::desc::*;
use crate::hint::*;
use crate::layout::*;

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

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub struct CmdSpec {
    pub value: CmdChoice,
    pub slot: u8,
    pub shape: CmdShape,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub struct HintSpec {
    pub addr: Addr,
    pub len: Len,
}

#[derive(Arbitrary, Debug, PartialEq)]
pub enum Chain {
    /// What a driver would post: a command and hints, in order, direct or indirect.
    Good {
        start: u16,
        cmd: Option<CmdSpec>,
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
        writes: Vec<(u16, RawDesc)>,
        tables: Vec<RawTable>,
        cmds: Vec<(Addr, CmdChoice)>,
    },
}

#[derive(Arbitrary, Debug, PartialEq)]
pub enum Op {
    /// Post an element and leave it on the ring.
    Post(Chain),
    /// Process one element.
    Process,
    /// Post an element and process one.
    PostProcess(Chain),
    StartRound,
    StopRound,
    Done,
    /// Write 0 to the status register.
    Reset,
    /// Set the driver up again (after a reset), posting some elements before DRIVER_OK.
    Setup(Vec<Chain>),
    /// Reset, then set up again.
    ResetSetup,
    Pause,
    Resume,
    /// Rewrite a command slot.
    WriteCmd {
        slot: u8,
        value: CmdChoice,
    },
    /// What the Linux driver does after reading a new id: a start buffer with the current
    /// id (in its own element), elements of hints, then (if `stop`) a STOP buffer, each
    /// processed as soon as it is posted.
    LinuxRound {
        hints: Vec<Vec<HintSpec>>,
        indirect: bool,
        stop: bool,
    },
    /// Publish another available index: within a queue size of the device's position (even
    /// values), or the raw value (odd values).
    AvailIdx(u16),
}

#[derive(Arbitrary, Debug, PartialEq)]
pub struct Input {
    pub placement: Placement,
    pub regions: Vec<RegionSpec>,
    pub ring_region: u8,
    /// The free page queue's maximum size is `2 << (x % 8)` (2..=256).
    pub max_size_log: u8,
    /// The driver's queue size is the maximum `>> (x % 3)`.
    pub size_shift: u8,
    pub stats: bool,
    pub page_poison: bool,
    pub reporting: bool,
    pub event_idx: bool,
    pub indirect_desc: bool,
    pub ack_poison: bool,
    pub ops: Vec<Op>,
}
