// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory layouts: 1 to 4 small regions with holes, partial last pages and unaligned
//! starts, placed low, anywhere or right below the top of the address space. One region (the
//! ring region) starts on a page and holds the rings, then a scratch area for element data
//! and indirect tables.

use arbitrary::Arbitrary;
use guest_model::ring::GuestMem;
use vm_memory::{Bytes, GuestAddress};

/// The guest page size.
pub const PAGE: u64 = 4096;
/// The most regions a layout has.
pub const MAX_REGIONS: usize = 4;
/// The most pages a region has.
pub const MAX_REGION_PAGES: u64 = 256;
/// The fewest pages the ring region has.
pub const RING_REGION_PAGES: u64 = 16;
/// Descriptors in an indirect table slot.
pub const TABLE_ENTRIES: usize = 16;

/// `a` rounded up to a page, `None` past the top of the address space.
pub fn align_up(a: u64) -> Option<u64> {
    a.checked_add(PAGE - 1).map(|a| a & !(PAGE - 1))
}

/// `a` rounded down to a page.
pub fn align_down(a: u64) -> u64 {
    a & !(PAGE - 1)
}

/// One region of the input.
#[derive(Arbitrary, Debug, PartialEq)]
pub struct RegionSpec {
    /// Hole before the region, in pages (0: adjacent to the previous one).
    pub gap_pages: u8,
    /// Length in pages, 1..=256 (at least 16 for the ring region).
    pub pages: u8,
    /// Bytes cut from the end (only if the top bit is set), for a partial last page.
    pub trim: u16,
    /// Bytes added to the start (only if the top bit is set; never for the ring region).
    pub skew: u16,
}

impl AsRef<RegionSpec> for RegionSpec {
    fn as_ref(&self) -> &RegionSpec {
        self
    }
}

/// Where the layout lies in the address space.
#[derive(Arbitrary, Debug, PartialEq)]
pub enum Placement {
    /// The layout starts at this page number (below 2^44).
    Low(u32),
    /// The layout starts at this address, rounded down to a page and clamped so it fits.
    At(u64),
    /// The layout ends this many pages below the highest address a region can reach.
    Top(u16),
}

/// How a target uses its ring region past the rings (offsets from the region's start).
#[derive(Debug, Clone, Copy)]
pub struct Scratch {
    /// The first byte past the rings: the guest model may write with raw addresses from here.
    pub off: u64,
    /// The scratch area's length.
    pub len: u64,
    /// The first element data slot.
    pub slot_off: u64,
    /// The size of a data slot.
    pub slot_size: u64,
    /// The number of data slots.
    pub slots: u64,
    /// The first indirect table slot (`TABLE_ENTRIES` descriptors each).
    pub table_off: u64,
    /// The number of indirect table slots.
    pub table_slots: u64,
}

/// A guest address chosen by the input.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Addr {
    /// `page` pages and `offset` bytes into a region (may run past its end).
    Region {
        /// The region, modulo their number.
        region: u8,
        /// Pages from the region's start.
        page: u8,
        /// Bytes past that page.
        offset: u16,
    },
    /// `back` bytes before the end of a region.
    End {
        /// The region, modulo their number.
        region: u8,
        /// Bytes before the region's end.
        back: u16,
    },
    /// A data slot (command buffers in `hint_desc`, element data in `balloon_device`).
    Slot(u8),
    /// An indirect table slot.
    Table(u8),
    /// Anywhere in the scratch area.
    Scratch(u16),
    /// Anything.
    Raw(u64),
}

/// A buffer length chosen by the input.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Len {
    /// Whole pages.
    Pages(u8),
    /// Whole pages, plus or minus a few bytes.
    Jitter {
        /// Pages.
        pages: u8,
        /// Bytes added (wrapping).
        delta: i16,
    },
    /// `u32::MAX - x`: overflows `addr + len` near the top, and the 4 GiB chain limit.
    Huge(u8),
    /// Anything.
    Raw(u32),
}

/// The length in bytes `l` stands for.
pub fn len_of(l: Len) -> u32 {
    match l {
        Len::Pages(p) => u32::from(p) * PAGE as u32,
        Len::Jitter { pages, delta } => {
            (u32::from(pages) * PAGE as u32).wrapping_add_signed(i32::from(delta))
        }
        Len::Huge(x) => u32::MAX - u32::from(x),
        Len::Raw(x) => x,
    }
}

/// The guest memory layout of one fuzz case.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `(start, len)` in ascending order; every region ends at or below `u64::MAX`.
    pub regions: Vec<(u64, u64)>,
    /// The start of the ring region.
    pub ring: u64,
    /// The use of the ring region past the rings.
    pub scratch: Scratch,
}

impl Layout {
    /// The layout of `specs` (the first 1 to 4; missing ones are one page, adjacent),
    /// region `ring_region % n` holding the rings.
    pub fn new<S: AsRef<RegionSpec>>(
        placement: &Placement,
        specs: &[S],
        ring_region: u8,
        scratch: Scratch,
    ) -> Layout {
        let n = specs.len().clamp(1, MAX_REGIONS);
        let ring_index = usize::from(ring_region) % n;
        let default = RegionSpec {
            gap_pages: 0,
            pages: 0,
            trim: 0,
            skew: 0,
        };
        // Offsets from the layout's start (page aligned), in u128.
        let mut rel = Vec::with_capacity(n);
        let mut cursor = 0u128;
        for i in 0..n {
            let spec = specs.get(i).map_or(&default, |s| s.as_ref());
            cursor += u128::from(spec.gap_pages) * u128::from(PAGE);
            let pages = 1 + u64::from(spec.pages) % MAX_REGION_PAGES;
            let mut len = pages * PAGE;
            if i == ring_index {
                len = pages.max(RING_REGION_PAGES) * PAGE;
                cursor = cursor.next_multiple_of(u128::from(PAGE));
            } else {
                if spec.skew & 0x8000 != 0 && i > 0 {
                    cursor += u128::from(spec.skew % 4096);
                }
                if spec.trim & 0x8000 != 0 {
                    len -= u64::from(spec.trim % 4096);
                }
            }
            rel.push((cursor, len));
            cursor += u128::from(len);
        }
        let total = cursor;
        // The last byte of a region can be at most u64::MAX - 1 (start + len must fit in u64).
        let max_base = align_down((u128::from(u64::MAX) - total) as u64);
        let base = match *placement {
            Placement::Low(p) => (u64::from(p) * PAGE).min(max_base),
            Placement::At(a) => align_down(a).min(max_base),
            Placement::Top(k) => max_base.saturating_sub(u64::from(k) * PAGE),
        };
        let regions: Vec<(u64, u64)> = rel
            .iter()
            .map(|&(off, len)| (base + off as u64, len))
            .collect();
        Layout {
            ring: regions[ring_index].0,
            regions,
            scratch,
        }
    }

    /// Region `i` (modulo their number).
    pub fn region(&self, i: u8) -> (u64, u64) {
        self.regions[usize::from(i) % self.regions.len()]
    }

    /// The region holding all of `[addr, addr + len)`.
    pub fn containing(&self, addr: u64, len: u64) -> Option<usize> {
        let end = u128::from(addr) + u128::from(len);
        self.regions
            .iter()
            .position(|&(s, l)| addr >= s && end <= u128::from(s) + u128::from(l))
    }

    /// Whether every byte of `[addr, addr + len)` is RAM (regions may be adjacent).
    pub fn in_ram(&self, addr: u64, len: u64) -> bool {
        let end = u128::from(addr) + u128::from(len);
        let mut cur = u128::from(addr);
        while cur < end {
            let Some(&(s, l)) = self
                .regions
                .iter()
                .find(|&&(s, l)| cur >= u128::from(s) && cur < u128::from(s) + u128::from(l))
            else {
                return false;
            };
            cur = u128::from(s) + u128::from(l);
        }
        true
    }

    /// The guest address `a` stands for.
    pub fn addr(&self, a: Addr) -> u64 {
        match a {
            Addr::Region {
                region,
                page,
                offset,
            } => {
                let (s, _) = self.region(region);
                s.wrapping_add(u64::from(page) * PAGE)
                    .wrapping_add(u64::from(offset))
            }
            Addr::End { region, back } => {
                let (s, l) = self.region(region);
                (s + l).wrapping_sub(u64::from(back))
            }
            Addr::Slot(slot) => self.slot(u64::from(slot)),
            Addr::Table(slot) => self.table_slot(u64::from(slot)),
            Addr::Scratch(x) => self.ring + self.scratch.off + u64::from(x) % self.scratch.len,
            Addr::Raw(a) => a,
        }
    }

    /// Data slot `slot` (modulo their number).
    pub fn slot(&self, slot: u64) -> u64 {
        let s = &self.scratch;
        self.ring + s.slot_off + (slot % s.slots) * s.slot_size
    }

    /// Indirect table slot `slot` (modulo their number).
    pub fn table_slot(&self, slot: u64) -> u64 {
        let s = &self.scratch;
        self.ring + s.table_off + (slot % s.table_slots) * (TABLE_ENTRIES as u64 * 16)
    }
}

/// A write by the guest model outside the rings: skipped where it would touch them (the
/// model keeps them consistent itself), partial where it leaves RAM (what RAM there is in
/// the range is written, as if byte by byte).
pub fn guest_write(lay: &Layout, mem: &GuestMem, addr: u64, bytes: &[u8]) {
    let end = u128::from(addr) + bytes.len() as u128;
    let (ring_lo, ring_hi) = (u128::from(lay.ring), u128::from(lay.ring + lay.scratch.off));
    if u128::from(addr) < ring_hi && end > ring_lo {
        return;
    }
    if mem.write_slice(bytes, GuestAddress(addr)).is_ok() {
        return;
    }
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(a) = addr.checked_add(i as u64) {
            let _ = mem.write_obj(b, GuestAddress(a));
        }
    }
}
