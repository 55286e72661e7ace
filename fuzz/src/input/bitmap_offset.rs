// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of `bitmap_offset`: what [`crate::bitmap_offset::run`] drives.

use arbitrary::Arbitrary;

/// One guest memory region of the migration bitmap's layout.
#[derive(Arbitrary, Debug, PartialEq)]
pub struct Region {
    /// Hole before the region, in pages.
    pub gap_pages: u16,
    /// Length in bytes (clamped to `MAX_REGION_PAGES` pages; zero is kept to test the
    /// error).
    pub len: u32,
}

/// Where the layout lies in the guest physical address space.
#[derive(Arbitrary, Debug, PartialEq)]
pub enum Placement {
    /// The first region starts at this address (the layout may run past the top).
    At(u64),
    /// The last region ends exactly at the top of the address space.
    EndAtTop,
}

/// One operation on the migration bitmap, checked against the page model after it.
#[derive(Arbitrary, Debug, PartialEq)]
pub enum Op {
    /// A hint anywhere, with raw values (overflow, far outside RAM).
    RawHint {
        /// The hint's guest address.
        gpa: u64,
        /// The hint's length in bytes.
        len: u64,
    },
    /// A hint near a region, to land on its edges often.
    NearHint {
        /// The region (modulo the number of regions).
        region: u8,
        /// Pages from the region's start (before it when negative).
        page: i16,
        /// Bytes added to the address (modulo 4096).
        jitter: u16,
        /// The length in pages...
        pages: u16,
        /// ...plus this many bytes.
        len_jitter: i16,
    },
    /// Writes, as a sync would report them.
    Mark {
        /// The region (modulo the number of regions).
        region: u8,
        /// Pages from the region's start.
        page: u16,
        /// Bytes written.
        len: u32,
    },
    /// The sending side takes one page.
    Send {
        /// The region (modulo the number of regions).
        region: u8,
        /// Pages from the region's start.
        page: u16,
    },
    /// Everything dirty again.
    MarkAll,
    /// A dirty-log sync: the same words for every region, with one bit per `page_size`
    /// bytes.
    Sync {
        /// The log's page size in bytes (zero included).
        page_size: u32,
        /// The log's words (at most `MAX_LOG_WORDS`).
        words: Vec<u64>,
    },
}

/// One `bitmap_offset` case: bit counting, then the migration bitmap.
#[derive(Arbitrary, Debug, PartialEq)]
pub struct Input {
    /// The words the counting functions count in (at most `MAX_WORDS`).
    pub words: Vec<u64>,
    /// Small `(offset, len)` bit ranges to count.
    pub queries: Vec<(u16, u16)>,
    /// Raw `(offset, len)` bit ranges, overflowing ones included.
    pub raw_queries: Vec<(usize, usize)>,
    /// Where the layout lies.
    pub placement: Placement,
    /// The regions of the layout (at most `MAX_REGIONS`).
    pub regions: Vec<Region>,
    /// The operations on the bitmap (at most `MAX_OPS`).
    pub ops: Vec<Op>,
}
