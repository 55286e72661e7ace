// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Free page hint rounds end to end: a Linux-faithful guest model drives the device through
//! virtio-mmio registers, split rings in guest memory, ioeventfd kicks and the irqfd, while
//! the test plays the migration thread through `FreePageHinting`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_model::*;
use virtio_balloon::migration::MigrationBitmap;
use virtio_balloon::sink::{FreePageSink, RecordedHint, RecordingSink};
use virtio_balloon::transport::VirtioDevice;
use virtio_balloon::HintState;
use vm_memory::GuestAddress;

const BLOCK: u64 = HINT_BLOCK_BYTES;

/// Blocks outside the allocator's free set, used for hand-posted (hostile or late) hints.
fn stray_blocks(n: usize) -> Vec<GuestAddress> {
    blocks(GuestAddress(128 * MIB), n)
}

fn records_as_set(recs: &[RecordedHint]) -> BTreeSet<(u64, u64)> {
    recs.iter().map(|r| (r.gpa.0, r.len)).collect()
}

/// Asserts that `recs` are exactly `expected` blocks under `id`, each once.
fn assert_exact_hints(recs: &[RecordedHint], id: u32, expected: &[GuestAddress]) {
    for r in recs {
        assert_eq!(
            r.cmd_id, id,
            "hint {r:?} under the wrong id (round {id:#x})"
        );
    }
    let set = records_as_set(recs);
    assert_eq!(set.len(), recs.len(), "duplicate hints: {recs:?}");
    assert_eq!(
        set,
        block_set(expected, BLOCK),
        "hinted ranges differ from the free blocks"
    );
}

fn post_stray_hints(h: &Harness, q: u16, stray: &[GuestAddress]) {
    for b in stray {
        h.driver
            .post_and_kick(q, &[Part::input(*b, BLOCK as u32)], false)
            .expect("post a stray hint");
    }
}

/// One round in step mode: the guest handles the config interrupt and runs the free page
/// work to the end. Returns the round report.
fn step_round(h: &Harness) -> RoundReport {
    h.driver.wait_config_change().expect("config interrupt");
    match h.driver.run_free_page_work() {
        WorkOutcome::Round(r) => r,
        other => panic!("the guest did not run a round: {other:?}"),
    }
}

fn full_round_with(cfg: HarnessConfig) {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(cfg, sink.clone());
    let free = h.driver.free_blocks();
    assert!(!free.is_empty());
    let q = h.driver.free_page_queue().expect("free page queue");

    let id = h.hints.start_round();
    assert!(id >= 2, "round id {id:#x} is a reserved value");
    assert!(
        h.hints.wait_round_complete(DEADLINE),
        "the guest's round never completed: {}",
        h.driver.diag(q)
    );
    // The guest posted STOP last; everything it posted has been used.
    h.driver
        .wait_all_used(q)
        .expect("device consumed the queue");
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Stop, "{st:?}");
    assert_eq!(st.cmd_id, id);
    assert!(st.round_complete);
    assert_exact_hints(&sink.hints(), id, &free);
    // The guest's work item finishes right after its STOP buffer; then it holds every block
    // until DONE.
    h.driver.wait_work_idle().unwrap();
    assert_eq!(h.driver.held_blocks(), free);
    assert!(h.driver.free_blocks().is_empty());
    let rounds = h.driver.rounds();
    assert_eq!(
        rounds,
        [RoundReport {
            id,
            hinted: free.len(),
            end: RoundEnd::OutOfBlocks
        }]
    );

    h.hints.done();
    wait_until("the guest to free its hinted blocks after DONE", || {
        h.driver.free_blocks() == free
    })
    .unwrap();
    assert!(h.driver.held_blocks().is_empty());
    assert_eq!(h.hints.status().state, HintState::Done);
    assert_eq!(
        h.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID),
        cmd::DONE
    );
    // Nothing more reached the sink.
    assert_eq!(sink.hints().len(), free.len());
    h.assert_clean();
}

#[test]
fn full_round_delivers_exactly_the_free_blocks() {
    let mut cfg = HarnessConfig::simple(256 * MIB, 24);
    cfg.background = true;
    full_round_with(cfg);
}

#[test]
fn full_round_with_event_idx_indirect_and_mmio_kicks() {
    let mut cfg = HarnessConfig::simple(256 * MIB, 24);
    cfg.background = true;
    cfg.driver.ack_event_idx = true;
    cfg.driver.ack_indirect = true;
    cfg.driver.kick = KickMode::Mmio;
    full_round_with(cfg);
}

#[test]
fn full_round_without_stats_queue_and_with_poison() {
    let mut cfg = HarnessConfig::simple(256 * MIB, 24);
    cfg.background = true;
    cfg.balloon.stats = false;
    cfg.balloon.page_poison = true;
    cfg.driver.guest_poison = Some(driver::PAGE_POISON_VAL);
    full_round_with(cfg);
}

#[test]
fn full_round_on_a_small_ring_reuses_descriptors() {
    // 8 descriptors for 24 blocks: the guest must wait for used buffers and reuse heads.
    let mut cfg = HarnessConfig::simple(256 * MIB, 24);
    cfg.background = true;
    cfg.balloon.free_page_queue_size = 8;
    full_round_with(cfg);
}

#[test]
fn full_round_on_the_smallest_ring_linux_accepts() {
    // Two descriptors: one is always kept for the command, so one hint is in flight at a
    // time and every block waits for the previous one to be used.
    let mut cfg = HarnessConfig::simple(256 * MIB, 24);
    cfg.background = true;
    cfg.balloon.free_page_queue_size = 2;
    cfg.driver.ack_event_idx = true;
    full_round_with(cfg);
}

#[test]
fn full_round_one_chain_per_wakeup() {
    let mut cfg = HarnessConfig::simple(256 * MIB, 24);
    cfg.background = true;
    cfg.balloon.chains_per_wakeup = 1;
    full_round_with(cfg);
}

#[test]
fn full_round_into_migration_bitmap_clears_exactly_the_hinted_pages() {
    let mut cfg = HarnessConfig::simple(256 * MIB, 20);
    cfg.background = true;
    let mem = guest_memory(&cfg.regions);
    let bitmap = Arc::new(MigrationBitmap::new(&*mem).expect("bitmap"));
    let total = bitmap.mark_all_dirty();
    assert_eq!(total, 256 * MIB / 4096);
    let h = Harness::with_memory(cfg, mem, bitmap.clone());
    let free = h.driver.free_blocks();

    h.hints.start_round();
    assert!(
        h.hints.wait_round_complete(DEADLINE),
        "round never completed"
    );
    let q = h.driver.free_page_queue().unwrap();
    h.driver.wait_all_used(q).unwrap();

    let hinted_pages: BTreeSet<u64> = free
        .iter()
        .flat_map(|b| (0..BLOCK / 4096).map(move |p| b.0 + p * 4096))
        .collect();
    assert_eq!(bitmap.hinted_pages(), hinted_pages.len() as u64);
    assert_eq!(bitmap.dirty_pages(), total - hinted_pages.len() as u64);
    let dirty: Vec<u64> = bitmap.iter_dirty().map(|a| a.0).collect();
    assert_eq!(dirty.len() as u64, total - hinted_pages.len() as u64);
    for page in &dirty {
        assert!(
            !hinted_pages.contains(page),
            "hinted page {page:#x} still dirty"
        );
    }
    for page in (0..256 * MIB).step_by(4096) {
        assert_eq!(
            bitmap.is_dirty(GuestAddress(page)),
            !hinted_pages.contains(&page),
            "page {page:#x}"
        );
    }
    h.hints.done();
    h.assert_clean();
}

#[test]
fn stale_start_id_is_ignored_with_its_hints() {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(HarnessConfig::simple(256 * MIB, 8), sink.clone());
    let q = h.driver.free_page_queue().unwrap();
    let free = h.driver.free_blocks();

    let old = h.hints.start_round();
    h.hints.stop_round();
    let new = h.hints.start_round();
    assert_ne!(old, new);
    assert_eq!(h.hints.status().state, HintState::Requested);

    // A guest a round behind: a start buffer holding the old id in the active slot, then
    // hints.
    let slot = h.driver.cmd_id_active_slot();
    h.driver.write_u32(slot, old).unwrap();
    h.driver
        .post_and_kick(q, &[Part::out(slot, 4)], false)
        .unwrap();
    let stray = stray_blocks(4);
    post_stray_hints(&h, q, &stray);
    h.driver.wait_all_used(q).unwrap();
    assert!(
        sink.hints().is_empty(),
        "stale round hinted: {:?}",
        sink.hints()
    );
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Requested, "{st:?}");
    assert_eq!(st.cmd_id, new);
    assert_eq!(h.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID), new);

    // The real round under the new id still works, and only it counts.
    let r = step_round(&h);
    assert_eq!(r.id, new);
    assert_eq!(r.end, RoundEnd::OutOfBlocks);
    h.driver.wait_all_used(q).unwrap();
    assert_exact_hints(&sink.hints(), new, &free);
    assert_eq!(h.hints.status().state, HintState::Stop);
    h.assert_clean();
}

#[test]
fn hints_before_the_start_buffer_are_ignored() {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(HarnessConfig::simple(256 * MIB, 8), sink.clone());
    let q = h.driver.free_page_queue().unwrap();
    let free = h.driver.free_blocks();

    let id = h.hints.start_round();
    h.driver.wait_config_change().unwrap();
    // Hints ahead of the start buffer in ring order: REQUESTED ignores them. No wait here:
    // ring order alone must decide.
    let early = stray_blocks(4);
    post_stray_hints(&h, q, &early);
    match h.driver.run_free_page_work() {
        WorkOutcome::Round(r) => assert_eq!(r.id, id),
        other => panic!("no round: {other:?}"),
    }
    h.driver.wait_all_used(q).unwrap();
    assert_exact_hints(&sink.hints(), id, &free);
    h.assert_clean();
}

#[test]
fn hints_after_the_guest_stop_are_ignored() {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(HarnessConfig::simple(256 * MIB, 8), sink.clone());
    let q = h.driver.free_page_queue().unwrap();
    let free = h.driver.free_blocks();

    let id = h.hints.start_round();
    let r = step_round(&h);
    assert_eq!(r.end, RoundEnd::OutOfBlocks);
    h.driver.wait_all_used(q).unwrap();
    assert!(h.hints.status().round_complete);
    assert_eq!(h.hints.status().state, HintState::Stop);

    post_stray_hints(&h, q, &stray_blocks(4));
    // And a repeat of the old start id: it must not restart the round.
    let slot = h.driver.cmd_id_active_slot();
    h.driver
        .post_and_kick(q, &[Part::out(slot, 4)], false)
        .unwrap();
    post_stray_hints(&h, q, &blocks(GuestAddress(160 * MIB), 2));
    h.driver.wait_all_used(q).unwrap();
    assert_exact_hints(&sink.hints(), id, &free);
    assert_eq!(h.hints.status().state, HintState::Stop);
    h.assert_clean();
}

#[test]
fn hints_after_done_are_ignored() {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(HarnessConfig::simple(256 * MIB, 8), sink.clone());
    let q = h.driver.free_page_queue().unwrap();
    let free = h.driver.free_blocks();

    let id = h.hints.start_round();
    step_round(&h);
    h.driver.wait_all_used(q).unwrap();
    h.hints.done();
    assert_eq!(h.hints.status().state, HintState::Done);

    // The guest has not seen DONE yet and keeps posting (a racing guest), then a stale start.
    post_stray_hints(&h, q, &stray_blocks(3));
    let slot = h.driver.cmd_id_active_slot();
    h.driver
        .post_and_kick(q, &[Part::out(slot, 4)], false)
        .unwrap();
    post_stray_hints(&h, q, &blocks(GuestAddress(160 * MIB), 2));
    h.driver.wait_all_used(q).unwrap();
    assert_exact_hints(&sink.hints(), id, &free);
    assert_eq!(h.hints.status().state, HintState::Done);

    // Now the guest sees DONE and frees everything.
    h.driver.wait_config_change().unwrap();
    assert_eq!(
        h.driver.run_free_page_work(),
        WorkOutcome::Done {
            returned: free.len()
        }
    );
    assert_eq!(h.driver.free_blocks(), free);
    h.assert_clean();
}

#[test]
fn hints_after_stop_round_are_ignored() {
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = HarnessConfig::simple(256 * MIB, 12);
    // The guest must not notice the stop while it posts the late blocks below.
    cfg.driver.async_irq_in_step_mode = false;
    let h = Harness::new(cfg, sink.clone());
    let q = h.driver.free_page_queue().unwrap();

    let id = h.hints.start_round();
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.send_cmd_id_start().unwrap(), id);
    let mut early = Vec::new();
    for _ in 0..3 {
        match h.driver.get_free_page_and_send().unwrap() {
            Sent::Block(b) => early.push(b),
            other => panic!("{other:?}"),
        }
    }
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.hints.status().state, HintState::Start);
    assert_exact_hints(&sink.hints(), id, &early);

    h.hints.stop_round();
    assert_eq!(h.hints.status().state, HintState::Stop);
    // The guest has not handled the config interrupt yet: it keeps hinting.
    for _ in 0..3 {
        assert!(matches!(
            h.driver.get_free_page_and_send().unwrap(),
            Sent::Block(_)
        ));
    }
    h.driver.wait_all_used(q).unwrap();
    assert_exact_hints(&sink.hints(), id, &early);

    // Then it sees the interrupt, reads STOP, and ends its round with a STOP buffer.
    h.driver.wait_config_change().unwrap();
    let (more, end) = h.driver.send_free_pages();
    assert_eq!((more, end), (0, RoundEnd::IdChanged(cmd::STOP)));
    h.driver.send_cmd_id_stop().unwrap();
    h.driver.wait_all_used(q).unwrap();
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Stop);
    assert!(
        !st.round_complete,
        "a round stopped by the device is not complete: {st:?}"
    );
    assert_exact_hints(&sink.hints(), id, &early);
    h.assert_clean();
}

#[test]
fn reset_mid_round_stops_hints_and_keeps_ids_rising() {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(HarnessConfig::simple(256 * MIB, 12), sink.clone());
    let q = h.driver.free_page_queue().unwrap();

    let id1 = h.hints.start_round();
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.send_cmd_id_start().unwrap(), id1);
    let mut sent = Vec::new();
    for _ in 0..4 {
        if let Sent::Block(b) = h.driver.get_free_page_and_send().unwrap() {
            sent.push(b);
        }
    }
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.hints.status().state, HintState::Start);
    assert_exact_hints(&sink.hints(), id1, &sent);

    // The driver resets the device mid-round (status 0) but, buggy, keeps using its old
    // ring: hints posted and kicked now must go nowhere.
    h.driver.write_reg(reg::STATUS, 0);
    assert_eq!(h.driver.status(), 0);
    let st = h.hints.status();
    assert_eq!(
        st.state,
        HintState::Stop,
        "reset must stop the round: {st:?}"
    );
    for _ in 0..4 {
        h.driver.get_free_page_and_send().unwrap();
    }
    h.driver.notify_eventfd(q).unwrap();
    h.driver.write_reg(reg::QUEUE_NOTIFY, u32::from(q));

    // The driver is removed (Linux remove: blocks back, reset, queues deactivated) and a new
    // instance probes.
    h.driver.remove();
    assert!(h.driver.held_blocks().is_empty());
    h.driver.probe().expect("re-probe");
    assert_eq!(h.hints.status().state, HintState::Stop);
    let free = h.driver.free_blocks();
    let id2 = h.hints.start_round();
    assert!(
        id2 > id1,
        "ids must keep rising across reset: {id1:#x} then {id2:#x}"
    );
    let r = step_round(&h);
    assert_eq!((r.id, r.end), (id2, RoundEnd::OutOfBlocks));
    let q = h.driver.free_page_queue().unwrap();
    h.driver.wait_all_used(q).unwrap();
    assert!(h.hints.wait_round_complete(DEADLINE));

    let recs = sink.hints();
    let (old, new): (Vec<RecordedHint>, Vec<RecordedHint>) =
        recs.into_iter().partition(|r| r.cmd_id == id1);
    assert_exact_hints(&old, id1, &sent);
    assert_exact_hints(&new, id2, &free);
    h.assert_clean();
}

#[test]
fn config_shows_the_current_id_during_start() {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(HarnessConfig::simple(256 * MIB, 8), sink.clone());
    let q = h.driver.free_page_queue().unwrap();
    let free = h.driver.free_blocks();

    let gen0 = h.driver.read_reg(reg::CONFIG_GENERATION);
    let id = h.hints.start_round();
    h.driver.wait_config_change().unwrap();
    let gen1 = h.driver.read_reg(reg::CONFIG_GENERATION);
    assert_ne!(
        gen0, gen1,
        "publishing an id must bump the config generation"
    );
    assert_eq!(h.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID), id);
    assert_eq!(h.driver.send_cmd_id_start().unwrap(), id);
    h.driver.get_free_page_and_send().unwrap();
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.hints.status().state, HintState::Start);
    assert_eq!(h.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID), id);

    // A config interrupt for an unrelated reason: the guest re-reads the id, still sees the
    // current one, and carries on with the round.
    let raised = h
        .dev
        .lock()
        .unwrap()
        .device()
        .interrupt()
        .signal_config_change();
    assert!(raised);
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.cmd_id_received(), id);
    let (more, end) = h.driver.send_free_pages();
    assert_eq!(end, RoundEnd::OutOfBlocks);
    assert_eq!(more, free.len() - 1);
    h.driver.send_cmd_id_stop().unwrap();
    h.driver.wait_all_used(q).unwrap();
    assert!(h.hints.wait_round_complete(DEADLINE));
    assert_exact_hints(&sink.hints(), id, &free);
    h.assert_clean();
}

/// A sink that notes whether the migration thread considered the round open when each hint
/// arrived, and in which round (epoch) of the test.
#[derive(Default)]
struct RaceSink {
    open: AtomicBool,
    epoch: AtomicUsize,
    recs: Mutex<Vec<(usize, bool, RecordedHint)>>,
}

impl FreePageSink for RaceSink {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        let open = self.open.load(Ordering::SeqCst);
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.recs
            .lock()
            .unwrap()
            .push((epoch, open, RecordedHint { cmd_id, gpa, len }));
    }
}

#[test]
fn stop_round_racing_a_hinting_guest() {
    let mut cfg = HarnessConfig::simple(1024 * MIB, 200);
    cfg.background = true;
    stop_round_race(cfg, 0x5eed_0fba_1100);
}

#[test]
fn stop_round_racing_a_hinting_guest_with_event_idx_and_mmio_kicks() {
    let mut cfg = HarnessConfig::simple(1024 * MIB, 200);
    cfg.background = true;
    cfg.driver.ack_event_idx = true;
    cfg.driver.kick = KickMode::Mmio;
    cfg.balloon.free_page_queue_size = 64;
    cfg.balloon.chains_per_wakeup = 16;
    stop_round_race(cfg, 0x0dd_ba11);
}

fn stop_round_race(cfg: HarnessConfig, seed: u64) {
    const ITERATIONS: usize = 300;
    println!("seed {seed:#x}");
    let mut rng = Rng::new(seed);

    let sink = Arc::new(RaceSink::default());
    let h = Harness::new(cfg, sink.clone());

    // Memory pressure: a shrinker keeps handing held blocks back, so the guest always finds
    // more to hint and only the id change ends its rounds.
    let stop_shrinker = Arc::new(AtomicBool::new(false));
    let shrinker = {
        let d = h.driver.clone();
        let stop = stop_shrinker.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                d.shrink(16);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    let mut ids = Vec::with_capacity(ITERATIONS);
    // How many blocks the guest had posted when each round was published: the round's sync
    // point, after the previous stop_round returned.
    let mut posted_before = Vec::with_capacity(ITERATIONS + 1);
    for i in 0..ITERATIONS {
        sink.epoch.store(i, Ordering::SeqCst);
        sink.open.store(true, Ordering::SeqCst);
        posted_before.push(h.driver.posted_count());
        ids.push(h.hints.start_round());
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        h.hints.stop_round();
        sink.open.store(false, Ordering::SeqCst);
        assert_eq!(h.hints.status().state, HintState::Stop);
        if rng.below(4) == 0 {
            // Sometimes let the guest see the stop before the next round starts.
            h.driver.wait_work_idle().unwrap();
        }
    }
    stop_shrinker.store(true, Ordering::SeqCst);
    shrinker.join().unwrap();
    h.hints.done();
    wait_until("the guest to give back its blocks", || {
        h.driver.held_blocks().is_empty()
    })
    .unwrap();
    h.driver.stop_background();

    let recs = sink.recs.lock().unwrap().clone();
    let metrics = h.hints.status().metrics;
    let rounds = h.driver.rounds();
    println!(
        "{} hints delivered, {} posted by the guest in {} guest rounds; device metrics {metrics:?}",
        recs.len(),
        h.driver.posted_hints().len(),
        rounds.len()
    );
    assert!(
        recs.len() > ITERATIONS,
        "too few hints ({}) for the race to mean anything",
        recs.len()
    );
    let late: Vec<_> = recs.iter().filter(|(_, open, _)| !open).collect();
    assert!(
        late.is_empty(),
        "{} hints reached the sink after stop_round returned, e.g. {:?}",
        late.len(),
        &late[..late.len().min(5)]
    );
    let wrong: Vec<_> = recs
        .iter()
        .filter(|(epoch, _, r)| r.cmd_id != ids[*epoch])
        .collect();
    assert!(
        wrong.is_empty(),
        "{} hints carried an id other than the open round's, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // The safety property: every hint applied in round i matches a block the guest posted
    // after round i was published (after the previous stop_round, where a migration syncs)
    // and before stop_round(i) returned; counted with multiplicity, since blocks come back
    // through the shrinker and are posted again. A device that fell behind may apply such a
    // block under the newer id while the guest still thinks of it as its older round (Linux
    // reuses one start slot); the block was still free after the sync, so that is safe, and
    // it is only reported.
    let posted_hints = h.driver.posted_hints();
    posted_before.push(posted_hints.len());
    let mut got: HashMap<(usize, u64), usize> = HashMap::new();
    for (epoch, _, r) in &recs {
        assert_eq!(r.len, BLOCK, "{r:?}");
        *got.entry((*epoch, r.gpa.0)).or_default() += 1;
    }
    let mut other_guest_round = 0;
    for (&(epoch, gpa), &n) in &got {
        let window = &posted_hints[posted_before[epoch]..posted_before[epoch + 1]];
        let matching: Vec<_> = window.iter().filter(|p| p.gpa.0 == gpa).collect();
        assert!(
            n <= matching.len(),
            "sink got block {gpa:#x} {n} times in round {:#x}, the guest posted it {} times \
             between that round's publication and its stop",
            ids[epoch],
            matching.len()
        );
        other_guest_round += matching
            .iter()
            .filter(|p| p.active_id != ids[epoch])
            .count()
            .min(n);
    }
    for p in &posted_hints {
        assert_eq!(p.len, BLOCK);
    }
    println!("{other_guest_round} hints applied under a newer id than the guest's round");
    h.assert_clean();
}

/// Puts the device in START for a fresh round through the guest model (step mode) and
/// returns (free page queue, id).
fn enter_start(h: &Harness) -> (u16, u32) {
    let q = h.driver.free_page_queue().unwrap();
    let id = h.hints.start_round();
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.send_cmd_id_start().unwrap(), id);
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.hints.status().state, HintState::Start);
    (q, id)
}

/// The 4 KiB pages covered by `recs`, checking each lies under `id`.
fn hinted_pages(recs: &[RecordedHint], id: u32) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    for r in recs {
        assert_eq!(r.cmd_id, id, "{r:?}");
        assert_eq!(r.gpa.0 % 4096, 0, "unaligned hint {r:?}");
        assert_eq!(r.len % 4096, 0, "partial page hint {r:?}");
        assert!(r.len > 0, "empty hint {r:?}");
        for p in (r.gpa.0..r.gpa.0 + r.len).step_by(4096) {
            assert!(pages.insert(p), "page {p:#x} hinted twice");
        }
    }
    pages
}

fn pages(start: u64, len: u64) -> impl Iterator<Item = u64> {
    (start..start + len).step_by(4096)
}

#[test]
fn command_split_over_indirect_descriptors_and_multi_part_hints() {
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = HarnessConfig::simple(256 * MIB, 0);
    cfg.driver.ack_indirect = true;
    let h = Harness::new(cfg, sink.clone());
    assert!(h.driver.has_feature(feature::RING_INDIRECT_DESC));
    let q = h.driver.free_page_queue().unwrap();

    let id = h.hints.start_round();
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.cmd_id_received(), id);
    // The id in two 2-byte readable parts of an indirect table.
    let cmd_buf = h.driver.alloc_scratch(8, 8).unwrap();
    h.driver.write_u32(cmd_buf, id).unwrap();
    h.driver
        .post_and_kick(
            q,
            &[
                Part::out(cmd_buf, 2),
                Part::out(GuestAddress(cmd_buf.0 + 2), 2),
            ],
            true,
        )
        .unwrap();
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.hints.status().state, HintState::Start);

    // One indirect chain with three writable parts: every part is a hint.
    let parts = [
        Part::input(GuestAddress(8 * MIB), BLOCK as u32),
        Part::input(GuestAddress(16 * MIB), 2 * MIB as u32),
        Part::input(GuestAddress(24 * MIB + 2 * MIB), 2 * MIB as u32),
    ];
    h.driver.post_and_kick(q, &parts, true).unwrap();
    // And the same shape as a plain chain.
    let plain = [
        Part::input(GuestAddress(40 * MIB), 1 << 20),
        Part::input(GuestAddress(48 * MIB), 1 << 16),
    ];
    h.driver.post_and_kick(q, &plain, false).unwrap();
    h.driver.wait_all_used(q).unwrap();
    let got = hinted_pages(&sink.hints(), id);
    let want: BTreeSet<u64> = pages(8 * MIB, BLOCK)
        .chain(pages(16 * MIB, 2 * MIB))
        .chain(pages(26 * MIB, 2 * MIB))
        .chain(pages(40 * MIB, MIB))
        .chain(pages(48 * MIB, 1 << 16))
        .collect();
    assert_eq!(got, want);
    for b in h.driver.reclaim(q).unwrap() {
        assert_eq!(b.len, 0, "free page queue used length must be 0: {b:?}");
    }
    assert_eq!(h.hints.status().state, HintState::Start);
    h.assert_clean();
}

#[test]
fn writable_four_byte_buffer_is_not_a_command() {
    let sink = Arc::new(RecordingSink::default());
    let h = Harness::new(HarnessConfig::simple(256 * MIB, 2), sink.clone());
    let (q, id) = enter_start(&h);

    // A 4-byte device-writable buffer whose bytes read as STOP: a (too small) hint, not a
    // command. The round must go on.
    let stray = GuestAddress(128 * MIB);
    h.driver.write_u32(stray, cmd::STOP).unwrap();
    h.driver
        .post_and_kick(q, &[Part::input(stray, 4)], false)
        .unwrap();
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.hints.status().state, HintState::Start);
    assert!(sink.hints().is_empty(), "{:?}", sink.hints());

    let (n, end) = h.driver.send_free_pages();
    assert_eq!((n, end), (2, RoundEnd::OutOfBlocks));
    h.driver.send_cmd_id_stop().unwrap();
    h.driver.wait_all_used(q).unwrap();
    assert!(h.hints.status().round_complete);
    let free_then = h.driver.held_blocks();
    assert_exact_hints(&sink.hints(), id, &free_then);
    h.assert_clean();
}

#[test]
fn hints_are_clipped_to_ram_and_rounded_to_whole_pages() {
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = HarnessConfig::simple(256 * MIB, 0);
    cfg.regions = vec![
        (GuestAddress(0), 256 * MIB),
        (GuestAddress(512 * MIB), 256 * MIB),
    ];
    let h = Harness::new(cfg, sink.clone());
    let (q, id) = enter_start(&h);

    let hint = |addr: u64, len: u64| {
        h.driver
            .post_and_kick(q, &[Part::input(GuestAddress(addr), len as u32)], false)
            .unwrap();
    };
    hint(256 * MIB - 2 * MIB, BLOCK); // runs 2 MiB into the hole
    hint(768 * MIB - MIB, BLOCK); // runs 3 MiB past the end of RAM
    hint(300 * MIB, BLOCK); // wholly in the hole
    hint(8 * MIB + 0x800, 0x3000); // unaligned: only [+0x1000, +0x3000) is whole
    hint(12 * MIB + 0x10, 0xff0); // less than a page once rounded: nothing
    hint(16 * MIB, 0); // empty
    hint(u64::MAX - 0xfff, 0x2000); // wraps the address space
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.hints.status().state, HintState::Start);

    let got = hinted_pages(&sink.hints(), id);
    let want: BTreeSet<u64> = pages(254 * MIB, 2 * MIB)
        .chain(pages(767 * MIB, MIB))
        .chain(pages(8 * MIB + 0x1000, 0x2000))
        .collect();
    assert_eq!(got, want);
    h.assert_clean();
}

/// The start-buffer fence (`docs/protocol.md`): Linux keeps the start id in one slot it reuses
/// every round. A start buffer the device has not consumed when the guest starts the next round
/// reads the *new* id; the device must still not take it (or the old round's hints behind it) for
/// the new round.
#[test]
fn unconsumed_start_buffer_from_an_earlier_round_does_not_start_the_next() {
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = HarnessConfig::simple(256 * MIB, 6);
    cfg.driver.async_irq_in_step_mode = false;
    let h = Harness::new(cfg, sink.clone());
    let q = h.driver.free_page_queue().unwrap();

    let id1 = h.hints.start_round();
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.cmd_id_received(), id1);
    h.hints.stop_round();
    let used_before = h.driver.used_idx(q).unwrap();
    // The guest has not seen the stop. Its start buffer and first hints sit on the ring
    // unconsumed (a device that lags: the kicks are still in flight).
    let slot = h.driver.cmd_id_active_slot();
    h.driver.write_u32(slot, id1).unwrap();
    h.driver.post(q, &[Part::out(slot, 4)], false).unwrap();
    let old_round = stray_blocks(3);
    for b in &old_round {
        h.driver
            .post(q, &[Part::input(*b, BLOCK as u32)], false)
            .unwrap();
    }
    // The next round is published while those buffers are still there.
    let id2 = h.hints.start_round();
    assert_ne!(id1, id2);
    assert_eq!(
        h.driver.used_idx(q).unwrap(),
        used_before,
        "the old buffers were consumed before the new id was published: scenario not exercised"
    );
    // The guest now sees the new id and starts round 2, rewriting the shared slot: the old
    // descriptor now reads id2 as well.
    h.driver.wait_config_change().unwrap();
    let free = h.driver.free_blocks();
    match h.driver.run_free_page_work() {
        WorkOutcome::Round(r) => assert_eq!((r.id, r.end), (id2, RoundEnd::OutOfBlocks)),
        other => panic!("no round: {other:?}"),
    }
    h.driver.wait_all_used(q).unwrap();
    assert_eq!(h.driver.read_u32(slot).unwrap(), id2);
    assert_exact_hints(&sink.hints(), id2, &free);
    assert!(h.hints.wait_round_complete(DEADLINE));
    h.assert_clean();
}

/// Many rounds in a row, long enough for the 16-bit avail and used indexes to wrap: every
/// round still gets exactly its blocks.
#[test]
fn rounds_keep_working_across_ring_index_wrap() {
    let sink = Arc::new(RecordingSink::default());
    // 1024 blocks of 4 MiB: 4 GiB of lazily mapped RAM that is never touched.
    let mut cfg = HarnessConfig::simple(4100 * MIB, 1024);
    cfg.driver.async_irq_in_step_mode = true;
    let h = Harness::new(cfg, sink.clone());
    let q = h.driver.free_page_queue().unwrap();
    let free = h.driver.free_blocks();
    let mut wrapped = false;
    let mut last_idx = 0u16;
    let mut rounds = 0;
    while !wrapped || rounds < 2 {
        let id = h.hints.start_round();
        let r = step_round(&h);
        assert_eq!(
            (r.id, r.hinted, r.end),
            (id, free.len(), RoundEnd::OutOfBlocks)
        );
        let idx = h.driver.wait_all_used(q).unwrap();
        assert!(h.hints.wait_round_complete(DEADLINE), "round {rounds}");
        assert_exact_hints(&sink.take(), id, &free);
        h.hints.done();
        h.driver.wait_config_change().unwrap();
        assert_eq!(
            h.driver.run_free_page_work(),
            WorkOutcome::Done {
                returned: free.len()
            }
        );
        if idx < last_idx {
            wrapped = true;
            rounds = 0;
        }
        last_idx = idx;
        rounds += 1;
    }
    h.assert_clean();
}
