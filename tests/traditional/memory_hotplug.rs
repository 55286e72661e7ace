// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device over `GuestMemoryAtomic`, whose memory map can change under it (hotplug). If
//! the map loses the rings, every queue operation fails: the device must neither panic nor
//! loop, apply nothing, and serve the queues again once the memory is back.

use std::sync::Arc;

use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::MmioTransport;
use virtio_balloon::{Balloon, BalloonConfig, HintState, QueueRole};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use guest_model::bring_up;
use guest_model::ring::{GuestMem as Mem, Part, RingLayout, SplitRing};
type Atomic = GuestMemoryAtomic<Mem>;

const RING_SIZE: u16 = 16;

/// The driver side of a ring at `base`, laid out as Linux does.
fn ring(mem: &Mem, base: u64) -> SplitRing {
    let layout = RingLayout::linux(GuestAddress(base), RING_SIZE);
    SplitRing::new(mem, 0, layout, false, true, None).unwrap()
}

/// A one-part chain.
fn post(q: &mut SplitRing, mem: &Mem, part: Part) {
    q.add(mem, &[part], false, 0).unwrap();
}

#[test]
fn queues_survive_guest_memory_losing_their_rings() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let atomic = Atomic::new(mem.clone());
    let sink = Arc::new(RecordingSink::default());
    let cfg = BalloonConfig::default().with_stats(false);
    let balloon = Balloon::new(cfg, atomic.clone(), sink.clone()).unwrap();
    let hints = balloon.hint_control();
    let inflate = balloon.queue_layout().index(QueueRole::Inflate).unwrap();
    let fpq = balloon.queue_layout().index(QueueRole::FreePage).unwrap();
    let mut t = MmioTransport::new(balloon);

    let mut inflate_q = ring(&mem, 0x1_0000);
    let mut fp_q = ring(&mem, 0x2_0000);
    let rings = |q: &SplitRing| [q.layout.desc.0, q.layout.avail.0, q.layout.used.0];
    bring_up::bring_up_hinting(
        &mut t,
        &[
            (inflate, RING_SIZE, rings(&inflate_q)),
            (fpq, RING_SIZE, rings(&fp_q)),
        ],
    );

    // A queue the driver did not set up, and one that does not exist, are no work.
    let deflate = t.device().queue_layout().index(QueueRole::Deflate).unwrap();
    t.device_mut().process_queue(deflate);
    t.device_mut().process_queue(99);

    // A round in START.
    let id = hints.start_round();
    mem.write_obj(id, GuestAddress(0x3_0000)).unwrap();
    post(&mut fp_q, &mem, Part::out(GuestAddress(0x3_0000), 4));
    t.device_mut().process_queue(fpq);
    assert_eq!(hints.status().state, HintState::Start);

    // The guest posts a hint and a PFN array; then the memory map loses the rings.
    post(
        &mut fp_q,
        &mem,
        Part::input(GuestAddress(0x20_0000), 0x1000),
    );
    post(&mut inflate_q, &mem, Part::out(GuestAddress(0x3_1000), 4));
    atomic
        .lock()
        .unwrap()
        .replace(Mem::from_ranges(&[(GuestAddress(0x10_0000), 0x30_0000)]).unwrap());

    t.device_mut().process_queue(inflate);
    t.device_mut().process_queue(fpq);
    hints.stop_round();
    assert!(
        sink.hints().is_empty(),
        "nothing is applied without the rings"
    );
    assert_eq!(inflate_q.used_idx(&mem).unwrap(), 0);
    assert_eq!(
        fp_q.used_idx(&mem).unwrap(),
        1,
        "only the start buffer was used"
    );

    // The memory comes back: the queues are served again (the hint arrives in STOP).
    atomic.lock().unwrap().replace(mem.clone());
    t.device_mut().process_queue(inflate);
    t.device_mut().process_queue(fpq);
    assert_eq!(inflate_q.used_idx(&mem).unwrap(), 1);
    assert_eq!(fp_q.used_idx(&mem).unwrap(), 2);
    assert!(sink.hints().is_empty());
    assert_eq!(hints.status().metrics.hints_wrong_state, 1);
}
