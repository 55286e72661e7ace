// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The configuration generation follows every change of what the device shows, including
//! the one the guest causes itself: its STOP of a free page hint round moves
//! `free_page_hint_cmd_id` from the round's id to 0. The virtio specification (1.2, sections
//! 2.5.1 and 4.2.2) has a driver read the configuration between two reads of the generation
//! and retry if they differ, so the device must present a new generation after such a change;
//! it raises no configuration interrupt for it (the guest knows). The device's own changes
//! (a new target, a new round, STOP or DONE from the migration) bump it and interrupt, as
//! before; the driver's own writes (`actual`, `poison_val`) and a reset do not bump it.

use guest_model as common;

use std::sync::Arc;

use common::*;
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::spec::features as f;
use virtio_balloon::transport::VirtioDevice;
use virtio_balloon::{Balloon, BalloonConfig, HintState};
use vm_memory::Bytes;

/// A 4-byte read of an MMIO register, straight through the transport.
fn mmio_reg(h: &Harness, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    h.dev.lock().unwrap().read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// `virtio_cread` of a 32-bit configuration field as Linux does it: read the generation,
/// the field, the generation again, and start over until both generations agree. Returns
/// the value and how many times the field was read. `between` runs after the first read of
/// the field, to put a device-side change in the middle of the first attempt.
fn cread32(h: &Harness, offset: u64, mut between: impl FnMut()) -> (u32, u32) {
    let mut reads = 0;
    loop {
        let before = mmio_reg(h, reg::CONFIG_GENERATION);
        let value = h.driver.read_config32(offset);
        reads += 1;
        if reads == 1 {
            between();
        }
        if mmio_reg(h, reg::CONFIG_GENERATION) == before {
            return (value, reads);
        }
        assert!(reads < 10, "the generation never settles");
    }
}

/// Brings a round to START with one hint applied; returns the round id and the free page
/// queue. Every interrupt so far has been handled by the guest.
fn round_in_start(h: &Harness) -> (u32, u16) {
    let q = h.driver.free_page_queue().expect("free page queue");
    let id = h.hints.start_round();
    h.driver.wait_config_change().expect("config interrupt");
    assert_eq!(h.driver.send_cmd_id_start().expect("start"), id);
    h.driver.get_free_page_and_send().expect("hint");
    h.driver.wait_all_used(q).expect("used");
    assert_eq!(h.hints.status().state, HintState::Start);
    h.driver.deliver_pending_interrupts().expect("interrupts");
    (id, q)
}

#[test]
fn the_guests_stop_moves_the_generation_without_an_interrupt() {
    let h = Harness::new(
        HarnessConfig::simple(256 * MIB, 4),
        Arc::new(RecordingSink::default()),
    );
    let gen0 = mmio_reg(&h, reg::CONFIG_GENERATION);
    let (id, q) = round_in_start(&h);
    // Publishing the id was the device's change (one bump, one interrupt); the guest's start
    // buffer changed nothing the configuration shows.
    let gen_start = mmio_reg(&h, reg::CONFIG_GENERATION);
    assert_eq!(gen_start, gen0.wrapping_add(1));
    assert_eq!(h.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID), id);
    let config_irqs = h.driver.config_interrupts();
    assert_eq!(mmio_reg(&h, reg::INTERRUPT_STATUS) & isr::CONFIG, 0);

    // The guest's STOP: a 4-byte out buffer holding 0.
    h.driver.send_cmd_id_stop().expect("stop");
    h.driver.wait_all_used(q).expect("used");
    assert!(h.hints.wait_round_complete(DEADLINE));
    assert_eq!(h.hints.status().state, HintState::Stop);
    assert_eq!(
        h.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID),
        cmd::STOP
    );
    assert_eq!(
        mmio_reg(&h, reg::CONFIG_GENERATION),
        gen_start.wrapping_add(1),
        "the shown id changed: a new generation"
    );
    assert_eq!(
        mmio_reg(&h, reg::INTERRUPT_STATUS) & isr::CONFIG,
        0,
        "no configuration interrupt for the guest's own change"
    );
    h.driver.deliver_pending_interrupts().expect("interrupts");
    assert_eq!(h.driver.config_interrupts(), config_irqs);

    // The device's own DONE still bumps the generation and interrupts.
    h.hints.done();
    assert_eq!(
        mmio_reg(&h, reg::CONFIG_GENERATION),
        gen_start.wrapping_add(2)
    );
    assert_ne!(mmio_reg(&h, reg::INTERRUPT_STATUS) & isr::CONFIG, 0);
    h.driver.wait_config_change().expect("config interrupt");
    assert_eq!(h.driver.config_interrupts(), config_irqs + 1);
    h.assert_clean();
}

#[test]
fn a_configuration_read_across_the_guests_stop_is_retried() {
    let h = Harness::new(
        HarnessConfig::simple(256 * MIB, 4),
        Arc::new(RecordingSink::default()),
    );
    let (id, q) = round_in_start(&h);
    // Nothing changes: one read.
    assert_eq!(cread32(&h, config::FREE_PAGE_HINT_CMD_ID, || {}), (id, 1));
    // The STOP lands while the driver reads: the first value is stale, the generation says
    // so, and the second read sees STOP.
    let (value, reads) = cread32(&h, config::FREE_PAGE_HINT_CMD_ID, || {
        h.driver.send_cmd_id_stop().expect("stop");
        h.driver.wait_all_used(q).expect("used");
        assert!(h.hints.wait_round_complete(DEADLINE));
    });
    assert_eq!((value, reads), (cmd::STOP, 2));
    h.assert_clean();
}

#[test]
fn any_out_buffer_that_ends_the_round_moves_the_generation() {
    // QEMU ends a round on any out-buffer in START, whatever it holds: a second start
    // buffer does too, and changes what the configuration shows the same way.
    let h = Harness::new(
        HarnessConfig::simple(256 * MIB, 4),
        Arc::new(RecordingSink::default()),
    );
    let (id, q) = round_in_start(&h);
    let gen = mmio_reg(&h, reg::CONFIG_GENERATION);
    let slot = h.driver.alloc_scratch(4, 4).expect("scratch");
    h.driver.mem().write_obj(id, slot).expect("write the id");
    h.driver
        .post_and_kick(q, &[Part::out(slot, 4)], false)
        .expect("post");
    h.driver.wait_all_used(q).expect("used");
    assert!(h.hints.wait_round_complete(DEADLINE));
    assert_eq!(mmio_reg(&h, reg::CONFIG_GENERATION), gen.wrapping_add(1));
    assert_eq!(mmio_reg(&h, reg::INTERRUPT_STATUS) & isr::CONFIG, 0);
    // Out buffers once the round is over change nothing.
    h.driver.send_cmd_id_stop().expect("stop");
    h.driver.wait_all_used(q).expect("used");
    assert_eq!(mmio_reg(&h, reg::CONFIG_GENERATION), gen.wrapping_add(1));
    assert_eq!(h.hints.status().metrics.ignored_commands, 1);
    h.driver.reclaim(q).expect("reclaim");
}

#[test]
fn a_whole_round_of_the_background_driver_moves_the_generation_twice_and_interrupts_once() {
    let mut cfg = HarnessConfig::simple(256 * MIB, 8);
    cfg.background = true;
    let h = Harness::new(cfg, Arc::new(RecordingSink::default()));
    let q = h.driver.free_page_queue().expect("free page queue");
    let gen0 = h.driver.read_reg(reg::CONFIG_GENERATION);
    let config_irqs = h.driver.config_interrupts();

    let id = h.hints.start_round();
    assert!(
        h.hints.wait_round_complete(DEADLINE),
        "the guest's round never completed: {}",
        h.driver.diag(q)
    );
    h.driver.wait_all_used(q).expect("used");
    let rounds = h.driver.rounds();
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert_eq!(rounds[0].id, id);
    assert_eq!(h.hints.status().metrics.rounds_stopped_by_guest, 1);
    // One bump for the id the device published, one for the STOP the guest sent.
    assert_eq!(
        h.driver.read_reg(reg::CONFIG_GENERATION),
        gen0.wrapping_add(2)
    );
    assert_eq!(
        h.driver.read_config32(config::FREE_PAGE_HINT_CMD_ID),
        cmd::STOP
    );
    // The guest's interrupt thread saw the device's change only.
    wait_until("the round's configuration interrupt", || {
        h.driver.config_interrupts() == config_irqs + 1
    })
    .unwrap();
    assert_eq!(mmio_reg(&h, reg::INTERRUPT_STATUS) & isr::CONFIG, 0);
    h.assert_clean();
}

#[test]
fn dropping_page_poison_clears_poison_val_under_a_new_generation() {
    // Linux negotiates twice when it drops PAGE_POISON; a poison value written in between
    // does not survive, and that change of the configuration gets a new generation (before
    // DRIVER_OK, so no interrupt).
    let mem = guest_memory(&[(vm_memory::GuestAddress(0), 16 * MIB)]);
    let mut dev: Balloon<Mem> = Balloon::new(
        BalloonConfig::default(),
        mem,
        Arc::new(RecordingSink::default()),
    )
    .expect("balloon");
    let base = f::bit(f::VIRTIO_F_VERSION_1)
        | f::bit(f::VIRTIO_BALLOON_F_MUST_TELL_HOST)
        | f::bit(f::VIRTIO_BALLOON_F_STATS_VQ)
        | f::bit(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    dev.ack_features(base | f::bit(f::VIRTIO_BALLOON_F_PAGE_POISON))
        .expect("features");
    dev.write_config(config::POISON_VAL, &0xaaaa_aaaau32.to_le_bytes());
    assert_eq!(dev.poison_val(), 0xaaaa_aaaa);
    let gen = dev.interrupt().config_generation();
    assert_eq!(gen, 0, "the driver's own write is no device change");

    dev.ack_features(base)
        .expect("features without PAGE_POISON");
    assert_eq!(dev.poison_val(), 0);
    assert_eq!(dev.interrupt().config_generation(), 1);
    assert_eq!(dev.interrupt().status(), 0);
    // Negotiating again changes nothing more.
    dev.ack_features(base).expect("features");
    assert_eq!(dev.interrupt().config_generation(), 1);
}
