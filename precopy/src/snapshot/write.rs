// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Taking a snapshot: the precopy loop with a [`SnapshotWriter`] as its destination.

use std::path::Path;
use std::time::Duration;

use vm_memory::GuestMemoryBackend;

use super::error::SnapshotError;
use super::layout::SnapshotLayout;
use super::writer::{SnapshotStats, SnapshotWriter};
use crate::precopy::{CancelToken, MigrationReport, Precopy, PrecopyConfig, VmControl};
use virtio_balloon::migration::{DirtyLog, MigrationBitmap, PrecopyNotifierChain};
use virtio_balloon::FreePageHinting;

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
