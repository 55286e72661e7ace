// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Snapshot and restore: `Balloon::save_state` / `Balloon::restore` and
//! `MmioTransport::save_state` / `MmioTransport::restore`.
//!
//! The guest is the Linux driver model of `guest_model`, in step mode. It reaches the device
//! through a bus that holds the transport behind a mutex, so a test can swap a restored
//! device in while the guest keeps its rings (they live in the same guest memory). The kick
//! and interrupt eventfds the guest uses belong to the rig, not to a device: the rig serves
//! the current device's queues when it is pumped, and relays the current device's interrupt
//! eventfd to the guest's, so both survive the swap.

use guest_model::backend::RecordingBackend;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use guest_model::driver::{PAGE_POISON_VAL, TOKEN_STATS};
use guest_model::*;
use serde::{Deserialize, Serialize};
use virtio_balloon::backend::MemoryBackend;
use virtio_balloon::defs::features as f;
use virtio_balloon::sink::{FreePageSink, RecordedHint, RecordingSink};
use virtio_balloon::transport::{
    ActivateError, FeatureError, MmioState, MmioTransport, VirtioDevice,
};
use virtio_balloon::{
    Balloon, BalloonConfig, BalloonError, BalloonEvents, BalloonMetrics, BalloonState,
    FreePageHinting, HintMetrics, HintState, RestoreError,
};
use virtio_balloon::{ManualClock, QueueSnapshot, BALLOON_STATE_VERSION};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Status bits the driver has set once it is running.
const LIVE: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
/// Status bits after feature negotiation, before DRIVER_OK.
const NEGOTIATED: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A backend that only records what it is asked to do (4 KiB host pages).
fn recording_backend() -> Arc<RecordingBackend> {
    RecordingBackend::new(4096)
}

/// Guest memory, a swappable device behind its transport, and the guest driver model.
struct Rig {
    cfg: BalloonConfig,
    mem: Mem,
    dev: Dev,
    driver: Driver,
    hints: FreePageHinting,
    sink: Arc<RecordingSink>,
    backend: Arc<RecordingBackend>,
    /// The guest's kick eventfds (what ioeventfds would signal).
    kicks: Vec<EventFd>,
    /// The guest's interrupt eventfd (what an irqfd would inject).
    irq: EventFd,
}

impl Rig {
    /// Builds the rig from a harness configuration (`background` is ignored: step mode).
    fn new(hc: HarnessConfig) -> Rig {
        let mem = guest_memory(&hc.regions);
        let sink = Arc::new(RecordingSink::default());
        let backend = recording_backend();
        let balloon: Balloon<Mem> =
            Balloon::with_backend(hc.balloon, mem.clone(), sink.clone(), backend.clone())
                .expect("create the balloon");
        let hints = balloon.hint_control();
        let nq = balloon.num_queues();
        let kicks: Vec<EventFd> = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("kick eventfd"))
            .collect();
        let irq = EventFd::new(EFD_NONBLOCK).expect("irq eventfd");
        let dev: Dev = Arc::new(Mutex::new(MmioTransport::new(balloon)));
        let bus: Arc<dyn Bus> = Arc::new(dev.clone());
        let driver = Driver::new(
            bus,
            mem.clone(),
            irq.try_clone().expect("clone the irq eventfd"),
            kicks
                .iter()
                .map(|k| k.try_clone().expect("clone a kick eventfd"))
                .collect(),
            hc.driver.clone(),
        )
        .expect("create the driver model");
        let rig = Rig {
            cfg: hc.balloon,
            mem,
            dev,
            driver,
            hints,
            sink,
            backend,
            kicks,
            irq,
        };
        if hc.probe {
            rig.driver.probe().expect("probe");
            rig.pump();
        }
        rig
    }

    /// Runs `f` on the current device.
    fn with_dev<T>(&self, f: impl FnOnce(&mut Balloon<Mem>) -> T) -> T {
        f(lock(&self.dev).device_mut())
    }

    /// Serves every queue that was kicked (by the guest or by the device itself) until
    /// nothing is left, then relays the interrupt.
    fn pump(&self) {
        // A hang guard: a handful of passes always suffices here.
        for _ in 0..1000 {
            let mut worked = false;
            {
                let mut t = lock(&self.dev);
                for (i, kick) in self.kicks.iter().enumerate() {
                    let guest = kick.read().is_ok();
                    let own = t.device().queue_event(i).is_some_and(|e| e.read().is_ok());
                    if guest || own {
                        t.device_mut().process_queue(i);
                        worked = true;
                    }
                }
            }
            if !worked {
                break;
            }
        }
        self.relay();
    }

    /// Forwards a signal of the current device's interrupt eventfd to the guest's. Returns
    /// whether there was one.
    fn relay(&self) -> bool {
        let fired = lock(&self.dev)
            .device()
            .interrupt()
            .eventfd()
            .read()
            .is_ok();
        if fired {
            self.irq.write(1).expect("signal the guest interrupt");
        }
        fired
    }

    /// The migration thread starts a round; the interrupt reaches the guest.
    fn start_round(&self) -> u32 {
        let id = self.hints.start_round();
        self.relay();
        id
    }

    /// Starts a round and lets the guest run it to its end, which must hint all `blocks`
    /// free blocks. Returns the round's id.
    fn whole_round(&mut self, blocks: usize) -> u32 {
        let id = self.start_round();
        match self.driver.run_free_page_work() {
            WorkOutcome::Round(r) => assert_eq!(
                r,
                RoundReport {
                    id,
                    hinted: blocks,
                    end: RoundEnd::OutOfBlocks
                }
            ),
            other => panic!("the guest did not run a round: {other:?}"),
        }
        self.pump();
        assert!(self.hints.status().round_complete);
        id
    }

    /// Pauses the device and saves it with its transport.
    fn save(&self, pause: bool) -> (BalloonState, MmioState) {
        let mut t = lock(&self.dev);
        if pause {
            t.device_mut().pause();
        }
        let state = t.device_mut().save_state();
        (state, t.save_state())
    }

    /// Restores `state` into a new device over the same guest memory (with a new sink and
    /// backend) and puts it behind the guest's bus, dropping the old device.
    fn restore(
        &mut self,
        cfg: BalloonConfig,
        state: &BalloonState,
        mmio: MmioState,
    ) -> Result<(), RestoreError> {
        let sink = Arc::new(RecordingSink::default());
        let backend = recording_backend();
        let dev = Balloon::restore(cfg, self.mem.clone(), sink.clone(), backend.clone(), state)?;
        self.hints = dev.hint_control();
        *lock(&self.dev) = MmioTransport::restore(dev, mmio);
        self.cfg = cfg;
        self.sink = sink;
        self.backend = backend;
        Ok(())
    }

    fn assert_clean(&self) {
        assert!(
            self.driver.errors().is_empty(),
            "driver model errors: {:?}",
            self.driver.errors()
        );
    }
}

/// A restore that is expected to fail (fresh sink and backend).
fn try_restore(rig: &Rig, cfg: BalloonConfig, state: &BalloonState) -> RestoreError {
    let sink: Arc<dyn FreePageSink> = Arc::new(RecordingSink::default());
    let backend: Arc<dyn MemoryBackend> = recording_backend();
    match Balloon::restore(cfg, rig.mem.clone(), sink, backend, state) {
        Ok(dev) => panic!("restore succeeded: {dev:?}"),
        Err(e) => e,
    }
}

/// A restored device with a fresh sink and backend, not put behind any bus.
fn restore_detached(rig: &Rig, state: &BalloonState) -> Balloon<Mem> {
    let sink: Arc<dyn FreePageSink> = Arc::new(RecordingSink::default());
    let backend: Arc<dyn MemoryBackend> = recording_backend();
    Balloon::restore(rig.cfg, rig.mem.clone(), sink, backend, state).expect("restore")
}

/// Writes `pfns` into a fresh scratch buffer and returns it as a device-readable part.
fn pfn_part(driver: &Driver, pfns: &[u32]) -> Part {
    let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let at = driver
        .alloc_scratch(raw.len() as u64, 4096)
        .expect("scratch for a PFN array");
    driver.mem().write_slice(&raw, at).expect("write PFNs");
    Part::out(at, raw.len() as u32)
}

fn pfn_range(first: u32, n: u32) -> Vec<u32> {
    (first..first + n).collect()
}

fn hint_set(recs: &[RecordedHint]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = recs.iter().map(|r| (r.gpa.0, r.len)).collect();
    v.sort_unstable();
    v
}

fn block_list(blocks: &[GuestAddress]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = blocks.iter().map(|b| (b.0, HINT_BLOCK_BYTES)).collect();
    v.sort_unstable();
    v
}

fn posted_block(sent: Sent) -> GuestAddress {
    match sent {
        Sent::Block(b) => b,
        other => panic!("the guest did not post a block: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Round trip
// ---------------------------------------------------------------------------------------

fn assert_serde<T: Serialize + for<'de> Deserialize<'de>>() {}

#[test]
fn saved_states_are_serde_types() {
    assert_serde::<BalloonState>();
    assert_serde::<QueueSnapshot>();
    assert_serde::<BalloonMetrics>();
    assert_serde::<HintMetrics>();
    assert_serde::<HintState>();
    assert_serde::<MmioState>();
}

#[test]
fn restore_then_save_gives_the_same_state_except_hinting_done() {
    let mut hc = HarnessConfig::simple(256 * MIB, 3);
    hc.driver.guest_poison = Some(PAGE_POISON_VAL);
    let mut rig = Rig::new(hc);
    assert!(rig.driver.has_feature(feature::PAGE_POISON));
    // A complete hint round, a target, an `actual`, a held stats buffer, polling and
    // inhibited discards: every field has a non-default value.
    let id = rig.start_round();
    match rig.driver.run_free_page_work() {
        WorkOutcome::Round(r) => assert_eq!(r.id, id),
        other => panic!("no round: {other:?}"),
    }
    rig.pump();
    assert!(rig.hints.status().round_complete);
    rig.with_dev(|d| d.set_target(300));
    rig.relay();
    rig.driver.write_config(config::ACTUAL, 4, 7);
    rig.with_dev(|d| {
        d.set_stats_interval(Duration::from_millis(1500))
            .expect("stats interval");
        d.set_discards_inhibited(true);
    });
    rig.driver.deliver_pending_interrupts().expect("interrupts");

    let (saved, mmio) = rig.save(true);
    assert!(saved.activated);
    assert_eq!(saved.hint_state, HintState::Stop);
    assert_eq!(saved.hint_cmd_id, id);
    assert_eq!(saved.num_pages, 300);
    assert_eq!(saved.actual, 7);
    assert_eq!(saved.poison_val, PAGE_POISON_VAL);
    assert!(saved.stats_held.is_some());
    assert_eq!(saved.stats_interval_ms, 1500);
    assert!(saved.discards_inhibited);
    assert_eq!(saved.queues.len(), 4);
    assert!(saved.metrics.hint.rounds_started == 1 && saved.metrics.stats_updates == 1);
    assert_eq!(u32::from(mmio.status), LIVE);

    let cfg = rig.cfg;
    rig.restore(cfg, &saved, mmio).expect("restore");
    let again = rig.with_dev(|d| d.save_state());
    assert_eq!(again.device_features, saved.device_features);
    assert_eq!(again.acked_features, saved.acked_features);
    assert_eq!(again.activated, saved.activated);
    assert_eq!(again.num_pages, saved.num_pages);
    assert_eq!(again.actual, saved.actual);
    assert_eq!(again.poison_val, saved.poison_val);
    assert_eq!(again.queues, saved.queues);
    assert_eq!(again.hint_cmd_id, saved.hint_cmd_id);
    assert_eq!(again.hint_state, HintState::Done);
    assert_eq!(again.stats_held, saved.stats_held);
    assert_eq!(again.stats_interval_ms, saved.stats_interval_ms);
    assert_eq!(again.discards_inhibited, saved.discards_inhibited);
    // Moving to DONE is a configuration change the driver is told about.
    assert_eq!(
        u32::from(again.interrupt_status),
        u32::from(saved.interrupt_status) | isr::CONFIG
    );
    assert_eq!(
        again.config_generation,
        saved.config_generation.wrapping_add(1)
    );
    assert_eq!(again.metrics, saved.metrics);
    // Apart from those three, the states are equal.
    let expected = BalloonState {
        hint_state: HintState::Done,
        interrupt_status: again.interrupt_status,
        config_generation: again.config_generation,
        ..saved.clone()
    };
    assert_eq!(again, expected);
    // The getters agree with the state.
    rig.with_dev(|d| {
        assert_eq!(d.num_pages(), 300);
        assert_eq!(d.actual(), 7);
        assert_eq!(d.poison_val(), PAGE_POISON_VAL);
        assert_eq!(d.stats_interval(), Duration::from_millis(1500));
        assert!(d.discards_inhibited());
        assert!(d.is_activated());
    });
    assert_eq!(lock(&rig.dev).save_state(), mmio);
    // poison_val stays latched on the restored, running device.
    rig.driver.write_config(config::POISON_VAL, 4, 0);
    rig.with_dev(|d| {
        assert_eq!(d.poison_val(), PAGE_POISON_VAL);
        assert_eq!(
            d.metrics().late_poison_writes,
            saved.metrics.late_poison_writes + 1
        );
    });
    rig.assert_clean();
}

// ---------------------------------------------------------------------------------------
// 2. In the middle of a hint round
// ---------------------------------------------------------------------------------------

#[test]
fn restore_mid_hint_round_ends_the_round_and_the_id_counter_continues() {
    mid_hint_round(HarnessConfig::simple(256 * MIB, 6));
}

#[test]
fn restore_mid_hint_round_with_event_idx_indirect_and_mmio_kicks() {
    let mut hc = HarnessConfig::simple(256 * MIB, 6);
    hc.driver.ack_event_idx = true;
    hc.driver.ack_indirect = true;
    hc.driver.kick = KickMode::Mmio;
    mid_hint_round(hc);
}

fn mid_hint_round(hc: HarnessConfig) {
    let mut rig = Rig::new(hc);
    let q = rig.driver.free_page_queue().expect("free page queue");
    let all_free = rig.driver.free_blocks();
    let old_sink = rig.sink.clone();

    // The guest starts the round and posts two hints, which the device applies.
    let id1 = rig.start_round();
    assert_eq!(rig.driver.send_cmd_id_start().expect("start"), id1);
    let applied: Vec<GuestAddress> = (0..2)
        .map(|_| posted_block(rig.driver.get_free_page_and_send().expect("hint")))
        .collect();
    rig.pump();
    assert_eq!(rig.hints.status().state, HintState::Start);
    assert!(old_sink.hints().iter().all(|h| h.cmd_id == id1));
    assert_eq!(hint_set(&old_sink.hints()), block_list(&applied));
    // One more hint the old device never sees.
    let late = posted_block(rig.driver.get_free_page_and_send().expect("hint"));
    let late_head = rig
        .driver
        .posted_hints()
        .last()
        .map(|p| p.head)
        .expect("posted");
    let avail = rig.driver.avail_idx(q).expect("avail");
    assert_eq!(rig.driver.used_idx(q).expect("used"), avail.wrapping_sub(1));

    let (state, mmio) = rig.save(true);
    assert_eq!(state.hint_state, HintState::Start);
    assert_eq!(state.hint_cmd_id, id1);
    let fq = state.queues[usize::from(q)];
    assert!(fq.ready);
    assert_eq!(fq.next_avail, avail.wrapping_sub(1));
    assert_eq!(fq.next_used, avail.wrapping_sub(1));
    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");

    // The restored device shows DONE and told the driver with a configuration interrupt.
    assert_eq!(rig.driver.status(), LIVE);
    assert_eq!(
        rig.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID),
        cmd::DONE
    );
    let st = rig.hints.status();
    assert_eq!((st.state, st.cmd_id), (HintState::Done, id1));
    assert!(st.negotiated);
    assert_ne!(rig.driver.read_reg(reg::INTERRUPT_STATUS) & isr::CONFIG, 0);
    assert!(
        rig.relay(),
        "the restored device did not signal its interrupt"
    );
    let config_irqs = rig.driver.config_interrupts();
    rig.driver.deliver_pending_interrupts().expect("interrupts");
    assert_eq!(rig.driver.config_interrupts(), config_irqs + 1);

    // The hint left on the ring was consumed, not applied.
    assert_eq!(rig.driver.used_idx(q).expect("used"), avail);
    assert_eq!(
        rig.driver
            .used_elem(q, avail.wrapping_sub(1))
            .expect("used elem"),
        (u32::from(late_head), 0)
    );
    assert!(rig.sink.hints().is_empty(), "{:?}", rig.sink.hints());
    assert_eq!(rig.hints.status().metrics.drained, 1);
    assert!(!rig.driver.free_blocks().contains(&late));

    // A hint the guest posts after the restore is acknowledged but not applied.
    let wrong_state = rig.hints.status().metrics.hints_wrong_state;
    posted_block(rig.driver.get_free_page_and_send().expect("hint"));
    rig.pump();
    assert_eq!(rig.driver.used_idx(q).expect("used"), avail.wrapping_add(1));
    assert!(rig.sink.hints().is_empty(), "{:?}", rig.sink.hints());
    assert_eq!(
        rig.hints.status().metrics.hints_wrong_state,
        wrong_state + 1
    );
    assert_eq!(rig.hints.status().state, HintState::Done);

    // The guest notices the new id, sends its STOP, and gives its blocks back on DONE.
    assert_eq!(
        rig.driver.send_free_pages(),
        (0, RoundEnd::IdChanged(cmd::DONE))
    );
    rig.driver.send_cmd_id_stop().expect("stop");
    rig.pump();
    assert_eq!(rig.hints.status().state, HintState::Done);
    assert_eq!(
        rig.driver.run_free_page_work(),
        WorkOutcome::Done { returned: 4 }
    );
    assert_eq!(rig.driver.free_blocks(), all_free);

    // A new round gets a larger id and works end to end.
    let id2 = rig.start_round();
    assert!(id2 > id1, "id {id2:#x} after restore is not above {id1:#x}");
    match rig.driver.run_free_page_work() {
        WorkOutcome::Round(r) => assert_eq!(
            r,
            RoundReport {
                id: id2,
                hinted: all_free.len(),
                end: RoundEnd::OutOfBlocks
            }
        ),
        other => panic!("the guest did not run a round: {other:?}"),
    }
    rig.pump();
    let st = rig.hints.status();
    assert_eq!((st.state, st.cmd_id), (HintState::Stop, id2));
    assert!(st.round_complete);
    let hints = rig.sink.hints();
    assert!(hints.iter().all(|h| h.cmd_id == id2), "{hints:?}");
    assert_eq!(hint_set(&hints), block_list(&all_free));
    assert_eq!(hints.len(), all_free.len());
    assert_eq!(
        rig.driver.used_idx(q).expect("used"),
        rig.driver.avail_idx(q).expect("avail")
    );
    // Nothing reached the old sink after the save.
    assert_eq!(old_sink.hints().len(), applied.len());
    rig.assert_clean();
}

#[test]
fn guest_reset_after_a_mid_round_restore_starts_over_with_a_larger_id() {
    let mut rig = Rig::new(HarnessConfig::simple(256 * MIB, 3));
    let free = rig.driver.free_blocks();
    let id1 = rig.start_round();
    assert_eq!(rig.driver.send_cmd_id_start().expect("start"), id1);
    posted_block(rig.driver.get_free_page_and_send().expect("hint"));
    rig.pump();
    assert_eq!(rig.hints.status().state, HintState::Start);
    let (state, mmio) = rig.save(true);
    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");

    // The guest reboots: reset, hinted blocks back to its allocator, probe again.
    rig.driver.reset(true);
    assert!(!rig.with_dev(|dev| dev.is_activated()));
    assert!(!rig.hints.negotiated());
    assert_eq!(rig.driver.free_blocks(), free);
    rig.driver.probe().expect("probe after reset");
    rig.pump();
    assert!(rig.hints.negotiated());
    let id2 = rig.start_round();
    assert!(
        id2 > id1,
        "id {id2:#x} after restore and reset is not above {id1:#x}"
    );
    match rig.driver.run_free_page_work() {
        WorkOutcome::Round(r) => assert_eq!(
            r,
            RoundReport {
                id: id2,
                hinted: free.len(),
                end: RoundEnd::OutOfBlocks
            }
        ),
        other => panic!("the guest did not run a round: {other:?}"),
    }
    rig.pump();
    assert!(rig.hints.status().round_complete);
    let hints = rig.sink.hints();
    assert!(hints.iter().all(|h| h.cmd_id == id2), "{hints:?}");
    assert_eq!(hint_set(&hints), block_list(&free));
    rig.assert_clean();
}

// ---------------------------------------------------------------------------------------
// 3. In the middle of inflation
// ---------------------------------------------------------------------------------------

#[test]
fn restore_mid_inflation_acks_each_element_once_and_discards_pending_pages_at_save() {
    mid_inflation(HarnessConfig::simple(256 * MIB, 0));
}

#[test]
fn restore_mid_inflation_with_event_idx_and_indirect() {
    let mut hc = HarnessConfig::simple(256 * MIB, 0);
    hc.driver.ack_event_idx = true;
    hc.driver.ack_indirect = true;
    mid_inflation(hc);
}

fn mid_inflation(mut hc: HarnessConfig) {
    // Inflated runs wait to be merged across elements only when the driver promised to tell
    // the host before it reuses a page.
    hc.balloon.must_tell_host = true;
    let mut rig = Rig::new(hc);
    assert!(rig.driver.has_feature(feature::MUST_TELL_HOST));
    let q = rig
        .driver
        .queue_index(QueueRole::Inflate)
        .expect("inflateq");
    let page = BALLOON_PFN_BYTES;
    let run = |first: u32, pages: u64| (u64::from(first) * page, pages * page);
    // Four elements of 16 pages from 128 MiB on: A and B apart, C and D adjacent.
    let (a, b, c, d) = (0x8000u32, 0x9000u32, 0xa000u32, 0xa010u32);
    let indirect = rig.driver.has_feature(feature::RING_INDIRECT_DESC);
    let post = |first: u32| {
        let part = pfn_part(&rig.driver, &pfn_range(first, 16));
        rig.driver
            .post_and_kick(q, &[part], indirect)
            .expect("post")
    };

    // A and B reach the old device: both wait to be merged with later pages (the device
    // keeps a small set of pending runs, not only the last one).
    let ha = post(a);
    let hb = post(b);
    rig.pump();
    assert_eq!(rig.driver.used_idx(q).expect("used"), 2);
    let old_backend = rig.backend.clone();
    assert!(old_backend.discards().is_empty());
    rig.with_dev(|dev| dev.set_target(64));
    rig.relay();
    rig.driver.write_config(config::ACTUAL, 4, 32);
    // C and D are posted and kicked, but the old device never serves them.
    let hc = post(c);
    let hd = post(d);
    assert_eq!(rig.driver.used_idx(q).expect("used"), 2);

    let (state, mmio) = rig.save(false);
    // Saving discarded A and B.
    assert_eq!(old_backend.discards(), [run(a, 16), run(b, 16)]);
    assert_eq!((state.num_pages, state.actual), (64, 32));
    let iq = state.queues[usize::from(q)];
    assert_eq!((iq.next_avail, iq.next_used), (2, 2));
    assert_eq!(state.metrics.pages.inflate_elements, 2);
    assert_eq!(state.metrics.pages.discard_calls, 2);
    // The guest has not handled the interrupts yet (used buffers, new target).
    let pending = u32::from(state.interrupt_status);
    assert_eq!(pending, isr::VRING | isr::CONFIG);

    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");
    rig.with_dev(|dev| {
        assert_eq!((dev.num_pages(), dev.actual()), (64, 32));
        assert!(!dev.target_reached());
    });
    // The pending interrupt bits are raised again on the restored device.
    assert_eq!(
        rig.driver.read_reg(reg::INTERRUPT_STATUS) & pending,
        pending
    );
    assert!(
        rig.relay(),
        "the restored device did not signal its interrupt"
    );
    assert_eq!(rig.driver.read_config32(config::NUM_PAGES), 64);
    assert_eq!(rig.driver.read_config32(config::ACTUAL), 32);
    rig.pump();
    rig.pump();

    // Every element was acknowledged exactly once: A and B by the old device, C and D by the
    // new one, in order.
    assert_eq!(rig.driver.used_idx(q).expect("used"), 4);
    let used: Vec<(u32, u32)> = (0..4)
        .map(|pos| rig.driver.used_elem(q, pos).expect("used elem"))
        .collect();
    let expected: Vec<(u32, u32)> = [ha, hb, hc, hd]
        .iter()
        .map(|&h| (u32::from(h), 0))
        .collect();
    assert_eq!(used, expected);
    let reclaimed: Vec<u16> = rig
        .driver
        .reclaim(q)
        .expect("reclaim")
        .iter()
        .map(|u| u.head)
        .collect();
    assert_eq!(reclaimed, [ha, hb, hc, hd]);

    // The new device merged C and D and discards them together; nothing of A or B again.
    assert!(
        rig.backend.discards().is_empty(),
        "{:?}",
        rig.backend.discards()
    );
    rig.with_dev(|dev| dev.flush_discards());
    assert_eq!(rig.backend.discards(), [run(c, 32)]);
    assert_eq!(old_backend.discards(), [run(a, 16), run(b, 16)]);
    // The counters went on from the saved ones.
    let m = rig.with_dev(|dev| dev.metrics()).pages;
    assert_eq!(m.inflate_elements, 4);
    assert_eq!(m.inflated_pages, 64);
    assert_eq!(m.discard_calls, 3);
    assert_eq!(m.discarded_bytes, 64 * page);
    rig.assert_clean();
}

// ---------------------------------------------------------------------------------------
// 4. The held statistics buffer
// ---------------------------------------------------------------------------------------

#[test]
fn held_stats_buffer_survives_restore() {
    let mut rig = Rig::new(HarnessConfig::simple(256 * MIB, 0));
    let q = rig.driver.queue_index(QueueRole::Stats).expect("statsq");
    rig.with_dev(|dev| {
        assert_eq!(dev.metrics().stats_updates, 1);
        assert!(dev.latest_stats().is_some());
    });
    assert_eq!(rig.driver.used_idx(q).expect("used"), 0);

    let (state, mmio) = rig.save(true);
    let held = state.stats_held.expect("the device holds the stats buffer");
    assert_eq!(state.metrics.stats_updates, 1);
    assert_eq!(state.metrics.stats_requests, 0);
    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");
    rig.pump();
    // The restored device keeps the buffer until it wants fresh numbers.
    assert_eq!(rig.driver.used_idx(q).expect("used"), 0);
    assert!(rig.with_dev(|dev| dev.request_stats()));
    assert_eq!(rig.driver.used_idx(q).expect("used"), 1);
    assert_eq!(
        rig.driver.used_elem(q, 0).expect("used elem"),
        (u32::from(held), 0)
    );
    assert!(
        !rig.with_dev(|dev| dev.request_stats()),
        "a second request without a buffer"
    );

    // The guest refills it, as after any request.
    rig.relay();
    rig.driver.deliver_pending_interrupts().expect("interrupts");
    assert!(rig.driver.pending_work(WorkKind::UpdateStats));
    assert!(rig.driver.run_stats_work().expect("stats work"));
    rig.pump();
    rig.with_dev(|dev| {
        let m = dev.metrics();
        assert_eq!(m.stats_updates, 2, "{m:?}");
        assert_eq!(m.stats_requests, 1, "{m:?}");
        assert!(dev.latest_stats().is_some());
        assert!(dev.request_stats());
    });
    let used = rig.driver.reclaim(q).expect("reclaim");
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(used[0].token, TOKEN_STATS);
    rig.assert_clean();
}

// ---------------------------------------------------------------------------------------
// 5. Restore errors
// ---------------------------------------------------------------------------------------

/// A rig with a running driver and its saved (active) state.
fn active_state() -> (Rig, BalloonState) {
    let rig = Rig::new(HarnessConfig::simple(256 * MIB, 0));
    let (state, _) = rig.save(true);
    assert!(state.activated);
    assert_eq!(state.queues.len(), 4);
    // The unchanged state restores.
    assert!(restore_detached(&rig, &state).is_activated());
    (rig, state)
}

#[test]
fn restore_refuses_another_feature_offer() {
    let (rig, state) = active_state();
    let other = rig.cfg.with_deflate_on_oom(!rig.cfg.deflate_on_oom);
    assert_ne!(other.device_features(), state.device_features);
    let e = try_restore(&rig, other, &state);
    match e {
        RestoreError::FeaturesDiffer { saved, offered } => {
            assert_eq!(saved, state.device_features);
            assert_eq!(offered, other.device_features());
        }
        ref other => panic!("wrong error: {other:?}"),
    }
    let text = e.to_string();
    for v in [state.device_features, other.device_features()] {
        assert!(text.contains(&format!("{v:#x}")), "{text}");
    }
}

#[test]
fn restore_refuses_another_number_of_queues() {
    let (rig, state) = active_state();
    let mut fewer = state.clone();
    fewer.queues.pop();
    let e = try_restore(&rig, rig.cfg, &fewer);
    assert!(
        matches!(
            e,
            RestoreError::QueueCount {
                saved: 3,
                expected: 4
            }
        ),
        "{e:?}"
    );
    assert!(!e.to_string().is_empty());
    let mut more = state.clone();
    more.queues.push(QueueSnapshot::default());
    let e = try_restore(&rig, rig.cfg, &more);
    assert!(
        matches!(
            e,
            RestoreError::QueueCount {
                saved: 5,
                expected: 4
            }
        ),
        "{e:?}"
    );
}

#[test]
fn restore_refuses_a_queue_outside_guest_memory() {
    let (rig, state) = active_state();
    for field in 0..3 {
        let mut bad = state.clone();
        let q = &mut bad.queues[0];
        assert!(q.ready);
        let outside = 1u64 << 40;
        match field {
            0 => q.desc_table = outside,
            1 => q.avail_ring = outside,
            _ => q.used_ring = outside,
        }
        let e = try_restore(&rig, rig.cfg, &bad);
        assert!(
            matches!(
                e,
                RestoreError::Queue { index: 0 }
                    | RestoreError::Activate(ActivateError::InvalidQueue { index: 0 })
            ),
            "ring {field}: {e:?}"
        );
        assert!(!e.to_string().is_empty());
    }
    // A queue the device cannot have.
    let mut bad = state.clone();
    bad.queues[1].max_size /= 2;
    let e = try_restore(&rig, rig.cfg, &bad);
    assert!(matches!(e, RestoreError::Queue { index: 1 }), "{e:?}");
    // A size the driver cannot have set.
    let mut bad = state.clone();
    bad.queues[1].size = 3;
    let e = try_restore(&rig, rig.cfg, &bad);
    assert!(
        matches!(
            e,
            RestoreError::Queue { index: 1 }
                | RestoreError::Activate(ActivateError::InvalidQueue { index: 1 })
        ),
        "{e:?}"
    );
}

#[test]
fn restore_reports_a_configuration_that_cannot_make_a_device() {
    let (rig, state) = active_state();
    let cfg = rig.cfg.with_chains_per_wakeup(0);
    let e = try_restore(&rig, cfg, &state);
    assert!(
        matches!(e, RestoreError::Create(BalloonError::ZeroBudget)),
        "{e:?}"
    );
    assert!(!e.to_string().is_empty());
}

#[test]
fn restore_drops_a_held_stats_head_outside_the_queue() {
    let (rig, mut state) = active_state();
    let q = rig.driver.queue_index(QueueRole::Stats).expect("statsq");
    let size = state.queues[usize::from(q)].size;
    assert!(state.stats_held.is_some());
    state.stats_held = Some(size);
    let mut dev = restore_detached(&rig, &state);
    assert!(!dev.request_stats());
    assert_eq!(rig.driver.used_idx(q).expect("used"), 0);
    assert_eq!(dev.save_state().stats_held, None);
}

#[test]
fn restore_refuses_acked_features_the_device_did_not_offer() {
    let (rig, state) = active_state();
    let extra = feature::bit(feature::ACCESS_PLATFORM);
    assert_eq!(state.device_features & extra, 0);
    let mut bad = state.clone();
    bad.acked_features |= extra;
    let e = try_restore(&rig, rig.cfg, &bad);
    assert!(
        matches!(e, RestoreError::Features(FeatureError::NotOffered(b)) if b == extra),
        "{e:?}"
    );
    assert!(e.to_string().contains(&format!("{extra:#x}")), "{e}");
    let mut legacy = state.clone();
    legacy.acked_features &= !feature::bit(feature::VERSION_1);
    let e = try_restore(&rig, rig.cfg, &legacy);
    assert!(
        matches!(e, RestoreError::Features(FeatureError::NoVersion1)),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. A device the driver never started
// ---------------------------------------------------------------------------------------

#[test]
fn restore_of_a_never_activated_device_comes_up_normally() {
    let mut hc = HarnessConfig::simple(256 * MIB, 3);
    hc.probe = false;
    let mut rig = Rig::new(hc);
    rig.with_dev(|dev| dev.set_target(100));
    let (state, mmio) = rig.save(false);
    assert!(!state.activated);
    assert_eq!(state.acked_features, 0);
    assert_eq!(state.num_pages, 100);
    assert_eq!(mmio.status, 0);

    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");
    assert!(!rig.with_dev(|dev| dev.is_activated()));
    assert_eq!(rig.driver.status(), 0);
    assert_eq!(rig.driver.read_reg(reg::INTERRUPT_STATUS), 0);
    assert!(!rig.relay(), "an inactive device raised an interrupt");
    assert_eq!(rig.hints.status().state, HintState::Stop);
    assert!(!rig.hints.negotiated());
    assert_eq!(rig.driver.read_config32(config::NUM_PAGES), 100);

    rig.driver.probe().expect("probe after restore");
    rig.pump();
    assert_eq!(rig.driver.status(), LIVE);
    assert!(rig.with_dev(|dev| dev.is_activated()));
    assert_eq!(rig.with_dev(|dev| dev.metrics().stats_updates), 1);
    let free = rig.driver.free_blocks();
    let id = rig.whole_round(free.len());
    assert!(id >= 2);
    let hints = rig.sink.hints();
    assert!(hints.iter().all(|h| h.cmd_id == id));
    assert_eq!(hint_set(&hints), block_list(&free));
    rig.assert_clean();
}

#[test]
fn restored_metrics_continue_counting() {
    let mut rig = Rig::new(HarnessConfig::simple(256 * MIB, 2));
    let id = rig.start_round();
    assert!(matches!(
        rig.driver.run_free_page_work(),
        WorkOutcome::Round(_)
    ));
    rig.pump();
    let q = rig
        .driver
        .queue_index(QueueRole::Inflate)
        .expect("inflateq");
    let part = pfn_part(&rig.driver, &pfn_range(0x8000, 8));
    rig.driver.post_and_kick(q, &[part], false).expect("post");
    rig.pump();
    let (state, mmio) = rig.save(true);
    let before = state.metrics;
    assert_eq!(before.hint.rounds_started, 1);
    assert_eq!(before.hint.rounds_stopped_by_guest, 1);
    assert_eq!(before.hint.hints_accepted, 2);
    assert_eq!(before.pages.inflate_elements, 1);
    assert_eq!(before.stats_updates, 1);

    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");
    assert_eq!(rig.with_dev(|dev| dev.metrics()), before);
    // One more of everything.
    assert!(rig.relay());
    rig.driver.deliver_pending_interrupts().expect("interrupts");
    assert_eq!(
        rig.driver.run_free_page_work(),
        WorkOutcome::Done { returned: 2 }
    );
    let id2 = rig.start_round();
    assert!(id2 > id);
    assert!(matches!(
        rig.driver.run_free_page_work(),
        WorkOutcome::Round(_)
    ));
    let part = pfn_part(&rig.driver, &pfn_range(0x9000, 8));
    rig.driver.post_and_kick(q, &[part], false).expect("post");
    rig.pump();
    assert!(rig.with_dev(|dev| dev.request_stats()));
    rig.relay();
    rig.driver.deliver_pending_interrupts().expect("interrupts");
    assert!(rig.driver.run_stats_work().expect("stats work"));
    rig.pump();
    let after = rig.with_dev(|dev| dev.metrics());
    assert_eq!(after.hint.rounds_started, 2);
    assert_eq!(after.hint.rounds_stopped_by_guest, 2);
    assert_eq!(after.hint.hints_accepted, 4);
    assert_eq!(after.pages.inflate_elements, 2);
    assert_eq!(after.pages.inflated_pages, 16);
    assert_eq!(after.stats_updates, 2);
    assert_eq!(after.stats_requests, 1);
    rig.assert_clean();
}

// ---------------------------------------------------------------------------------------
// 7. The transport's status
// ---------------------------------------------------------------------------------------

#[test]
fn transport_restore_keeps_a_status_that_matches_the_device() {
    let (rig, active) = active_state();
    let mut fresh: Balloon<Mem> = Balloon::with_backend(
        rig.cfg,
        rig.mem.clone(),
        Arc::new(RecordingSink::default()),
        recording_backend(),
    )
    .expect("create");
    let inactive = fresh.save_state();
    assert!(!inactive.activated);
    let cases: [(bool, u32, u32); 6] = [
        (true, LIVE, LIVE),
        (true, NEGOTIATED, 0),
        (true, 0, 0),
        (false, LIVE, 0),
        (false, NEGOTIATED, NEGOTIATED),
        (
            false,
            status::ACKNOWLEDGE | status::DRIVER,
            status::ACKNOWLEDGE | status::DRIVER,
        ),
    ];
    for (activated, saved, expected) in cases {
        let state = if activated { &active } else { &inactive };
        let dev = restore_detached(&rig, state);
        assert_eq!(dev.is_activated(), activated);
        let mmio = MmioState {
            status: saved as u8,
            device_features_select: 1,
            driver_features_select: 1,
            queue_select: 2,
        };
        let t = MmioTransport::restore(dev, mmio);
        assert_eq!(
            u32::from(t.status()),
            expected,
            "device active {activated}, saved status {saved:#x}"
        );
        assert_eq!(
            t.save_state(),
            MmioState {
                status: expected as u8,
                ..mmio
            }
        );
    }
}

#[test]
fn transport_restore_mid_negotiation_lets_the_driver_finish() {
    let mut hc = HarnessConfig::simple(256 * MIB, 0);
    hc.probe = false;
    let mut rig = Rig::new(hc);
    let d = rig.driver.clone();
    d.write_reg(reg::STATUS, status::ACKNOWLEDGE);
    d.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let acked = feature::bit(feature::VERSION_1)
        | feature::bit(feature::STATS_VQ)
        | feature::bit(feature::FREE_PAGE_HINT);
    d.write_driver_features(acked);
    d.write_reg(reg::STATUS, NEGOTIATED);
    assert_eq!(d.status(), NEGOTIATED);
    // Queue 0 is set up; the selectors point elsewhere when the VM is saved.
    let layout = RingLayout::linux(GuestAddress(2 * MIB), 256);
    d.write_reg(reg::QUEUE_SEL, 0);
    d.write_reg(reg::QUEUE_NUM, 256);
    for (low, addr) in [
        (reg::QUEUE_DESC_LOW, layout.desc),
        (reg::QUEUE_AVAIL_LOW, layout.avail),
        (reg::QUEUE_USED_LOW, layout.used),
    ] {
        d.write_reg(low, addr.0 as u32);
        d.write_reg(low + 4, (addr.0 >> 32) as u32);
    }
    d.write_reg(reg::QUEUE_READY, 1);
    d.write_reg(reg::QUEUE_SEL, 2);
    d.write_reg(reg::DEVICE_FEATURES_SEL, 1);

    let (state, mmio) = rig.save(false);
    assert!(!state.activated);
    assert_eq!(state.acked_features, acked);
    let q0 = state.queues[0];
    assert!(q0.ready);
    assert_eq!(
        (q0.size, q0.desc_table, q0.avail_ring, q0.used_ring),
        (256, layout.desc.0, layout.avail.0, layout.used.0)
    );
    assert_eq!(
        mmio,
        MmioState {
            status: NEGOTIATED as u8,
            device_features_select: 1,
            driver_features_select: 0,
            queue_select: 2,
        }
    );
    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");
    assert_eq!(lock(&rig.dev).save_state(), mmio);
    assert_eq!(d.status(), NEGOTIATED);
    assert_eq!(
        d.read_reg(reg::DEVICE_FEATURES),
        (cfg.device_features() >> 32) as u32
    );
    d.write_reg(reg::QUEUE_SEL, 0);
    assert_eq!(d.read_reg(reg::QUEUE_READY), 1);
    d.write_reg(reg::STATUS, LIVE);
    assert_eq!(d.status(), LIVE);
    rig.with_dev(|dev| {
        assert!(dev.is_activated());
        assert_eq!(dev.driver_features(), acked);
        let q = dev.queue(0).expect("queue 0");
        assert_eq!(virtio_queue::QueueT::desc_table(q), layout.desc.0);
    });
}

// ---------------------------------------------------------------------------------------
// 8. Format versions and golden files
// ---------------------------------------------------------------------------------------

/// The stall timeout of the golden device.
const GOLDEN_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The device of the golden files, saved: a driver with event index and page poison; a
/// target of 1024 pages of which two inflate elements of 256 pages arrived and `actual` says
/// 512; the statistics buffer returned once and refilled, polling every 10 s; a free page
/// hint round in START with two hints applied. Since version 2 the stall watch is on and the
/// target stalled at 512 pages.
///
/// `tests/data/snapshot-v1.json` was written by version 1 of the crate (before states had a
/// version) from this scenario without the stall watch. The files are never rewritten: see
/// [`write_the_golden_file_of_a_new_version`].
fn golden_device() -> (Rig, BalloonState) {
    let mut hc = HarnessConfig::simple(256 * MIB, 4);
    hc.driver.ack_event_idx = true;
    hc.driver.guest_poison = Some(PAGE_POISON_VAL);
    hc.balloon.stall_timeout = Some(GOLDEN_STALL_TIMEOUT);
    let rig = Rig::new(hc);
    let clock = Arc::new(ManualClock::new());
    rig.with_dev(|d| d.set_clock(clock.clone()));
    let inflateq = rig
        .driver
        .queue_index(QueueRole::Inflate)
        .expect("inflateq");
    rig.with_dev(|d| d.set_target(1024));
    rig.relay();
    rig.driver.deliver_pending_interrupts().expect("interrupts");
    for first in [0x8000u32, 0x8100] {
        let part = pfn_part(&rig.driver, &pfn_range(first, 256));
        rig.driver
            .post_and_kick(inflateq, &[part], false)
            .expect("inflate");
    }
    rig.pump();
    assert_eq!(rig.driver.used_idx(inflateq).expect("used"), 2);
    rig.driver.write_config(config::ACTUAL, 4, 512);
    clock.advance(GOLDEN_STALL_TIMEOUT);
    assert!(rig.with_dev(|d| d.check_stall()));
    assert!(rig.with_dev(|d| d.request_stats()));
    rig.relay();
    rig.driver.deliver_pending_interrupts().expect("interrupts");
    assert!(rig.driver.run_stats_work().expect("stats work"));
    rig.pump();
    rig.with_dev(|d| {
        d.set_stats_interval(Duration::from_secs(10))
            .expect("stats interval")
    });
    let id = rig.start_round();
    rig.driver.deliver_pending_interrupts().expect("interrupts");
    assert_eq!(rig.driver.send_cmd_id_start().expect("start"), id);
    for _ in 0..2 {
        posted_block(rig.driver.get_free_page_and_send().expect("hint"));
    }
    rig.pump();
    assert_eq!(rig.hints.status().state, HintState::Start);
    rig.assert_clean();
    let (state, _) = rig.save(true);
    (rig, state)
}

/// The fields of a serialised state (a JSON object).
fn fields(value: &mut serde_json::Value) -> &mut serde_json::Map<String, serde_json::Value> {
    value
        .as_object_mut()
        .expect("a state serialises to a JSON object")
}

/// `state` as version 1 of the crate saw it: what version 2 added at its defaults.
fn as_version_1(state: &BalloonState) -> BalloonState {
    BalloonState {
        version: 1,
        stall_closest: None,
        target_stalled: false,
        metrics: {
            let mut m = state.metrics;
            m.target_stalls = 0;
            m
        },
        ..state.clone()
    }
}

fn golden_path(version: u32) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format!("snapshot-v{version}.json"))
}

fn read_golden(version: u32) -> BalloonState {
    let path = golden_path(version);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

/// Restores a golden state with the stall watch on, over new guest memory laid out as the
/// saved guest's (256 MiB at 0). The rings' contents live in guest memory, not in the
/// state; here the guest made available exactly what the device had read.
fn restore_golden(state: &BalloonState) -> (Balloon<Mem>, Arc<ManualClock>) {
    let mem = guest_memory(&[(GuestAddress(0), 256 * MIB)]);
    for q in &state.queues {
        mem.write_obj(q.next_avail, GuestAddress(q.avail_ring + 2))
            .expect("avail idx");
    }
    let cfg = BalloonConfig::default().with_stall_timeout(Some(GOLDEN_STALL_TIMEOUT));
    let sink: Arc<dyn FreePageSink> = Arc::new(RecordingSink::default());
    let backend: Arc<dyn MemoryBackend> = recording_backend();
    let mut dev = Balloon::restore(cfg, mem, sink, backend, state).expect("restore the golden");
    let clock = Arc::new(ManualClock::new());
    dev.set_clock(clock.clone());
    (dev, clock)
}

fn config32(dev: &Balloon<Mem>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

/// What every golden device is, restored: the fields of version 1.
fn check_golden_device(dev: &mut Balloon<Mem>, state: &BalloonState) {
    assert!(dev.is_activated());
    assert_eq!((dev.num_pages(), dev.actual()), (1024, 512));
    assert!(!dev.target_reached());
    assert_eq!(config32(dev, config::NUM_PAGES), 1024);
    assert_eq!(config32(dev, config::ACTUAL), 512);
    // Negotiated: everything offered but indirect descriptors.
    let offered = [
        f::VIRTIO_BALLOON_F_MUST_TELL_HOST,
        f::VIRTIO_BALLOON_F_STATS_VQ,
        f::VIRTIO_BALLOON_F_FREE_PAGE_HINT,
        f::VIRTIO_BALLOON_F_PAGE_POISON,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
        virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
    ]
    .iter()
    .fold(0u64, |bits, &b| bits | f::bit(b));
    assert_eq!(dev.device_features(), offered);
    assert_eq!(
        dev.driver_features(),
        offered & !f::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
    );
    assert!(dev.has_feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX));
    assert!(!dev.has_feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC));
    assert_eq!(dev.poison_val(), PAGE_POISON_VAL);
    assert_eq!(config32(dev, config::POISON_VAL), PAGE_POISON_VAL);
    // Where the device stands on each ring: (size, next_avail, next_used).
    let rings: Vec<(u16, u16, u16)> = (0..dev.num_queues())
        .map(|i| {
            let s = dev.live_queue_state(i).expect("queue");
            assert!(s.ready && s.event_idx_enabled, "queue {i}: {s:?}");
            let saved = state.queues[i];
            assert_eq!(
                (s.desc_table, s.avail_ring, s.used_ring),
                (saved.desc_table, saved.avail_ring, saved.used_ring)
            );
            (s.size, s.next_avail, s.next_used)
        })
        .collect();
    // inflateq read both inflate elements, deflateq nothing, statsq holds its second
    // buffer, the free page queue read the start buffer and two hints.
    assert_eq!(rings, [(256, 2, 2), (256, 0, 0), (256, 2, 1), (1024, 3, 3)]);
    // Hinting: the round was in START; the restored device is DONE and the id continues.
    let st = dev.hint_control().status();
    assert_eq!((st.state, st.cmd_id), (HintState::Done, 2));
    assert!(st.negotiated && !st.round_complete);
    assert_eq!(
        (
            st.metrics.elements,
            st.metrics.rounds_started,
            st.metrics.hints_accepted,
            st.metrics.bytes_accepted,
            st.metrics.drained
        ),
        (3, 1, 2, 2 * HINT_BLOCK_BYTES, 0)
    );
    assert_eq!(config32(dev, config::FREE_PAGE_HINT_CMD_ID), cmd::DONE);
    // The counters continue.
    let m = dev.metrics();
    assert_eq!((m.pages.inflate_elements, m.pages.inflated_pages), (2, 512));
    assert_eq!((m.stats_updates, m.stats_requests), (2, 1));
    assert_eq!(m.pages, state.metrics.pages);
    assert_eq!(m.hint, state.metrics.hint);
    // Statistics: polling continues, and the held buffer (head 0) goes back on request.
    assert_eq!(dev.stats_interval(), Duration::from_secs(10));
    assert!(!dev.discards_inhibited());
    // The pending used-buffer interrupt is raised again, and DONE is a configuration change.
    assert_eq!(
        u32::from(dev.interrupt().status()),
        isr::VRING | isr::CONFIG
    );
    assert_eq!(dev.interrupt().config_generation(), 3);
    assert!(dev.request_stats());
    let s = dev.live_queue_state(2).expect("statsq");
    assert_eq!((s.next_avail, s.next_used), (2, 2));
    assert!(!dev.request_stats(), "only one buffer was held");
}

/// Every later version must keep restoring this file, a state version 1 of the crate wrote
/// (without a `version` field).
#[test]
fn golden_version_1_state_restores() {
    let text = std::fs::read_to_string(golden_path(1)).expect("read the golden file");
    assert!(
        serde_json::from_str::<serde_json::Value>(&text)
            .expect("JSON")
            .get("version")
            .is_none(),
        "version 1 states have no version field"
    );
    let state = read_golden(1);
    assert_eq!(state.version, 1);
    // Fields added after version 1 read as their defaults.
    assert_eq!((state.stall_closest, state.target_stalled), (None, false));
    assert_eq!(state.metrics.target_stalls, 0);
    assert_eq!(state.hint_state, HintState::Start);

    let (mut dev, clock) = restore_golden(&state);
    // Saved again, the state is the current version, DONE, with the raised interrupt and
    // the new generation; the stall watch started on its own (512 pages from the target).
    let again = dev.save_state();
    let expected = BalloonState {
        version: BALLOON_STATE_VERSION,
        hint_state: HintState::Done,
        interrupt_status: 3,
        config_generation: 3,
        stall_closest: Some(512),
        target_stalled: false,
        ..state.clone()
    };
    assert_eq!(again, expected);
    check_golden_device(&mut dev, &state);

    // A version 1 state knew no stall; the restored device watches from the restore on.
    assert!(!dev.target_stalled());
    clock.advance(GOLDEN_STALL_TIMEOUT - Duration::from_secs(1));
    assert!(!dev.check_stall());
    assert!(!dev.take_events().contains(BalloonEvents::TARGET_STALLED));
    clock.advance(Duration::from_secs(1));
    assert!(dev.check_stall());
    assert!(dev.take_events().contains(BalloonEvents::TARGET_STALLED));
    assert_eq!(dev.metrics().target_stalls, 1);
}

/// Every later version must keep restoring this file, a state version 2 of the crate wrote.
#[test]
fn golden_version_2_state_restores() {
    let state = read_golden(2);
    assert_eq!(state.version, 2);
    assert_eq!(
        (state.stall_closest, state.target_stalled),
        (Some(512), true)
    );
    assert_eq!(state.metrics.target_stalls, 1);
    // The same device as version 1's, apart from what version 2 added.
    let v1 = read_golden(1);
    assert_eq!(as_version_1(&state), v1);

    let (mut dev, clock) = restore_golden(&state);
    // The stall survives: the restored device is stalled and tells its (maybe new) VMM,
    // without counting the stall twice.
    assert!(dev.target_stalled());
    assert!(dev.take_events().contains(BalloonEvents::TARGET_STALLED));
    assert_eq!(dev.metrics().target_stalls, 1);
    let again = dev.save_state();
    assert_eq!(
        again,
        BalloonState {
            hint_state: HintState::Done,
            interrupt_status: 3,
            config_generation: 3,
            ..state.clone()
        }
    );
    check_golden_device(&mut dev, &state);
    // No second event while nothing moves; progress clears the stall.
    clock.advance(GOLDEN_STALL_TIMEOUT * 3);
    assert!(dev.check_stall());
    assert!(!dev.take_events().contains(BalloonEvents::TARGET_STALLED));
    dev.write_config(config::ACTUAL, &600u32.to_le_bytes());
    assert!(!dev.target_stalled());
    assert_eq!(dev.metrics().target_stalls, 1);
}

/// The golden file of the current version exists and a device saved today reads back
/// equal to what the scenario saves: when the layout changes without a version bump and a
/// new file, this fails.
#[test]
fn saved_states_carry_the_current_version_and_have_a_golden_file() {
    let (_rig, state) = golden_device();
    assert_eq!(state.version, BALLOON_STATE_VERSION);
    let value = serde_json::to_value(&state).expect("serialize");
    assert_eq!(
        value.get("version"),
        Some(&serde_json::Value::from(BALLOON_STATE_VERSION))
    );
    let back: BalloonState = serde_json::from_value(value).expect("deserialize");
    assert_eq!(back, state);
    assert_eq!(
        read_golden(BALLOON_STATE_VERSION),
        state,
        "what the golden device saves differs from tests/data/snapshot-v{BALLOON_STATE_VERSION}.json: \
         a field was added, removed or changed meaning; bump BALLOON_STATE_VERSION (see its \
         documentation) and write the new version's golden file"
    );
}

/// Fields added after version 1 have serde defaults: a current state with them removed
/// reads as a version 1 state.
#[test]
fn fields_added_after_version_1_default_when_missing() {
    let (_rig, state) = golden_device();
    let mut value = serde_json::to_value(&state).expect("serialize");
    for key in ["version", "stall_closest", "target_stalled"] {
        assert!(fields(&mut value).remove(key).is_some(), "{key}");
    }
    let mut metrics = fields(&mut value).remove("metrics").expect("metrics");
    assert!(fields(&mut metrics).remove("target_stalls").is_some());
    fields(&mut value).insert("metrics".to_string(), metrics);
    let old: BalloonState = serde_json::from_value(value).expect("deserialize");
    assert_eq!(old, as_version_1(&state));
}

#[test]
fn a_newer_state_version_is_refused_and_the_device_keeps_running() {
    let mut rig = Rig::new(HarnessConfig::simple(256 * MIB, 3));
    let free = rig.driver.free_blocks();
    let (state, mmio) = rig.save(true);
    rig.with_dev(|d| d.resume());
    let cfg = rig.cfg;

    // A state from a later crate, with a field this one does not know: it parses (unknown
    // fields are ignored), and the version check refuses it instead of dropping the field.
    let mut value = serde_json::to_value(&state).expect("serialize");
    fields(&mut value).insert(
        "version".to_string(),
        serde_json::Value::from(BALLOON_STATE_VERSION + 1),
    );
    fields(&mut value).insert("from_the_future".to_string(), serde_json::Value::Bool(true));
    let newer: BalloonState = serde_json::from_value(value).expect("deserialize");
    match try_restore(&rig, cfg, &newer) {
        RestoreError::UnsupportedVersion { found, supported } => {
            assert_eq!(
                (found, supported),
                (BALLOON_STATE_VERSION + 1, BALLOON_STATE_VERSION)
            );
        }
        other => panic!("unexpected error: {other}"),
    }
    let text = try_restore(&rig, cfg, &newer).to_string();
    for number in [BALLOON_STATE_VERSION + 1, BALLOON_STATE_VERSION] {
        assert!(text.contains(&number.to_string()), "{text:?}");
    }
    // No crate writes version 0, nor the largest one.
    for version in [0, u32::MAX] {
        let bad = BalloonState {
            version,
            ..state.clone()
        };
        assert!(matches!(
            try_restore(&rig, cfg, &bad),
            RestoreError::UnsupportedVersion { found, .. } if found == version
        ));
    }

    // The running device did not notice: a whole hint round works end to end.
    rig.whole_round(free.len());
    assert_eq!(hint_set(&rig.sink.hints()), block_list(&free));

    // And every supported version restores.
    for version in 1..=BALLOON_STATE_VERSION {
        let ok = BalloonState {
            version,
            ..state.clone()
        };
        assert!(
            restore_detached(&rig, &ok).is_activated(),
            "version {version}"
        );
    }
    rig.restore(cfg, &state, mmio).expect("restore");
    assert_eq!(
        rig.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID),
        cmd::DONE
    );
    rig.assert_clean();
}

/// Writes the golden file of the current version, once: run it after bumping
/// `BALLOON_STATE_VERSION` (`cargo test --test snapshot -- --ignored
/// write_the_golden_file_of_a_new_version`). It refuses to overwrite a file: a golden file
/// is what an older crate wrote and stays as it is.
#[test]
#[ignore = "writes tests/data; run once per new state version"]
fn write_the_golden_file_of_a_new_version() {
    let path = golden_path(BALLOON_STATE_VERSION);
    assert!(
        !path.exists(),
        "{} exists: golden files are never rewritten",
        path.display()
    );
    let (_rig, state) = golden_device();
    let text = serde_json::to_string_pretty(&state).expect("serialize");
    std::fs::write(&path, text + "\n").expect("write the golden file");
}

// ---------------------------------------------------------------------------------------
// 9. The stall watch
// ---------------------------------------------------------------------------------------

#[test]
fn a_stall_watch_in_progress_keeps_its_closest_distance_across_restore() {
    let mut hc = HarnessConfig::simple(256 * MIB, 0);
    hc.balloon.stall_timeout = Some(GOLDEN_STALL_TIMEOUT);
    let mut rig = Rig::new(hc);
    let clock = Arc::new(ManualClock::new());
    rig.with_dev(|d| {
        d.set_clock(clock.clone());
        d.set_target(1024);
    });
    rig.relay();
    rig.driver.write_config(config::ACTUAL, 4, 512);
    // Most of the timeout passes on the source; the save does not carry it over.
    clock.advance(GOLDEN_STALL_TIMEOUT - Duration::from_secs(1));
    let (state, mmio) = rig.save(true);
    assert_eq!(
        (state.stall_closest, state.target_stalled),
        (Some(512), false)
    );
    let cfg = rig.cfg;
    rig.restore(cfg, &state, mmio).expect("restore");
    let clock = Arc::new(ManualClock::new());
    rig.with_dev(|d| {
        d.set_clock(clock.clone());
        d.take_events();
    });
    clock.advance(GOLDEN_STALL_TIMEOUT - Duration::from_secs(1));
    assert!(!rig.with_dev(|d| d.check_stall()), "the clock restarted");
    // The guest deflates on OOM and inflates back to where it was before the save: no
    // progress, so the timeout that started at the restore still runs out.
    rig.driver.write_config(config::ACTUAL, 4, 256);
    rig.driver.write_config(config::ACTUAL, 4, 512);
    clock.advance(Duration::from_secs(1));
    assert!(rig.with_dev(|d| d.check_stall()));
    assert!(rig
        .with_dev(|d| d.take_events())
        .contains(BalloonEvents::TARGET_STALLED));
    assert_eq!(rig.with_dev(|d| d.metrics().target_stalls), 1);

    // Without a stall timeout on the restoring side, a saved stall is dropped.
    let (stalled, _) = rig.save(true);
    assert!(stalled.target_stalled);
    let off = rig.cfg.with_stall_timeout(None);
    let sink: Arc<dyn FreePageSink> = Arc::new(RecordingSink::default());
    let backend: Arc<dyn MemoryBackend> = recording_backend();
    let mut dev = Balloon::restore(off, rig.mem.clone(), sink, backend, &stalled).expect("restore");
    assert!(!dev.target_stalled());
    assert!(!dev.take_events().contains(BalloonEvents::TARGET_STALLED));
    rig.assert_clean();
}
