// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sources of dirty pages: what the guest wrote since the previous bitmap sync.
//!
//! [`MigrationBitmap::sync`](super::MigrationBitmap::sync) asks a [`DirtyLog`] for each guest
//! memory region in turn. Three sources are covered:
//!
//! * **KVM** (`KVM_GET_DIRTY_LOG`): `KvmDirtyLog` (feature `kvm`), with or without manual
//!   protection. Without it, any closure
//!   `FnMut(&RegionInfo) -> Result<Vec<u64>, DirtyLogError>` is a [`DirtyLog`] with 4 KiB
//!   pages, so a VMM passes `|r| vm_fd.get_dirty_log(slot_of(r), r.len as usize)` (with its
//!   error boxed). With manual protection the log must also be cleared before pages leave
//!   the migration bitmap: see [`DirtyLogClear`].
//! * **vm-memory's write tracking** (`GuestMemoryMmap<AtomicBitmap>`, feature
//!   `backend-bitmap`): [`GuestMemoryDirtyLog`] harvests the bitmap that every write through
//!   vm-memory marks, which is what a VMM's own device emulation writes with.
//! * **Page contents**, for memory whose writes nothing traps (the shared memory of a
//!   User-Mode Linux guest or of a vhost-user frontend):
//!   [`ContentDirtyLog`](super::ContentDirtyLog) hashes every page at each sync and reports
//!   those whose bytes changed. It reads all of memory at every sync and cannot see a write
//!   that puts back the bytes it last saw, which matters for pages free page hints skipped:
//!   see its documentation for when that is safe.
//!
//! A VMM with more than one source syncs from all of them: a page is dirty when any says so
//! ([`JoinedLog`]).

use std::error::Error as StdError;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::counting::merge_log;
use crate::defs::PAGE_SIZE;

/// The error a [`DirtyLog`] returns: whatever the source's own error is, boxed.
pub type DirtyLogError = Box<dyn StdError + Send + Sync>;

/// One guest memory region as the migration bitmap tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Position of the region among the bitmap's regions, in ascending address order (the
    /// order of `GuestMemoryMmap::iter`).
    pub index: usize,
    /// First guest physical address of the region.
    pub start: GuestAddress,
    /// Length of the region in bytes.
    pub len: u64,
}

/// The dirty pages of one region, harvested from a [`DirtyLog`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HarvestedLog {
    /// Bytes per bit; not zero. Bit `i` covers region bytes
    /// `[i * page_size, (i + 1) * page_size)`, and every 4 KiB page those bytes touch counts
    /// as dirty.
    pub page_size: u64,
    /// The bits, least significant first: bit `i` is bit `i % 64` of word `i / 64`.
    pub words: Vec<u64>,
}

/// A source of dirty pages that can be harvested region by region.
///
/// Harvesting must be atomic per page with respect to the guest's writes: a write that
/// races the harvest is either in the words returned, or stays in the log for the next
/// call. `KVM_GET_DIRTY_LOG` and vm-memory's `AtomicBitmap::get_and_reset` both work this
/// way.
pub trait DirtyLog {
    /// Returns the pages of `region` written since the previous call for it, and resets them
    /// in the log.
    ///
    /// # Errors
    ///
    /// Whatever the source fails with; the sync stops and reports the region.
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError>;

    /// Tells the log which bytes a copy just sent for the 4 KiB page at `addr`: `data` is
    /// what the destination now holds for it.
    ///
    /// Logs that trap writes (KVM's, vm-memory's) ignore it, which is the default. A log
    /// that finds changes by content (`ContentDirtyLog`) compares
    /// the page with these bytes at the next harvest, so a write that lands after the read
    /// is always seen, even one that puts back the bytes the log saw before.
    fn page_sent(&mut self, addr: GuestAddress, data: &[u8]) {
        let _ = (addr, data);
    }
}

impl<F> DirtyLog for F
where
    F: FnMut(&RegionInfo) -> Result<Vec<u64>, DirtyLogError>,
{
    /// A closure returning bitmap words with one bit per 4 KiB page, the shape of
    /// `KVM_GET_DIRTY_LOG` on a 4 KiB-page host.
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        Ok(HarvestedLog {
            page_size: PAGE_SIZE,
            words: self(region)?,
        })
    }
}

/// A dirty log that keeps pages dirty until it is told they leave the migration bitmap:
/// KVM's with manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
///
/// Installed with [`MigrationBitmap::set_log_clear`](super::MigrationBitmap::set_log_clear),
/// it is called before pages leave the migration bitmap: for hinted pages before their
/// bits are cleared, for pages about to be sent before they are read
/// ([`MigrationBitmap::take_page`](super::MigrationBitmap::take_page)). After it returns, a
/// write to any of those pages must be logged again.
///
/// It must only re-arm pages whose writes the migration bitmap already has (pages the log
/// reported at a sync and nobody cleared since), never a page written after the last
/// harvest: that write would be lost.
pub trait DirtyLogClear: Send + Sync {
    /// Re-arms logging for the 4 KiB pages `[first_page, first_page + pages)` of `region`
    /// (page numbers inside the region).
    ///
    /// # Errors
    ///
    /// Whatever the source fails with. The caller then keeps the pages in the migration
    /// bitmap (a failed hint is ignored, a failed send is an error of the migration).
    fn clear_dirty_log(
        &self,
        region: &RegionInfo,
        first_page: u64,
        pages: u64,
    ) -> Result<(), DirtyLogError>;
}

/// Two dirty logs joined: a page is dirty when either reports it.
///
/// A VMM's dirty log is KVM's (the vCPUs' writes) joined with the writes its own device
/// emulation makes from host threads (vm-memory's write tracking, [`GuestMemoryDirtyLog`]):
/// `JoinedLog(kvm_log, GuestMemoryDirtyLog::new(&mem))`. Both are harvested for each region;
/// when their page sizes differ the result is in 4 KiB pages.
///
/// If the second log fails, what the first returned for that region is dropped with the
/// error: like after any failed sync, the migration must start over
/// (the precopy loop of `virtio-balloon-precopy` ends with the error and a new run marks everything dirty).
#[derive(Debug)]
pub struct JoinedLog<A, B>(pub A, pub B);

impl<A: DirtyLog, B: DirtyLog> DirtyLog for JoinedLog<A, B> {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        let a = self.0.take_dirty_log(region)?;
        let b = self.1.take_dirty_log(region)?;
        if a.page_size == b.page_size {
            let (mut long, short) = if a.words.len() >= b.words.len() {
                (a, b)
            } else {
                (b, a)
            };
            for (w, s) in long.words.iter_mut().zip(&short.words) {
                *w |= s;
            }
            return Ok(long);
        }
        let pages = usize::try_from(region.len.div_ceil(PAGE_SIZE))
            .map_err(|_| Box::new(RegionMismatch { region: *region }))?;
        let joined = super::counting::DirtyBitmap::new(pages);
        for log in [&a, &b] {
            // A zero page size cannot be placed: everything is dirty.
            if merge_log(&joined, log.page_size, &log.words).is_none() {
                joined.set_all();
            }
        }
        Ok(HarvestedLog {
            page_size: PAGE_SIZE,
            words: joined.to_words(),
        })
    }

    fn page_sent(&mut self, addr: GuestAddress, data: &[u8]) {
        self.0.page_sent(addr, data);
        self.1.page_sent(addr, data);
    }
}

/// Error of [`GuestMemoryDirtyLog`]: the guest memory no longer has the region the migration
/// bitmap was built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "guest memory has no region {} at {:#x} of {:#x} bytes",
    .region.index,
    .region.start.0,
    .region.len
)]
pub struct RegionMismatch {
    /// The region the bitmap asked for.
    pub region: RegionInfo,
}

/// The write-tracking bitmaps of a `GuestMemoryMmap<AtomicBitmap>` as a [`DirtyLog`].
///
/// Every write through vm-memory (`Bytes`, volatile slices) marks its pages in the region's
/// `AtomicBitmap`; harvesting takes those bits and resets them atomically
/// (`AtomicBitmap::get_and_reset`). The bitmap's page size is worked out from its length in
/// bits and in bytes, so a host with 64 KiB pages works too.
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap};
/// use vm_memory::bitmap::AtomicBitmap;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem =
///     GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
/// let bitmap = MigrationBitmap::new(&mem).unwrap();
/// mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
/// assert_eq!(bitmap.sync(&mut GuestMemoryDirtyLog::new(&mem)).unwrap(), 1);
/// assert!(bitmap.is_dirty(GuestAddress(0x5000)));
/// ```
#[derive(Debug)]
pub struct GuestMemoryDirtyLog<'a> {
    mem: &'a GuestMemoryMmap<AtomicBitmap>,
}

impl<'a> GuestMemoryDirtyLog<'a> {
    /// Harvests the write bitmaps of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap<AtomicBitmap>) -> Self {
        GuestMemoryDirtyLog { mem }
    }
}

impl DirtyLog for GuestMemoryDirtyLog<'_> {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        let mismatch = || Box::new(RegionMismatch { region: *region });
        let mmap_region = self
            .mem
            .iter()
            .nth(region.index)
            .filter(|r| r.start_addr() == region.start && r.len() == region.len)
            .ok_or_else(mismatch)?;
        // `MmapRegion::bitmap` (through deref) is the concrete `AtomicBitmap`; the
        // `GuestMemoryRegion::bitmap` method would give a slice without reset.
        let bitmap: &AtomicBitmap = vm_memory::MmapRegion::bitmap(mmap_region);
        Ok(HarvestedLog {
            page_size: bitmap_page_size(bitmap.byte_size(), bitmap.len()),
            words: bitmap.get_and_reset(),
        })
    }
}

/// The page size of an `AtomicBitmap` of `bits` bits over `bytes` bytes.
///
/// For a power-of-two page size `ps` and `bits = ceil(bytes / ps) >= 2`, `bytes / bits` lies
/// in `(ps / 2, ps]`, so the next power of two of its ceiling is `ps`. With one bit, the bit
/// covers the whole region and any power of two at least `bytes` describes it.
fn bitmap_page_size(bytes: usize, bits: usize) -> u64 {
    if bits == 0 {
        return PAGE_SIZE;
    }
    (bytes.div_ceil(bits) as u64).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    #[test]
    fn page_size_is_recovered_from_the_bitmap_shape() {
        for ps in [0x400usize, 0x1000, 0x4000, 0x10000, 0x20_0000] {
            for bytes in [1usize, ps - 1, ps, ps + 1, 7 * ps - 3, 512 * ps, 1 << 30] {
                let bitmap = AtomicBitmap::new(bytes, NonZeroUsize::new(ps).unwrap());
                let got = bitmap_page_size(bitmap.byte_size(), bitmap.len()) as usize;
                if bitmap.len() >= 2 {
                    assert_eq!(got, ps, "bytes {bytes} page size {ps}");
                } else {
                    assert!(got >= bytes && got <= ps, "bytes {bytes} page size {ps}");
                }
            }
        }
        assert_eq!(bitmap_page_size(0, 0), PAGE_SIZE);
    }

    /// A log that returns the same harvest every time, or fails.
    struct Fixed(Option<HarvestedLog>);

    impl DirtyLog for Fixed {
        fn take_dirty_log(&mut self, _: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
            self.0.clone().ok_or_else(|| "log failed".into())
        }
    }

    fn fixed(page_size: u64, words: &[u64]) -> Fixed {
        Fixed(Some(HarvestedLog {
            page_size,
            words: words.to_vec(),
        }))
    }

    const REGION: RegionInfo = RegionInfo {
        index: 0,
        start: GuestAddress(0),
        len: 64 * PAGE_SIZE + 0x800,
    };

    #[test]
    fn joined_logs_of_one_page_size_are_ored() {
        let mut log = JoinedLog(fixed(PAGE_SIZE, &[0b1001]), fixed(PAGE_SIZE, &[0b0110, 1]));
        let got = log.take_dirty_log(&REGION).unwrap();
        assert_eq!(got.page_size, PAGE_SIZE);
        assert_eq!(got.words, vec![0b1111, 1]);
        let mut log = JoinedLog(fixed(PAGE_SIZE, &[2, 1]), fixed(PAGE_SIZE, &[4]));
        assert_eq!(log.take_dirty_log(&REGION).unwrap().words, vec![6, 1]);
    }

    #[test]
    fn joined_logs_of_other_page_sizes_meet_in_4k_pages() {
        // 8 KiB bit 1 is 4 KiB pages 2 and 3; a 64 KiB bit 2 is pages 32..48; bits past
        // the region (65 pages) are dropped.
        let mut log = JoinedLog(
            fixed(PAGE_SIZE, &[0b1]),
            fixed(2 * PAGE_SIZE, &[0b10 | (1 << 40)]),
        );
        let got = log.take_dirty_log(&REGION).unwrap();
        assert_eq!(got.page_size, PAGE_SIZE);
        assert_eq!(got.words, vec![0b1101, 0]);
        let mut log = JoinedLog(fixed(PAGE_SIZE, &[]), fixed(16 * PAGE_SIZE, &[0b100]));
        assert_eq!(
            log.take_dirty_log(&REGION).unwrap().words,
            vec![0xffff_0000_0000, 0]
        );
        // A bit whose bytes do not fit in u64 ends the expansion.
        let mut log = JoinedLog(fixed(PAGE_SIZE, &[1]), fixed(u64::MAX / 2, &[0b10]));
        assert_eq!(log.take_dirty_log(&REGION).unwrap().words, vec![1, 0]);
    }

    #[test]
    fn a_joined_log_with_page_size_zero_is_wholly_dirty() {
        let mut log = JoinedLog(fixed(0, &[1]), fixed(PAGE_SIZE, &[]));
        let got = log.take_dirty_log(&REGION).unwrap();
        assert_eq!(got.words, vec![u64::MAX, 1]);
    }

    #[test]
    fn a_joined_log_fails_when_either_does() {
        let mut log = JoinedLog(Fixed(None), fixed(PAGE_SIZE, &[1]));
        assert_eq!(
            log.take_dirty_log(&REGION).unwrap_err().to_string(),
            "log failed"
        );
        let mut log = JoinedLog(fixed(PAGE_SIZE, &[1]), Fixed(None));
        assert!(log.take_dirty_log(&REGION).is_err());
    }

    #[test]
    fn mismatched_region_is_an_error() {
        let mem =
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut log = GuestMemoryDirtyLog::new(&mem);
        let wrong = RegionInfo {
            index: 0,
            start: GuestAddress(0x1000),
            len: 0x10000,
        };
        let err = log.take_dirty_log(&wrong).unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest memory has no region 0 at 0x1000 of 0x10000 bytes"
        );
        let missing = RegionInfo {
            index: 1,
            start: GuestAddress(0),
            len: 0x10000,
        };
        assert!(log.take_dirty_log(&missing).is_err());
        let right = RegionInfo {
            index: 0,
            start: GuestAddress(0),
            len: 0x10000,
        };
        assert_eq!(log.take_dirty_log(&right).unwrap().words, vec![0]);
    }
}
