// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver side of one split virtqueue for the fuzz targets: a thin adapter over
//! `guest_model::ring::SplitRing`, the project's one driver-side ring writer.
//!
//! `SplitRing` sets the rings up (zeroes the descriptor table, the available and the used
//! ring), writes descriptor table entries and publishes heads. What a fuzzing driver needs
//! beyond a well-behaved one, this adapter adds:
//!
//! * chains are laid out round the table in order from a cursor ([`DriverRing::next_desc`]),
//!   not taken from a free list: the device under test may return anything in its used
//!   ring, and the targets post raw heads and raw tables;
//! * an available index can be published raw ([`DriverRing::set_avail_idx`]), anywhere
//!   relative to the device's position, and heads go on from there (`SplitRing::set_avail_idx`);
//! * indirect tables are written anywhere in guest memory ([`write_table_desc`], over
//!   `guest_model::ring::write_desc_at`).

use std::num::Wrapping;

use guest_model::ring::{write_desc_at, Desc, GuestMem, RingLayout, SplitRing, DESC_SIZE};
use vm_memory::GuestAddress;

/// The driver's side of one queue.
#[derive(Debug)]
pub struct DriverRing {
    ring: SplitRing,
    /// The table entry the next direct chain starts at.
    next_desc: u16,
}

impl DriverRing {
    /// Sets queue `index` up over `layout` (zeroing its three areas), or `None` when an area
    /// is not in guest memory.
    pub fn new(mem: &GuestMem, index: u16, layout: RingLayout) -> Option<Self> {
        if layout.size == 0 {
            return None;
        }
        // No EVENT_IDX bookkeeping and a callback: the driver never reclaims through
        // `get_buf`, and the available ring's flags stay 0.
        let ring = SplitRing::new(mem, index, layout, false, true, None).ok()?;
        Some(DriverRing { ring, next_desc: 0 })
    }

    /// Where the rings are.
    pub fn layout(&self) -> RingLayout {
        self.ring.layout
    }

    /// The queue size the driver chose.
    pub fn size(&self) -> u16 {
        self.ring.size()
    }

    /// The available index the driver last published.
    pub fn avail_idx(&self) -> Wrapping<u16> {
        Wrapping(self.ring.avail_idx())
    }

    /// The device's used index, `None` if guest memory cannot be read there.
    pub fn used_idx(&self, mem: &GuestMem) -> Option<u16> {
        self.ring.used_idx(mem).ok()
    }

    /// The table entry the next direct chain starts at.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    /// Moves the cursor of direct chains.
    pub fn set_next_desc(&mut self, next: u16) {
        self.next_desc = next;
    }

    /// Writes entry `i` (taken modulo the size) of the queue's descriptor table.
    pub fn write_desc(&self, mem: &GuestMem, i: u16, d: Desc) -> bool {
        self.ring.write_desc_raw(mem, i % self.size(), d).is_ok()
    }

    /// Puts `head` in the next available ring entry and publishes the index one past it
    /// (guest memory that holds neither is left alone).
    pub fn publish(&mut self, mem: &GuestMem, head: u16) {
        let _ = self.ring.publish_head(mem, head);
    }

    /// Publishes `idx` as the available index, wherever it is relative to the device.
    pub fn set_avail_idx(&mut self, mem: &GuestMem, idx: u16) {
        let _ = self.ring.set_avail_idx(mem, idx);
    }
}

/// Writes entry `i` of a descriptor table at `table` (an indirect table, anywhere): `false`
/// when guest memory does not hold it.
pub fn write_table_desc(mem: &GuestMem, table: u64, i: u16, d: Desc) -> bool {
    let at = table.wrapping_add(u64::from(i) * DESC_SIZE);
    write_desc_at(mem, GuestAddress(at), d).is_ok()
}
