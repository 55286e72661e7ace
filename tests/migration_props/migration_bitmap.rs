// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Properties of `MigrationBitmap`: hint clearing against a page-by-page model, the dirty
//! counter under concurrency, and no lost data when hints race the sending side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;

use proptest::prelude::*;
use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CASES: u32 = 10_000;
const PAGE: u64 = 4096;

/// Regions as `(start, len)`: up to 4, each up to 64 pages plus a possibly partial page,
/// separated by holes. Either low in the address space, or placed so that the last region
/// ends exactly at the top of it (its last byte is `u64::MAX`).
fn layout() -> impl Strategy<Value = Vec<(u64, u64)>> {
    let region = (0u64..4, 1u64..64, prop_oneof![Just(0u64), 1u64..PAGE]);
    (prop::collection::vec(region, 1..=4), any::<bool>()).prop_map(|(regions, at_top)| {
        let mut relative = Vec::new();
        let mut at = 0u64;
        for (hole_pages, pages, extra) in regions {
            at += hole_pages * PAGE;
            let len = pages * PAGE + extra;
            relative.push((at, len));
            at = (at + len).div_ceil(PAGE) * PAGE;
        }
        let (last_start, last_len) = *relative.last().unwrap();
        let base = if at_top {
            // 2^64 - (last_start + last_len), computed without overflow.
            u64::MAX - (last_start + last_len) + 1
        } else {
            0x10_0000
        };
        relative.iter().map(|&(s, l)| (base + s, l)).collect()
    })
}

/// A hint range relative to the layout: any start, any length, including ones that run past
/// the top of the address space.
fn hint(base: u64) -> impl Strategy<Value = (u64, u64)> {
    let span = 300 * PAGE;
    (
        prop_oneof![
            (0u64..300).prop_map(move |p| base.saturating_add(p * PAGE)),
            (0..span).prop_map(move |o| base.saturating_add(o)),
            Just(u64::MAX - PAGE + 1),
        ],
        prop_oneof![
            (0u64..64).prop_map(|p| p * PAGE),
            0..span,
            Just(u64::MAX),
            Just(u64::MAX - 1),
        ],
    )
}

fn bitmap_for(layout: &[(u64, u64)]) -> MigrationBitmap {
    let ranges: Vec<(GuestAddress, u64)> =
        layout.iter().map(|&(s, l)| (GuestAddress(s), l)).collect();
    MigrationBitmap::from_ranges(&ranges).unwrap()
}

/// Every page of the layout as `(address, length of the page inside its region)`.
fn pages(layout: &[(u64, u64)]) -> Vec<(u64, u64)> {
    layout
        .iter()
        .flat_map(|&(start, len)| {
            (0..len.div_ceil(PAGE)).map(move |i| (start + i * PAGE, (len - i * PAGE).min(PAGE)))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn clear_free_range_matches_the_page_model(
        (layout, hints) in layout().prop_flat_map(|l| {
            let base = l[0].0;
            (Just(l), prop::collection::vec(hint(base), 1..6))
        }),
        initially_dirty in any::<bool>(),
    ) {
        let bitmap = bitmap_for(&layout);
        let all = pages(&layout);
        if initially_dirty {
            prop_assert_eq!(bitmap.mark_all_dirty(), all.len() as u64);
        } else {
            // Every other page dirty.
            for &(addr, _) in all.iter().step_by(2) {
                bitmap.mark_dirty(GuestAddress(addr), 1);
            }
        }
        let mut model: Vec<bool> = all.iter().map(|&(addr, _)| bitmap.is_dirty(GuestAddress(addr))).collect();
        for (gpa, len) in hints {
            let mut expected = 0;
            // In u128, the end of a range may be 2^64 (a range that ends at the top of the
            // address space) or more (a malformed range, which clears nothing).
            let end = u128::from(gpa) + u128::from(len);
            if end <= 1 << 64 {
                for (i, &(addr, page_len)) in all.iter().enumerate() {
                    // Only whole 4 KiB pages wholly inside the hint are cleared.
                    let page_end = u128::from(addr) + u128::from(PAGE);
                    if page_len == PAGE && addr >= gpa && page_end <= end && model[i] {
                        model[i] = false;
                        expected += 1;
                    }
                }
            }
            prop_assert_eq!(bitmap.clear_free_range(GuestAddress(gpa), len), expected);
        }
        for (i, &(addr, _)) in all.iter().enumerate() {
            prop_assert_eq!(bitmap.is_dirty(GuestAddress(addr)), model[i], "page {:#x}", addr);
        }
        let set = model.iter().filter(|&&d| d).count() as u64;
        prop_assert_eq!(bitmap.dirty_pages(), set);
        prop_assert_eq!(bitmap.iter_dirty().count() as u64, set);
    }

    #[test]
    fn counter_is_exact_after_concurrent_marks_hints_and_sends(
        layout in layout(),
        ops in prop::collection::vec((0u64..300, 1u64..8), 1..40),
    ) {
        let bitmap = bitmap_for(&layout);
        let base = layout[0].0;
        let at = |page: u64| GuestAddress(base.saturating_add(page * PAGE));
        let barrier = Barrier::new(3);
        std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                for &(page, n) in &ops {
                    bitmap.mark_dirty(at(page), n * PAGE);
                }
            });
            s.spawn(|| {
                barrier.wait();
                for &(page, n) in ops.iter().rev() {
                    bitmap.clear_free_range(at(page), n * PAGE);
                }
            });
            s.spawn(|| {
                barrier.wait();
                for &(page, _) in &ops {
                    bitmap.test_and_clear(at(page));
                }
            });
        });
        prop_assert_eq!(bitmap.dirty_pages(), bitmap.iter_dirty().count() as u64);
    }
}

/// The guest frees pages, hints them, and reuses them (writes new data), while the migration
/// thread keeps syncing and sending. Hints only trim the bitmap being sent, never the write
/// log, so every write after a hint is sent by a later pass: after the final sync and pass
/// the destination equals the source, page by page.
#[test]
fn hints_racing_sync_and_send_lose_no_write() {
    const PAGES: u64 = 512;
    const SEEDS: u64 = 20;
    for seed in 0..SEEDS {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), (PAGES / 2 * PAGE) as usize),
            (GuestAddress(1 << 32), (PAGES / 2 * PAGE) as usize),
        ])
        .unwrap();
        let page_addr = |i: u64| {
            if i < PAGES / 2 {
                i * PAGE
            } else {
                (1 << 32) + (i - PAGES / 2) * PAGE
            }
        };
        let to_send = MigrationBitmap::new(&mem).unwrap();
        let mut dest = vec![0u8; (PAGES * PAGE) as usize];
        let dest_index = |addr: u64| -> usize {
            if addr < 1 << 32 {
                addr as usize
            } else {
                (addr - (1 << 32) + PAGES / 2 * PAGE) as usize
            }
        };
        to_send.mark_all_dirty();
        let guest_done = AtomicBool::new(false);
        let barrier = Barrier::new(2);

        // The pass the migration thread runs: send every dirty page as it is now.
        let send_pass = |dest: &mut Vec<u8>| {
            let dirty: Vec<GuestAddress> = to_send.iter_dirty().collect();
            for page in dirty {
                if to_send.test_and_clear(page) {
                    let at = dest_index(page.0);
                    mem.read_slice(&mut dest[at..at + PAGE as usize], page)
                        .unwrap();
                }
            }
        };

        let (to_send, mem, barrier, guest_done) = (&to_send, &mem, &barrier, &guest_done);
        let dest_ref = &mut dest;
        std::thread::scope(|s| {
            s.spawn(move || {
                barrier.wait();
                // A simple deterministic generator per seed.
                let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for round in 0..2000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = page_addr(x % PAGES);
                    // The page is free: the guest hints it...
                    to_send.clear_free_range(GuestAddress(page), PAGE);
                    // ...and later allocates it again and writes new contents.
                    let value = (round as u8).wrapping_add(seed as u8) | 1;
                    mem.write_slice(&[value; PAGE as usize], GuestAddress(page))
                        .unwrap();
                }
                guest_done.store(true, Ordering::Release);
            });
            s.spawn(move || {
                barrier.wait();
                let mut log = GuestMemoryDirtyLog::new(mem);
                // Bounded: the guest does 2000 writes; stop early once it is done.
                for _ in 0..10_000 {
                    send_pass(dest_ref);
                    to_send.sync(&mut log).unwrap();
                    if guest_done.load(Ordering::Acquire) {
                        break;
                    }
                }
            });
        });
        // Stop-and-copy: the guest is stopped; final sync and pass.
        to_send.sync(&mut GuestMemoryDirtyLog::new(mem)).unwrap();
        send_pass(&mut dest);
        assert_eq!(to_send.dirty_pages(), 0);
        for i in 0..PAGES {
            let addr = page_addr(i);
            let mut src = [0u8; PAGE as usize];
            mem.read_slice(&mut src, GuestAddress(addr)).unwrap();
            let at = dest_index(addr);
            assert_eq!(
                &dest[at..at + PAGE as usize],
                &src[..],
                "seed {seed}: page {addr:#x} differs on the destination"
            );
        }
    }
}
