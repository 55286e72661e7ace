// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memory statistics from the driver (`VIRTIO_BALLOON_F_STATS_VQ`).
//!
//! The statistics queue runs backwards: the driver posts one buffer, the device keeps it, and
//! gives it back when it wants fresh numbers; the driver refills it and posts it again. Each
//! buffer is an array of packed 10-byte entries (`le16` tag, `le64` value). Unknown tags and a
//! trailing fragment are ignored; at most [`MAX_STATS_ENTRIES`] entries are parsed per buffer.

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::queue::serve_checked;
use super::timer::Timer;
use crate::defs::stats_tag::{self as tag, ENTRY_SIZE};
use crate::transport::Interrupt;

/// The most entries parsed from one buffer (Linux sends 16); the rest is ignored.
pub const MAX_STATS_ENTRIES: usize = 256;

/// The values of one statistics buffer, by tag. A tag the driver did not send is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BalloonStats {
    values: [Option<u64>; tag::COUNT],
}

impl BalloonStats {
    /// The value of `tag`, if the driver sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(usize::from(tag)).copied().flatten()
    }

    /// Every tag the driver sent with its value, in tag order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        (0u16..)
            .zip(self.values.iter())
            .filter_map(|(t, v)| v.map(|v| (t, v)))
    }

    /// Free memory in bytes.
    pub fn free_memory(&self) -> Option<u64> {
        self.get(tag::MEMFREE)
    }

    /// Total memory in bytes.
    pub fn total_memory(&self) -> Option<u64> {
        self.get(tag::MEMTOT)
    }

    /// Available memory in bytes.
    pub fn available_memory(&self) -> Option<u64> {
        self.get(tag::AVAIL)
    }

    fn set(&mut self, tag: u16, value: u64) -> bool {
        match self.values.get_mut(usize::from(tag)) {
            Some(slot) => {
                *slot = Some(value);
                true
            }
            None => false,
        }
    }
}

/// The latest statistics and when they arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsReport {
    /// The values.
    pub stats: BalloonStats,
    /// When the device received the buffer (monotonic).
    pub received: Instant,
    /// When the device received the buffer (wall clock).
    pub received_at: SystemTime,
    /// Entries parsed (known and unknown tags).
    pub entries: u32,
    /// Entries with a tag the device does not know (ignored).
    pub unknown_tags: u32,
}

/// Parses the device-readable part of a statistics buffer as a byte stream of 10-byte
/// entries. Returns `None` if a descriptor cannot be read.
pub(super) fn parse<M>(chain: &DescriptorChain<M>) -> Option<(BalloonStats, u32, u32)>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let mem = chain.memory();
    let mut stats = BalloonStats::default();
    let (mut entries, mut unknown) = (0u32, 0u32);
    let mut entry = [0u8; ENTRY_SIZE];
    let mut have = 0usize;
    for desc in chain.clone() {
        if desc.is_write_only() {
            continue;
        }
        let mut off = 0u64;
        let len = u64::from(desc.len());
        while off < len && (entries as usize) < MAX_STATS_ENTRIES {
            let want = (ENTRY_SIZE - have).min((len - off) as usize);
            let addr = desc.addr().0.checked_add(off).map(GuestAddress)?;
            mem.read_slice(&mut entry[have..have + want], addr).ok()?;
            have += want;
            off += want as u64;
            if have == ENTRY_SIZE {
                have = 0;
                entries += 1;
                let t = u16::from_le_bytes([entry[0], entry[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&entry[2..]);
                if !stats.set(t, u64::from_le_bytes(v)) {
                    unknown += 1;
                }
            }
        }
    }
    Some((stats, entries, unknown))
}

/// The statistics side of the device.
#[derive(Debug)]
pub(super) struct StatsState {
    /// The head of the buffer the device holds, if any.
    pub(super) held: Option<u16>,
    /// The latest buffer's values.
    pub(super) last: Option<StatsReport>,
    /// How often the device asks for fresh numbers (0: only when asked).
    pub(super) interval: Duration,
    /// The timer that asks at that interval.
    pub(super) timer: Timer,
}

/// What one pass over the statistics queue found.
#[derive(Debug, Default)]
pub(super) struct StatsServed {
    /// Buffers parsed.
    pub(super) updates: u64,
    /// Buffers that could not be read (held anyway).
    pub(super) malformed: u64,
}

/// Serves up to `budget` elements of the statistics queue `index`. Each buffer is parsed
/// and then held until the device wants fresh numbers
/// ([`request_stats`](super::Balloon::request_stats)); a second one while one is held (the
/// driver must not send it) gives the older one back.
pub(super) fn serve_stats<B: GuestMemoryBackend>(
    queue: &mut Queue,
    mem: &B,
    index: usize,
    budget: usize,
    irq: &Interrupt,
    evt: &EventFd,
    stats: &mut StatsState,
) -> StatsServed {
    let mut served = StatsServed::default();
    let bad = serve_checked(queue, mem, index, budget, irq, evt, |chain| {
        match parse(chain) {
            Some((values, entries, unknown_tags)) => {
                served.updates += 1;
                stats.last = Some(StatsReport {
                    stats: values,
                    received: Instant::now(),
                    received_at: SystemTime::now(),
                    entries,
                    unknown_tags,
                });
            }
            None => served.malformed += 1,
        }
        stats.held.replace(chain.head_index())
    });
    served.malformed += bad;
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_every_tag() {
        for t in 0..tag::COUNT as u16 {
            assert!(tag::name(t).is_some(), "tag {t}");
        }
        assert_eq!(tag::name(tag::DIRECT_RECLAIM), Some("direct_reclaims"));
        assert_eq!(tag::name(16), None);
    }

    #[test]
    fn values_by_tag() {
        let mut s = BalloonStats::default();
        assert!(s.set(tag::MEMFREE, 7));
        assert!(s.set(tag::MEMTOT, 9));
        assert!(s.set(tag::AVAIL, 8));
        assert!(!s.set(16, 1));
        assert_eq!(s.free_memory(), Some(7));
        assert_eq!(s.total_memory(), Some(9));
        assert_eq!(s.available_memory(), Some(8));
        assert_eq!(s.get(tag::SWAP_IN), None);
        assert_eq!(s.get(u16::MAX), None);
        assert_eq!(s.iter().collect::<Vec<_>>(), [(4, 7), (5, 9), (6, 8)]);
    }
}
