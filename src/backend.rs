// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What happens to guest memory the driver gives up or takes back.
//!
//! The device turns inflated PFNs and reported free pages into host ranges and hands them to
//! a [`MemoryBackend`]; deflated PFNs go to [`MemoryBackend::populate`]. Every range the
//! backend sees lies inside one guest memory region, starts and ends on a host page boundary
//! (for discards) and has been merged with its neighbours, so the backend never has to check
//! the guest.
//!
//! [`MadviseBackend`] is the default: `madvise(MADV_DONTNEED)` to discard and
//! `madvise(MADV_WILLNEED)` to repopulate, optionally punching holes in shared file-backed
//! memory. A VMM with other needs (userfaultfd, an external memory manager, a process that
//! must not free memory at all) implements the trait itself.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{FileOffset, GuestAddress};

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
}

impl fmt::Debug for HostRange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRange")
            .field("gpa", &format_args!("{:#x}", self.gpa.0))
            .field("len", &format_args!("{:#x}", self.len))
            .field("host_addr", &self.host_addr)
            .field("region_offset", &format_args!("{:#x}", self.region_offset))
            .field("file_backed", &self.file_offset.is_some())
            .finish()
    }
}

/// Decides what happens to memory the guest gives up (inflate, free page reporting) and
/// takes back (deflate).
///
/// The device calls it from its event loop thread with ranges it has validated: inside one
/// region of guest memory, merged, and for discards aligned to [`host_page_size`].
/// An error is counted in the device's metrics and logged; the guest's element is still
/// acknowledged (a discard is an optimisation, never a promise to the guest).
///
/// [`host_page_size`]: MemoryBackend::host_page_size
pub trait MemoryBackend: Send + Sync {
    /// The size of the host pages backing guest memory (a power of two, at least 4 KiB).
    /// The device discards only whole host pages: it collects the 4 KiB pieces of a larger
    /// page (a huge page, a 64 KiB host page) until all of them were inflated.
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

/// The default backend: `madvise(MADV_DONTNEED)` to discard, `madvise(MADV_WILLNEED)` to
/// repopulate.
///
/// `MADV_DONTNEED` frees private anonymous memory at once. For a region that maps a file
/// shared, it only drops the mapping (the data stays in the file) unless
/// [`punch_holes`](Self::punch_holes) is on: then the file range is deallocated with
/// `fallocate(FALLOC_FL_PUNCH_HOLE)` first. Leave it off for private file mappings (a
/// snapshot file restored copy-on-write): punching would change the file under every VM
/// that maps it.
#[derive(Debug, Clone)]
pub struct MadviseBackend {
    page_size: u64,
    punch_holes: bool,
}

impl Default for MadviseBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MadviseBackend {
    /// A backend for memory on the host's base pages.
    pub fn new() -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page_size = u64::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two() && *s >= 4096)
            .unwrap_or(4096);
        MadviseBackend {
            page_size,
            punch_holes: false,
        }
    }

    /// A backend for memory on pages of `page_size` bytes (for example 2 MiB for hugetlbfs).
    /// Returns `None` unless it is a power of two of at least 4 KiB.
    pub fn with_page_size(page_size: u64) -> Option<Self> {
        (page_size.is_power_of_two() && page_size >= 4096).then_some(MadviseBackend {
            page_size,
            punch_holes: false,
        })
    }

    /// Also punch holes in the files behind file-backed regions (shared mappings only).
    pub fn punch_holes(mut self, on: bool) -> Self {
        self.punch_holes = on;
        self
    }

    fn advise(range: &HostRange<'_>, advice: libc::c_int) -> io::Result<()> {
        let len =
            usize::try_from(range.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `host_addr..host_addr + len` lies inside one region of guest memory that
        // vm-memory mapped and keeps mapped while the device holds the memory (the device
        // builds every range from a region it just looked up and clips it to that region).
        // Neither advice unmaps anything: DONTNEED replaces the contents with zeros (or the
        // file's data) and WILLNEED only reads ahead. Guest memory is shared with the guest
        // and only ever accessed through volatile operations, so no Rust reference observes
        // the change.
        let ret = unsafe { libc::madvise(range.host_addr.cast(), len, advice) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn punch_hole(range: &HostRange<'_>, file: &FileOffset) -> io::Result<()> {
        let offset = file
            .start()
            .checked_add(range.region_offset)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = libc::off_t::try_from(range.len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: fallocate works on a file descriptor the region's FileOffset keeps open; the
        // byte range is the part of the file the region maps at `range`, which the device
        // clipped to the region.
        let ret = unsafe {
            libc::fallocate(
                file.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl MemoryBackend for MadviseBackend {
    fn host_page_size(&self) -> u64 {
        self.page_size
    }

    fn discard(&self, range: &HostRange<'_>) -> io::Result<()> {
        if self.punch_holes {
            if let Some(file) = range.file_offset {
                Self::punch_hole(range, file)?;
            }
        }
        Self::advise(range, libc::MADV_DONTNEED)
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
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
        }
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
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&[0x5a; 0x4000]).unwrap();
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
        // Without punching, a shared file mapping keeps its data in the file.
        let keep = MadviseBackend::new();
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
    }
}
