// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Tests of the guest model for precopy migration (`guest_model::guest`): layout, page
//! contents, the writer and its shrinker path, and stopping the VM.

use std::collections::BTreeSet;
use std::time::Duration;

use guest_model::*;
use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap};
use virtio_balloon_precopy::VmControl;
use vm_memory::{Bytes, GuestAddress};

/// Whether every byte of `[gpa, gpa + len)` is zero.
fn all_zero(guest: &Guest, gpa: GuestAddress, len: u64) -> bool {
    let mut buf = vec![0u8; len as usize];
    guest
        .mem()
        .read_slice(&mut buf, gpa)
        .expect("read guest RAM");
    buf.iter().all(|&b| b == 0)
}

/// Harvests (and resets) vm-memory's dirty log into a fresh bitmap.
fn harvest(guest: &Guest) -> MigrationBitmap {
    let bitmap = MigrationBitmap::new(&**guest.mem()).expect("bitmap");
    bitmap
        .sync(&mut GuestMemoryDirtyLog::new(guest.mem()))
        .expect("sync the dirty log");
    bitmap
}

fn wait(what: &str, cond: impl FnMut() -> bool) {
    wait_until(what, cond).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn layout_and_allocated_ranges() {
    // 10 MiB used rounds up to 12 MiB: allocated is [0, 16 MiB).
    let guest = Guest::boot(&GuestSpec::new(64 * MIB, 10 * MIB, 0));
    assert_eq!(guest.used_range(), (GuestAddress(4 * MIB), 12 * MIB));
    assert_eq!(guest.allocated(), vec![(GuestAddress(0), 16 * MIB)]);
    assert_eq!(guest.used_bytes(), 16 * MIB);
    assert_eq!(
        guest.driver().free_blocks(),
        blocks(GuestAddress(16 * MIB), 12)
    );
    assert!(guest.dirtied_freed_blocks().is_empty());
    assert!(guest.driver().is_background());
    assert!(guest.hints().negotiated());

    // Low memory and the used blocks hold their first generation; the driver area and the
    // free memory were not written by the model.
    for gpa in [0, MIB - PAGE_BYTES, 4 * MIB, 16 * MIB - PAGE_BYTES] {
        let gpa = GuestAddress(gpa);
        assert_eq!(guest.page_generation(gpa), 1, "{gpa:?}");
        let mut got = [0u8; 4096];
        guest.mem().read_slice(&mut got, gpa).unwrap();
        assert_eq!(got[..], guest.expected_page(gpa).unwrap()[..], "{gpa:?}");
    }
    assert_eq!(guest.page_generation(GuestAddress(2 * MIB)), 0);
    assert!(guest.expected_page(GuestAddress(2 * MIB)).is_none());
    assert!(all_zero(&guest, GuestAddress(16 * MIB), 48 * MIB));
    assert!(guest.stale_pages(&**guest.mem()).is_empty());
    guest.harness.assert_clean();
}

#[test]
fn page_contents_are_never_zero_and_tell_versions_apart() {
    let a = page_contents(7, GuestAddress(0x5000), 1);
    assert!(a.chunks_exact(8).all(|w| w != [0u8; 8]));
    let b = page_contents(7, GuestAddress(0x5000), 2);
    // Every 64-byte line tells the versions apart.
    assert!(a
        .chunks_exact(64)
        .zip(b.chunks_exact(64))
        .all(|(x, y)| x != y));
    assert_ne!(a[..], page_contents(7, GuestAddress(0x6000), 1)[..]);
    assert_ne!(a[..], page_contents(8, GuestAddress(0x5000), 1)[..]);
    assert_eq!(a[..], page_contents(7, GuestAddress(0x5000), 1)[..]);
    assert_eq!(
        merge_ranges(vec![
            (GuestAddress(0x3000), 0x1000),
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x3800), 0x2000),
            (GuestAddress(0x9000), 0),
        ]),
        vec![(GuestAddress(0), 0x2000), (GuestAddress(0x3000), 0x2800)]
    );
}

#[test]
fn dirtied_freed_blocks_hold_data_and_are_free() {
    let guest = Guest::boot(&GuestSpec::new(64 * MIB, 8 * MIB, 10 * MIB));
    // 10 MiB rounds up to the 3 lowest free blocks.
    let dirty = blocks(GuestAddress(12 * MIB), 3);
    assert_eq!(guest.dirtied_freed_blocks(), &dirty[..]);
    let free: BTreeSet<GuestAddress> = guest.driver().free_blocks().into_iter().collect();
    for &b in &dirty {
        assert!(free.contains(&b), "{b:?} is not free");
        for off in [0, HINT_BLOCK_BYTES / 2, HINT_BLOCK_BYTES - PAGE_BYTES] {
            let gpa = GuestAddress(b.0 + off);
            assert_eq!(guest.page_generation(gpa), 1);
            assert!(!all_zero(&guest, gpa, PAGE_BYTES), "{gpa:?} is zero");
        }
    }
    // Not allocated: the guest does not care what they hold.
    assert_eq!(guest.allocated(), vec![(GuestAddress(0), 12 * MIB)]);
    assert!(all_zero(&guest, GuestAddress(24 * MIB), 40 * MIB));

    // More than is free is clamped to every free block.
    let guest = Guest::boot(&GuestSpec::new(32 * MIB, 4 * MIB, 1 << 30));
    assert_eq!(
        guest.dirtied_freed_blocks(),
        &blocks(GuestAddress(8 * MIB), 6)[..]
    );
    assert_eq!(guest.driver().free_blocks().len(), 6);
}

#[test]
fn baseline_guest_does_not_negotiate_hinting() {
    let mut spec = GuestSpec::new(32 * MIB, 4 * MIB, 0);
    spec.hinting = false;
    let guest = Guest::boot(&spec);
    assert!(!guest.hints().negotiated());
    assert_eq!(guest.driver().free_blocks().len(), 6);
    guest.harness.assert_clean();
}

#[test]
fn writer_blocks_are_allocated_and_not_free() {
    let guest = Guest::boot(&GuestSpec::new(64 * MIB, 8 * MIB, 16 * MIB));
    let mut w = WriterSpec::new(0, 8 * MIB);
    w.used_share = 20;
    guest.start_writer(w);
    wait("the writer to free blocks", || {
        guest.writer_stats().blocks_freed >= 3
    });
    let mut vm = guest.vm_control();
    vm.stop_vm().expect("stop the guest");
    assert!(guest.writer_parked());

    let mine = guest.writer_blocks();
    assert_eq!(mine.len(), 2, "working set of 8 MiB: {mine:?}");
    // The older block counts whole; of the newest, only the pages written so far (the rest
    // still hold what the free block held).
    let allocated = guest.allocated();
    let written = (1..=HINT_BLOCK_BYTES / PAGE_BYTES)
        .map(|pages| pages * PAGE_BYTES)
        .find(|&len| {
            let expect = vec![
                (GuestAddress(0), 12 * MIB),
                (mine[0], HINT_BLOCK_BYTES),
                (mine[1], len),
            ];
            allocated == merge_ranges(expect)
        })
        .unwrap_or_else(|| panic!("allocated {allocated:x?}, writer blocks {mine:?}"));
    assert_eq!(guest.used_bytes(), 16 * MIB + written);
    let free: BTreeSet<GuestAddress> = guest.driver().free_blocks().into_iter().collect();
    for b in &mine {
        assert!(!free.contains(b), "{b:?} is both the writer's and free");
        assert!(b.0 >= 12 * MIB, "{b:?} is not a block of the allocator");
    }
    // Every block is accounted for: the writer's plus the free ones.
    assert_eq!(free.len() + mine.len(), 13);
    let stats = guest.writer_stats();
    assert_eq!(stats.blocks_allocated - stats.blocks_freed, 2);
    // What the model wrote is in memory.
    assert!(guest.stale_pages(&**guest.mem()).is_empty());

    vm.resume_vm();
    let before = guest.writer_stats().pages_written;
    wait("writes after resume", || {
        guest.writer_stats().pages_written > before
    });
    let stats = guest.stop_writer();
    assert!(stats.pages_written > before);
    // Stopping the writer keeps its blocks allocated.
    assert_eq!(guest.writer_blocks().len(), 2);
    guest.harness.assert_clean();
}

#[test]
fn writer_allocates_through_the_shrinker_during_a_round() {
    let guest = Guest::boot(&GuestSpec::new(64 * MIB, 8 * MIB, 16 * MIB));
    // 32 MiB/s: a new block every 1/8 s or so.
    let mut w = WriterSpec::new(32 * MIB, 8 * MIB);
    w.used_share = 0;
    guest.start_writer(w);
    let hints = guest.hints();
    hints.start_round();
    wait("the driver to hold hint blocks", || {
        !guest.driver().held_blocks().is_empty()
    });
    wait("a block through the shrinker", || {
        guest.writer_stats().blocks_from_shrinker > 0
    });

    let mut vm = guest.vm_control();
    vm.stop_vm().expect("stop the guest");
    let mine: BTreeSet<GuestAddress> = guest.writer_blocks().into_iter().collect();
    let held: BTreeSet<GuestAddress> = guest.driver().held_blocks().into_iter().collect();
    let free: BTreeSet<GuestAddress> = guest.driver().free_blocks().into_iter().collect();
    assert!(mine.is_disjoint(&held), "writer {mine:?} held {held:?}");
    assert!(mine.is_disjoint(&free), "writer {mine:?} free {free:?}");
    assert!(held.is_disjoint(&free), "held {held:?} free {free:?}");
    assert_eq!(mine.len() + held.len() + free.len(), 13);
    assert!(guest.stale_pages(&**guest.mem()).is_empty());
    vm.resume_vm();

    // DONE gives the held blocks back.
    hints.done();
    wait("the held blocks to come back", || {
        guest.driver().held_blocks().is_empty()
    });
    let stats = guest.stop_writer();
    assert!(stats.blocks_from_shrinker > 0);
    assert!(stats.blocks_from_shrinker <= stats.blocks_allocated);
    guest.harness.assert_clean();
}

#[test]
fn stop_vm_parks_the_writer_and_resume_restarts_it() {
    let guest = Guest::boot(&GuestSpec::new(64 * MIB, 8 * MIB, 0));
    guest.start_writer(WriterSpec::new(0, 8 * MIB));
    wait("writes", || guest.writer_stats().pages_written > 100);

    let mut vm = guest.vm_control();
    vm.stop_vm().expect("stop the guest");
    assert!(guest.is_stopped());
    // Take what was written before the stop, then nothing more may come.
    harvest(&guest);
    let written = guest.writer_stats().pages_written;
    std::thread::sleep(Duration::from_millis(50));
    let after = harvest(&guest);
    assert_eq!(
        after.dirty_pages(),
        0,
        "written while stopped: {:?}",
        after.iter_dirty().take(8).collect::<Vec<_>>()
    );
    assert_eq!(guest.writer_stats().pages_written, written);
    assert!(guest.writer_parked());

    vm.resume_vm();
    assert!(!guest.is_stopped());
    wait("writes after resume", || {
        guest.writer_stats().pages_written > written
    });
    vm.stop_vm().expect("stop the guest again");
    assert!(harvest(&guest).dirty_pages() > 0);
    // The writer can be stopped while the VM is.
    guest.stop_writer();
    vm.resume_vm();
    guest.harness.assert_clean();
}

#[test]
fn dirty_log_marks_every_page_the_writer_wrote() {
    let guest = Guest::boot(&GuestSpec::new(128 * MIB, 16 * MIB, 32 * MIB));
    let mut w = WriterSpec::new(0, 12 * MIB);
    w.used_share = 25;
    guest.start_writer(w);
    let mut vm = guest.vm_control();
    vm.stop_vm().expect("stop the guest");
    harvest(&guest);
    let pages: Vec<GuestAddress> = (0..128 * MIB)
        .step_by(PAGE_BYTES as usize)
        .map(GuestAddress)
        .collect();
    let before: Vec<u32> = pages.iter().map(|&p| guest.page_generation(p)).collect();
    let written = guest.writer_stats().pages_written;

    vm.resume_vm();
    // More than a working set, so blocks are freed and reused.
    wait("the writer to write 5000 pages", || {
        guest.writer_stats().pages_written >= written + 5000
    });
    vm.stop_vm().expect("stop the guest");
    let log = harvest(&guest);
    let mut changed = 0;
    for (i, &p) in pages.iter().enumerate() {
        if guest.page_generation(p) != before[i] {
            changed += 1;
            assert!(log.is_dirty(p), "{p:?} was written but is not in the log");
        }
    }
    assert!(changed > 1024, "only {changed} pages changed");
    assert!(guest.stale_pages(&**guest.mem()).is_empty());
    let stats = guest.stop_writer();
    assert!(stats.blocks_freed > 0);
    vm.resume_vm();
    guest.harness.assert_clean();
}

#[test]
fn stale_pages_finds_old_versions() {
    let guest = Guest::boot(&GuestSpec::new(32 * MIB, 4 * MIB, 0));
    guest.start_writer(WriterSpec::new(0, 4 * MIB));
    let mut vm = guest.vm_control();
    wait("writes", || guest.writer_stats().pages_written > 10);
    vm.stop_vm().expect("stop the guest");
    // A copy of the memory now is current; one page overwritten with its older version
    // is stale.
    let copy = guest_memory(&[(GuestAddress(0), 32 * MIB)]);
    let mut buf = vec![0u8; (32 * MIB) as usize];
    guest.mem().read_slice(&mut buf, GuestAddress(0)).unwrap();
    copy.write_slice(&buf, GuestAddress(0)).unwrap();
    assert!(guest.stale_pages(&*copy).is_empty());
    let page = GuestAddress(5 * MIB);
    let g = guest.page_generation(page);
    assert!(g >= 1);
    // Generation g - 1 (0 for a page written once: a pattern no write produced).
    let old = page_contents(guest.spec().seed, page, g - 1);
    copy.write_slice(&old[..], page).unwrap();
    assert_eq!(guest.stale_pages(&*copy), vec![page]);
    guest.stop_writer();
    vm.resume_vm();
}

#[test]
#[ignore = "boots the default 4 GiB guest (about 3.6 GiB resident)"]
fn default_guest_boots() {
    let start = std::time::Instant::now();
    let guest = Guest::boot(&GuestSpec::default());
    eprintln!("booted the default guest in {:?}", start.elapsed());
    assert_eq!(guest.allocated(), vec![(GuestAddress(0), 52 * MIB)]);
    assert_eq!(guest.dirtied_freed_blocks().len(), 896);
    assert_eq!(guest.driver().free_blocks().len(), 1011);
    assert!(!all_zero(
        &guest,
        GuestAddress(3636 * MIB - PAGE_BYTES),
        PAGE_BYTES
    ));
    assert!(all_zero(&guest, GuestAddress(3636 * MIB), PAGE_BYTES));
    guest.harness.assert_clean();
}
