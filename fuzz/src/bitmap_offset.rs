// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzzes bit counting and the migration bitmap.
//!
//! * `count_one`, `count_one_with_offset` and `checked_count_one_with_offset` over arbitrary
//!   words and `(offset, len)` pairs (small ones, and raw `usize` ones that overflow),
//!   against a bit-by-bit model; out-of-bounds pairs must give `None`.
//! * `MigrationBitmap` over an arbitrary region layout (holes, partial last pages, unaligned
//!   starts, layouts that end exactly at the top of the address space or run past it) driven
//!   by arbitrary hints (overflowing, unaligned, outside RAM, near region edges), marks,
//!   sends and dirty-log syncs of any page size. After every operation the dirty counter and
//!   the set of dirty pages must equal a page-by-page model in which a hint clears exactly
//!   the whole 4 KiB pages it covers.

use crate::input::bitmap_offset::*;
use virtio_balloon::migration::{checked_count_one_with_offset, count_one, count_one_with_offset};
use virtio_balloon::migration::{
    DirtyLog, DirtyLogError, HarvestedLog, MigrationBitmap, RegionInfo,
};
use vm_memory::GuestAddress;

const PAGE: u64 = 4096;
const TOP: u128 = 1 << 64;
const MAX_WORDS: usize = 64;
const MAX_REGIONS: usize = 6;
const MAX_REGION_PAGES: u64 = 512;
const MAX_OPS: usize = 64;
const MAX_LOG_WORDS: usize = 16;

fn naive_count(map: &[u64], offset: usize, nbits: usize) -> usize {
    (offset..offset + nbits)
        .filter(|&i| (map[i / 64] >> (i % 64)) & 1 == 1)
        .count()
}

fn check_counts(words: &[u64], queries: &[(u16, u16)], raw_queries: &[(usize, usize)]) {
    let total = words.len() * 64;
    let small = queries
        .iter()
        .map(|&(o, l)| (usize::from(o), usize::from(l)));
    for (offset, len) in small.chain(raw_queries.iter().copied()) {
        let checked = checked_count_one_with_offset(words, offset, len);
        match offset.checked_add(len) {
            Some(end) if end <= total => {
                let expected = naive_count(words, offset, len);
                assert_eq!(checked, Some(expected), "offset {offset} len {len}");
                assert_eq!(count_one_with_offset(words, offset, len), expected);
                if offset == 0 {
                    assert_eq!(count_one(words, len), expected);
                }
            }
            _ => assert_eq!(checked, None, "offset {offset} len {len} is out of bounds"),
        }
    }
}

/// One 4 KiB page of the model. Addresses are `u128` so that a page ending at the top of the
/// address space (at 2^64) needs no special case.
struct Page {
    addr: u128,
    /// Bytes of the page inside its region (less than 4 KiB for a partial last page).
    len: u128,
    /// Index of the page in its region.
    index: u128,
    region: usize,
    dirty: bool,
}

/// The page-by-page model of the migration bitmap.
struct Model {
    regions: Vec<(u64, u64)>,
    pages: Vec<Page>,
}

impl Model {
    fn new(regions: Vec<(u64, u64)>) -> Self {
        let mut pages = Vec::new();
        for (r, &(start, len)) in regions.iter().enumerate() {
            for i in 0..len.div_ceil(PAGE) {
                pages.push(Page {
                    addr: u128::from(start) + u128::from(i * PAGE),
                    len: u128::from((len - i * PAGE).min(PAGE)),
                    index: u128::from(i),
                    region: r,
                    dirty: false,
                });
            }
        }
        Model { regions, pages }
    }

    fn region(&self, index: u8) -> (u64, u64) {
        self.regions[usize::from(index) % self.regions.len()]
    }

    fn hint(&mut self, gpa: u64, len: u64) -> u64 {
        let (gpa, end) = (u128::from(gpa), u128::from(gpa) + u128::from(len));
        if end > TOP {
            return 0;
        }
        let mut cleared = 0;
        for page in self.pages.iter_mut() {
            let whole = page.len == u128::from(PAGE);
            if page.dirty && whole && page.addr >= gpa && page.addr + page.len <= end {
                page.dirty = false;
                cleared += 1;
            }
        }
        cleared
    }

    fn mark(&mut self, gpa: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let (gpa, end) = (
            u128::from(gpa),
            (u128::from(gpa) + u128::from(len)).min(TOP),
        );
        let mut newly = 0;
        for page in self.pages.iter_mut() {
            if page.addr < end && gpa < page.addr + page.len && !page.dirty {
                page.dirty = true;
                newly += 1;
            }
        }
        newly
    }

    fn send(&mut self, gpa: u64) -> bool {
        let gpa = u128::from(gpa);
        self.pages
            .iter_mut()
            .find(|p| p.addr <= gpa && gpa < p.addr + p.len)
            .is_some_and(|p| std::mem::replace(&mut p.dirty, false))
    }

    /// A log with `page_size`-byte bits: bit `b` makes dirty every page whose region-relative
    /// bytes `[4096 * index, 4096 * (index + 1))` meet `[b * ps, (b + 1) * ps)`.
    fn sync(&mut self, page_size: u64, words: &[u64]) -> u64 {
        let ps = u128::from(page_size);
        let nbits = (words.len() * 64) as u128;
        let bit_set = |b: u128| (words[(b / 64) as usize] >> (b % 64)) & 1 == 1;
        let mut newly = 0;
        for page in self.pages.iter_mut() {
            let (lo, hi) = (page.index * 4096, (page.index + 1) * 4096);
            // The bits whose bytes [b * ps, (b + 1) * ps) meet [lo, hi).
            let hit = (lo / ps..hi.div_ceil(ps).min(nbits)).any(bit_set);
            if hit && !page.dirty {
                page.dirty = true;
                newly += 1;
            }
        }
        newly
    }

    fn dirty_pages(&self) -> Vec<u64> {
        self.pages
            .iter()
            .filter(|p| p.dirty)
            .map(|p| p.addr as u64)
            .collect()
    }
}

/// Hands the same words to every region.
struct FixedLog<'a> {
    page_size: u64,
    words: &'a [u64],
}

impl DirtyLog for FixedLog<'_> {
    fn take_dirty_log(&mut self, _region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        Ok(HarvestedLog {
            page_size: self.page_size,
            words: self.words.to_vec(),
        })
    }
}

/// The regions the input describes, and whether they are valid. An invalid layout ends with
/// the offending region (empty, or running past the top of the address space).
fn layout(input: &Input) -> (Vec<(u64, u64)>, bool) {
    // Offsets from the first region's start, in u128 so nothing overflows here.
    let mut relative = Vec::new();
    let mut at = 0u128;
    for region in input.regions.iter().take(MAX_REGIONS) {
        at += u128::from(region.gap_pages) * u128::from(PAGE);
        let len = u64::from(region.len) % (MAX_REGION_PAGES * PAGE + 1);
        relative.push((at, len));
        at = (at + u128::from(len)).next_multiple_of(u128::from(PAGE));
    }
    let base = match (&input.placement, relative.last()) {
        (Placement::At(base), _) => u128::from(*base),
        (Placement::EndAtTop, Some(&(start, len))) => TOP.saturating_sub(start + u128::from(len)),
        (Placement::EndAtTop, None) => 0,
    };
    let mut out = Vec::new();
    for (offset, len) in relative {
        let Ok(start) = u64::try_from(base + offset) else {
            // The layout runs off the top: it ends with the regions so far.
            break;
        };
        out.push((start, len));
        if len == 0 || u128::from(start) + u128::from(len) > TOP {
            return (out, false);
        }
    }
    (out, true)
}

fn run_bitmap(input: &Input) {
    let (layout, valid) = layout(input);
    let ranges: Vec<(GuestAddress, u64)> =
        layout.iter().map(|&(s, l)| (GuestAddress(s), l)).collect();
    if !valid {
        assert!(MigrationBitmap::from_ranges(&ranges).is_err());
        return;
    }
    if layout.is_empty() {
        return;
    }
    let bitmap = MigrationBitmap::from_ranges(&ranges).expect("valid layout rejected");
    let mut model = Model::new(layout);
    for op in input.ops.iter().take(MAX_OPS) {
        match *op {
            Op::RawHint { gpa, len } => {
                assert_eq!(
                    bitmap.clear_free_range(GuestAddress(gpa), len),
                    model.hint(gpa, len)
                );
            }
            Op::NearHint {
                region,
                page,
                jitter,
                pages,
                len_jitter,
            } => {
                let (start, _) = model.region(region);
                let gpa = start
                    .wrapping_add_signed(i64::from(page) * PAGE as i64)
                    .wrapping_add(u64::from(jitter % 4096));
                let len = (u64::from(pages) * PAGE).wrapping_add_signed(i64::from(len_jitter));
                assert_eq!(
                    bitmap.clear_free_range(GuestAddress(gpa), len),
                    model.hint(gpa, len)
                );
            }
            Op::Mark { region, page, len } => {
                let (start, _) = model.region(region);
                let gpa = start.saturating_add(u64::from(page) * PAGE);
                let len = u64::from(len);
                assert_eq!(
                    bitmap.mark_dirty(GuestAddress(gpa), len),
                    model.mark(gpa, len)
                );
            }
            Op::Send { region, page } => {
                let (start, _) = model.region(region);
                let gpa = start.saturating_add(u64::from(page) * PAGE);
                assert_eq!(bitmap.test_and_clear(GuestAddress(gpa)), model.send(gpa));
            }
            Op::MarkAll => {
                let newly = model.pages.iter().filter(|p| !p.dirty).count() as u64;
                model.pages.iter_mut().for_each(|p| p.dirty = true);
                assert_eq!(bitmap.mark_all_dirty(), newly);
            }
            Op::Sync {
                page_size,
                ref words,
            } => {
                let words = &words[..words.len().min(MAX_LOG_WORDS)];
                let page_size = u64::from(page_size);
                let mut log = FixedLog { page_size, words };
                let result = bitmap.sync(&mut log);
                if page_size == 0 {
                    // The first region's words cannot be placed: the sync marks that whole
                    // region dirty and stops with an error, leaving the other logs alone.
                    assert!(result.is_err());
                    model
                        .pages
                        .iter_mut()
                        .filter(|p| p.region == 0)
                        .for_each(|p| p.dirty = true);
                } else {
                    // Each region gets the same words; the model counts per page.
                    assert_eq!(result.unwrap(), model.sync(page_size, words));
                }
            }
        }
        let expected = model.dirty_pages();
        assert_eq!(bitmap.dirty_pages(), expected.len() as u64);
        let actual: Vec<u64> = bitmap.iter_dirty().map(|a| a.0).collect();
        assert_eq!(actual, expected);
    }
}

/// Runs one input.
pub fn run(input: &Input) {
    let words: Vec<u64> = input.words.iter().copied().take(MAX_WORDS).collect();
    check_counts(&words, &input.queries, &input.raw_queries);
    run_bitmap(input);
}
