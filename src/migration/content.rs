// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A dirty log that finds written pages by their content, for memory whose writes nothing
//! traps.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::dirty_log::{DirtyLog, DirtyLogError, HarvestedLog, RegionInfo, RegionMismatch};
use crate::defs::PAGE_SIZE;

/// [`PAGE_SIZE`] as a `usize` (4096 fits every target).
const PAGE: usize = PAGE_SIZE as usize;

/// How far ahead of the page being hashed the next pages are prefetched, in pages.
const PREFETCH_AHEAD: usize = 2;

/// Asks the CPU to start loading `page` into its caches.
///
/// A harvest copies a page from memory, then hashes the copy: the hash reads only the cache
/// and the hardware prefetchers do not cross 4 KiB boundaries, so without this every copy
/// starts from cold misses and the memory bus idles during every hash (about a tenth of a
/// harvest's time, benches/content_log.rs).
#[inline(always)]
fn prefetch<B: BitmapSlice>(page: &VolatileSlice<'_, B>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let guard = page.ptr_guard();
        let base = guard.as_ptr();
        for line in (0..page.len()).step_by(64) {
            // SAFETY: a prefetch is only a hint to the caches: it never faults, yields no
            // value and writes nothing, so it is no access that could race the guest's
            // writes. The address lies inside `page`, which `guard` keeps mapped, and the
            // instruction (SSE) is on every x86_64 CPU.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(line).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = page;
}

/// The hashes of one region, from its first harvest on.
struct RegionHashes {
    /// First guest physical address of the region.
    start: u64,
    /// Length of the region in bytes (not zero).
    len: u64,
    /// One hash per 4 KiB page: of what the last harvest read, or of what the copy sent
    /// since.
    hashes: Box<[u64]>,
}

impl RegionHashes {
    /// The byte length of the page at region offset `off` (`off < len`): 4096, or less
    /// for a partial last page.
    fn page_len(&self, off: u64) -> usize {
        // At most PAGE_SIZE, so it fits a usize.
        (self.len - off).min(PAGE_SIZE) as usize
    }
}

/// Dirty tracking by content: a page is dirty when its bytes differ from the last time the
/// log looked at it or the copy sent it.
///
/// It is for guest memory whose writes nothing can trap: the shared memory of a User-Mode
/// Linux guest or of a vhost-user frontend, where there is no KVM dirty log and the host's
/// soft-dirty bits do not see the other process's writes. The log keeps one keyed 64-bit
/// hash (XXH3, seeded at random for each log so that a guest cannot work out collisions in
/// advance) per 4 KiB page of every region. Each harvest
/// ([`take_dirty_log`](DirtyLog::take_dirty_log), which
/// [`MigrationBitmap::sync`](super::MigrationBitmap::sync) calls for each region) reads every
/// page of the region, hashes it and reports the pages whose hash changed; the first harvest
/// of a region reports all of its pages. [`page_sent`](DirtyLog::page_sent) stores the hash
/// of the bytes the copy sent, so the next harvest compares the page with what the
/// destination holds.
///
/// Regions are found by the start and length that the migration bitmap passes
/// ([`RegionInfo`]); a region that is not in the guest memory is a [`RegionMismatch`] error,
/// and a region whose length changed is started over (all pages dirty). A partial last page
/// (a region length that is not a multiple of 4 KiB) is hashed over the bytes it has.
///
/// The guest may run during a harvest. A write that races the read of its page is either
/// in the bytes read (and the page is reported if they changed), or lands after them, so the
/// page differs from them at the next harvest (unless the write put back exactly what was
/// read: see below).
///
/// # Cost
///
/// Every sync reads all of guest memory and hashes each page once: its time is that of a
/// full read of memory plus one hash per page (`benches/content_log.rs` measures it beside a
/// plain read pass). The hashes take 8 bytes per 4 KiB page (2 MiB per GiB of guest memory),
/// allocated for each region at its first harvest. Pages are copied into a 4 KiB buffer
/// before they are hashed, with vm-memory's volatile copy, because the guest may be writing
/// them at the same time.
///
/// # What it cannot see
///
/// A write that leaves a page's bytes as the log last saw them: a page changed and changed
/// back between two harvests, or written with the bytes it already held. For a page the
/// copy sent, that is harmless: the log last saw the bytes that were sent, so the
/// destination holds exactly them. For a page that free page hints took off the migration
/// bitmap it is not: the destination still holds whatever was sent for that page before
/// (possibly nothing), and a guest that takes the page back and writes into it exactly the
/// bytes it held when it was freed leaves that older copy in place on the destination.
///
/// So with free page hinting this log is safe when every free page holds what the
/// destination holds for it: then a hinted page the guest takes back either keeps those
/// bytes, which the destination has, or is written with other bytes, which the log sees.
/// That is the case of a guest that zeroes the pages it frees (Linux with `init_on_free=1`)
/// and a destination whose memory starts zeroed, for every page the copy never sent with
/// other bytes. It is not the case of a page the copy sent while it was in use and that was
/// freed (zeroed) and hinted afterwards: the destination keeps its old bytes, and a guest
/// that takes it back and writes only zeros into it finds those old bytes after the
/// migration. (A guest that takes it back and only reads it, relying on `init_on_free`,
/// finds them with any dirty log.) Without hints, every page the copy skips is one whose
/// bytes the destination already holds, so the log misses nothing the destination needs
/// (beyond the 2^-64 chance of a hash collision for a changed page).
///
/// KVM's dirty log and vm-memory's write tracking have no such limit, since they see every
/// write: use them whenever they can see the guest's writes; this log is for memory nothing
/// else can track. The hash is keyed but not cryptographic: it keeps a guest from making
/// collisions by accident or from a table, not a guest that studies its own migration.
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::{ContentDirtyLog, DirtyLog, MigrationBitmap};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
/// let bitmap = MigrationBitmap::new(&mem).unwrap();
/// let mut log = ContentDirtyLog::new(&mem);
/// // What a copy does with the dirty pages: read each one, send it, tell the log.
/// let send_dirty = |log: &mut ContentDirtyLog<_>| {
///     let mut page = [0u8; 4096];
///     for addr in bitmap.iter_dirty().collect::<Vec<_>>() {
///         bitmap.test_and_clear(addr);
///         mem.read_slice(&mut page, addr).unwrap();
///         log.page_sent(addr, &page);
///     }
/// };
///
/// // The first sync reads every page and reports them all.
/// assert_eq!(bitmap.sync(&mut log).unwrap(), 256);
/// send_dirty(&mut log);
///
/// // The guest writes a page: the next sync finds it, the one after finds nothing.
/// mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
/// assert_eq!(bitmap.sync(&mut log).unwrap(), 1);
/// assert!(bitmap.is_dirty(GuestAddress(0x5000)));
/// send_dirty(&mut log);
/// assert_eq!(bitmap.sync(&mut log).unwrap(), 0);
///
/// // A copy that sent other bytes than memory now holds (the guest wrote the page after
/// // it was read) makes the page dirty at the next sync.
/// log.page_sent(GuestAddress(0x7000), &[0xab; 4096]);
/// assert_eq!(bitmap.sync(&mut log).unwrap(), 1);
/// assert!(bitmap.is_dirty(GuestAddress(0x7000)));
/// assert_eq!(log.pages_hashed(), 4 * 256);
/// assert_eq!(log.bytes_read(), 4 * 0x10_0000);
/// ```
pub struct ContentDirtyLog<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    /// The hash key, random for each log.
    seed: u64,
    /// The regions harvested so far, sorted by start address and not overlapping.
    regions: Vec<RegionHashes>,
    pages_hashed: u64,
    bytes_read: u64,
}

impl<M: GuestMemoryBackend> fmt::Debug for ContentDirtyLog<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Neither the key nor the hashes: they are what keeps collisions unpredictable.
        f.debug_struct("ContentDirtyLog")
            .field("regions", &self.regions.len())
            .field("pages_hashed", &self.pages_hashed)
            .field("bytes_read", &self.bytes_read)
            .finish_non_exhaustive()
    }
}

impl<'a, M: GuestMemoryBackend> ContentDirtyLog<'a, M> {
    /// A log over the regions of `mem`, with a fresh random key and no hashes yet: the
    /// first harvest of each region reports all of its pages.
    pub fn new(mem: &'a M) -> Self {
        ContentDirtyLog {
            mem,
            seed: RandomState::new().hash_one(0x636f_6e74_656e_7400u64),
            regions: Vec::new(),
            pages_hashed: 0,
            bytes_read: 0,
        }
    }

    /// Pages that harvests read from guest memory and hashed, since the log was created
    /// (the hashes of sent pages are not counted).
    pub fn pages_hashed(&self) -> u64 {
        self.pages_hashed
    }

    /// Bytes that harvests read from guest memory, since the log was created.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The hash of a page's bytes.
    fn hash(seed: u64, bytes: &[u8]) -> u64 {
        xxh3_64_with_seed(bytes, seed)
    }

    /// The hashes of the region at `start` of `len` bytes (`pages` pages, `len` not zero)
    /// and whether they are new (nothing stored yet). A region not seen before, or seen
    /// with another length, gets a new table, which replaces every table it overlaps.
    fn hashes_for(
        &mut self,
        start: u64,
        len: u64,
        pages: usize,
    ) -> Option<(&mut RegionHashes, bool)> {
        let mut pos = self.regions.partition_point(|r| r.start < start);
        let known = self
            .regions
            .get(pos)
            .is_some_and(|r| r.start == start && r.len == len);
        if !known {
            // Exact: the memory has this region, so it fits the address space.
            let last = start.saturating_add(len - 1);
            self.regions
                .retain(|r| r.start > last || r.start.saturating_add(r.len - 1) < start);
            // Every table left lies wholly before or after the new one.
            pos = self.regions.partition_point(|r| r.start < start);
            self.regions.insert(
                pos,
                RegionHashes {
                    start,
                    len,
                    hashes: vec![0u64; pages].into_boxed_slice(),
                },
            );
        }
        let entry = self.regions.get_mut(pos)?;
        Some((entry, !known))
    }
}

impl<M: GuestMemoryBackend> DirtyLog for ContentDirtyLog<'_, M> {
    /// Reads and hashes every page of `region`; returns the pages whose hash differs from
    /// the stored one (all of them at the region's first harvest), in 4 KiB pages, and stores
    /// the new hashes.
    ///
    /// # Errors
    ///
    /// [`RegionMismatch`] when the guest memory has no region at `region.start` of
    /// `region.len` bytes; vm-memory's error when the region has no host mapping to read.
    /// Nothing is stored then.
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        let mismatch = || Box::new(RegionMismatch { region: *region });
        let mem = self.mem;
        let mem_region = mem
            .find_region(region.start)
            .filter(|r| r.start_addr() == region.start && r.len() == region.len)
            .ok_or_else(mismatch)?;
        let len = usize::try_from(region.len)
            .ok()
            .filter(|&len| len != 0)
            .ok_or_else(mismatch)?;
        // Of `len` bytes; a page outside a shorter one would be reported dirty below.
        let slice = mem_region.as_volatile_slice()?;
        let pages = len.div_ceil(PAGE);
        let seed = self.seed;
        let (entry, fresh) = self
            .hashes_for(region.start.0, region.len, pages)
            .ok_or_else(mismatch)?;

        let mut words = vec![0u64; pages.div_ceil(64)];
        let mut buf = [0u8; PAGE];
        let mut off = 0usize;
        for (word, hashes) in words.iter_mut().zip(entry.hashes.chunks_mut(64)) {
            for (bit, stored) in hashes.iter_mut().enumerate() {
                let n = (len - off).min(PAGE);
                let changed = match (slice.subslice(off, n), buf.get_mut(..n)) {
                    (Ok(page), Some(bytes)) => {
                        // Hashing the mapping in place would need a `&[u8]` over bytes the
                        // guest may be writing: a data race. vm-memory's copy reads them
                        // through a raw pointer into a buffer that stays in L1.
                        page.copy_to(bytes);
                        let ahead = off.saturating_add(PREFETCH_AHEAD * PAGE);
                        let ahead_len = len.saturating_sub(ahead).min(PAGE);
                        if let Ok(next) = slice.subslice(ahead, ahead_len) {
                            prefetch(&next);
                        }
                        let h = Self::hash(seed, bytes);
                        let changed = fresh || h != *stored;
                        *stored = h;
                        changed
                    }
                    // Cannot happen (the page lies inside the region's slice); a page that
                    // cannot be read is reported dirty, so nothing is lost.
                    _ => true,
                };
                *word |= u64::from(changed) << bit;
                off += n;
            }
        }
        let pages = pages as u64;
        self.pages_hashed = self.pages_hashed.saturating_add(pages);
        self.bytes_read = self.bytes_read.saturating_add(region.len);
        Ok(HarvestedLog {
            page_size: PAGE_SIZE,
            words,
        })
    }

    /// Stores the hash of `data` for the page at `addr`, so the next harvest reports the
    /// page unless memory holds exactly `data`.
    ///
    /// Ignored for an address that is not the start of a 4 KiB page of a region already
    /// harvested (before its first harvest every page is reported anyway), and for `data`
    /// that is not 4096 bytes long. The partial last page of a region takes either its own
    /// length or 4096 bytes (of which only the first belong to the page).
    fn page_sent(&mut self, addr: GuestAddress, data: &[u8]) {
        let seed = self.seed;
        let pos = self.regions.partition_point(|r| r.start <= addr.0);
        let Some(entry) = pos.checked_sub(1).and_then(|i| self.regions.get_mut(i)) else {
            return;
        };
        // `entry.start <= addr` by the search.
        let off = addr.0 - entry.start;
        if off >= entry.len || off % PAGE_SIZE != 0 {
            return;
        }
        let page_len = entry.page_len(off);
        if data.len() != page_len && data.len() != PAGE {
            return;
        }
        // The region's length fitted a usize at its harvest, so its page numbers do.
        let page = (off / PAGE_SIZE) as usize;
        if let (Some(bytes), Some(stored)) = (data.get(..page_len), entry.hashes.get_mut(page)) {
            *stored = Self::hash(seed, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::{JoinedLog, MigrationBitmap};
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestMemoryMmap, GuestRegionCollection};

    type Mem = GuestMemoryMmap<()>;

    fn mem(ranges: &[(u64, usize)]) -> Mem {
        let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        Mem::from_ranges(&ranges).unwrap()
    }

    fn info(index: usize, start: u64, len: u64) -> RegionInfo {
        RegionInfo {
            index,
            start: GuestAddress(start),
            len,
        }
    }

    /// The dirty page numbers of a harvest.
    fn dirty(log: &HarvestedLog) -> Vec<u64> {
        assert_eq!(log.page_size, PAGE_SIZE);
        let mut pages = Vec::new();
        for (i, &w) in log.words.iter().enumerate() {
            for bit in 0..64 {
                if w & (1 << bit) != 0 {
                    pages.push(i as u64 * 64 + bit);
                }
            }
        }
        pages
    }

    fn harvest<M: GuestMemoryBackend>(log: &mut ContentDirtyLog<'_, M>, r: RegionInfo) -> Vec<u64> {
        dirty(&log.take_dirty_log(&r).unwrap())
    }

    fn read_page(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    const ONE: RegionInfo = RegionInfo {
        index: 0,
        start: GuestAddress(0),
        len: 16 * PAGE_SIZE,
    };

    #[test]
    fn first_harvest_reports_every_page() {
        let m = mem(&[(0, 16 * PAGE)]);
        let mut log = ContentDirtyLog::new(&m);
        assert_eq!(harvest(&mut log, ONE), (0..16).collect::<Vec<_>>());
        assert_eq!(log.pages_hashed(), 16);
        assert_eq!(log.bytes_read(), 16 * PAGE_SIZE);
        // 100 pages: the second word holds the last 36.
        let m = mem(&[(0, 100 * PAGE)]);
        let mut log = ContentDirtyLog::new(&m);
        let got = log.take_dirty_log(&info(0, 0, 100 * PAGE_SIZE)).unwrap();
        assert_eq!(got.words, vec![u64::MAX, (1 << 36) - 1]);
    }

    #[test]
    fn unchanged_memory_is_clean() {
        let m = mem(&[(0, 16 * PAGE)]);
        m.write_slice(&[7u8; 3 * PAGE], GuestAddress(0x2000))
            .unwrap();
        let mut log = ContentDirtyLog::new(&m);
        harvest(&mut log, ONE);
        assert!(harvest(&mut log, ONE).is_empty());
        assert!(harvest(&mut log, ONE).is_empty());
        assert_eq!(log.pages_hashed(), 48);
    }

    #[test]
    fn a_changed_byte_is_found() {
        let m = mem(&[(0, 16 * PAGE)]);
        let mut log = ContentDirtyLog::new(&m);
        harvest(&mut log, ONE);
        // The last byte of page 3, the first of page 9.
        m.write_obj(1u8, GuestAddress(0x3fff)).unwrap();
        m.write_obj(0x80u8, GuestAddress(0x9000)).unwrap();
        assert_eq!(harvest(&mut log, ONE), vec![3, 9]);
        assert!(harvest(&mut log, ONE).is_empty());
        // Changed again to another value.
        m.write_obj(2u8, GuestAddress(0x3fff)).unwrap();
        assert_eq!(harvest(&mut log, ONE), vec![3]);
    }

    /// The limit of the method: a page changed and changed back between two harvests looks
    /// unwritten.
    #[test]
    fn limit_a_write_that_restores_the_old_bytes_is_not_found() {
        let m = mem(&[(0, 16 * PAGE)]);
        m.write_obj(0x55u8, GuestAddress(0x4010)).unwrap();
        let mut log = ContentDirtyLog::new(&m);
        harvest(&mut log, ONE);
        m.write_obj(0xaau8, GuestAddress(0x4010)).unwrap();
        m.write_obj(0x55u8, GuestAddress(0x4010)).unwrap();
        assert!(harvest(&mut log, ONE).is_empty());
    }

    /// The write-after-send case: the harvest saw A, the guest wrote B, the copy sent B,
    /// the guest wrote A back. Memory is what the log saw at the harvest, but not what the
    /// destination holds: the page must be dirty.
    #[test]
    fn a_page_sent_with_other_bytes_is_dirty_at_the_next_harvest() {
        let m = mem(&[(0, 16 * PAGE)]);
        let a = [0x11u8; PAGE];
        let b = [0x22u8; PAGE];
        m.write_slice(&a, GuestAddress(0x6000)).unwrap();
        let mut log = ContentDirtyLog::new(&m);
        harvest(&mut log, ONE);
        m.write_slice(&b, GuestAddress(0x6000)).unwrap();
        log.page_sent(GuestAddress(0x6000), &read_page(&m, 0x6000, PAGE));
        m.write_slice(&a, GuestAddress(0x6000)).unwrap();
        assert_eq!(harvest(&mut log, ONE), vec![6]);
        assert!(harvest(&mut log, ONE).is_empty());

        // Sending what memory holds keeps the page clean; sending other bytes does not.
        log.page_sent(GuestAddress(0x6000), &a);
        assert!(harvest(&mut log, ONE).is_empty());
        log.page_sent(GuestAddress(0x6000), &b);
        assert_eq!(harvest(&mut log, ONE), vec![6]);
        // Sending the bytes a write since the harvest left: the next harvest is clean.
        m.write_slice(&b, GuestAddress(0x6000)).unwrap();
        log.page_sent(GuestAddress(0x6000), &b);
        assert!(harvest(&mut log, ONE).is_empty());
    }

    #[test]
    fn page_sent_ignores_what_is_not_a_page_of_a_harvested_region() {
        let m = mem(&[(0, 16 * PAGE), (0x10_0000, 16 * PAGE)]);
        let mut log = ContentDirtyLog::new(&m);
        let other = [0xeeu8; PAGE];
        // Before any harvest, nothing is known.
        log.page_sent(GuestAddress(0x1000), &other);
        harvest(&mut log, ONE);
        let second = info(1, 0x10_0000, 16 * PAGE_SIZE);
        harvest(&mut log, second);
        for (addr, data) in [
            // Not page aligned.
            (0x1001, &other[..]),
            // Short, long.
            (0x1000, &other[..PAGE - 1]),
            (0x2000, &[0xee; PAGE + 1][..]),
            (0x3000, &[][..]),
            // Outside every region: between them, past the last, at the top.
            (0x8_0000, &other[..]),
            (0x11_0000, &other[..]),
            (u64::MAX - 0xfff, &other[..]),
        ] {
            log.page_sent(GuestAddress(addr), data);
        }
        assert!(harvest(&mut log, ONE).is_empty());
        assert!(harvest(&mut log, second).is_empty());
        // The same bytes at a page of the second region do count.
        log.page_sent(GuestAddress(0x10_f000), &other);
        assert_eq!(harvest(&mut log, second), vec![15]);
    }

    #[test]
    fn regions_are_tracked_apart() {
        let m = mem(&[(0, 4 * PAGE), (0x10_0000, 8 * PAGE), (0x20_0000, 70 * PAGE)]);
        let bitmap = MigrationBitmap::new(&m).unwrap();
        let regions: Vec<_> = bitmap.regions().collect();
        let mut log = ContentDirtyLog::new(&m);
        assert_eq!(bitmap.sync(&mut log).unwrap(), 82);
        for r in &regions {
            assert!(harvest(&mut log, *r).is_empty());
        }
        m.write_obj(9u8, GuestAddress(0x10_2000)).unwrap();
        m.write_obj(9u8, GuestAddress(0x20_0000 + 65 * PAGE_SIZE + 5))
            .unwrap();
        assert!(harvest(&mut log, regions[0]).is_empty());
        assert_eq!(harvest(&mut log, regions[1]), vec![2]);
        assert_eq!(harvest(&mut log, regions[2]), vec![65]);
        // page_sent reaches the region holding the address.
        log.page_sent(GuestAddress(0x3000), &[1; PAGE]);
        log.page_sent(GuestAddress(0x20_0000), &[1; PAGE]);
        assert_eq!(harvest(&mut log, regions[0]), vec![3]);
        assert!(harvest(&mut log, regions[1]).is_empty());
        assert_eq!(harvest(&mut log, regions[2]), vec![0]);
        assert_eq!(log.pages_hashed(), 4 * 82);
    }

    #[test]
    fn a_partial_last_page_is_hashed_over_its_bytes() {
        let len = 2 * PAGE + 0x800;
        let m = mem(&[(0x10_0000, len)]);
        let r = info(0, 0x10_0000, len as u64);
        let mut log = ContentDirtyLog::new(&m);
        assert_eq!(harvest(&mut log, r), vec![0, 1, 2]);
        assert_eq!(log.bytes_read(), len as u64);
        assert!(harvest(&mut log, r).is_empty());
        let last = 0x10_0000 + 2 * PAGE_SIZE;
        m.write_obj(3u8, GuestAddress(last + 0x7ff)).unwrap();
        assert_eq!(harvest(&mut log, r), vec![2]);

        // Sent as its own 0x800 bytes, or as 4096 bytes of which the first are the page.
        let bytes = read_page(&m, last, 0x800);
        log.page_sent(GuestAddress(last), &bytes);
        assert!(harvest(&mut log, r).is_empty());
        let mut padded = bytes.clone();
        padded.resize(PAGE, 0xff);
        log.page_sent(GuestAddress(last), &padded);
        assert!(harvest(&mut log, r).is_empty());
        // Other bytes in the page make it dirty; past it they are not the page's.
        padded[0x7ff] ^= 1;
        log.page_sent(GuestAddress(last), &padded);
        assert_eq!(harvest(&mut log, r), vec![2]);
        // Any other length is ignored.
        log.page_sent(GuestAddress(last), &[0u8; 0x801]);
        log.page_sent(GuestAddress(last), &[0u8; 0x7ff]);
        assert!(harvest(&mut log, r).is_empty());
    }

    #[test]
    fn a_region_the_memory_lacks_is_an_error() {
        let m = mem(&[(0, 16 * PAGE), (0x10_0000, 16 * PAGE)]);
        let mut log = ContentDirtyLog::new(&m);
        for wrong in [
            info(0, 0x1000, 16 * PAGE_SIZE),
            info(0, 0, 15 * PAGE_SIZE),
            info(0, 0, 17 * PAGE_SIZE),
            info(0, 0, 0),
            info(2, 0x8_0000, 16 * PAGE_SIZE),
        ] {
            let err = log.take_dirty_log(&wrong).unwrap_err();
            assert_eq!(
                err.to_string(),
                RegionMismatch { region: wrong }.to_string()
            );
        }
        assert_eq!(log.pages_hashed(), 0);
        // The index is not what identifies a region.
        let moved = info(5, 0x10_0000, 16 * PAGE_SIZE);
        assert_eq!(harvest(&mut log, moved).len(), 16);
        assert!(harvest(&mut log, info(1, 0x10_0000, 16 * PAGE_SIZE)).is_empty());
    }

    #[test]
    fn a_region_with_another_layout_starts_over() {
        let m = mem(&[(0, 16 * PAGE)]);
        let mut log = ContentDirtyLog::new(&m);
        harvest(&mut log, ONE);
        // The memory is replaced: the same start with another length, then regions that
        // overlap the old one.
        let m2 = mem(&[(0, 8 * PAGE)]);
        let m3 = mem(&[(0x4000, 4 * PAGE), (0x8000, 16 * PAGE)]);
        let mut log2 = ContentDirtyLog {
            mem: &m2,
            seed: log.seed,
            regions: std::mem::take(&mut log.regions),
            pages_hashed: 0,
            bytes_read: 0,
        };
        assert_eq!(harvest(&mut log2, info(0, 0, 8 * PAGE_SIZE)).len(), 8);
        assert!(harvest(&mut log2, info(0, 0, 8 * PAGE_SIZE)).is_empty());
        let mut log3 = ContentDirtyLog {
            mem: &m3,
            seed: log2.seed,
            regions: std::mem::take(&mut log2.regions),
            pages_hashed: 0,
            bytes_read: 0,
        };
        let starts = |log: &ContentDirtyLog<'_, Mem>| -> Vec<u64> {
            log.regions.iter().map(|r| r.start).collect()
        };
        // [0x8000, 0x18000) is new and leaves the old [0, 0x8000) alone.
        let hi = info(1, 0x8000, 16 * PAGE_SIZE);
        assert_eq!(harvest(&mut log3, hi).len(), 16);
        assert_eq!(starts(&log3), vec![0, 0x8000]);
        // [0x4000, 0x8000) overlaps it: the old table goes.
        let lo = info(0, 0x4000, 4 * PAGE_SIZE);
        assert_eq!(harvest(&mut log3, lo).len(), 4);
        assert_eq!(starts(&log3), vec![0x4000, 0x8000]);
        assert!(harvest(&mut log3, hi).is_empty());
        assert!(harvest(&mut log3, lo).is_empty());
        // A page sent below the new tables is ignored.
        log3.page_sent(GuestAddress(0x1000), &[1; PAGE]);
        assert!(harvest(&mut log3, lo).is_empty());
    }

    /// A region with no host mapping, which vm-memory cannot give a slice of.
    #[derive(Debug)]
    struct Unmapped(GuestAddress);

    impl GuestMemoryRegion for Unmapped {
        type B = ();
        fn len(&self) -> u64 {
            0x1000
        }
        fn start_addr(&self) -> GuestAddress {
            self.0
        }
        fn bitmap(&self) {}
    }

    impl vm_memory::GuestMemoryRegionBytes for Unmapped {}

    #[test]
    fn a_region_without_a_mapping_is_an_error() {
        let m = GuestRegionCollection::from_regions(vec![Unmapped(GuestAddress(0))]).unwrap();
        let mut log = ContentDirtyLog::new(&m);
        let err = log.take_dirty_log(&info(0, 0, 0x1000)).unwrap_err();
        assert!(err.to_string().contains("host virtual address"), "{err}");
        assert!(log.regions.is_empty());
    }

    #[test]
    fn joined_logs_forward_page_sent() {
        let m = mem(&[(0, 16 * PAGE)]);
        let never = |_: &RegionInfo| -> Result<Vec<u64>, DirtyLogError> { Ok(vec![0]) };
        let mut first = JoinedLog(ContentDirtyLog::new(&m), never);
        let mut second = JoinedLog(never, ContentDirtyLog::new(&m));
        assert_eq!(dirty(&first.take_dirty_log(&ONE).unwrap()).len(), 16);
        assert_eq!(dirty(&second.take_dirty_log(&ONE).unwrap()).len(), 16);
        first.page_sent(GuestAddress(0x2000), &[1; PAGE]);
        second.page_sent(GuestAddress(0x5000), &[1; PAGE]);
        assert_eq!(dirty(&first.take_dirty_log(&ONE).unwrap()), vec![2]);
        assert_eq!(dirty(&second.take_dirty_log(&ONE).unwrap()), vec![5]);
    }

    #[test]
    fn debug_shows_no_key() {
        let m = mem(&[(0, 16 * PAGE)]);
        let mut log = ContentDirtyLog::new(&m);
        harvest(&mut log, ONE);
        let text = format!("{log:?}");
        assert_eq!(
            text,
            "ContentDirtyLog { regions: 1, pages_hashed: 16, bytes_read: 65536, .. }"
        );
        assert!(!text.contains(&log.seed.to_string()));
    }

    #[test]
    fn keys_differ_between_logs() {
        let m = mem(&[(0, 16 * PAGE)]);
        let seeds: std::collections::HashSet<u64> =
            (0..8).map(|_| ContentDirtyLog::new(&m).seed).collect();
        assert_eq!(seeds.len(), 8);
    }

    /// Steps of the model test.
    #[derive(Clone, Debug)]
    enum Op {
        /// Write `byte` at byte `offset` of page `page` (small alphabet, so writes that
        /// restore old bytes are common).
        Write {
            page: usize,
            offset: usize,
            byte: u8,
        },
        /// Harvest every region.
        Sync,
        /// Send page `page`: what memory holds, or it with one byte flipped.
        Sent { page: usize, flip: Option<usize> },
    }

    /// Two regions: 3 full pages, then 2 full pages and a partial one of 0x300 bytes.
    const MODEL_REGIONS: [(u64, usize); 2] = [(0x1000, 3 * PAGE), (0x10_0000, 2 * PAGE + 0x300)];

    /// The guest address and length of model page `page`.
    fn model_page(page: usize) -> (u64, usize) {
        let mut page = page;
        for (start, len) in MODEL_REGIONS {
            let pages = len.div_ceil(PAGE);
            if page < pages {
                let off = page * PAGE;
                return (start + off as u64, (len - off).min(PAGE));
            }
            page -= pages;
        }
        unreachable!()
    }

    const MODEL_PAGES: usize = 6;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..MODEL_PAGES, 0..PAGE, 0u8..3)
                .prop_map(|(page, offset, byte)| Op::Write { page, offset, byte }),
            2 => Just(Op::Sync),
            2 => (0..MODEL_PAGES, prop::option::of(0..PAGE))
                .prop_map(|(page, flip)| Op::Sent { page, flip }),
        ]
    }

    proptest! {
        /// Against a model that keeps, for each page, the bytes the log last saw (by a
        /// harvest or a send) and compares them byte for byte with memory.
        #[test]
        fn matches_a_byte_for_byte_model(ops in prop::collection::vec(op(), 1..60)) {
            let m = mem(&MODEL_REGIONS);
            let bitmap = MigrationBitmap::new(&m).unwrap();
            let regions: Vec<_> = bitmap.regions().collect();
            let mut log = ContentDirtyLog::new(&m);
            let mut seen: Vec<Option<Vec<u8>>> = vec![None; MODEL_PAGES];
            let mut first_page = 0;
            let region_pages: Vec<_> = MODEL_REGIONS.iter().map(|(_, l)| {
                let first = first_page;
                first_page += l.div_ceil(PAGE);
                first
            }).collect();
            for op in ops.into_iter().chain([Op::Sync]) {
                match op {
                    Op::Write { page, offset, byte } => {
                        let (addr, len) = model_page(page);
                        let offset = (offset % len) as u64;
                        m.write_obj(byte, GuestAddress(addr + offset)).unwrap();
                    }
                    Op::Sync => {
                        for (r, &first) in regions.iter().zip(&region_pages) {
                            let pages = r.len.div_ceil(PAGE_SIZE) as usize;
                            let mut want = Vec::new();
                            for p in 0..pages {
                                let (addr, len) = model_page(first + p);
                                let now = read_page(&m, addr, len);
                                if seen[first + p].as_ref() != Some(&now) {
                                    want.push(p as u64);
                                }
                                seen[first + p] = Some(now);
                            }
                            prop_assert_eq!(harvest(&mut log, *r), want);
                        }
                    }
                    Op::Sent { page, flip } => {
                        let (addr, len) = model_page(page);
                        let mut data = read_page(&m, addr, len);
                        if let Some(i) = flip {
                            data[i % len] ^= 0x80;
                        }
                        log.page_sent(GuestAddress(addr), &data);
                        // A region not harvested yet keeps no hashes.
                        if seen[page].is_some() {
                            seen[page] = Some(data);
                        }
                    }
                }
            }
        }
    }
}
