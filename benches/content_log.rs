// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The content-hash dirty log's sync beside a plain read of the same memory.
//!
//! Guest memory is 256 MiB in one region, every page written with non-zero bytes that differ
//! from page to page (so every page is really backed, none is the kernel's shared zero page).
//!
//! * `floor_read_pass`: one read pass over all of it, adding up its `u64` words (the least a
//!   log that looks at every byte must do).
//! * `sync`: [`MigrationBitmap::sync`] with a [`ContentDirtyLog`], which reads, copies and
//!   hashes every page and compares the hashes. Memory does not change between syncs, so no
//!   page is dirty: the time is the log's alone. The first sync (which allocates the hashes)
//!   runs before the clock starts.
//!
//! `scripts/bench_ratios.py` prints the sync's rate as a fraction of the floor's (target:
//! at least 0.5).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_balloon::migration::{ContentDirtyLog, MigrationBitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// 256 MiB of guest memory.
const MEM_SIZE: usize = 256 << 20;
const PAGE: usize = 4096;

/// Guest memory with every page written: word `i` of the memory holds a value derived from
/// `i`, never zero.
fn guest_memory() -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut page = [0u8; PAGE];
    for p in 0..MEM_SIZE / PAGE {
        for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
            let i = (p * PAGE / 8 + w) as u64;
            let v = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress((p * PAGE) as u64))
            .unwrap();
    }
    mem
}

/// Adds up every `u64` word of the memory.
fn read_pass(mem: &GuestMemoryMmap<()>) -> u64 {
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: `host` is the start of the region's mapping of MEM_SIZE bytes, which lives as
    // long as `mem` (borrowed for this call), is page aligned (so aligned for u64) and
    // initialized; nothing writes the memory during the benchmark, so a shared slice over it
    // aliases no write.
    let words = unsafe { std::slice::from_raw_parts(host.cast::<u64>(), MEM_SIZE / 8) };
    words.iter().fold(0u64, |acc, &w| acc.wrapping_add(w))
}

fn bench_content_log(c: &mut Criterion) {
    let mem = guest_memory();
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let mut log = ContentDirtyLog::new(&mem);
    let pages = (MEM_SIZE / PAGE) as u64;
    assert_eq!(bitmap.sync(&mut log).unwrap(), pages);

    let mut group = c.benchmark_group("content_log");
    group.throughput(Throughput::Bytes(MEM_SIZE as u64));
    group.sample_size(20);
    group.bench_function("floor_read_pass", |b| {
        b.iter(|| black_box(read_pass(black_box(&mem))))
    });
    group.bench_function("sync", |b| {
        b.iter(|| black_box(bitmap.sync(&mut log).unwrap()))
    });
    group.finish();

    // Memory never changed: only the first sync found pages, and every sync read it all.
    assert_eq!(bitmap.dirty_pages(), pages);
    assert_eq!(log.bytes_read(), log.pages_hashed() * PAGE as u64);
}

criterion_group!(benches, bench_content_log);
criterion_main!(benches);
