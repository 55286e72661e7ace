// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Free page hinting: the command ids a guest model writes and a sink that records hints.

use std::sync::Mutex;

use arbitrary::Arbitrary;
use virtio_balloon::sink::FreePageSink;
use vm_memory::GuestAddress;

use crate::layout::PAGE;

/// The id after `prev` in a new round (ids 0 and 1 are STOP and DONE).
pub fn next_cmd_id(prev: u32) -> u32 {
    match prev.checked_add(1) {
        Some(id) if id >= 2 => id,
        _ => 2,
    }
}

/// A command the guest writes.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum CmdChoice {
    /// The current id.
    Current,
    /// The current id minus one.
    Previous,
    /// The id the next round will have.
    Next,
    /// STOP (0).
    Stop,
    /// DONE (1).
    Done,
    /// Anything.
    Raw(u32),
}

impl CmdChoice {
    /// The command's value when the device's id is `current`.
    pub fn resolve(self, current: u32) -> u32 {
        match self {
            CmdChoice::Current => current,
            CmdChoice::Previous => current.wrapping_sub(1),
            CmdChoice::Next => next_cmd_id(current),
            CmdChoice::Stop => 0,
            CmdChoice::Done => 1,
            CmdChoice::Raw(x) => x,
        }
    }
}

/// A hint given to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// The id it came under.
    pub cmd_id: u32,
    /// Its guest address.
    pub gpa: u64,
    /// Its length.
    pub len: u64,
}

/// Records every hint, and checks on the spot what needs no knowledge of the element:
/// non-empty, 4 KiB aligned, inside one RAM region, under an id of a round (at least 2).
pub struct RecordingSink {
    regions: Vec<(u64, u64)>,
    hints: Mutex<Vec<Hint>>,
}

impl RecordingSink {
    /// A sink for guest memory made of `regions` (`(start, len)`).
    pub fn new(regions: Vec<(u64, u64)>) -> Self {
        RecordingSink {
            regions,
            hints: Mutex::new(Vec::new()),
        }
    }

    /// The hints recorded since the last call.
    pub fn take(&self) -> Vec<Hint> {
        std::mem::take(&mut *self.hints.lock().unwrap())
    }
}

impl FreePageSink for RecordingSink {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        let gpa = gpa.0;
        assert!(len > 0, "empty hint at {gpa:#x}");
        assert_eq!(gpa % PAGE, 0, "unaligned hint start {gpa:#x}+{len:#x}");
        assert_eq!(len % PAGE, 0, "unaligned hint length {gpa:#x}+{len:#x}");
        let end = u128::from(gpa) + u128::from(len);
        assert!(
            self.regions
                .iter()
                .any(|&(s, l)| gpa >= s && end <= u128::from(s) + u128::from(l)),
            "hint {gpa:#x}+{len:#x} is not inside one RAM region of {:x?}",
            self.regions
        );
        assert!(cmd_id >= 2, "hint under reserved id {cmd_id}");
        self.hints.lock().unwrap().push(Hint { cmd_id, gpa, len });
    }
}
