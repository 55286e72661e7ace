// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of `bitmap_offset`: what `crate::bitmap_offset::run` drives. Variants and fields without a doc
//! comment are read where that module uses them.

#![allow(missing_docs)]

use arbitrary::Arbitrary;

#[derive(Arbitrary, Debug, PartialEq)]
pub struct Region {
    /// Hole before the region, in pages.
    pub gap_pages: u16,
    /// Length in bytes (clamped to `MAX_REGION_PAGES` pages; zero is kept to test the
    /// error).
    pub len: u32,
}

#[derive(Arbitrary, Debug, PartialEq)]
pub enum Placement {
    /// The first region starts at this address (the layout may run past the top).
    At(u64),
    /// The last region ends exactly at the top of the address space.
    EndAtTop,
}

#[derive(Arbitrary, Debug, PartialEq)]
pub enum Op {
    /// A hint anywhere, with raw values (overflow, far outside RAM).
    RawHint { gpa: u64, len: u64 },
    /// A hint near a region, to land on its edges often.
    NearHint {
        region: u8,
        page: i16,
        jitter: u16,
        pages: u16,
        len_jitter: i16,
    },
    /// Writes, as a sync would report them.
    Mark { region: u8, page: u16, len: u32 },
    /// The sending side takes one page.
    Send { region: u8, page: u16 },
    /// Everything dirty again.
    MarkAll,
    /// A dirty-log sync: the same words for every region, with one bit per `page_size`
    /// bytes.
    Sync { page_size: u32, words: Vec<u64> },
}

#[derive(Arbitrary, Debug, PartialEq)]
pub struct Input {
    pub words: Vec<u64>,
    pub queries: Vec<(u16, u16)>,
    pub raw_queries: Vec<(usize, usize)>,
    pub placement: Placement,
    pub regions: Vec<Region>,
    pub ops: Vec<Op>,
}
