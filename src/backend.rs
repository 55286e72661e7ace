// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What happens to guest memory the driver gives up or takes back.
//!
//! The device turns inflated PFNs and reported free pages into host ranges and hands them to
//! a [`MemoryBackend`]; deflated PFNs go to [`MemoryBackend::populate`]. Every range the
//! backend sees lies inside one guest memory region, starts and ends on a page boundary of
//! that region (for discards) and has been merged with its neighbours, so the backend never
//! has to check the guest.
//!
//! # What frees memory depends on what backs it
//!
//! `MADV_DONTNEED` frees private anonymous memory, but only drops the mapping of a shared
//! file, memfd or shmem segment (the pages stay in the file), and works on hugetlbfs only in
//! whole huge pages. So the device looks at each guest memory region once
//! ([`RegionBacking::of_region`]) and passes the result along with every range
//! ([`HostRange::backing`]). It also discards a region only in whole pages of that region's
//! page size ([`RegionBacking::page_size`]): a 2 MiB hugetlbfs region is discarded 2 MiB at a
//! time, once all 512 of its 4 KiB pieces were inflated.
//!
//! [`MadviseBackend`], the default, then chooses per range (its [`DiscardPolicy::Auto`]):
//!
//! | backing | discard | page size |
//! | --- | --- | --- |
//! | [`AnonymousPrivate`](RegionBacking::AnonymousPrivate) (also with transparent huge pages) | `madvise(MADV_DONTNEED)` | base page |
//! | [`SharedFile`](RegionBacking::SharedFile): a shared file mapping, memfd, shmem, shared anonymous memory | `fallocate(FALLOC_FL_PUNCH_HOLE)` on the region's file; `madvise(MADV_REMOVE)` if the region has no file descriptor | base page |
//! | [`PrivateFile`](RegionBacking::PrivateFile): a file mapped copy-on-write (a snapshot restored lazily) | `madvise(MADV_DONTNEED)` only: the private copies are freed, the file is never changed, and the guest reads the file's data there afterwards | base page |
//! | [`HugeTlb`](RegionBacking::HugeTlb), shared | as a shared file, whole huge pages only | huge page |
//! | [`HugeTlb`](RegionBacking::HugeTlb), private | `madvise(MADV_DONTNEED)`, whole huge pages only | huge page |
//! | [`Unknown`](RegionBacking::Unknown) | nothing: the discard fails with [`io::ErrorKind::Unsupported`] and the device counts it | base page |
//!
//! A VMM with other needs (userfaultfd, an external memory manager, a process that must not
//! free memory at all) implements the trait itself.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

/// The file system magic number of hugetlbfs (`HUGETLBFS_MAGIC` in `linux/magic.h`).
const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;

/// The host's base page size (a power of two, at least 4 KiB).
fn base_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two() && *s >= 4096)
        .unwrap_or(4096)
}

/// What backs one guest memory region on the host. It decides how the region's memory is
/// freed and the size of the pages it is freed in ([`page_size`](Self::page_size)).
///
/// The device finds it once per region with [`of_region`](Self::of_region) and passes it to
/// the backend with every range ([`HostRange::backing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegionBacking {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`), with or without transparent
    /// huge pages. `MADV_DONTNEED` frees it.
    AnonymousPrivate,
    /// Memory whose pages belong to a file shared with others: a `MAP_SHARED` mapping of a
    /// regular file, a memfd or a shmem/tmpfs file, or shared anonymous memory (which the
    /// kernel backs with a shmem file). Only deallocating the file range frees it
    /// (`fallocate(FALLOC_FL_PUNCH_HOLE)` or `MADV_REMOVE`).
    SharedFile,
    /// A `MAP_PRIVATE` (copy-on-write) mapping of a file that is not on hugetlbfs, for
    /// example a snapshot file restored lazily. `MADV_DONTNEED` frees the pages the guest
    /// wrote (its private copies); the file itself must never be changed.
    PrivateFile,
    /// hugetlbfs memory: an anonymous `MAP_HUGETLB` mapping, a memfd made with
    /// `MFD_HUGETLB`, or a file on a hugetlbfs mount. Only whole huge pages can be freed.
    HugeTlb {
        /// The huge page size in bytes (for example 2 MiB or 1 GiB).
        page_size: u64,
        /// Whether the mapping is shared (`MAP_SHARED`): freed by deallocating the file
        /// range; a private one is freed with `MADV_DONTNEED`.
        shared: bool,
    },
    /// What backs the region could not be determined (no `/proc`, a region whose file is
    /// not the file it maps, a region over several different mappings, or vm-memory's
    /// hugetlbfs flag contradicting the kernel). [`MadviseBackend`] discards nothing there
    /// and the device counts it ([`PageMetrics::unknown_backing_regions`](
    /// crate::device::PageMetrics::unknown_backing_regions)).
    Unknown,
}

impl RegionBacking {
    /// The size of the pages the region is made of: the huge page size for
    /// [`HugeTlb`](Self::HugeTlb), the host's base page size otherwise. The device discards
    /// only whole pages of this size.
    pub fn page_size(self) -> u64 {
        match self {
            RegionBacking::HugeTlb { page_size, .. } => page_size,
            _ => base_page_size(),
        }
    }

    /// Whether the backing was determined.
    pub fn is_known(self) -> bool {
        self != RegionBacking::Unknown
    }

    /// What backs `region`, from its host mapping, its file
    /// ([`file_offset`](GuestMemoryRegion::file_offset)) and vm-memory's hugetlbfs flag
    /// ([`is_hugetlbfs`](GuestMemoryRegion::is_hugetlbfs)). See [`probe`](Self::probe).
    pub fn of_region<R: GuestMemoryRegion>(region: &R) -> RegionBacking {
        match region.get_host_address(MemoryRegionAddress(0)) {
            Ok(host) => Self::probe(
                host,
                region.len(),
                region.file_offset(),
                region.is_hugetlbfs(),
            ),
            Err(_) => RegionBacking::Unknown,
        }
    }

    /// What backs the `len` bytes mapped at `host_addr` (not dereferenced), whose file (if
    /// any) is `file` and whose hugetlbfs flag (if any) is `hugetlbfs`.
    ///
    /// The kernel's record of the mappings (`/proc/self/maps`) tells whether the memory is
    /// shared or private and anonymous or which file it maps; every mapping the range spans
    /// must agree, and `file` must be that file (same inode). `fstatfs` on `file` tells
    /// hugetlbfs (and its page size, the block size) from other file systems; a file mapping
    /// without a `file` is looked up in `/proc/self/smaps` instead (`KernelPageSize` and the
    /// `ht` flag). `hugetlbfs`, when set, must agree with what the kernel says. Anything that
    /// fails or disagrees gives [`Unknown`](Self::Unknown). It reads `/proc` once or twice:
    /// call it once per region, not per range.
    ///
    /// (`MmapRegion::flags` would tell shared from private too, but the device reaches
    /// regions through the [`GuestMemoryRegion`] trait, which does not have it, and the
    /// kernel's record also covers regions built over mappings someone else made.)
    pub fn probe(
        host_addr: *const u8,
        len: u64,
        file: Option<&FileOffset>,
        hugetlbfs: Option<bool>,
    ) -> RegionBacking {
        classify(host_addr as u64, len, file, hugetlbfs).unwrap_or(RegionBacking::Unknown)
    }
}

/// One line of `/proc/self/maps` (also the header lines of `/proc/self/smaps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
    shared: bool,
    dev: (u32, u32),
    inode: u64,
}

impl Vma {
    /// `start-end perms offset major:minor inode [path]`; `None` for anything else.
    fn parse(line: &str) -> Option<Vma> {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let shared = match fields.next()?.as_bytes().get(3) {
            Some(b's') => true,
            Some(b'p') => false,
            _ => return None,
        };
        let _offset = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let dev = (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        );
        let inode = fields.next()?.parse().ok()?;
        (start < end).then_some(Vma {
            start,
            end,
            shared,
            dev,
            inode,
        })
    }
}

/// Calls `f` with each line of the `/proc/self` file `name` until it returns `Some`.
fn scan_proc<T>(name: &str, mut f: impl FnMut(&str) -> Option<Option<T>>) -> Option<T> {
    let mut reader = BufReader::new(File::open(format!("/proc/self/{name}")).ok()?);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(done) = f(&line) {
            return done;
        }
    }
}

/// The mapping behind `[start, end)`: the VMAs covering it without a gap, all shared or all
/// private, all of the same file (or all anonymous). `None` if they are not.
fn mapping_of(start: u64, end: u64) -> Option<Vma> {
    let mut cursor = start;
    let mut first: Option<Vma> = None;
    scan_proc("maps", |line| {
        let Some(vma) = Vma::parse(line) else {
            return Some(None);
        };
        if vma.end <= cursor {
            return None;
        }
        if vma.start > cursor {
            return Some(None);
        }
        match first {
            None => first = Some(vma),
            Some(f) if (f.shared, f.dev, f.inode) != (vma.shared, vma.dev, vma.inode) => {
                return Some(None);
            }
            Some(_) => {}
        }
        cursor = vma.end;
        (cursor >= end).then_some(first)
    })
}

/// The kernel page size of the VMA holding `addr` and whether it is hugetlb (the `ht` flag),
/// from `/proc/self/smaps`.
fn smaps_page(addr: u64) -> Option<(u64, bool)> {
    let mut inside = false;
    let mut size = None;
    scan_proc("smaps", |line| {
        if let Some(vma) = Vma::parse(line) {
            if inside || vma.start > addr {
                return Some(None);
            }
            inside = vma.end > addr;
            return None;
        }
        if !inside {
            return None;
        }
        if let Some(rest) = line.strip_prefix("KernelPageSize:") {
            size = rest
                .trim()
                .strip_suffix("kB")
                .and_then(|kb| kb.trim().parse::<u64>().ok())
                .and_then(|kb| kb.checked_mul(1024));
        } else if let Some(rest) = line.strip_prefix("VmFlags:") {
            let hugetlb = rest.split_ascii_whitespace().any(|flag| flag == "ht");
            return Some(size.map(|s| (s, hugetlb)));
        }
        None
    })
}

/// The file system magic number and block size of `file`.
fn fs_of(file: &File) -> Option<(u32, u64)> {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`, which lives for the call, about a descriptor `file`
    // keeps open.
    let ret = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if ret != 0 {
        return None;
    }
    // The magic is a 32-bit value in a signed field of the platform's word size.
    #[allow(clippy::unnecessary_cast)]
    let magic = (st.f_type as u64 & 0xffff_ffff) as u32;
    let bsize = u64::try_from(st.f_bsize).ok()?;
    Some((magic, bsize))
}

fn classify(
    start: u64,
    len: u64,
    file: Option<&FileOffset>,
    hugetlbfs: Option<bool>,
) -> Option<RegionBacking> {
    let end = start.checked_add(len).filter(|_| len > 0)?;
    let map = mapping_of(start, end)?;
    let base = base_page_size();
    let huge_page = if map.inode == 0 {
        // Anonymous private memory. Shared anonymous and hugetlb memory always map a file
        // (on the kernel's internal shmem or hugetlbfs mount), and a region that names a
        // file must map it.
        if map.shared || file.is_some() {
            return None;
        }
        None
    } else if let Some(file) = file {
        if file.file().metadata().ok()?.ino() != map.inode {
            return None;
        }
        let (magic, bsize) = fs_of(file.file())?;
        (magic == HUGETLBFS_MAGIC).then_some(bsize)
    } else {
        let (size, hugetlb) = smaps_page(start)?;
        hugetlb.then_some(size)
    };
    if hugetlbfs.is_some_and(|h| h != huge_page.is_some()) {
        return None;
    }
    Some(match huge_page {
        Some(page_size) => {
            if !page_size.is_power_of_two() || page_size < base {
                return None;
            }
            RegionBacking::HugeTlb {
                page_size,
                shared: map.shared,
            }
        }
        None if map.inode == 0 => RegionBacking::AnonymousPrivate,
        None if map.shared => RegionBacking::SharedFile,
        None => RegionBacking::PrivateFile,
    })
}

/// One host range of guest memory, inside a single guest memory region.
#[derive(Clone, Copy)]
pub struct HostRange<'a> {
    /// The guest physical address of the first byte.
    pub gpa: GuestAddress,
    /// The length in bytes (never 0).
    pub len: u64,
    /// The host virtual address of the first byte (from vm-memory's mapping of the region).
    pub host_addr: *mut u8,
    /// The offset of the first byte inside its region.
    pub region_offset: u64,
    /// The file the region maps and the offset of the region's start in it, if any.
    pub file_offset: Option<&'a FileOffset>,
    /// What backs the region ([`RegionBacking::of_region`], found once per region). For
    /// discards, `host_addr` and `len` are multiples of its
    /// [`page_size`](RegionBacking::page_size) (and of the backend's
    /// [`host_page_size`](MemoryBackend::host_page_size)).
    pub backing: RegionBacking,
}

impl fmt::Debug for HostRange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRange")
            .field("gpa", &format_args!("{:#x}", self.gpa.0))
            .field("len", &format_args!("{:#x}", self.len))
            .field("host_addr", &self.host_addr)
            .field("region_offset", &format_args!("{:#x}", self.region_offset))
            .field("file_backed", &self.file_offset.is_some())
            .field("backing", &self.backing)
            .finish()
    }
}

/// Decides what happens to memory the guest gives up (inflate, free page reporting) and
/// takes back (deflate).
///
/// The device calls it from its event loop thread with ranges it has validated: inside one
/// region of guest memory, merged, and for discards aligned to the larger of
/// [`host_page_size`] and the region's [`RegionBacking::page_size`].
/// An error is counted in the device's metrics and logged; the guest's element is still
/// acknowledged (a discard is an optimisation, never a promise to the guest).
///
/// [`host_page_size`]: MemoryBackend::host_page_size
pub trait MemoryBackend: Send + Sync {
    /// The smallest unit the backend discards (a power of two, at least 4 KiB), for every
    /// region. The device discards only whole pages of the larger of this and the region's
    /// own page size ([`RegionBacking::page_size`]): it collects the 4 KiB pieces of a larger
    /// page (a huge page, a 64 KiB host page) until all of them were inflated. A backend
    /// over memory the device cannot classify (hugetlbfs without `/proc`, say) can raise it
    /// for every region.
    fn host_page_size(&self) -> u64 {
        4096
    }

    /// Frees the host memory behind `range`. Afterwards the guest may read zeros (or the
    /// file's contents) there.
    fn discard(&self, range: &HostRange<'_>) -> io::Result<()>;

    /// Tells the host the guest takes `range` back and will use it soon (a hint; it must not
    /// change the contents).
    fn populate(&self, range: &HostRange<'_>) -> io::Result<()>;
}

/// How [`MadviseBackend`] discards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DiscardPolicy {
    /// By what backs each region ([`HostRange::backing`]; the table in the
    /// [module documentation](self)): `MADV_DONTNEED` for private memory, hole punching (or
    /// `MADV_REMOVE`) for shared files, memfds, shmem and shared hugetlbfs, whole huge pages
    /// only, never a private file mapping's file, and nothing where the backing is
    /// [`Unknown`](RegionBacking::Unknown). The default.
    #[default]
    Auto,
    /// An override, what [`MadviseBackend::punch_holes(true)`](MadviseBackend::punch_holes)
    /// always did: for every region with a file ([`HostRange::file_offset`]),
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` on the file range, then
    /// `MADV_DONTNEED`; for every other region `MADV_DONTNEED`. Also for regions of unknown
    /// backing: the operator vouches that every file may be punched. The one exception: a
    /// region known to map its file privately ([`PrivateFile`](RegionBacking::PrivateFile),
    /// private [`HugeTlb`](RegionBacking::HugeTlb)) is never punched, only `MADV_DONTNEED`.
    PunchHoles,
    /// An override, what `MadviseBackend::new()` did before the backing was looked at
    /// ([`MadviseBackend::punch_holes(false)`](MadviseBackend::punch_holes)):
    /// `MADV_DONTNEED` for every region, whatever backs it, unknown included. Frees private
    /// memory, never touches a file, frees nothing of a shared file.
    ///
    /// With either override, a region the device could not classify is discarded in the
    /// backend's page size: for hugetlbfs memory the device cannot recognise, give the
    /// backend the huge page size ([`MadviseBackend::with_page_size`]).
    Madvise,
}

/// The default backend: frees memory by what backs each region ([`DiscardPolicy::Auto`],
/// see the [module documentation](self)), repopulates with `madvise(MADV_WILLNEED)`.
///
/// [`punch_holes`](Self::punch_holes) and [`with_policy`](Self::with_policy) replace the
/// per-region choice with a fixed one.
#[derive(Debug, Clone)]
pub struct MadviseBackend {
    page_size: u64,
    policy: DiscardPolicy,
}

impl Default for MadviseBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MadviseBackend {
    /// A backend that discards by what backs each region, in pages of the host's base page
    /// size or the region's huge page size.
    pub fn new() -> Self {
        MadviseBackend {
            page_size: base_page_size(),
            policy: DiscardPolicy::Auto,
        }
    }

    /// A backend that discards at least `page_size` bytes at a time in every region (for
    /// example 2 MiB for hugetlbfs memory the device cannot classify). Returns `None` unless
    /// it is a power of two of at least 4 KiB.
    pub fn with_page_size(page_size: u64) -> Option<Self> {
        (page_size.is_power_of_two() && page_size >= 4096).then_some(MadviseBackend {
            page_size,
            policy: DiscardPolicy::Auto,
        })
    }

    /// Overrides the per-region choice: `true` gives [`DiscardPolicy::PunchHoles`] (punch
    /// the file of every file-backed region, as this switch always did, except files known
    /// to be mapped privately), `false` gives [`DiscardPolicy::Madvise`] (`MADV_DONTNEED`
    /// only, what the backend did by default before it looked at the backing). Leave it
    /// alone for the automatic choice ([`DiscardPolicy::Auto`]).
    pub fn punch_holes(self, on: bool) -> Self {
        self.with_policy(if on {
            DiscardPolicy::PunchHoles
        } else {
            DiscardPolicy::Madvise
        })
    }

    /// Discards with `policy`.
    pub fn with_policy(mut self, policy: DiscardPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How the backend discards.
    pub fn policy(&self) -> DiscardPolicy {
        self.policy
    }

    fn advise(range: &HostRange<'_>, advice: libc::c_int) -> io::Result<()> {
        let len =
            usize::try_from(range.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `host_addr..host_addr + len` lies inside one region of guest memory that
        // vm-memory mapped and keeps mapped while the device holds the memory (the device
        // builds every range from a region it just looked up and clips it to that region).
        // No advice used here unmaps anything: DONTNEED replaces the contents with zeros (or
        // the file's data), REMOVE frees the backing store (zeros), and WILLNEED only reads
        // ahead. Guest memory is shared with the guest and only ever accessed through
        // volatile operations, so no Rust reference observes the change.
        let ret = unsafe { libc::madvise(range.host_addr.cast(), len, advice) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn punch_hole(range: &HostRange<'_>, file: &FileOffset) -> io::Result<()> {
        // An offset or length past `off64_t` fails with EINVAL, as fallocate itself would.
        let offset = file
            .start()
            .checked_add(range.region_offset)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // The byte range is the part of the file the region maps at `range`, which the device
        // clipped to the region; the region's FileOffset keeps the file open.
        fallocate(
            file.file(),
            FallocateMode::PunchHole,
            true,
            offset,
            range.len,
        )
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    /// Frees the file pages behind a range of a shared mapping: punches the region's file,
    /// or without a descriptor has the kernel do it through the mapping (`MADV_REMOVE`).
    /// Either also unmaps the pages from every mapping of the file.
    fn deallocate(range: &HostRange<'_>) -> io::Result<()> {
        match range.file_offset {
            Some(file) => Self::punch_hole(range, file),
            None => Self::advise(range, libc::MADV_REMOVE),
        }
    }

    /// The automatic choice ([`DiscardPolicy::Auto`]).
    fn discard_auto(range: &HostRange<'_>) -> io::Result<()> {
        if range.backing == RegionBacking::Unknown {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "what backs the region is unknown: nothing discarded",
            ));
        }
        // Whole pages of the region only (the device never sends anything else): a partial
        // huge page cannot be freed, and a hole punched into part of a page would only zero
        // it.
        let page = range.backing.page_size();
        if (range.host_addr as u64) % page != 0 || range.len % page != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        match range.backing {
            RegionBacking::SharedFile | RegionBacking::HugeTlb { shared: true, .. } => {
                Self::deallocate(range)
            }
            _ => Self::advise(range, libc::MADV_DONTNEED),
        }
    }
}

impl MemoryBackend for MadviseBackend {
    fn host_page_size(&self) -> u64 {
        self.page_size
    }

    fn discard(&self, range: &HostRange<'_>) -> io::Result<()> {
        match self.policy {
            DiscardPolicy::Auto => Self::discard_auto(range),
            DiscardPolicy::PunchHoles => {
                let private_file = matches!(
                    range.backing,
                    RegionBacking::PrivateFile | RegionBacking::HugeTlb { shared: false, .. }
                );
                if let Some(file) = range.file_offset.filter(|_| !private_file) {
                    Self::punch_hole(range, file)?;
                }
                Self::advise(range, libc::MADV_DONTNEED)
            }
            DiscardPolicy::Madvise => Self::advise(range, libc::MADV_DONTNEED),
        }
    }

    fn populate(&self, range: &HostRange<'_>) -> io::Result<()> {
        Self::advise(range, libc::MADV_WILLNEED)
    }
}

/// A backend that leaves memory alone (the device still parses, validates and counts
/// everything). For VMMs that must never free guest memory, and for tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopBackend;

impl MemoryBackend for NoopBackend {
    fn discard(&self, _range: &HostRange<'_>) -> io::Result<()> {
        Ok(())
    }

    fn populate(&self, _range: &HostRange<'_>) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

    fn range_of(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> HostRange<'_> {
        let region = mem.find_region(GuestAddress(gpa)).unwrap();
        let off = gpa - region.start_addr().0;
        HostRange {
            gpa: GuestAddress(gpa),
            len,
            host_addr: region
                .get_host_address(vm_memory::MemoryRegionAddress(off))
                .unwrap(),
            region_offset: off,
            file_offset: region.file_offset(),
            backing: RegionBacking::of_region(region),
        }
    }

    /// A temporary file holding `len` bytes of `fill`.
    fn file_of(len: usize, fill: u8) -> File {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&vec![fill; len]).unwrap();
        file
    }

    /// Guest memory of one region at 0 mapping `file` with `flags`.
    fn mapped(file: File, len: usize, flags: i32) -> GuestMemoryMmap {
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap()
    }

    fn read_file_at(file: &mut File, at: u64) -> u8 {
        let mut b = [0u8; 1];
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut b).unwrap();
        b[0]
    }

    fn backing_of(mem: &GuestMemoryMmap) -> RegionBacking {
        RegionBacking::of_region(mem.find_region(GuestAddress(0)).unwrap())
    }

    #[test]
    fn madvise_discard_zeroes_anonymous_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x2000))
            .unwrap();
        mem.write_obj(0x1234_u32, GuestAddress(0x3000)).unwrap();
        let backend = MadviseBackend::new();
        assert!(backend.host_page_size() >= 4096);
        backend.discard(&range_of(&mem, 0x2000, 0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0x1234);
        backend.populate(&range_of(&mem, 0x3000, 0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0x1234);
    }

    #[test]
    fn misaligned_range_is_an_error_not_a_crash() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let backend = MadviseBackend::new();
        let err = backend
            .discard(&range_of(&mem, 0x2001, 0x1000))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        for policy in [DiscardPolicy::Madvise, DiscardPolicy::PunchHoles] {
            let err = MadviseBackend::new()
                .with_policy(policy)
                .discard(&range_of(&mem, 0x2001, 0x1000))
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{policy:?}");
        }
    }

    #[test]
    fn punch_hole_failures_are_errors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let read_only = std::fs::File::open(tmp.as_path()).unwrap();
        let fo = FileOffset::new(read_only, 0);
        let backend = MadviseBackend::default().punch_holes(true);
        let mut range = range_of(&mem, 0x2000, 0x1000);
        range.file_offset = Some(&fo);
        // fallocate on a read-only descriptor fails, and so does an offset past off_t.
        assert!(backend.discard(&range).is_err());
        range.region_offset = u64::MAX;
        let err = backend.discard(&range).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        // The same range as a shared file under the automatic choice.
        range.backing = RegionBacking::SharedFile;
        let err = MadviseBackend::new().discard(&range).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn page_size_must_be_a_power_of_two() {
        assert!(MadviseBackend::with_page_size(0x20_0000).is_some());
        assert_eq!(
            MadviseBackend::with_page_size(0x1_0000)
                .unwrap()
                .host_page_size(),
            0x1_0000
        );
        assert!(MadviseBackend::with_page_size(0x3000).is_none());
        assert!(MadviseBackend::with_page_size(2048).is_none());
    }

    #[test]
    fn punch_hole_frees_file_backed_memory() {
        let mut file = file_of(0x4000, 0x5a);
        let fo = FileOffset::new(file.try_clone().unwrap(), 0);
        let mem =
            GuestMemoryMmap::<()>::from_ranges_with_files([(GuestAddress(0), 0x4000, Some(fo))])
                .unwrap();
        let backend = MadviseBackend::new().punch_holes(true);
        backend.discard(&range_of(&mem, 0x1000, 0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x5a);
        let mut buf = [0u8; 0x1000];
        file.seek(SeekFrom::Start(0x1000)).unwrap();
        file.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "the hole reads as zeros");
        // Without punching (the MADV_DONTNEED-only override; before regions were classified
        // also the default), a shared file mapping keeps its data in the file.
        let keep = MadviseBackend::new().punch_holes(false);
        assert_eq!(keep.policy(), DiscardPolicy::Madvise);
        mem.write_obj(0x77u8, GuestAddress(0x3000)).unwrap();
        keep.discard(&range_of(&mem, 0x3000, 0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x77);
        NoopBackend
            .discard(&range_of(&mem, 0x2000, 0x1000))
            .unwrap();
        NoopBackend
            .populate(&range_of(&mem, 0x2000, 0x1000))
            .unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x5a);
        assert!(format!("{:?}", range_of(&mem, 0x2000, 0x1000)).contains("file_backed: true"));
        // The automatic choice punches a shared file too.
        let auto = MadviseBackend::new();
        assert_eq!(auto.policy(), DiscardPolicy::Auto);
        auto.discard(&range_of(&mem, 0x3000, 0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);
        assert_eq!(read_file_at(&mut file, 0x3000), 0);
        assert_eq!(read_file_at(&mut file, 0x2000), 0x5a);
    }

    #[test]
    fn the_kernel_says_what_backs_a_region() {
        let base = base_page_size();
        let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert_eq!(backing_of(&anon), RegionBacking::AnonymousPrivate);
        assert_eq!(backing_of(&anon).page_size(), base);
        let shared = mapped(file_of(0x4000, 1), 0x4000, libc::MAP_SHARED);
        assert_eq!(backing_of(&shared), RegionBacking::SharedFile);
        let private = mapped(file_of(0x4000, 1), 0x4000, libc::MAP_PRIVATE);
        assert_eq!(backing_of(&private), RegionBacking::PrivateFile);
        assert!(backing_of(&private).is_known());
        // A memfd (shmem) mapped shared.
        // SAFETY: a NUL-terminated name and no flags.
        let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nothing else.
        let memfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        memfd.set_len(0x4000).unwrap();
        let shm = mapped(memfd, 0x4000, libc::MAP_SHARED);
        assert_eq!(backing_of(&shm), RegionBacking::SharedFile);
        // Shared anonymous memory has no descriptor: smaps says it is not hugetlb.
        let region: MmapRegion = MmapRegionBuilder::new(0x4000)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_ANONYMOUS)
            .build()
            .unwrap();
        let shared_anon =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        assert_eq!(backing_of(&shared_anon), RegionBacking::SharedFile);
    }

    #[test]
    fn a_backing_that_cannot_be_told_is_unknown() {
        // vm-memory's hugetlbfs flag contradicting the kernel.
        let region: MmapRegion = MmapRegionBuilder::new(0x4000)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .with_hugetlbfs(true)
            .build()
            .unwrap();
        let host = region.as_ptr();
        let lying =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        assert_eq!(backing_of(&lying), RegionBacking::Unknown);
        assert!(!backing_of(&lying).is_known());
        assert_eq!(RegionBacking::Unknown.page_size(), base_page_size());
        // The same memory told right.
        assert_eq!(
            RegionBacking::probe(host, 0x4000, None, Some(false)),
            RegionBacking::AnonymousPrivate
        );
        // A region naming a file it does not map.
        let other = FileOffset::new(file_of(0x1000, 0), 0);
        assert_eq!(
            RegionBacking::probe(host, 0x4000, Some(&other), None),
            RegionBacking::Unknown
        );
        let shared = mapped(file_of(0x4000, 1), 0x4000, libc::MAP_SHARED);
        let host = shared.get_host_address(GuestAddress(0)).unwrap();
        assert_eq!(
            RegionBacking::probe(host, 0x4000, Some(&other), None),
            RegionBacking::Unknown
        );
        // Past the mapping, nothing mapped at all, or empty.
        assert_eq!(
            RegionBacking::probe(host, 0x10_0000_0000, None, None),
            RegionBacking::Unknown
        );
        assert_eq!(
            RegionBacking::probe(std::ptr::null(), 0x1000, None, None),
            RegionBacking::Unknown
        );
        assert_eq!(
            RegionBacking::probe(host, 0, None, None),
            RegionBacking::Unknown
        );
        assert_eq!(
            RegionBacking::probe(usize::MAX as *const u8, 0x1000, None, None),
            RegionBacking::Unknown
        );
    }

    #[test]
    fn proc_lines_parse() {
        let v = Vma::parse("7f00a000-7f00c000 rw-s 00000000 00:01 2049   /memfd:x (deleted)\n")
            .unwrap();
        assert_eq!(
            v,
            Vma {
                start: 0x7f00_a000,
                end: 0x7f00_c000,
                shared: true,
                dev: (0, 1),
                inode: 2049
            }
        );
        let anon = Vma::parse("55d0-55e0 rw-p 00000000 00:00 0 \n").unwrap();
        assert!(!anon.shared);
        assert_eq!(anon.inode, 0);
        for bad in [
            "Rss:                 4 kB",
            "VmFlags: rd wr mr mw me ac",
            "10-20 rw-x 0 00:00 0",
            "20-10 rw-p 0 00:00 0",
            "10-20 rw-p 0 00:00",
            "",
        ] {
            assert_eq!(Vma::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_backing_is_freed_its_own_way() {
        let auto = MadviseBackend::new();
        // A private file mapping: the guest's copy goes, the file stays as it was.
        let mut file = file_of(0x4000, 0x5a);
        let private = mapped(file.try_clone().unwrap(), 0x4000, libc::MAP_PRIVATE);
        private.write_obj(0x11u8, GuestAddress(0x1000)).unwrap();
        auto.discard(&range_of(&private, 0x1000, 0x1000)).unwrap();
        assert_eq!(
            private.read_obj::<u8>(GuestAddress(0x1000)).unwrap(),
            0x5a,
            "the guest reads the file's data again"
        );
        assert_eq!(read_file_at(&mut file, 0x1000), 0x5a);
        // Even the punching override leaves a privately mapped file alone.
        private.write_obj(0x22u8, GuestAddress(0x2000)).unwrap();
        MadviseBackend::new()
            .punch_holes(true)
            .discard(&range_of(&private, 0x2000, 0x1000))
            .unwrap();
        assert_eq!(private.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x5a);
        assert_eq!(read_file_at(&mut file, 0x2000), 0x5a);

        // Shared anonymous memory: MADV_REMOVE (no descriptor to punch).
        let region: MmapRegion = MmapRegionBuilder::new(0x4000)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_ANONYMOUS)
            .build()
            .unwrap();
        let shm =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        shm.write_obj(0x33u8, GuestAddress(0x1000)).unwrap();
        shm.write_obj(0x44u8, GuestAddress(0x2000)).unwrap();
        // MADV_DONTNEED alone keeps the data of shared memory.
        MadviseBackend::new()
            .punch_holes(false)
            .discard(&range_of(&shm, 0x1000, 0x1000))
            .unwrap();
        assert_eq!(shm.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x33);
        auto.discard(&range_of(&shm, 0x1000, 0x1000)).unwrap();
        assert_eq!(shm.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(shm.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x44);

        // Unknown: nothing happens, and the caller hears so.
        let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        anon.write_obj(0x55u8, GuestAddress(0x1000)).unwrap();
        let mut range = range_of(&anon, 0x1000, 0x1000);
        range.backing = RegionBacking::Unknown;
        let err = auto.discard(&range).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert_eq!(anon.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x55);
        auto.populate(&range).unwrap();
        // The MADV_DONTNEED override applies everywhere, as it always did.
        MadviseBackend::new()
            .with_policy(DiscardPolicy::Madvise)
            .discard(&range)
            .unwrap();
        assert_eq!(anon.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        // A huge page range that is not whole huge pages is refused.
        range.backing = RegionBacking::HugeTlb {
            page_size: 0x20_0000,
            shared: false,
        };
        let err = auto.discard(&range).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(DiscardPolicy::default(), DiscardPolicy::Auto);
    }
}
