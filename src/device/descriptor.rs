// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parsing and validation of free page hint elements (`hint_desc`).
//!
//! A free page queue element is a descriptor chain written by the guest:
//!
//! * its device-readable descriptors carry a command id: the first 4 bytes gathered across
//!   them, little-endian;
//! * its device-writable descriptors are free page ranges.
//!
//! The direction of a descriptor decides what it is, never its length (a 4-byte writable
//! descriptor is a 4-byte hint, not a command). Everything here is pure: it reads guest
//! memory and the descriptor table, allocates nothing and never panics on guest input.
//!
//! [`inspect`] makes the first pass over an element: it checks the chain is well formed
//! (readable descriptors first, not truncated by a loop, a bad index or a bad indirect table)
//! and reads the command. Only a well-formed element may deliver hints. [`for_each_hint`]
//! makes the second pass: each writable descriptor becomes page-aligned ranges inside guest
//! RAM, split at memory region boundaries.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::defs::PAGE_SIZE;

/// Why an element was refused as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// The chain ended while a descriptor still pointed to a next one: a loop, an index past
    /// the table, a bad indirect table, or more than 4 GiB in total.
    Truncated,
    /// The chain has no descriptor at all (only an invalid indirect descriptor).
    Empty,
    /// The chain has more descriptors than the queue has entries (possible only through an
    /// indirect table, which may hold up to 65535).
    TooLong,
    /// A device-readable descriptor follows a device-writable one.
    OrderViolation,
    /// The readable part is 1 to 3 bytes long: not a command id.
    ShortCommand,
    /// The readable part lies outside guest memory.
    UnreadableCommand,
}

/// How many writable descriptors [`inspect`] keeps, so the common element (Linux sends one
/// 4 MiB block per element) is read from guest memory only once.
pub const KEPT_HINTS: usize = 4;

/// What the first pass learned about a well-formed element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    /// The command id in the readable part, if it has one (`None`: no readable bytes).
    pub command: Option<u32>,
    /// How many writable descriptors (hints) the element has.
    pub writable: u32,
    /// The first [`KEPT_HINTS`] writable descriptors as (address, length).
    kept: [(u64, u32); KEPT_HINTS],
}

impl Element {
    /// The writable descriptors [`inspect`] kept, if it kept them all.
    fn all_hints(&self) -> Option<&[(u64, u32)]> {
        let n = self.writable as usize;
        (n <= KEPT_HINTS).then(|| &self.kept[..n])
    }
}

/// What happened to one writable descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintOutcome {
    /// Bytes handed to the caller, inside RAM and page aligned.
    pub accepted: u64,
    /// Bytes inside the rounded range that are not in guest RAM (or are in RAM that hints
    /// must not touch).
    pub outside_ram: u64,
    /// The descriptor had length zero.
    pub zero_length: bool,
    /// `addr + len` overflows.
    pub overflow: bool,
    /// Nothing was left once the range was rounded inward to whole pages.
    pub too_small: bool,
}

/// First pass over an element: checks its shape and reads its command.
///
/// Zero-length readable descriptors contribute no bytes. Bytes past the first 4 are ignored.
/// A chain of more than `max_len` descriptors (the queue size, which the virtio spec says a
/// chain may not exceed) is refused after reading `max_len + 1` of them, so the work per
/// element stays bounded by the queue size even through an indirect table.
pub fn inspect<M>(chain: &DescriptorChain<M>, max_len: u16) -> Result<Element, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let mem = chain.memory();
    let mut cmd = [0u8; 4];
    let mut have = 0usize;
    let mut readable_bytes = 0u64;
    let mut writable = 0u32;
    let mut kept = [(0u64, 0u32); KEPT_HINTS];
    let mut seen_writable = false;
    let mut last_has_next = false;
    let mut count = 0u32;

    for desc in chain.clone() {
        count += 1;
        if count > u32::from(max_len) {
            return Err(ChainError::TooLong);
        }
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            seen_writable = true;
            if let Some(slot) = kept.get_mut(writable as usize) {
                *slot = (desc.addr().0, desc.len());
            }
            writable = writable.saturating_add(1);
            continue;
        }
        if seen_writable {
            return Err(ChainError::OrderViolation);
        }
        let len = desc.len() as usize;
        readable_bytes = readable_bytes.saturating_add(len as u64);
        let take = len.min(cmd.len() - have);
        if take > 0 {
            mem.read_slice(&mut cmd[have..have + take], desc.addr())
                .map_err(|_| ChainError::UnreadableCommand)?;
            have += take;
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    let command = match readable_bytes {
        0 => None,
        1..=3 => return Err(ChainError::ShortCommand),
        _ => Some(u32::from_le_bytes(cmd)),
    };
    Ok(Element {
        command,
        writable,
        kept,
    })
}

/// Checks that a chain of any queue is well formed (not empty, not longer than `max_len`, not
/// cut short by a loop, a bad index or a bad indirect table) and returns its number of
/// descriptors.
pub fn check_chain<M>(chain: &DescriptorChain<M>, max_len: u16) -> Result<u32, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let mut count = 0u32;
    let mut last_has_next = false;
    for desc in chain.clone() {
        count += 1;
        if count > u32::from(max_len) {
            return Err(ChainError::TooLong);
        }
        last_has_next = desc.has_next();
    }
    match (count, last_has_next) {
        (0, _) => Err(ChainError::Empty),
        (_, true) => Err(ChainError::Truncated),
        _ => Ok(count),
    }
}

/// Second step: calls `f(gpa, len)` for every page-aligned piece of guest RAM covered by the
/// element's writable descriptors, and `outcome(HintOutcome)` once per writable descriptor.
///
/// `element` is what [`inspect`] returned for `chain` (which bounds its length). When it kept
/// every writable descriptor, the chain is not read again.
pub fn for_each_hint<M>(
    chain: &DescriptorChain<M>,
    element: &Element,
    file_backed_ok: bool,
    mut f: impl FnMut(GuestAddress, u64),
    mut outcome: impl FnMut(HintOutcome),
) where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let mem = chain.memory();
    if let Some(hints) = element.all_hints() {
        for &(addr, len) in hints {
            outcome(split_range(
                mem,
                addr,
                u64::from(len),
                file_backed_ok,
                &mut f,
            ));
        }
        return;
    }
    for desc in chain.clone() {
        if desc.is_write_only() {
            outcome(split_range(
                mem,
                desc.addr().0,
                u64::from(desc.len()),
                file_backed_ok,
                &mut f,
            ));
        }
    }
}

/// Rounds `[addr, addr + len)` inward to whole pages and calls `f` for each piece that lies
/// inside one guest memory region (skipping file-backed regions unless `file_backed_ok`).
///
/// The loop runs at most once per region plus once per hole, so it is bounded by the memory
/// layout, not by the guest.
pub fn split_range<Mem: GuestMemoryBackend + ?Sized>(
    mem: &Mem,
    addr: u64,
    len: u64,
    file_backed_ok: bool,
    f: &mut impl FnMut(GuestAddress, u64),
) -> HintOutcome {
    let mut out = HintOutcome::default();
    if len == 0 {
        out.zero_length = true;
        return out;
    }
    let Some(end) = addr.checked_add(len) else {
        out.overflow = true;
        return out;
    };
    let start = match align_up(addr) {
        Some(s) if s < align_down(end) => s,
        _ => {
            out.too_small = true;
            return out;
        }
    };
    let end = align_down(end);

    let holes = super::regions::for_each_piece(mem, start, end, |region, cur, piece_end| {
        let usable = file_backed_ok || region.file_offset().is_none();
        // Regions normally start on page boundaries; round again in case one does not.
        let (s, e) = (align_up(cur).unwrap_or(u64::MAX), align_down(piece_end));
        if usable && s < e {
            f(GuestAddress(s), e - s);
            out.accepted += e - s;
            out.outside_ram += (s - cur) + (piece_end - e);
        } else {
            out.outside_ram += piece_end - cur;
        }
    });
    out.outside_ram += holes;
    out
}

fn align_up(addr: u64) -> Option<u64> {
    addr.checked_add(PAGE_SIZE - 1)
        .map(|a| a & !(PAGE_SIZE - 1))
}

fn align_down(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x100_0000),
            (GuestAddress(0x200_0000), 0x100_0000),
        ])
        .unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn pieces(mem: &GuestMemoryMmap, addr: u64, len: u64) -> (Vec<(u64, u64)>, HintOutcome) {
        let mut v = Vec::new();
        let out = split_range(mem, addr, len, false, &mut |g, l| v.push((g.0, l)));
        (v, out)
    }

    #[test]
    fn split_rounds_inward_and_splits_at_holes() {
        let m = mem();
        // Unaligned both ends: keeps only whole pages.
        let (v, out) = pieces(&m, 0x1001, 0x3000);
        assert_eq!(v, vec![(0x2000, 0x2000)]);
        assert_eq!(out.accepted, 0x2000);
        // Across the hole between the regions.
        let (v, out) = pieces(&m, 0xff_f000, 0x100_2000);
        assert_eq!(v, vec![(0xff_f000, 0x1000), (0x200_0000, 0x1000)]);
        assert_eq!(out.outside_ram, 0x100_0000);
        // Entirely outside RAM.
        let (v, out) = pieces(&m, 0x400_0000, 0x1000);
        assert!(v.is_empty());
        assert_eq!(out.outside_ram, 0x1000);
        // Overflow, zero length, smaller than a page.
        assert!(pieces(&m, u64::MAX - 0xfff, 0x2000).1.overflow);
        assert!(pieces(&m, 0, 0).1.zero_length);
        assert!(pieces(&m, 0x10, 0x100).1.too_small);
        assert!(pieces(&m, u64::MAX - 0x1ffe, 0x1ffe).1.too_small);
        assert!(pieces(&m, u64::MAX - 0xffe, 0xfff).1.overflow);
    }

    #[test]
    fn inspect_reads_command_across_descriptors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&[2, 0], GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&[0, 0, 9, 9], GuestAddress(0x10_1000))
            .unwrap();
        let chain = vq.build_desc_chain(&[
            desc(0x10_0000, 2, F_NEXT),
            desc(0x10_1000, 4, F_NEXT),
            desc(0x40_0000, 0x40_0000, F_WRITE),
        ]);
        let el = inspect(&chain.unwrap(), 16).unwrap();
        assert_eq!(el.command, Some(2));
        assert_eq!(el.writable, 1);
        assert_eq!(el.all_hints(), Some(&[(0x40_0000, 0x40_0000)][..]));
    }

    #[test]
    fn inspect_refuses_bad_shapes() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 3, F_NEXT), desc(0x40_0000, 0x1000, F_WRITE)])
            .unwrap();
        assert_eq!(inspect(&chain, 16), Err(ChainError::ShortCommand));

        let chain = vq
            .build_desc_chain(&[
                desc(0x40_0000, 0x1000, F_WRITE | F_NEXT),
                desc(0x10_0000, 4, 0),
            ])
            .unwrap();
        assert_eq!(inspect(&chain, 16), Err(ChainError::OrderViolation));

        let chain = vq.build_desc_chain(&[desc(0x900_0000, 4, 0)]).unwrap();
        assert_eq!(inspect(&chain, 16), Err(ChainError::UnreadableCommand));

        // A zero-length readable descriptor is "no command".
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 0, F_NEXT), desc(0x40_0000, 0x1000, F_WRITE)])
            .unwrap();
        assert_eq!(inspect(&chain, 16).unwrap().command, None);
    }

    #[test]
    fn chains_longer_than_the_queue_are_refused() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs: Vec<_> = (0..5)
            .map(|i| desc(0x40_0000 + i * 0x1000, 0x1000, F_WRITE))
            .collect();
        let chain = vq.build_desc_chain(&descs).unwrap();
        assert_eq!(inspect(&chain, 4), Err(ChainError::TooLong));
        assert_eq!(check_chain(&chain, 4), Err(ChainError::TooLong));
        assert_eq!(inspect(&chain, 5).unwrap().writable, 5);
        assert_eq!(check_chain(&chain, 5), Ok(5));
    }

    #[test]
    fn inspect_detects_loops() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 4);
        // Descriptor 0 points to itself.
        let table = vq.desc_table();
        table
            .store(
                0,
                SplitDescriptor::new(0x40_0000, 0x1000, F_WRITE | F_NEXT, 0).into(),
            )
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0u16);
        vq.avail().idx().store(1u16);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(inspect(&chain, 16), Err(ChainError::Truncated));
    }

    #[test]
    fn for_each_hint_reports_only_writable_parts() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[
                desc(0x10_0000, 4, F_NEXT),
                desc(0x40_0000, 0x40_0000, F_WRITE | F_NEXT),
                desc(0x900_0000, 0x1000, F_WRITE | F_NEXT),
                desc(0x80_0000, 0, F_WRITE),
            ])
            .unwrap();
        let element = inspect(&chain, 16).unwrap();
        assert!(element.all_hints().is_some(), "three hints are kept");
        let mut got = Vec::new();
        let mut outcomes = Vec::new();
        for_each_hint(
            &chain,
            &element,
            false,
            |g, l| got.push((g.0, l)),
            |o| outcomes.push(o),
        );
        assert_eq!(got, vec![(0x40_0000, 0x40_0000)]);
        assert_eq!(outcomes.len(), 3);
        assert_eq!(outcomes[1].outside_ram, 0x1000);
        assert!(outcomes[2].zero_length);
    }

    #[test]
    fn long_elements_are_read_again() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let n = KEPT_HINTS as u64 + 2;
        let descs: Vec<_> = (0..n)
            .map(|i| desc(0x40_0000 + i * 0x2000, 0x1000, F_WRITE))
            .collect();
        let chain = vq.build_desc_chain(&descs).unwrap();
        let element = inspect(&chain, 16).unwrap();
        assert_eq!(element.writable as u64, n);
        assert!(element.all_hints().is_none());
        let mut got = Vec::new();
        for_each_hint(&chain, &element, false, |g, l| got.push((g.0, l)), |_| {});
        let want: Vec<_> = (0..n).map(|i| (0x40_0000 + i * 0x2000, 0x1000)).collect();
        assert_eq!(got, want);
    }
}
