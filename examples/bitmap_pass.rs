// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One precopy pass over a guest's memory, with and without free page hints, through the
//! real `MigrationBitmap` and vm-memory's write tracking; then the guest reuses some hinted
//! pages and the next sync brings exactly those back.
//!
//! There is no guest driver or device yet (they come with the device milestone): the hints
//! are the 4 MiB blocks that a guest which freed three quarters of its memory would post.
//!
//! ```sh
//! cargo run --release --example bitmap_pass            # 1024 MiB guest
//! cargo run --release --example bitmap_pass -- 4096    # guest size in MiB
//! ```

use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap};
use virtio_balloon::sink::FreePageSink;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The Linux driver hints free memory in blocks of this size (order 10 on x86).
const BLOCK: u64 = 4 * MIB;

/// Sends every dirty page (reads it, as a real sender would) and returns how many it sent.
fn send_pass(mem: &GuestMemoryMmap<AtomicBitmap>, to_send: &MigrationBitmap) -> u64 {
    let mut page = [0u8; PAGE as usize];
    let mut sent = 0;
    for addr in to_send.iter_dirty() {
        if to_send.test_and_clear(addr) {
            mem.read_slice(&mut page, addr)
                .expect("dirty page outside RAM");
            sent += 1;
        }
    }
    sent
}

fn main() {
    let size_mib: u64 = match std::env::args().nth(1) {
        None => 1024,
        Some(arg) => match arg.parse() {
            Ok(n) if n >= 16 && n % 8 == 0 => n,
            _ => {
                eprintln!("usage: bitmap_pass [GUEST_MIB], a multiple of 8, at least 16");
                std::process::exit(2);
            }
        },
    };
    // Like an x86 guest: low memory, a hole below 4 GiB, the rest above.
    let low = size_mib * MIB * 3 / 4;
    let high = size_mib * MIB - low;
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), low as usize),
        (GuestAddress(4 << 30), high as usize),
    ])
    .expect("cannot map guest memory");
    let to_send = MigrationBitmap::new(&mem).expect("bad memory layout");
    let mut log = GuestMemoryDirtyLog::new(&mem);

    // The free 4 MiB blocks: three of every four.
    let free_blocks: Vec<GuestAddress> = [(0, low), (4 << 30, high)]
        .iter()
        .flat_map(|&(start, len)| (0..len / BLOCK).map(move |b| GuestAddress(start + b * BLOCK)))
        .enumerate()
        .filter(|(i, _)| i % 4 != 0)
        .map(|(_, gpa)| gpa)
        .collect();

    println!(
        "guest: {size_mib} MiB in 2 regions, {} free 4 MiB blocks hinted",
        free_blocks.len()
    );
    println!("{:<28} {:>12} {:>12}", "pass", "pages sent", "MiB sent");

    to_send.mark_all_dirty();
    let sent = send_pass(&mem, &to_send);
    report("first pass, no hints", sent);

    to_send.mark_all_dirty();
    for &gpa in &free_blocks {
        // What the device does with each accepted hint.
        to_send.free_page_hint(2, gpa, BLOCK);
    }
    let sent = send_pass(&mem, &to_send);
    report("first pass, with hints", sent);

    // The guest reuses one page in each of (up to) 100 hinted blocks after the hints:
    // the write log has them, so the next sync makes them dirty again.
    let reused = free_blocks.len().min(100) as u64;
    for gpa in free_blocks.iter().take(reused as usize) {
        mem.write_obj(0x5au8, *gpa).expect("write outside RAM");
    }
    let back = to_send.sync(&mut log).expect("sync failed");
    let sent = send_pass(&mem, &to_send);
    report("second pass (after sync)", sent);
    assert_eq!(back, reused, "every reused page comes back");
    assert_eq!(sent, reused);
    println!(
        "pages skipped thanks to hints: {} ({} MiB)",
        to_send.hinted_pages(),
        to_send.hinted_pages() * PAGE / MIB
    );
}

fn report(name: &str, pages: u64) {
    println!("{name:<28} {pages:>12} {:>12}", pages * PAGE / MIB);
}
