// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The snapshot writer beside its floor: a plain sequential write of the same bytes to the
//! same file system.
//!
//! Guest memory is 256 MiB of non-zero pages (every page is written; nothing is hinted or
//! zero, so both sides write the same 256 MiB).
//!
//! * `floor_sequential_write`: create a file in the same directory, `write_all` the guest's
//!   bytes in 1 MiB chunks, `sync_all`.
//! * `snapshot_stopped`: the whole stopped-mode snapshot through the public API: mark all
//!   dirty, sync vm-memory's write tracking, read every page, write it at its file offset,
//!   make the file durable and write the description.
//!
//! `scripts/bench_ratios.py` prints the snapshot's rate as a fraction of the floor's (the
//! issue's target: at least 0.8).

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap, PrecopyNotifierChain};
use virtio_balloon_precopy::snapshot::Snapshot;
use virtio_balloon_precopy::{VmControl, VmControlError};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 256 << 20;
const CHUNK: usize = 1 << 20;

struct Stopped;

impl VmControl for Stopped {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        Ok(())
    }
    fn resume_vm(&mut self) {}
}

fn bench(c: &mut Criterion) {
    // The target directory's file system: the one a user's snapshots would go to.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("snapshot-bench");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut chunk = vec![0u8; CHUNK];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13) | 1;
    }
    for off in (0..MEM).step_by(CHUNK) {
        mem.write_slice(&chunk, GuestAddress(off as u64)).unwrap();
    }

    let mut g = c.benchmark_group("snapshot_writer");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(MEM as u64));

    let floor_path = dir.join("plain");
    g.bench_function("floor_sequential_write", |b| {
        b.iter(|| {
            let _ = fs::remove_file(&floor_path);
            let mut f = File::create(&floor_path).unwrap();
            let mut buf = vec![0u8; CHUNK];
            for off in (0..MEM).step_by(CHUNK) {
                mem.read_slice(&mut buf, GuestAddress(off as u64)).unwrap();
                f.write_all(&buf).unwrap();
            }
            f.sync_all().unwrap();
        })
    });

    let snap_path = dir.join("snapshot");
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    g.bench_function("snapshot_stopped", |b| {
        b.iter(|| {
            let report = Snapshot::new(&mem, &bitmap, &chain)
                .overwrite(true)
                .write(
                    &mut GuestMemoryDirtyLog::new(&mem),
                    &mut Stopped,
                    &snap_path,
                )
                .unwrap();
            assert_eq!(report.file.data_pages, (MEM / 4096) as u64);
        })
    });
    g.finish();
    let _ = fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
