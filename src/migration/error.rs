// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The errors of the migration bitmap.

use vm_memory::GuestAddress;

use super::dirty_log::DirtyLogError;

/// Errors of the migration bitmap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A guest memory region of length zero.
    #[error("guest memory region at {:#x} is empty", .start.0)]
    EmptyRegion {
        /// Where it starts.
        start: GuestAddress,
    },
    /// A guest memory region that runs past the top of the address space, or whose page
    /// count does not fit in memory.
    #[error("guest memory region at {:#x} of {len:#x} bytes overflows", .start.0)]
    RegionOverflow {
        /// Where it starts.
        start: GuestAddress,
        /// Its length in bytes.
        len: u64,
    },
    /// Two guest memory regions overlap.
    #[error("guest memory regions at {:#x} and {:#x} overlap", .first.0, .second.0)]
    OverlappingRegions {
        /// The lower region's start.
        first: GuestAddress,
        /// The start of the region that overlaps it.
        second: GuestAddress,
    },
    /// The dirty log failed for a region.
    #[error("dirty log of region {region} failed: {source}")]
    DirtyLog {
        /// The region's index.
        region: usize,
        /// What the log returned.
        source: DirtyLogError,
    },
    /// Clearing pages in the dirty log before sending them failed (see
    /// [`MigrationBitmap::take_page`](super::MigrationBitmap::take_page)); they stay dirty.
    #[error("clearing the dirty log of region {region} failed: {source}")]
    ClearDirtyLog {
        /// The region's index.
        region: usize,
        /// What the log returned.
        source: DirtyLogError,
    },
    /// The dirty log reported a page size of zero. The region was marked wholly dirty, so
    /// nothing it held is lost.
    #[error("dirty log of region {region} has page size {page_size}; region marked dirty")]
    DirtyLogPageSize {
        /// The region's index.
        region: usize,
        /// The page size it reported.
        page_size: u64,
    },
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
