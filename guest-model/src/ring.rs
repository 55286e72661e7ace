// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest (driver) side of a split virtqueue, written the way Linux's
//! `drivers/virtio/virtio_ring.c` does it: a private free list chained through
//! `desc_extra[].next`, one avail ring entry per chain, a Release fence before the avail index
//! is published, and `virtqueue_get_buf` reclaiming used chains in used-ring order.
//!
//! Everything lives in guest memory laid out by the test; the device sees only the guest
//! physical addresses written into the MMIO queue registers.

use std::fmt;
use std::sync::atomic::{fence, Ordering};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory as the tests share it.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Avail ring flag: the driver does not want used-buffer interrupts.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not want kicks.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Size of one descriptor table entry.
pub const DESC_SIZE: u64 = 16;
/// Linux's `VIRTIO_MMIO_VRING_ALIGN`: the used ring starts on a page boundary.
pub const VRING_ALIGN: u64 = 4096;

/// One part of a buffer chain: guest address, length, device-writable or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Guest physical address of the part.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (an "in" buffer for the driver).
    pub writable: bool,
}

impl Part {
    /// A device-readable part.
    pub fn out(addr: GuestAddress, len: u32) -> Self {
        Part {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable part.
    pub fn input(addr: GuestAddress, len: u32) -> Self {
        Part {
            addr,
            len,
            writable: true,
        }
    }
}

/// A raw descriptor table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// le64 addr.
    pub addr: u64,
    /// le32 len.
    pub len: u32,
    /// le16 flags.
    pub flags: u16,
    /// le16 next.
    pub next: u16,
}

impl Desc {
    /// A descriptor written as given: no flag added, `next` as passed.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }

    /// A device-readable descriptor (no flags).
    pub fn out(addr: u64, len: u32) -> Self {
        Desc::new(addr, len, 0, 0)
    }

    /// A device-writable descriptor (`VRING_DESC_F_WRITE`).
    pub fn input(addr: u64, len: u32) -> Self {
        Desc::new(addr, len, VRING_DESC_F_WRITE, 0)
    }

    /// A descriptor naming an indirect table of `entries` descriptors at `table`
    /// (`VRING_DESC_F_INDIRECT`, length `16 * entries`).
    pub fn indirect(table: u64, entries: u32) -> Self {
        Desc::new(
            table,
            entries.saturating_mul(DESC_SIZE as u32),
            VRING_DESC_F_INDIRECT,
            0,
        )
    }
}

impl From<Part> for Desc {
    fn from(p: Part) -> Self {
        if p.writable {
            Desc::input(p.addr.0, p.len)
        } else {
            Desc::out(p.addr.0, p.len)
        }
    }
}

/// Where a queue's three parts live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (number of descriptors).
    pub size: u16,
    /// Descriptor table.
    pub desc: GuestAddress,
    /// Driver area (avail ring).
    pub avail: GuestAddress,
    /// Device area (used ring).
    pub used: GuestAddress,
}

impl RingLayout {
    /// Bytes the avail ring takes, `used_event` included.
    pub fn avail_bytes(size: u16) -> u64 {
        6 + 2 * u64::from(size)
    }

    /// Bytes the used ring takes, `avail_event` included.
    pub fn used_bytes(size: u16) -> u64 {
        6 + 8 * u64::from(size)
    }

    /// Linux's `vring_init` layout at `base` (which must be 4 KiB aligned): descriptors, then
    /// the avail ring, then the used ring at the next `VRING_ALIGN` boundary.
    pub fn linux(base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + DESC_SIZE * u64::from(size));
        let used = GuestAddress(align_up(avail.0 + Self::avail_bytes(size), VRING_ALIGN));
        RingLayout {
            size,
            desc,
            avail,
            used,
        }
    }

    /// First byte past the used ring.
    pub fn end(&self) -> u64 {
        self.used.0 + Self::used_bytes(self.size)
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

/// Linux's `vring_need_event`.
pub fn vring_need_event(event_idx: u16, new_idx: u16, old: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old)
}

/// What can go wrong on the guest side of a ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingError {
    /// Not enough free descriptors for the chain (Linux: -ENOSPC).
    NoSpace {
        /// Descriptors needed.
        needed: u16,
        /// Descriptors free.
        free: u16,
    },
    /// An empty chain was asked for.
    Empty,
    /// An indirect chain longer than the model's per-head table.
    IndirectTooLong(usize),
    /// Indirect descriptors were asked for but not negotiated or not set up.
    NoIndirect,
    /// The ring was marked broken (Linux `BAD_RING`): the device returned something no
    /// driver can accept.
    Broken(String),
    /// Guest memory access failed.
    Memory(String),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for RingError {}

/// Per-head bookkeeping (`desc_state` in Linux).
#[derive(Clone, Copy, Debug)]
struct HeadState {
    /// Caller's token for this chain (Linux's `data`).
    token: u64,
    /// Descriptors taken from the ring table (1 for an indirect chain).
    ring_descs: u16,
}

/// One used element as `virtqueue_get_buf` returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedBuf {
    /// The chain's head descriptor.
    pub head: u16,
    /// The token given when the chain was added.
    pub token: u64,
    /// The length the device wrote into the used element.
    pub len: u32,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct SplitRing {
    /// Queue index on the transport.
    pub index: u16,
    /// Layout in guest memory.
    pub layout: RingLayout,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// Indirect tables: base address and number of entries per head (0 = none).
    indirect: Option<(GuestAddress, u16)>,
    free_head: u16,
    num_free: u16,
    /// `desc_extra[].next`: the private free-list/chain links.
    next: Vec<u16>,
    desc_state: Vec<Option<HeadState>>,
    avail_idx_shadow: u16,
    avail_flags_shadow: u16,
    num_added: u16,
    last_used_idx: u16,
    broken: Option<String>,
}

fn mem_err<E: fmt::Debug>(e: E) -> RingError {
    RingError::Memory(format!("{e:?}"))
}

impl SplitRing {
    /// Sets up the driver side of a ring (Linux `vring_create_virtqueue` +
    /// `__vring_new_virtqueue`): zeroes the three areas, chains every descriptor into the free
    /// list, and writes the avail flags (`NO_INTERRUPT` when the queue has no callback and
    /// EVENT_IDX is off).
    pub fn new(
        mem: &GuestMem,
        index: u16,
        layout: RingLayout,
        event_idx: bool,
        callback: bool,
        indirect: Option<(GuestAddress, u16)>,
    ) -> Result<Self, RingError> {
        let size = layout.size;
        assert!(size > 0, "a ring needs at least one descriptor");
        let zero_desc = vec![0u8; (DESC_SIZE * u64::from(size)) as usize];
        mem.write_slice(&zero_desc, layout.desc).map_err(mem_err)?;
        let zero_avail = vec![0u8; RingLayout::avail_bytes(size) as usize];
        mem.write_slice(&zero_avail, layout.avail)
            .map_err(mem_err)?;
        let zero_used = vec![0u8; RingLayout::used_bytes(size) as usize];
        mem.write_slice(&zero_used, layout.used).map_err(mem_err)?;
        let next = (0..size).map(|i| i.wrapping_add(1)).collect();
        let mut avail_flags_shadow = 0;
        if !callback {
            avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT;
            if !event_idx {
                mem.store(avail_flags_shadow.to_le(), layout.avail, Ordering::Relaxed)
                    .map_err(mem_err)?;
            }
        }
        Ok(SplitRing {
            index,
            layout,
            event_idx,
            indirect,
            free_head: 0,
            num_free: size,
            next,
            desc_state: vec![None; size as usize],
            avail_idx_shadow: 0,
            avail_flags_shadow,
            num_added: 0,
            last_used_idx: 0,
            broken: None,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Free descriptors (`vq->num_free`).
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The avail index the driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx_shadow
    }

    /// The next used index the driver will reclaim.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used_idx
    }

    /// Why the ring is broken, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Chains posted and not reclaimed yet.
    pub fn in_flight(&self) -> usize {
        self.desc_state.iter().filter(|s| s.is_some()).count()
    }

    fn desc_addr(&self, i: u16) -> GuestAddress {
        GuestAddress(self.layout.desc.0 + DESC_SIZE * u64::from(i))
    }

    /// Writes one descriptor table entry, bypassing all bookkeeping.
    pub fn write_desc_raw(&self, mem: &GuestMem, i: u16, d: Desc) -> Result<(), RingError> {
        write_desc_at(mem, self.desc_addr(i), d)
    }

    /// Reads one descriptor table entry.
    pub fn read_desc(&self, mem: &GuestMem, i: u16) -> Result<Desc, RingError> {
        let a = self.desc_addr(i);
        Ok(Desc {
            addr: u64::from_le(mem.read_obj::<u64>(a).map_err(mem_err)?),
            len: u32::from_le(
                mem.read_obj::<u32>(GuestAddress(a.0 + 8))
                    .map_err(mem_err)?,
            ),
            flags: u16::from_le(
                mem.read_obj::<u16>(GuestAddress(a.0 + 12))
                    .map_err(mem_err)?,
            ),
            next: u16::from_le(
                mem.read_obj::<u16>(GuestAddress(a.0 + 14))
                    .map_err(mem_err)?,
            ),
        })
    }

    /// Adds a chain (Linux `virtqueue_add_split`) and publishes it in the avail ring. With
    /// `indirect`, the parts go into this head's indirect table and the ring takes one
    /// descriptor. Returns the head.
    pub fn add(
        &mut self,
        mem: &GuestMem,
        parts: &[Part],
        indirect: bool,
        token: u64,
    ) -> Result<u16, RingError> {
        if let Some(why) = &self.broken {
            return Err(RingError::Broken(why.clone()));
        }
        if parts.is_empty() {
            return Err(RingError::Empty);
        }
        let needed: u16 = if indirect {
            1
        } else {
            u16::try_from(parts.len()).unwrap_or(u16::MAX)
        };
        if self.num_free < needed {
            return Err(RingError::NoSpace {
                needed,
                free: self.num_free,
            });
        }
        let head = self.free_head;
        if indirect {
            let (base, per_head) = self.indirect.ok_or(RingError::NoIndirect)?;
            if parts.len() > usize::from(per_head) {
                return Err(RingError::IndirectTooLong(parts.len()));
            }
            let table = GuestAddress(base.0 + u64::from(head) * u64::from(per_head) * DESC_SIZE);
            for (k, p) in parts.iter().enumerate() {
                let last = k + 1 == parts.len();
                let mut flags = if p.writable { VRING_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT;
                }
                let d = Desc {
                    addr: p.addr.0,
                    len: p.len,
                    flags,
                    next: if last { 0 } else { (k + 1) as u16 },
                };
                write_desc_at(mem, GuestAddress(table.0 + DESC_SIZE * k as u64), d)?;
            }
            let d = Desc {
                addr: table.0,
                len: (parts.len() as u64 * DESC_SIZE) as u32,
                flags: VRING_DESC_F_INDIRECT,
                next: self.next[usize::from(head)],
            };
            self.write_desc_raw(mem, head, d)?;
            self.free_head = self.next[usize::from(head)];
        } else {
            let mut i = head;
            for (k, p) in parts.iter().enumerate() {
                let last = k + 1 == parts.len();
                let mut flags = if p.writable { VRING_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT;
                }
                let d = Desc {
                    addr: p.addr.0,
                    len: p.len,
                    flags,
                    next: self.next[usize::from(i)],
                };
                self.write_desc_raw(mem, i, d)?;
                i = self.next[usize::from(i)];
            }
            self.free_head = i;
        }
        self.num_free -= needed;
        self.desc_state[usize::from(head)] = Some(HeadState {
            token,
            ring_descs: needed,
        });
        self.publish_head(mem, head)?;
        Ok(head)
    }

    /// Adds a chain of raw descriptors and publishes it: each descriptor's address, length
    /// and flags are written as given, `VRING_DESC_F_NEXT` and `next` are filled in for every
    /// descriptor but the last, whose `next` is written as given. Flags such as
    /// `VRING_DESC_F_INDIRECT` with a hand-written table ([`write_table`]) or a write-only
    /// command let hostile tests post what Linux never would, with the free list kept right.
    /// Returns the head.
    pub fn add_descs(
        &mut self,
        mem: &GuestMem,
        descs: &[Desc],
        token: u64,
    ) -> Result<u16, RingError> {
        if descs.is_empty() {
            return Err(RingError::Empty);
        }
        let n = u16::try_from(descs.len()).unwrap_or(u16::MAX);
        let ids = self.alloc(n)?;
        for (k, (&i, d)) in ids.iter().zip(descs).enumerate() {
            let d = match ids.get(k + 1) {
                Some(&next) => Desc {
                    flags: d.flags | VRING_DESC_F_NEXT,
                    next,
                    ..*d
                },
                None => *d,
            };
            self.write_desc_raw(mem, i, d)?;
        }
        self.publish_chain(mem, &ids, token)
    }

    /// Takes `n` descriptors off the free list, in free-list order, without writing or
    /// publishing anything: the caller writes them with [`write_desc_raw`](Self::write_desc_raw)
    /// (any flags, any `next`, loops included) and hands them to
    /// [`publish_chain`](Self::publish_chain).
    pub fn alloc(&mut self, n: u16) -> Result<Vec<u16>, RingError> {
        if let Some(why) = &self.broken {
            return Err(RingError::Broken(why.clone()));
        }
        if n == 0 {
            return Err(RingError::Empty);
        }
        if self.num_free < n {
            return Err(RingError::NoSpace {
                needed: n,
                free: self.num_free,
            });
        }
        let mut ids = Vec::with_capacity(usize::from(n));
        let mut i = self.free_head;
        for _ in 0..n {
            ids.push(i);
            i = self.next[usize::from(i)];
        }
        self.free_head = i;
        self.num_free -= n;
        Ok(ids)
    }

    /// Publishes descriptors taken with [`alloc`](Self::alloc) as one chain headed by
    /// `ids[0]`: when the device returns the head, all of `ids` go back to the free list,
    /// whatever the descriptors' own `next` fields say.
    pub fn publish_chain(
        &mut self,
        mem: &GuestMem,
        ids: &[u16],
        token: u64,
    ) -> Result<u16, RingError> {
        let (&head, rest) = ids.split_first().ok_or(RingError::Empty)?;
        let size = self.layout.size;
        let mut i = head;
        for &n in rest {
            if i >= size || self.next[usize::from(i)] != n {
                return Err(RingError::Memory(format!(
                    "descriptors {ids:?} were not taken together by alloc"
                )));
            }
            i = n;
        }
        if head >= size || self.desc_state[usize::from(head)].is_some() {
            return Err(RingError::Memory(format!(
                "descriptor {head} is already a head"
            )));
        }
        self.desc_state[usize::from(head)] = Some(HeadState {
            token,
            ring_descs: u16::try_from(ids.len()).unwrap_or(u16::MAX),
        });
        self.publish_head(mem, head)?;
        Ok(head)
    }

    /// Chains published and not used by the device yet (avail index minus used index).
    pub fn pending(&self, mem: &GuestMem) -> Result<u16, RingError> {
        Ok(self.avail_idx_shadow.wrapping_sub(self.used_idx(mem)?))
    }

    /// Puts `head` into the next avail ring slot and publishes the new avail index with a
    /// Release fence before the store. No free-list bookkeeping: use it raw only for hostile
    /// tests (a head the driver never set up is "not a head" when it comes back).
    pub fn publish_head(&mut self, mem: &GuestMem, head: u16) -> Result<(), RingError> {
        let slot = self.avail_idx_shadow % self.layout.size;
        let at = GuestAddress(self.layout.avail.0 + 4 + 2 * u64::from(slot));
        store_u16(mem, at, head, Ordering::Relaxed)?;
        self.avail_idx_shadow = self.avail_idx_shadow.wrapping_add(1);
        self.num_added = self.num_added.wrapping_add(1);
        // virtio_wmb: descriptors and ring entry before the index.
        fence(Ordering::Release);
        self.store_avail_idx(mem)
    }

    /// Publishes `idx` as the available index, wherever it stands relative to the device's
    /// position (what a hostile driver may do); heads published later go on from it.
    pub fn set_avail_idx(&mut self, mem: &GuestMem, idx: u16) -> Result<(), RingError> {
        self.avail_idx_shadow = idx;
        self.store_avail_idx(mem)
    }

    fn store_avail_idx(&self, mem: &GuestMem) -> Result<(), RingError> {
        let at = GuestAddress(self.layout.avail.0 + 2);
        store_u16(mem, at, self.avail_idx_shadow, Ordering::Release)
    }

    /// Linux `virtqueue_kick_prepare_split`: does the device want a notification for what was
    /// added since the last call?
    pub fn kick_prepare(&mut self, mem: &GuestMem) -> Result<bool, RingError> {
        // virtio_mb: the avail index store before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let new_idx = self.avail_idx_shadow;
        let old = new_idx.wrapping_sub(self.num_added);
        self.num_added = 0;
        if self.event_idx {
            let avail_event: u16 = mem
                .load(self.avail_event_addr(), Ordering::Acquire)
                .map_err(mem_err)?;
            Ok(vring_need_event(u16::from_le(avail_event), new_idx, old))
        } else {
            let flags: u16 = mem
                .load(self.layout.used, Ordering::Acquire)
                .map_err(mem_err)?;
            Ok(u16::from_le(flags) & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    fn avail_event_addr(&self) -> GuestAddress {
        GuestAddress(self.layout.used.0 + 4 + 8 * u64::from(self.layout.size))
    }

    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.layout.avail.0 + 4 + 2 * u64::from(self.layout.size))
    }

    /// The device's used index, read with Acquire ordering.
    pub fn used_idx(&self, mem: &GuestMem) -> Result<u16, RingError> {
        mem.load(GuestAddress(self.layout.used.0 + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mem_err)
    }

    /// The used ring flags.
    pub fn used_flags(&self, mem: &GuestMem) -> Result<u16, RingError> {
        mem.load(self.layout.used, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mem_err)
    }

    /// Used element at ring position `pos` (taken modulo the size): (id, len).
    pub fn used_elem(&self, mem: &GuestMem, pos: u16) -> Result<(u32, u32), RingError> {
        let slot = pos % self.layout.size;
        let at = GuestAddress(self.layout.used.0 + 4 + 8 * u64::from(slot));
        let id = u32::from_le(mem.read_obj::<u32>(at).map_err(mem_err)?);
        let len = u32::from_le(
            mem.read_obj::<u32>(GuestAddress(at.0 + 4))
                .map_err(mem_err)?,
        );
        Ok((id, len))
    }

    fn bad_ring(&mut self, why: String) -> RingError {
        self.broken = Some(why.clone());
        RingError::Broken(why)
    }

    /// Linux `virtqueue_get_buf_ctx_split`: reclaims the next used chain, if any. A used id
    /// that is out of range or not an outstanding head breaks the ring (`BAD_RING`).
    pub fn get_buf(&mut self, mem: &GuestMem) -> Result<Option<UsedBuf>, RingError> {
        if let Some(why) = &self.broken {
            return Err(RingError::Broken(why.clone()));
        }
        let used_idx = self.used_idx(mem)?;
        if used_idx == self.last_used_idx {
            return Ok(None);
        }
        // virtio_rmb: only read the element after seeing the index.
        fence(Ordering::Acquire);
        let (id, len) = self.used_elem(mem, self.last_used_idx)?;
        if id >= u32::from(self.layout.size) {
            return Err(self.bad_ring(format!(
                "queue {}: used[{}] id {id} out of range (size {})",
                self.index, self.last_used_idx, self.layout.size
            )));
        }
        let head = id as u16;
        let Some(state) = self.desc_state[usize::from(head)].take() else {
            return Err(self.bad_ring(format!(
                "queue {}: used[{}] id {id} is not a head (used idx {used_idx}, avail idx {})",
                self.index, self.last_used_idx, self.avail_idx_shadow
            )));
        };
        // detach_buf_split: walk the private links to the chain's last descriptor and put the
        // whole chain at the front of the free list.
        let mut i = head;
        for _ in 1..state.ring_descs {
            i = self.next[usize::from(i)];
        }
        self.next[usize::from(i)] = self.free_head;
        self.free_head = head;
        self.num_free += state.ring_descs;
        self.last_used_idx = self.last_used_idx.wrapping_add(1);
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT == 0 && self.event_idx {
            // virtio_store_mb(used_event = last_used_idx).
            mem.store(
                self.last_used_idx.to_le(),
                self.used_event_addr(),
                Ordering::SeqCst,
            )
            .map_err(mem_err)?;
        }
        Ok(Some(UsedBuf {
            head,
            token: state.token,
            len,
        }))
    }

    /// Reclaims every used chain (`while (virtqueue_get_buf(vq)) ;`).
    pub fn reclaim_all(&mut self, mem: &GuestMem) -> Result<Vec<UsedBuf>, RingError> {
        let mut out = Vec::new();
        while let Some(b) = self.get_buf(mem)? {
            out.push(b);
        }
        Ok(out)
    }

    /// Advances over used elements without any bookkeeping and returns them raw (for rings
    /// filled with [`publish_head`](Self::publish_head)).
    pub fn take_used_raw(&mut self, mem: &GuestMem) -> Result<Vec<(u32, u32)>, RingError> {
        let used_idx = self.used_idx(mem)?;
        fence(Ordering::Acquire);
        let mut out = Vec::new();
        while self.last_used_idx != used_idx {
            out.push(self.used_elem(mem, self.last_used_idx)?);
            self.last_used_idx = self.last_used_idx.wrapping_add(1);
        }
        Ok(out)
    }
}

/// Writes `descs` as one chain into the table at `table`, entry 0 first: every entry but the
/// last gets `VRING_DESC_F_NEXT` and `next` = its successor's index; the last is written as
/// given. The table can be an indirect table or, for hostile tests, any guest memory.
pub fn write_table(mem: &GuestMem, table: GuestAddress, descs: &[Desc]) -> Result<(), RingError> {
    let mut at = table;
    for (k, d) in descs.iter().enumerate() {
        let d = match u16::try_from(k + 1) {
            Ok(next) if k + 1 < descs.len() => Desc {
                flags: d.flags | VRING_DESC_F_NEXT,
                next,
                ..*d
            },
            _ => *d,
        };
        write_desc_at(mem, at, d)?;
        at = GuestAddress(at.0.wrapping_add(DESC_SIZE));
    }
    Ok(())
}

/// Writes one raw descriptor at guest address `at`, whatever it holds.
pub fn write_desc_at(mem: &GuestMem, at: GuestAddress, d: Desc) -> Result<(), RingError> {
    mem.write_slice(&desc_bytes(&d), at).map_err(mem_err)
}

/// The 16 bytes of a descriptor table entry, as `struct vring_desc` lays them out
/// (little-endian `addr`, `len`, `flags`, `next`).
pub fn desc_bytes(d: &Desc) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len.to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
    raw[14..16].copy_from_slice(&d.next.to_le_bytes());
    raw
}

/// Stores a little-endian `u16` with `order`; a location the atomic store refuses (two bytes
/// straddling two memory regions, which hostile layouts make) is written byte by byte.
fn store_u16(mem: &GuestMem, at: GuestAddress, v: u16, order: Ordering) -> Result<(), RingError> {
    if mem.store(v.to_le(), at, order).is_ok() {
        return Ok(());
    }
    mem.write_slice(&v.to_le_bytes(), at).map_err(mem_err)
}
