// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Bitmap benchmarks over the dirty bitmap of 1 TiB of guest memory (2^28 pages of 4 KiB,
//! 32 MiB of bitmap words).
//!
//! Each operation is measured beside its floor, in the same run and over the same words:
//!
//! * `count/*`: `count_one_with_offset` (and `count_one`) against a plain popcount of every
//!   word.
//! * `clear/*`: `DirtyBitmap::clear_range` against a plain store of zeros into every word,
//!   both on a full bitmap (every word changes) and on a clean one (nothing to clear). The
//!   bitmap is refilled outside the timed part.
//! * `hint_clear/*`: the shape of real hints, 4 MiB blocks (1024 bits) cleared one by one
//!   across the whole bitmap through `MigrationBitmap::clear_free_range`, against storing
//!   zeros into the same 16 words per block.
//!
//! `scripts/bench_ratios.py` prints each operation's time divided by its floor's.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use virtio_balloon::migration::MigrationBitmap;
use virtio_balloon::migration::{count_one, count_one_with_offset, DirtyBitmap};
use vm_memory::GuestAddress;

/// 1 TiB of guest memory in 4 KiB pages.
const NBITS: usize = 1 << 28;
const NWORDS: usize = NBITS / 64;
/// Bits per 4 MiB hint block.
const BLOCK_BITS: usize = 1024;

/// Words with a realistic mix: half the pages dirty, in runs and scattered.
fn sample_words() -> Vec<u64> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..NWORDS)
        .map(|i| match i % 4 {
            0 => u64::MAX,
            1 => 0,
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            }
        })
        .collect()
}

fn bench_count(c: &mut Criterion) {
    let words = sample_words();
    let mut group = c.benchmark_group("count");
    group.throughput(Throughput::Bytes((NWORDS * 8) as u64));
    group.sample_size(30);
    group.bench_function("floor_popcount", |b| {
        b.iter(|| {
            black_box(&words)
                .iter()
                .map(|w| w.count_ones() as usize)
                .sum::<usize>()
        })
    });
    group.bench_function("count_one_with_offset", |b| {
        // Unaligned at both ends: a masked head word, whole words, a masked tail word.
        b.iter(|| count_one_with_offset(black_box(&words), 1, NBITS - 2))
    });
    group.bench_function("count_one", |b| {
        b.iter(|| count_one(black_box(&words), NBITS))
    });
    group.finish();
}

/// Times `op` alone, running `refill` before each call outside the timed part.
fn timed_after_refill(
    iters: u64,
    mut refill: impl FnMut(),
    mut op: impl FnMut() -> usize,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        refill();
        let start = Instant::now();
        black_box(op());
        total += start.elapsed();
    }
    total
}

/// The floor of a clear: refill every word (untimed), then store zeros into them,
/// `chunk_words` words per call, as one clear of that size would.
fn bench_floor_store_zeros(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    chunk_words: usize,
) {
    let words: Vec<AtomicU64> = (0..NWORDS).map(|_| AtomicU64::new(u64::MAX)).collect();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            timed_after_refill(
                iters,
                || {
                    words
                        .iter()
                        .for_each(|w| w.store(u64::MAX, Ordering::Relaxed))
                },
                || {
                    for chunk in black_box(&words).chunks(chunk_words) {
                        for w in chunk {
                            w.store(0, Ordering::Relaxed);
                        }
                    }
                    words.len()
                },
            )
        })
    });
}

fn bench_clear(c: &mut Criterion) {
    let bitmap = DirtyBitmap::new(NBITS);
    let mut group = c.benchmark_group("clear");
    group.throughput(Throughput::Bytes((NWORDS * 8) as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    bench_floor_store_zeros(&mut group, "floor_store_zeros", NWORDS);
    group.bench_function("clear_range_full", |b| {
        b.iter_custom(|iters| {
            timed_after_refill(
                iters,
                || {
                    bitmap.set_all();
                },
                || bitmap.clear_range(black_box(0), NBITS),
            )
        })
    });
    group.bench_function("clear_range_clean", |b| {
        bitmap.clear_all();
        b.iter(|| bitmap.clear_range(black_box(0), NBITS))
    });
    group.finish();
}

fn bench_hint_clear(c: &mut Criterion) {
    let len = (NBITS as u64) << 12;
    let bitmap = MigrationBitmap::from_ranges(&[(GuestAddress(0), len)]).unwrap();
    let mut group = c.benchmark_group("hint_clear");
    group.throughput(Throughput::Elements((NBITS / BLOCK_BITS) as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    bench_floor_store_zeros(&mut group, "floor_store_zeros_per_block", BLOCK_BITS / 64);
    group.bench_function("clear_free_range_per_block", |b| {
        b.iter_custom(|iters| {
            timed_after_refill(
                iters,
                || {
                    bitmap.mark_all_dirty();
                },
                || {
                    let mut cleared = 0;
                    for block in 0..(NBITS / BLOCK_BITS) as u64 {
                        let gpa = GuestAddress((block * BLOCK_BITS as u64) << 12);
                        cleared += bitmap.clear_free_range(black_box(gpa), 4 << 20);
                    }
                    cleared as usize
                },
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_count, bench_clear, bench_hint_clear);
criterion_main!(benches);
