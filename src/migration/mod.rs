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
mod counting;
mod dirty_log;
#[cfg(feature = "kvm")]
mod kvm;
mod notifier;

pub use bitmap::{MigrationBitmap, CLEAR_CHUNK_PAGES};
pub use counting::{
    checked_count_one_with_offset, count_one, count_one_with_offset, DirtyBitmap, BITS_PER_WORD,
};
pub use dirty_log::{
    DirtyLog, DirtyLogClear, DirtyLogError, GuestMemoryDirtyLog, HarvestedLog, JoinedLog,
    RegionInfo, RegionMismatch,
};
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub use kvm::{KvmDirtyLog, KvmError, KvmProtection, KvmSlot};
pub use notifier::{
    MigrationState, NotifierError, NotifierFailure, NotifierId, NotifyError, PrecopyContext,
    PrecopyEvent, PrecopyNotifier, PrecopyNotifierChain,
};

use std::fmt;

use vm_memory::GuestAddress;

/// Errors of the migration bitmap.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A guest memory region of length zero.
    EmptyRegion {
        /// Where it starts.
        start: GuestAddress,
    },
    /// A guest memory region that runs past the top of the address space, or whose page
    /// count does not fit in memory.
    RegionOverflow {
        /// Where it starts.
        start: GuestAddress,
        /// Its length in bytes.
        len: u64,
    },
    /// Two guest memory regions overlap.
    OverlappingRegions {
        /// The lower region's start.
        first: GuestAddress,
        /// The start of the region that overlaps it.
        second: GuestAddress,
    },
    /// The dirty log failed for a region.
    DirtyLog {
        /// The region's index.
        region: usize,
        /// What the log returned.
        source: DirtyLogError,
    },
    /// Clearing pages in the dirty log before sending them failed (see
    /// [`MigrationBitmap::take_page`]); they stay dirty.
    ClearDirtyLog {
        /// The region's index.
        region: usize,
        /// What the log returned.
        source: DirtyLogError,
    },
    /// The dirty log reported a page size of zero. The region was marked wholly dirty, so
    /// nothing it held is lost.
    DirtyLogPageSize {
        /// The region's index.
        region: usize,
        /// The page size it reported.
        page_size: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::EmptyRegion { start } => {
                write!(f, "guest memory region at {:#x} is empty", start.0)
            }
            Error::RegionOverflow { start, len } => write!(
                f,
                "guest memory region at {:#x} of {len:#x} bytes overflows",
                start.0
            ),
            Error::OverlappingRegions { first, second } => write!(
                f,
                "guest memory regions at {:#x} and {:#x} overlap",
                first.0, second.0
            ),
            Error::DirtyLog { region, source } => {
                write!(f, "dirty log of region {region} failed: {source}")
            }
            Error::ClearDirtyLog { region, source } => {
                write!(
                    f,
                    "clearing the dirty log of region {region} failed: {source}"
                )
            }
            Error::DirtyLogPageSize { region, page_size } => write!(
                f,
                "dirty log of region {region} has page size {page_size}; region marked dirty"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::DirtyLog { source, .. } | Error::ClearDirtyLog { source, .. } => {
                Some(source.as_ref())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errors_say_what_and_where() {
        let cases = [
            (
                Error::EmptyRegion {
                    start: GuestAddress(0x1000),
                },
                "guest memory region at 0x1000 is empty",
            ),
            (
                Error::RegionOverflow {
                    start: GuestAddress(u64::MAX),
                    len: 2,
                },
                "guest memory region at 0xffffffffffffffff of 0x2 bytes overflows",
            ),
            (
                Error::OverlappingRegions {
                    first: GuestAddress(0),
                    second: GuestAddress(0x800),
                },
                "guest memory regions at 0x0 and 0x800 overlap",
            ),
            (
                Error::DirtyLogPageSize {
                    region: 3,
                    page_size: 0,
                },
                "dirty log of region 3 has page size 0; region marked dirty",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(err.to_string(), text);
            assert!(err.source().is_none());
        }
        let err = Error::DirtyLog {
            region: 1,
            source: "ioctl failed".into(),
        };
        assert_eq!(
            err.to_string(),
            "dirty log of region 1 failed: ioctl failed"
        );
        assert_eq!(err.source().unwrap().to_string(), "ioctl failed");
    }
}
