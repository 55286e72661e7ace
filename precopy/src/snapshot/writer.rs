// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The sparse snapshot file as a [`PageDestination`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use vm_memory::GuestAddress;

use super::error::SnapshotError;
use super::layout::{description_path, SnapshotLayout};
use crate::destination::PageDestination;
use crate::wire::WIRE_PAGE_SIZE;
use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon::migration::DirtyBitmap;

/// Contiguous pages gathered into one write (1 MiB).
const GATHER_BYTES: usize = 1 << 20;

/// What a finished snapshot file holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotStats {
    /// The memory file's length (its apparent size).
    pub file_len: u64,
    /// Bytes the file system allocated for it (`st_blocks` × 512): the pages written, not
    /// the holes.
    pub allocated_bytes: u64,
    /// Pages written with their contents (a page sent twice counts twice).
    pub data_pages: u64,
    /// Zero pages: left as holes, or punched back into holes where an earlier iteration
    /// had written the page.
    pub zero_pages: u64,
    /// Pages punched back into holes.
    pub holes_punched: u64,
}

/// Writes guest pages into a sparse memory file at the offsets of a [`SnapshotLayout`],
/// then its description.
///
/// Pages of zeros are not written: they stay holes, which read as zeros. A page written in
/// one iteration and found zero in a later one is punched back into a hole. Contiguous
/// pages are gathered into writes of up to 1 MiB. [`finish`](Self::finish) makes the file
/// durable and only then writes the description (`<file>.layout`, by rename), so a copy
/// that fails or is interrupted never leaves a snapshot that claims to be complete.
#[derive(Debug)]
pub struct SnapshotWriter {
    file: File,
    path: PathBuf,
    layout: SnapshotLayout,
    /// One bit per page of each region: the file holds data for the page.
    written: Vec<DirtyBitmap>,
    /// Pages gathered for one write: they start at `gather_offset` in the file.
    gather: Vec<u8>,
    gather_offset: u64,
    stats: SnapshotStats,
    /// The region of the previous page (pages come in address order).
    last_region: usize,
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

impl SnapshotWriter {
    /// Creates the memory file `path` for `layout`, empty; it takes the layout's length in
    /// [`finish`](Self::finish).
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Exists`] if `path` or its description exists and `overwrite` is
    /// false; [`SnapshotError::Io`] if the file cannot be created. With `overwrite`, the
    /// old description is removed first, so an old snapshot is never taken for the new
    /// one, then the old memory file is unlinked (a process that has it mapped keeps it).
    pub fn create(
        path: &Path,
        layout: SnapshotLayout,
        overwrite: bool,
    ) -> Result<Self, SnapshotError> {
        let description = description_path(path);
        if !overwrite {
            for p in [path, description.as_path()] {
                if fs::symlink_metadata(p).is_ok() {
                    return Err(SnapshotError::Exists {
                        path: p.to_path_buf(),
                    });
                }
            }
        } else {
            // The description first: from here on the old snapshot is incomplete. The old
            // memory file is unlinked, not truncated: a VMM that still has it mapped
            // `MAP_PRIVATE` keeps its pages.
            for p in [description.as_path(), path] {
                match fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(format!("removing {}", p.display()))(e)),
                }
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_error(format!("creating {}", path.display())))?;
        let written = layout
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new((r.len / PAGE_SIZE) as usize))
            .collect();
        Ok(SnapshotWriter {
            file,
            path: path.to_path_buf(),
            layout,
            written,
            gather: Vec::with_capacity(GATHER_BYTES),
            gather_offset: 0,
            stats: SnapshotStats::default(),
            last_region: 0,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &SnapshotLayout {
        &self.layout
    }

    /// The region index and page index inside it of `gpa`.
    fn locate(&mut self, gpa: GuestAddress) -> io::Result<(usize, usize, u64)> {
        let regions = self.layout.regions();
        let hit = |r: &super::layout::SnapshotRegion| gpa >= r.gpa && gpa.0 - r.gpa.0 < r.len;
        let index = if regions.get(self.last_region).is_some_and(hit) {
            self.last_region
        } else {
            let i = regions.partition_point(|r| r.gpa <= gpa);
            match i.checked_sub(1) {
                Some(i) if hit(&regions[i]) => i,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("guest page {:#x} is outside the snapshot's layout", gpa.0),
                    ))
                }
            }
        };
        self.last_region = index;
        let r = &regions[index];
        let inside = gpa.0 - r.gpa.0;
        if inside % PAGE_SIZE != 0 || r.len - inside < PAGE_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest page {:#x} is not a whole page of the layout", gpa.0),
            ));
        }
        Ok((index, (inside / PAGE_SIZE) as usize, r.file_offset + inside))
    }

    fn flush_gather(&mut self) -> io::Result<()> {
        if !self.gather.is_empty() {
            self.file.write_all_at(&self.gather, self.gather_offset)?;
            self.gather.clear();
        }
        Ok(())
    }

    /// Makes the memory file durable, then writes the description, durably, by rename.
    /// Returns what the file holds.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Io`]; the description is then not written (or not renamed into
    /// place), so the snapshot does not claim to be complete.
    pub fn finish(mut self) -> Result<SnapshotStats, SnapshotError> {
        let path = self.path.clone();
        self.flush_gather()
            .map_err(io_error(format!("writing {}", path.display())))?;
        // The file takes its full length only now: an interrupted copy leaves a short one.
        self.file
            .set_len(self.layout.file_len())
            .map_err(io_error(format!("sizing {}", path.display())))?;
        self.file
            .sync_all()
            .map_err(io_error(format!("syncing {}", path.display())))?;
        let meta = self
            .file
            .metadata()
            .map_err(io_error(format!("reading the size of {}", path.display())))?;
        let description = description_path(&path);
        let mut tmp = description.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&self.layout.encode())?;
            f.sync_all()?;
            fs::rename(&tmp, &description)?;
            let dir = description
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(format!("writing {}", description.display()))(e));
        }
        let mut stats = self.stats;
        stats.file_len = meta.len();
        stats.allocated_bytes = meta.blocks().saturating_mul(512);
        Ok(stats)
    }

    /// Punches the page at `offset` back into a hole.
    fn punch(&mut self, offset: u64) -> io::Result<()> {
        // Offsets were checked to fit in i64 when the layout was made.
        let off = offset as libc::off_t;
        // SAFETY: fallocate on a descriptor this writer owns, with no pointer argument.
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                PAGE_SIZE as libc::off_t,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        // A file system without hole punching: write the zeros.
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return self.file.write_all_at(&[0u8; WIRE_PAGE_SIZE], offset);
        }
        Err(err)
    }
}

impl PageDestination for SnapshotWriter {
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn page(&mut self, gpa: GuestAddress, data: &[u8; WIRE_PAGE_SIZE]) -> io::Result<()> {
        let (region, page, offset) = self.locate(gpa)?;
        let gather_end = self.gather_offset + self.gather.len() as u64;
        if self.gather.is_empty() || gather_end != offset || self.gather.len() >= GATHER_BYTES {
            self.flush_gather()?;
            self.gather_offset = offset;
        }
        self.gather.extend_from_slice(data);
        self.written[region].set(page);
        self.stats.data_pages += 1;
        Ok(())
    }

    fn zero_page(&mut self, gpa: GuestAddress) -> io::Result<()> {
        let (region, page, offset) = self.locate(gpa)?;
        self.stats.zero_pages += 1;
        if self.written[region].test_and_clear(page) {
            self.flush_gather()?;
            self.punch(offset)?;
            self.stats.holes_punched += 1;
        }
        Ok(())
    }

    fn end_iteration(&mut self, _iteration: u32) -> io::Result<()> {
        self.flush_gather()
    }

    fn end(&mut self) -> io::Result<()> {
        self.flush_gather()
    }

    fn bytes(&self) -> u64 {
        self.stats.data_pages.saturating_mul(PAGE_SIZE)
    }
}
