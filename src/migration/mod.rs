// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The migration side of free page hinting.
//!
//! * [`MigrationBitmap`]: which guest pages a precopy migration still has to send, one atomic
//!   bitmap per guest memory region and a dirty page counter. Hints clear it (it is a
//!   [`FreePageSink`](crate::sink::FreePageSink)); the sending side test-and-clears it page by
//!   page; [`sync`](MigrationBitmap::sync) refills it from a [`DirtyLog`].
//! * [`PrecopyNotifierChain`]: the precopy events (setup, before and after each bitmap sync,
//!   complete, cleanup) delivered in order to [`PrecopyNotifier`]s such as the balloon
//!   device, which starts and stops hint rounds on them.
//!
//! The reference precopy loop that drives both, with its stream format and receiver, is the
//! workspace's `virtio-balloon-precopy` crate.
//!
//! # Why hints cannot lose data
//!
//! Two bitmaps are at play. The *dirty log* (KVM's, or vm-memory's write tracking) collects
//! every write the guest makes. The *migration bitmap* is the set of pages still to send in
//! this pass; each sync moves the dirty log into it. Hints clear only the migration bitmap,
//! and only during the round that started after the latest sync. A page the guest frees,
//! hints, then reuses is written after that sync, so the dirty log has it and the next sync
//! puts it back into the migration bitmap: it is sent, with its new contents.

mod bitmap;
mod content;
mod counting;
mod dirty_log;
mod error;
#[cfg(feature = "kvm")]
mod kvm;
mod notifier;

pub use bitmap::{MigrationBitmap, CLEAR_CHUNK_PAGES};
pub use content::ContentDirtyLog;
pub use counting::{
    checked_count_one_with_offset, count_one, count_one_with_offset, DirtyBitmap, BITS_PER_WORD,
};
pub use dirty_log::{
    DirtyLog, DirtyLogClear, DirtyLogError, GuestMemoryDirtyLog, HarvestedLog, JoinedLog,
    RegionInfo, RegionMismatch,
};
pub use error::Error;
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub use kvm::{KvmDirtyLog, KvmError, KvmProtection, KvmSlot};
pub use notifier::{
    MigrationState, NotifierError, NotifierFailure, NotifierId, NotifyError, PrecopyContext,
    PrecopyEvent, PrecopyNotifier, PrecopyNotifierChain,
};
