// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Opening a snapshot: restoring it into fresh memory, or mapping it as guest memory.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

use super::error::SnapshotError;
use super::layout::{description_path, SnapshotLayout};
use crate::wire::WIRE_PAGE_SIZE;

/// The largest description read (a description of [`MAX_REGIONS`](super::layout::MAX_REGIONS)
/// regions is about 96 KiB).
const MAX_DESCRIPTION: u64 = 1 << 20;
/// Bytes read from the file at once while restoring.
const CHUNK: usize = 1 << 20;

/// What [`SnapshotFile::restore_into`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreStats {
    /// Bytes read from the file's data (holes are skipped: they read as zeros, which fresh
    /// memory already holds).
    pub bytes_read: u64,
    /// Data extents the file system reported.
    pub extents: u64,
}

/// A complete snapshot: its memory file and its checked description.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    path: PathBuf,
    layout: SnapshotLayout,
}

impl SnapshotFile {
    /// Opens the snapshot whose memory file is `path`, with its description
    /// ([`description_path`]).
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Incomplete`] without a description (the copy did not finish);
    /// [`SnapshotError::BadDescription`] or [`SnapshotError::Version`] for a description
    /// this crate cannot read; [`SnapshotError::Truncated`] when the memory file is
    /// shorter than the description says; [`SnapshotError::Io`] for any other failure.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let description = description_path(path);
        let io = |what: String| move |source| SnapshotError::Io { what, source };
        let bytes = match File::open(&description) {
            Ok(f) => {
                let mut bytes = Vec::new();
                f.take(MAX_DESCRIPTION + 1)
                    .read_to_end(&mut bytes)
                    .map_err(io(format!("reading {}", description.display())))?;
                bytes
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SnapshotError::Incomplete {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io(format!("opening {}", description.display()))(e)),
        };
        let layout = SnapshotLayout::decode(&bytes)?;
        let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
        let len = fs::metadata(path)
            .map_err(io(format!("reading the size of {}", path.display())))?
            .len();
        if len < layout.file_len() {
            return Err(SnapshotError::Truncated {
                path: path.to_path_buf(),
                len,
                expected: layout.file_len(),
            });
        }
        Ok(SnapshotFile {
            file,
            path: path.to_path_buf(),
            layout,
        })
    }

    /// The regions and where they lie in the file.
    pub fn layout(&self) -> &SnapshotLayout {
        &self.layout
    }

    /// The memory file, open for reading: what a VMM maps `MAP_PRIVATE` at each region's
    /// file offset (see [`map_private`](Self::map_private)).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads the page at `gpa` into `buf`. Returns `Ok(false)` (and leaves `buf` alone) if
    /// no region of the layout holds the whole page.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Io`] if reading fails.
    pub fn read_page(
        &self,
        gpa: GuestAddress,
        buf: &mut [u8; WIRE_PAGE_SIZE],
    ) -> Result<bool, SnapshotError> {
        let offset = match self.layout.file_offset_of(gpa) {
            Some(offset) if self.layout.covers(gpa, WIRE_PAGE_SIZE as u64) => offset,
            _ => return Ok(false),
        };
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| SnapshotError::Io {
                what: format!("reading {} at {offset:#x}", self.path.display()),
                source,
            })?;
        Ok(true)
    }

    /// Copies the snapshot into `mem`, which must have exactly the layout's regions and read
    /// zeros where the file has holes (fresh memory does): only the file's data extents are
    /// read and written.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::LayoutMismatch`] before anything is written when `mem`'s regions
    /// are not the layout's; [`SnapshotError::Io`] if reading the file fails (what was
    /// copied until then stays).
    pub fn restore_into<M: GuestMemoryBackend>(
        &self,
        mem: &M,
    ) -> Result<RestoreStats, SnapshotError> {
        if !self.layout.matches(mem) {
            return Err(SnapshotError::LayoutMismatch {
                expected: self
                    .layout
                    .regions()
                    .iter()
                    .map(|r| (r.gpa, r.len))
                    .collect(),
                found: mem
                    .iter()
                    .map(|r| {
                        (
                            vm_memory::GuestMemoryRegion::start_addr(r),
                            vm_memory::GuestMemoryRegion::len(r),
                        )
                    })
                    .collect(),
            });
        }
        let mut stats = RestoreStats::default();
        let mut buf = vec![0u8; CHUNK];
        let io = |what: String| move |source| SnapshotError::Io { what, source };
        for r in self.layout.regions() {
            let end = r.file_offset + r.len;
            let mut pos = r.file_offset;
            while pos < end {
                let Some((data, data_end)) = self
                    .next_extent(pos, end)
                    .map_err(io(format!("seeking in {}", self.path.display())))?
                else {
                    break;
                };
                stats.extents += 1;
                let mut at = data;
                while at < data_end {
                    let n = usize::try_from(data_end - at).unwrap_or(CHUNK).min(CHUNK);
                    self.file
                        .read_exact_at(&mut buf[..n], at)
                        .map_err(io(format!("reading {} at {at:#x}", self.path.display())))?;
                    let gpa = GuestAddress(r.gpa.0 + (at - r.file_offset));
                    mem.write_slice(&buf[..n], gpa)
                        .map_err(|e| SnapshotError::Io {
                            what: format!("writing guest memory at {:#x}", gpa.0),
                            source: io::Error::other(e.to_string()),
                        })?;
                    stats.bytes_read += n as u64;
                    at += n as u64;
                }
                pos = data_end;
            }
        }
        Ok(stats)
    }

    /// The next data extent in `[pos, end)`, clipped to it, or `None` when the rest is a hole.
    /// File systems without `SEEK_DATA` report everything as data.
    fn next_extent(&self, pos: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        // Offsets were checked to fit in i64 when the layout was made.
        // SAFETY: lseek on a descriptor this snapshot owns; no memory is touched. The file
        // position is not used by anything else (every read is positioned).
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data after `pos`.
                Some(libc::ENXIO) => Ok(None),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((pos, end))),
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            return Ok(None);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((data, (hole as u64).min(end))))
    }

    /// Maps the snapshot as guest memory, each region `MAP_PRIVATE` from its file offset, the
    /// way Firecracker and Cloud Hypervisor restore: pages load from the file on first
    /// access, holes read as zeros, and the guest's writes stay in the process (the file is
    /// never changed).
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Io`] if a region cannot be mapped.
    pub fn map_private(&self) -> Result<GuestMemoryMmap<()>, SnapshotError> {
        let io = |what: String| move |source| SnapshotError::Io { what, source };
        let mut regions = Vec::with_capacity(self.layout.regions().len());
        for r in self.layout.regions() {
            let what = format!("mapping the region at {:#x}", r.gpa.0);
            let size = usize::try_from(r.len)
                .map_err(|_| io(what.clone())(io::Error::other("region too large")))?;
            let file = self.file.try_clone().map_err(io(what.clone()))?;
            let mapping = MmapRegionBuilder::<()>::new(size)
                .with_file_offset(FileOffset::new(file, r.file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| io(what.clone())(io::Error::other(e.to_string())))?;
            let region = GuestRegionMmap::new(mapping, r.gpa)
                .ok_or_else(|| io(what.clone())(io::Error::other("region overflows")))?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions)
            .map_err(|e| io("building guest memory".into())(io::Error::other(e.to_string())))
    }
}
