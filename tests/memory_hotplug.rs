// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device over `GuestMemoryAtomic`, whose memory map can change under it (hotplug). If
//! the map loses the rings, every queue operation fails: the device must neither panic nor
//! loop, apply nothing, and serve the queues again once the memory is back.

use std::sync::Arc;

use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::MmioTransport;
use virtio_balloon::{Balloon, BalloonConfig, HintState, QueueRole};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use guest_model::bring_up;
type Mem = GuestMemoryMmap;
type Atomic = GuestMemoryAtomic<Mem>;

const RING_SIZE: u16 = 16;
const WRITE: u16 = 2;

#[test]
fn queues_survive_guest_memory_losing_their_rings() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let atomic = Atomic::new(mem.clone());
    let sink = Arc::new(RecordingSink::default());
    let cfg = BalloonConfig {
        stats: false,
        ..BalloonConfig::default()
    };
    let balloon = Balloon::new(cfg, atomic.clone(), sink.clone()).unwrap();
    let hints = balloon.hint_control();
    let inflate = balloon.queue_layout().index(QueueRole::Inflate).unwrap();
    let fpq = balloon.queue_layout().index(QueueRole::FreePage).unwrap();
    let mut t = MmioTransport::new(balloon);

    let inflate_q = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), RING_SIZE);
    let fp_q = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), RING_SIZE);
    let rings =
        |q: &MockSplitQueue<'_, Mem>| [q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0];
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
    let start = RawDescriptor::from(Descriptor::new(0x3_0000, 4, 0, 0));
    fp_q.add_desc_chains(&[start], 0).unwrap();
    t.device_mut().process_queue(fpq);
    assert_eq!(hints.status().state, HintState::Start);

    // The guest posts a hint and a PFN array; then the memory map loses the rings.
    let hint = RawDescriptor::from(Descriptor::new(0x20_0000, 0x1000, WRITE, 0));
    fp_q.add_desc_chains(&[hint], 1).unwrap();
    let pfns = RawDescriptor::from(Descriptor::new(0x3_1000, 4, 0, 0));
    inflate_q.add_desc_chains(&[pfns], 0).unwrap();
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
    assert_eq!(inflate_q.used().idx().load(), 0);
    assert_eq!(
        fp_q.used().idx().load(),
        1,
        "only the start buffer was used"
    );

    // The memory comes back: the queues are served again (the hint arrives in STOP).
    atomic.lock().unwrap().replace(mem.clone());
    t.device_mut().process_queue(inflate);
    t.device_mut().process_queue(fpq);
    assert_eq!(inflate_q.used().idx().load(), 1);
    assert_eq!(fp_q.used().idx().load(), 2);
    assert!(sink.hints().is_empty());
    assert_eq!(hints.status().metrics.hints_wrong_state, 1);
}
