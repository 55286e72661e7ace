// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Host memory for tests that check what the host really frees: mappings of every kind a
//! guest region can have (anonymous, aligned for transparent huge pages, shared memfd,
//! hugetlbfs), huge page reservations, and the figures the kernel reports for them
//! (`/proc/self/smaps`, `/proc/meminfo`, a file's allocated blocks).

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion};

/// The huge page size the hugetlbfs helpers need (the x86-64 default, 2 MiB).
pub const HUGE_PAGE: u64 = 2 << 20;

/// Fields of the `/proc/self/smaps` entries of one region, summed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Smaps {
    /// `Rss`: resident bytes.
    pub rss: u64,
    /// `Anonymous`: resident private anonymous bytes (a private file mapping's copies).
    pub anonymous: u64,
    /// `AnonHugePages`: bytes in transparent huge pages.
    pub anon_huge: u64,
    /// `Shared_Hugetlb` + `Private_Hugetlb`: bytes in hugetlbfs pages.
    pub hugetlb: u64,
    /// The number of mappings found.
    pub vmas: usize,
}

/// The smaps entries of the mappings in `[start, start + len)`, found by their addresses.
/// Panics if a mapping reaches outside the range (merged with a neighbour: the figures
/// would not be the region's).
pub fn smaps(start: u64, len: u64) -> Smaps {
    let end = start + len;
    let text = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
    let mut out = Smaps::default();
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if let Some((s, e)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                inside = s < end && e > start;
                if inside {
                    assert!(
                        s >= start && e <= end,
                        "mapping {s:#x}-{e:#x} reaches outside the region {start:#x}-{end:#x}"
                    );
                    out.vmas += 1;
                }
                continue;
            }
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Some(kb) = value
            .trim()
            .strip_suffix("kB")
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = kb * 1024;
        match key {
            "Rss" => out.rss += bytes,
            "Anonymous" => out.anonymous += bytes,
            "AnonHugePages" => out.anon_huge += bytes,
            "Shared_Hugetlb" | "Private_Hugetlb" => out.hugetlb += bytes,
            _ => {}
        }
    }
    assert!(out.vmas > 0, "no mapping at {start:#x}");
    out
}

/// A `/proc/meminfo` figure (the number as written: kB or pages).
pub fn meminfo(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.split_ascii_whitespace().next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {key} in /proc/meminfo"))
}

/// The bytes allocated to `file` (`st_blocks` is in 512-byte units).
pub fn allocated(file: &File) -> u64 {
    file.metadata().expect("fstat").blocks() * 512
}

/// One hugetlbfs test at a time: they share the system's pool of huge pages.
pub static HUGETLB: Mutex<()> = Mutex::new(());

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Other test processes (another `cargo test` of this crate) take this lock too, with
/// `flock`, so that no two of them change `nr_hugepages` or count free huge pages at once.
const HUGETLB_LOCK: &str = "/tmp/virtio-balloon-backings-hugetlb.lock";

/// Huge pages reserved for a test; the old `nr_hugepages` comes back on drop, then the lock
/// is released (closing `_lock`).
pub struct HugePages {
    old: u64,
    _lock: File,
}

impl HugePages {
    /// Raises `nr_hugepages` by `n` 2 MiB pages; `Err` says why it could not.
    pub fn reserve(n: u64) -> Result<HugePages, String> {
        if meminfo("Hugepagesize") * 1024 != HUGE_PAGE {
            return Err(format!(
                "the default huge page size is {} kB, the test needs 2048 kB",
                meminfo("Hugepagesize")
            ));
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(HUGETLB_LOCK)
            .map_err(|e| format!("cannot open {HUGETLB_LOCK}: {e}"))?;
        // SAFETY: flock on a descriptor `lock` keeps open; it waits for other processes
        // holding the lock and has no memory-safety preconditions.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "cannot lock {HUGETLB_LOCK}: {}",
                io::Error::last_os_error()
            ));
        }
        let old: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .map_err(|e| format!("cannot read {NR_HUGEPAGES}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?;
        std::fs::write(NR_HUGEPAGES, format!("{}\n", old + n))
            .map_err(|e| format!("cannot write {NR_HUGEPAGES} (not root?): {e}"))?;
        let guard = HugePages { old, _lock: lock };
        let free = meminfo("HugePages_Free");
        if free < n {
            return Err(format!(
                "asked for {n} more huge pages, the kernel found {free} free (memory too \
                 fragmented?)"
            ));
        }
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, format!("{}\n", self.old)) {
            eprintln!(
                "backings: could not put {NR_HUGEPAGES} back to {}: {e}",
                self.old
            );
        }
    }
}

/// A mapping the test made itself (for alignment), unmapped on drop, after the memory and
/// the device that use it are gone.
pub struct OwnMapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for OwnMapping {
    fn drop(&mut self) {
        // SAFETY: the test mapped exactly this range and nothing uses it any more (the guest
        // memory and device holding it were dropped first).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Private anonymous memory at a 2 MiB aligned host address (so that whole transparent huge
/// pages fit), with `advice` applied, between two inaccessible ranges (so that the kernel
/// never merges it with a neighbouring mapping and smaps shows it alone). `hugetlbfs` is
/// what the region tells vm-memory.
pub fn aligned_anonymous(
    len: usize,
    advice: libc::c_int,
    hugetlbfs: Option<bool>,
) -> (MmapRegion<AtomicBitmap>, OwnMapping) {
    let align = HUGE_PAGE as usize;
    let total = len + 2 * align;
    // SAFETY: a fresh reservation of address space, no fixed address.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(reserved, libc::MAP_FAILED, "reserve address space");
    let mapping = OwnMapping {
        addr: reserved,
        len: total,
    };
    // At least one page of the reservation stays before and after the window.
    let aligned = (reserved as usize + 4096).next_multiple_of(align);
    // SAFETY: `aligned..aligned + len` lies inside the reservation just made, which nothing
    // else uses; MAP_FIXED replaces that part of it.
    let addr = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_eq!(addr as usize, aligned, "map the aligned range");
    // SAFETY: the range is the mapping just made.
    let ret = unsafe { libc::madvise(addr, len, advice) };
    assert_eq!(ret, 0, "madvise {advice}: {}", io::Error::last_os_error());
    let mut builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
    if let Some(h) = hugetlbfs {
        builder = builder.with_hugetlbfs(h);
    }
    // SAFETY: `addr..addr + len` is a mapping of this process that `mapping` keeps until
    // after the region is gone.
    let region = unsafe { builder.with_raw_mmap_pointer(addr.cast()) }
        .build()
        .expect("region over the mapping");
    (region, mapping)
}

/// A region vm-memory maps itself.
pub fn mapped(
    len: usize,
    file: Option<FileOffset>,
    flags: i32,
    hugetlbfs: Option<bool>,
) -> io::Result<MmapRegion<AtomicBitmap>> {
    let mut b = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags);
    if let Some(f) = file {
        b = b.with_file_offset(f);
    }
    if let Some(h) = hugetlbfs {
        b = b.with_hugetlbfs(h);
    }
    b.build().map_err(|e| io::Error::other(format!("{e}")))
}

/// A memfd of `len` bytes, created with `flags` (and `MFD_CLOEXEC`).
pub fn memfd(name: &std::ffi::CStr, flags: libc::c_uint, len: u64) -> io::Result<File> {
    // SAFETY: a NUL-terminated name; the call has no other preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}
