// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Split-ring descriptors: what the guest model writes (well-formed chains, raw table
//! entries and indirect tables) and how a chain is walked (virtio-queue's rules).

use arbitrary::Arbitrary;
use guest_model::ring::{desc_bytes, GuestMem};

use crate::layout::{guest_write, len_of, Addr, Layout, Len, TABLE_ENTRIES};

pub use guest_model::ring::Desc;
/// The buffer is an indirect table.
pub use guest_model::ring::VRING_DESC_F_INDIRECT as F_INDIRECT;
/// The descriptor continues through `next`.
pub use guest_model::ring::VRING_DESC_F_NEXT as F_NEXT;
/// The buffer is device-writable.
pub use guest_model::ring::VRING_DESC_F_WRITE as F_WRITE;

/// The most raw descriptor table writes of one element.
pub const MAX_RAW_WRITES: usize = 16;
/// The most raw indirect tables of one element.
pub const MAX_RAW_TABLES: usize = 2;

/// Which descriptor table a descriptor goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The queue's descriptor table (through the queue's `DriverRing`).
    Ring,
    /// An indirect table at this guest address.
    At(u64),
}

/// The descriptor `b` holds.
pub fn desc_from_bytes(b: [u8; 16]) -> Desc {
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = b;
    Desc {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    }
}

/// Whether the buffer is device-writable.
pub fn writable(d: &Desc) -> bool {
    d.flags & F_WRITE != 0
}

/// The descriptors a split-ring chain yields, in order (virtio-queue's rules): follows NEXT
/// within the table (at most as many steps as the table has entries), switches once into an
/// indirect table (whose length must be a multiple of 16; the indirect descriptor's other
/// flags and its next are ignored), refuses an indirect table inside an indirect table,
/// stops at an index past the table, at an unreadable descriptor, or when the total length
/// would pass 4 GiB. Stops after `cap` descriptors. `read` reads the table entry at a guest
/// address (`None`: unreadable).
pub fn walk(
    table: u64,
    size: u16,
    head: u16,
    cap: usize,
    mut read: impl FnMut(u64) -> Option<Desc>,
) -> Vec<Desc> {
    let mut out = Vec::new();
    let (mut table, mut size, mut next, mut ttl) = (table, size, head, size);
    let mut indirect = false;
    let mut total = 0u32;
    while out.len() < cap {
        if ttl == 0 || next >= size {
            break;
        }
        let Some(at) = table.checked_add(u64::from(next) * 16) else {
            break;
        };
        let Some(d) = read(at) else {
            break;
        };
        if d.flags & F_INDIRECT != 0 {
            if indirect || d.len % 16 != 0 || d.len / 16 > u32::from(u16::MAX) {
                break;
            }
            table = d.addr;
            size = (d.len / 16) as u16;
            next = 0;
            ttl = size;
            indirect = true;
            continue;
        }
        let Some(t) = total.checked_add(d.len) else {
            break;
        };
        total = t;
        if d.flags & F_NEXT != 0 {
            next = d.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        out.push(d);
    }
    out
}

/// Writes a well-formed chain the way a driver does: `parts` are `(addr, len, flags)`
/// without `F_NEXT`, which every part but the last gets (no parts: one empty readable
/// descriptor). Directly into the queue's descriptor table from index `start` (wrapping
/// at `size`), or, with `indirect`, into the indirect table at that address, referenced by
/// descriptor `start`. `write(table, index, desc)` writes one descriptor. Returns the index
/// after the last descriptor used in the descriptor table.
pub fn write_chain(
    mut parts: Vec<(u64, u32, u16)>,
    size: u16,
    start: u16,
    indirect: Option<u64>,
    mut write: impl FnMut(Table, u16, Desc),
) -> u16 {
    if parts.is_empty() {
        parts.push((0, 0, 0));
    }
    let n = parts.len();
    let descs = parts.iter().enumerate().map(|(i, &(addr, len, flags))| {
        let flags = if i + 1 < n { flags | F_NEXT } else { flags };
        (addr, len, flags)
    });
    match indirect {
        Some(t) => {
            for (i, (addr, len, flags)) in descs.enumerate() {
                let d = Desc {
                    addr,
                    len,
                    flags,
                    next: i as u16 + 1,
                };
                write(Table::At(t), i as u16, d);
            }
            let d = Desc {
                addr: t,
                len: n as u32 * 16,
                flags: F_INDIRECT,
                next: 0,
            };
            write(Table::Ring, start, d);
            start.wrapping_add(1)
        }
        None => {
            let idx = |i: usize| ((usize::from(start) + i) % usize::from(size)) as u16;
            for (i, (addr, len, flags)) in descs.enumerate() {
                let d = Desc {
                    addr,
                    len,
                    flags,
                    next: idx(i + 1),
                };
                write(Table::Ring, idx(i), d);
            }
            idx(n)
        }
    }
}

/// A descriptor with any contents.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub struct RawDesc {
    /// The buffer's address.
    pub addr: Addr,
    /// The buffer's length.
    pub len: Len,
    /// Any flags.
    pub flags: u16,
    /// Any next index.
    pub next: u16,
}

/// Descriptors written anywhere, as an indirect table would be.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct RawTable {
    /// Where the first entry goes.
    pub at: Addr,
    /// The entries (the first `TABLE_ENTRIES`).
    pub entries: Vec<RawDesc>,
}

impl RawDesc {
    /// The descriptor this stands for in `lay`.
    pub fn desc(&self, lay: &Layout) -> Desc {
        Desc {
            addr: lay.addr(self.addr),
            len: len_of(self.len),
            flags: self.flags,
            next: self.next,
        }
    }
}

/// Writes the descriptor table entries (`index % size`, with `write` as in `write_chain`)
/// and the tables (with `guest_write`) of a raw element.
pub fn write_raw(
    lay: &Layout,
    mem: &GuestMem,
    size: u16,
    writes: &[(u16, RawDesc)],
    tables: &[RawTable],
    mut write: impl FnMut(Table, u16, Desc),
) {
    for (idx, d) in writes.iter().take(MAX_RAW_WRITES) {
        write(Table::Ring, idx % size, d.desc(lay));
    }
    for t in tables.iter().take(MAX_RAW_TABLES) {
        let at = lay.addr(t.at);
        for (i, d) in t.entries.iter().take(TABLE_ENTRIES).enumerate() {
            guest_write(
                lay,
                mem,
                at.wrapping_add(16 * i as u64),
                &desc_bytes(&d.desc(lay)),
            );
        }
    }
}

/// The head a raw element publishes: values with the top bit set as they are (past the
/// table), others modulo the queue size.
pub fn raw_head(head: u16, size: u16) -> u16 {
    if head & 0x8000 != 0 {
        head
    } else {
        head % size
    }
}
