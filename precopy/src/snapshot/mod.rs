// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sparse memory snapshots that leave out the pages a guest hinted free.
//!
//! A snapshot is a copy of guest memory with a file as the destination. It is written by the
//! same loop as a migration ([`Precopy`](crate::Precopy)), so it follows the same rules:
//!
//! * Dirty logging is on before the hint round starts: the bitmap is set wholly dirty and
//!   synced, and only then does the balloon ask the guest for hints.
//! * Hints only clear pages from the [`MigrationBitmap`](virtio_balloon::migration::MigrationBitmap) of the copy. Nothing is discarded,
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
//! Keep your writer and ask the
//! [`MigrationBitmap`](virtio_balloon::migration::MigrationBitmap) which pages to write; the
//! balloon's [`FreePageHinting`](virtio_balloon::FreePageHinting) clears the hinted ones
//! from it:
//!
//! 1. Create the bitmap over guest memory and pass it to the balloon as its hint sink
//!    (`Balloon::new(config, mem, bitmap.clone())`). Turn on dirty logging (KVM:
//!    `KVM_MEM_LOG_DIRTY_PAGES` on every slot) before anything else.
//! 2. `bitmap.mark_all_dirty()`, then `bitmap.sync(&mut log)` to empty the log, then
//!    `hints.start_round()` (`FreePageHinting`, from `Balloon::hint_control`), and
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

mod error;
mod layout;
mod reader;
mod write;
mod writer;

pub use error::SnapshotError;
pub use layout::{
    description_path, SnapshotLayout, SnapshotRegion, DESCRIPTION_VERSION, MAX_REGIONS,
};
pub use reader::{RestoreStats, SnapshotFile};
pub use write::{Snapshot, SnapshotMode, SnapshotReport};
pub use writer::{SnapshotStats, SnapshotWriter};
