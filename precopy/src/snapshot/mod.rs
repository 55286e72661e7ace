// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sparse memory snapshots that leave out the pages a guest hinted free.
//!
//! A snapshot is a copy of guest memory with a file as the destination. It is written by the
//! same loop as a migration ([`Precopy`]), so it follows the same rules:
//!
//! * Dirty logging is on before the hint round starts: the bitmap is set wholly dirty and
//!   synced, and only then does the balloon ask the guest for hints.
//! * Hints only clear pages from the [`MigrationBitmap`] of the copy. Nothing is discarded,
//!   and the dirty log is never touched: a hinted page the guest takes back and writes
//!   (its balloon driver's shrinker returns hinted pages under memory pressure) is found
//!   dirty by the next sync and written to the file.
//! * The device moves to DONE only after the capture is complete (the final stage's
//!   `AfterBitmapSync` comes after its last page): until then the guest keeps its hinted
//!   pages isolated.
//!
//! Pages of zeros and hinted pages become holes; the description of the regions (a side
//! file, [`description_path`]) is written last, so an interrupted snapshot never looks
//! complete.
//!
//! Two modes ([`SnapshotMode`]): **stopped** (the guest runs its hint round, then is
//! stopped and written in one stage; the guest's downtime is the whole write) and **live**
//! (precopy iterations while the guest runs, then a final stage with it stopped: short
//! downtime, and pages rewritten between iterations are written more than once).
//!
//! # Restoring
//!
//! [`SnapshotFile::open`] checks the description and the file. Then either
//! [`restore_into`](SnapshotFile::restore_into) copies the file's data extents into fresh
//! memory, or [`map_private`](SnapshotFile::map_private) maps each region `MAP_PRIVATE`
//! from the file (what Firecracker and Cloud Hypervisor do with their memory files), so
//! pages load on first access and holes cost nothing.
//!
//! # Example
//!
//! ```
//! use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap, PrecopyNotifierChain};
//! use virtio_balloon_precopy::snapshot::{Snapshot, SnapshotFile, SnapshotMode};
//! use virtio_balloon_precopy::{VmControl, VmControlError};
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! struct Vm;
//! impl VmControl for Vm {
//!     fn stop_vm(&mut self) -> Result<(), VmControlError> {
//!         Ok(())
//!     }
//!     fn resume_vm(&mut self) {}
//! }
//!
//! let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 30), 1 << 20)];
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).unwrap();
//! mem.write_obj(0xfeed_u64, GuestAddress((1 << 30) + 0x3000)).unwrap();
//! let bitmap = MigrationBitmap::new(&mem).unwrap();
//! let chain = PrecopyNotifierChain::new();
//!
//! let dir = std::env::temp_dir().join(format!("snapshot-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("memory");
//! let report = Snapshot::new(&mem, &bitmap, &chain)
//!     .mode(SnapshotMode::Stopped)
//!     .overwrite(true)
//!     .write(&mut GuestMemoryDirtyLog::new(&mem), &mut Vm, &path)
//!     .unwrap();
//! assert_eq!(report.file.data_pages, 1);
//! assert_eq!(report.file.file_len, (1 << 30) + (1 << 20));
//!
//! let snapshot = SnapshotFile::open(&path).unwrap();
//! let restored = snapshot.map_private().unwrap();
//! assert_eq!(restored.read_obj::<u64>(GuestAddress((1 << 30) + 0x3000)).unwrap(), 0xfeed);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```
//!
//! # A VMM with its own snapshot writer
//!
//! Keep your writer and ask the [`MigrationBitmap`] which pages to write; the balloon's
//! [`FreePageHinting`] clears the hinted ones from it:
//!
//! 1. Create the bitmap over guest memory and pass it to the balloon as its hint sink
//!    (`Balloon::new(config, mem, bitmap.clone())`). Turn on dirty logging (KVM:
//!    `KVM_MEM_LOG_DIRTY_PAGES` on every slot) before anything else.
//! 2. `bitmap.mark_all_dirty()`, then `bitmap.sync(&mut log)` to empty the log, then
//!    `hints.start_round()` ([`FreePageHinting`], from `Balloon::hint_control`), and
//!    `hints.wait_round_complete(deadline)`.
//! 3. Pause the vCPUs and device emulation. `hints.stop_round()`, then `bitmap.sync(&mut
//!    log)` again: this brings back every hinted page the guest took back and wrote.
//! 4. Write the pages `bitmap.iter_dirty()` yields, each taken with
//!    `bitmap.take_page(addr)` (it clears the dirty log first when the log uses manual
//!    protection); leave every other page a hole.
//! 5. Only when every page is written, `hints.done()`: the guest may reuse its hinted
//!    pages. Resume the guest; then make the file durable and write what describes it.
//!
//! Never discard hinted pages (`MADV_DONTNEED`, hole punching) for a snapshot: the guest
//! may reuse a hinted page before the discard happens, and the discard then destroys live
//! data. Clearing bits in a bitmap synced against the dirty log cannot.

mod layout;
mod reader;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::precopy::{
    CancelToken, MigrationReport, Precopy, PrecopyConfig, PrecopyError, VmControl,
};
use virtio_balloon::migration::{DirtyLog, MigrationBitmap, PrecopyNotifierChain};
use virtio_balloon::FreePageHinting;

pub use layout::{
    description_path, SnapshotLayout, SnapshotRegion, DESCRIPTION_VERSION, MAX_REGIONS,
};
pub use reader::{RestoreStats, SnapshotFile};
pub use writer::{SnapshotStats, SnapshotWriter};

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The memory file or its description exists and overwriting was not asked for.
    #[error("{} exists (pass overwrite to replace it)", .path.display())]
    Exists {
        /// The path found.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The copy failed (the guest was resumed if it had been stopped).
    #[error("the copy failed: {0}")]
    Copy(#[source] PrecopyError),
    /// The regions cannot be laid out in a file.
    #[error("bad snapshot layout: {0}")]
    Layout(String),
    /// The memory file has no description: its copy did not finish.
    #[error("{} is not a complete snapshot (no description beside it)", .path.display())]
    Incomplete {
        /// The memory file.
        path: PathBuf,
    },
    /// The description is damaged or is not one.
    #[error("bad snapshot description: {0}")]
    BadDescription(String),
    /// The description has a version this crate does not read.
    #[error(
        "snapshot description version {found}, this crate reads version {DESCRIPTION_VERSION}"
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// The memory file is shorter than its description says.
    #[error("{} holds {len} bytes, its description needs {expected}", .path.display())]
    Truncated {
        /// The memory file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length the description needs.
        expected: u64,
    },
    /// The guest memory does not have the snapshot's regions.
    #[error("the guest memory's regions {found:x?} are not the snapshot's {expected:x?}")]
    LayoutMismatch {
        /// The snapshot's regions, `(start, length)`.
        expected: Vec<(GuestAddress, u64)>,
        /// The memory's regions.
        found: Vec<(GuestAddress, u64)>,
    },
}

/// How a snapshot is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotMode {
    /// The guest runs its hint round (if one is waited for), then is stopped and written in
    /// one stage.
    #[default]
    Stopped,
    /// Precopy iterations while the guest runs, then a final stage with the guest stopped.
    Live,
}

/// What a snapshot did.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct SnapshotReport {
    /// The copy: iterations, pages, hinted pages, time and downtime.
    pub copy: MigrationReport,
    /// The file.
    pub file: SnapshotStats,
}

/// Writes a sparse snapshot of guest memory. Build it like [`Precopy`], then
/// [`write`](Self::write) it.
pub struct Snapshot<'a, M> {
    mem: &'a M,
    bitmap: &'a MigrationBitmap,
    chain: &'a PrecopyNotifierChain,
    mode: SnapshotMode,
    config: PrecopyConfig,
    wait_for_hints: Option<(FreePageHinting, Duration)>,
    overwrite: bool,
    layout: Option<SnapshotLayout>,
    cancel: Option<CancelToken>,
}

impl<M> std::fmt::Debug for Snapshot<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("mode", &self.mode)
            .field("config", &self.config)
            .field("overwrite", &self.overwrite)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl<'a, M: GuestMemoryBackend> Snapshot<'a, M> {
    /// A snapshot of `mem`, writing the pages `bitmap` marks, notifying `chain`; stopped
    /// mode, every region at the file offset of its guest address, no overwriting.
    pub fn new(mem: &'a M, bitmap: &'a MigrationBitmap, chain: &'a PrecopyNotifierChain) -> Self {
        Snapshot {
            mem,
            bitmap,
            chain,
            mode: SnapshotMode::default(),
            config: PrecopyConfig::default(),
            wait_for_hints: None,
            overwrite: false,
            layout: None,
            cancel: None,
        }
    }

    /// Uses `mode`.
    pub fn mode(mut self, mode: SnapshotMode) -> Self {
        self.mode = mode;
        self
    }

    /// The live mode's loop settings (downtime limit, bandwidth, iterations).
    pub fn config(mut self, config: PrecopyConfig) -> Self {
        self.config = config;
        self
    }

    /// Waits up to `deadline` for the guest's hint round before writing (stopped mode) or
    /// before the first pass (live mode).
    pub fn wait_for_hint_round(mut self, hints: FreePageHinting, deadline: Duration) -> Self {
        self.wait_for_hints = Some((hints, deadline));
        self
    }

    /// Replaces an existing snapshot at the path.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// Places the regions in the file as `layout` says; it must cover every page of the
    /// bitmap.
    pub fn layout(mut self, layout: SnapshotLayout) -> Self {
        self.layout = Some(layout);
        self
    }

    /// Lets `token` cancel the snapshot.
    pub fn cancel_token(mut self, token: CancelToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Writes the snapshot to the memory file `path` and its description, syncing from
    /// `log` and stopping the guest with `vm`. The guest is resumed
    /// ([`VmControl::resume_vm`]) as soon as the last page is written (before the file is
    /// made durable and its description written), or as soon as the copy fails after the
    /// guest was stopped.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Exists`] (nothing is touched), [`SnapshotError::Layout`] or
    /// [`SnapshotError::LayoutMismatch`] before anything is written; then
    /// [`SnapshotError::Copy`] or [`SnapshotError::Io`]: the memory file is removed and no
    /// description is written.
    pub fn write<L, V>(
        self,
        log: &mut L,
        vm: &mut V,
        path: &Path,
    ) -> Result<SnapshotReport, SnapshotError>
    where
        L: DirtyLog + ?Sized,
        V: VmControl + ?Sized,
    {
        let layout = match self.layout {
            Some(l) => l,
            None => SnapshotLayout::at_guest_addresses(self.mem)?,
        };
        for r in self.bitmap.regions() {
            if !layout.covers(r.start, r.len) {
                return Err(SnapshotError::LayoutMismatch {
                    expected: layout.regions().iter().map(|r| (r.gpa, r.len)).collect(),
                    found: self.bitmap.regions().map(|r| (r.start, r.len)).collect(),
                });
            }
        }
        let mut writer = SnapshotWriter::create(path, layout, self.overwrite)?;
        let mut copy = Precopy::new(self.mem, self.bitmap, self.chain).config(self.config);
        if self.mode == SnapshotMode::Stopped {
            copy = copy.stopped();
        }
        if let Some((hints, deadline)) = self.wait_for_hints {
            copy = copy.wait_for_hint_round(hints, deadline);
        }
        if let Some(token) = self.cancel {
            copy = copy.cancel_token(token);
        }
        // On failure `run_to` has resumed the guest. On success every page is in the file
        // (the guest cannot change it any more), so the guest resumes before the file is
        // made durable and described.
        let result = match copy.run_to(log, vm, &mut writer) {
            Ok(report) => {
                vm.resume_vm();
                writer
                    .finish()
                    .map(|file| SnapshotReport { copy: report, file })
            }
            Err(e) => Err(SnapshotError::Copy(e)),
        };
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}
