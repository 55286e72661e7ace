// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzzes bit counting and the migration bitmap.
//!
//! * `count_one_with_offset` and `checked_count_one_with_offset` over arbitrary words and
//!   `(offset, len)` pairs, against a bit-by-bit model; out-of-bounds pairs must give `None`.
//! * `MigrationBitmap` over an arbitrary region layout (holes, partial last pages, the top
//!   of the address space) driven by arbitrary hints (overflowing, unaligned, outside RAM),
//!   marks and sends. After every operation the dirty counter must equal the number of set
//!   bits, and the bitmap must equal a page-by-page model in which a hint clears exactly the
//!   whole 4 KiB pages it covers.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_balloon::bitmap::{checked_count_one_with_offset, count_one_with_offset};
use virtio_balloon::migration::MigrationBitmap;
use vm_memory::GuestAddress;

const PAGE: u64 = 4096;
const MAX_WORDS: usize = 64;
const MAX_REGIONS: usize = 6;
const MAX_REGION_PAGES: u64 = 512;
const MAX_OPS: usize = 64;

#[derive(Arbitrary, Debug)]
struct Region {
    /// Hole before the region, in pages.
    gap_pages: u16,
    /// Length in bytes (clamped to `MAX_REGION_PAGES` pages; zero is kept to test the
    /// error).
    len: u32,
}

#[derive(Arbitrary, Debug)]
enum Op {
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
    /// Writes seen by a sync.
    Mark { region: u8, page: u16, len: u32 },
    /// The sending side takes one page.
    Send { region: u8, page: u16 },
    /// Everything dirty again.
    MarkAll,
}

#[derive(Arbitrary, Debug)]
struct Input {
    words: Vec<u64>,
    queries: Vec<(u16, u16)>,
    /// High bits of the first region's start (the rest of the layout follows it).
    base: u64,
    regions: Vec<Region>,
    ops: Vec<Op>,
}

fn naive_count(map: &[u64], offset: usize, nbits: usize) -> usize {
    (offset..offset + nbits)
        .filter(|&i| (map[i / 64] >> (i % 64)) & 1 == 1)
        .count()
}

fn check_counts(words: &[u64], queries: &[(u16, u16)]) {
    let total = words.len() * 64;
    for &(offset, len) in queries {
        let (offset, len) = (usize::from(offset), usize::from(len));
        let checked = checked_count_one_with_offset(words, offset, len);
        if offset + len <= total {
            let expected = naive_count(words, offset, len);
            assert_eq!(checked, Some(expected), "offset {offset} len {len}");
            assert_eq!(count_one_with_offset(words, offset, len), expected);
        } else {
            assert_eq!(checked, None, "offset {offset} len {len} is out of bounds");
        }
    }
}

/// The model: every page of every region with its address and its length inside the region.
struct Model {
    regions: Vec<(u64, u64)>,
    pages: Vec<(u64, u64, bool)>,
}

impl Model {
    fn new(regions: Vec<(u64, u64)>) -> Self {
        let pages = regions
            .iter()
            .flat_map(|&(start, len)| {
                (0..len.div_ceil(PAGE))
                    .map(move |i| (start + i * PAGE, (len - i * PAGE).min(PAGE), false))
            })
            .collect();
        Model { regions, pages }
    }

    fn region(&self, index: u8) -> (u64, u64) {
        self.regions[usize::from(index) % self.regions.len()]
    }

    fn hint(&mut self, gpa: u64, len: u64) -> u64 {
        let Some(end) = gpa.checked_add(len) else {
            return 0;
        };
        let mut cleared = 0;
        for (addr, page_len, dirty) in self.pages.iter_mut() {
            if *dirty && *page_len == PAGE && *addr >= gpa && *addr + PAGE <= end {
                *dirty = false;
                cleared += 1;
            }
        }
        cleared
    }

    fn mark(&mut self, gpa: u64, len: u64) -> u64 {
        let end = gpa.saturating_add(len);
        let mut newly = 0;
        for (addr, page_len, dirty) in self.pages.iter_mut() {
            let touched = len > 0 && *addr < end && gpa < *addr + *page_len;
            if touched && !*dirty {
                *dirty = true;
                newly += 1;
            }
        }
        newly
    }

    fn send(&mut self, gpa: u64) -> bool {
        for (addr, page_len, dirty) in self.pages.iter_mut() {
            if *addr <= gpa && gpa < *addr + *page_len {
                return std::mem::replace(dirty, false);
            }
        }
        false
    }

    fn dirty(&self) -> u64 {
        self.pages.iter().filter(|p| p.2).count() as u64
    }
}

/// The regions the input describes, and whether they are valid. An invalid layout ends with
/// the offending region (empty, or running past the top of the address space).
fn layout(input: &Input) -> (Vec<(u64, u64)>, bool) {
    let mut at = input.base;
    let mut out = Vec::new();
    for region in input.regions.iter().take(MAX_REGIONS) {
        let Some(start) = at.checked_add(u64::from(region.gap_pages) * PAGE) else {
            break;
        };
        let len = u64::from(region.len) % (MAX_REGION_PAGES * PAGE + 1);
        out.push((start, len));
        if len == 0 || start.checked_add(len - 1).is_none() {
            return (out, false);
        }
        // The next region starts on the first page boundary after this one, if any.
        match start
            .checked_add(len)
            .and_then(|end| end.checked_next_multiple_of(PAGE))
        {
            Some(next) => at = next,
            None => break,
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
                let all = model.pages.len() as u64;
                let newly = all - model.dirty();
                model.pages.iter_mut().for_each(|p| p.2 = true);
                assert_eq!(bitmap.mark_all_dirty(), newly);
            }
        }
        // The counter always equals the number of set bits, and the bits equal the model.
        assert_eq!(bitmap.dirty_pages(), model.dirty());
        assert_eq!(bitmap.iter_dirty().count() as u64, model.dirty());
    }
    for &(addr, _, dirty) in &model.pages {
        assert_eq!(bitmap.is_dirty(GuestAddress(addr)), dirty, "page {addr:#x}");
    }
}

fuzz_target!(|input: Input| {
    let words: Vec<u64> = input.words.iter().copied().take(MAX_WORDS).collect();
    check_counts(&words, &input.queries);
    run_bitmap(&input);
});
