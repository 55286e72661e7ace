// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device over `GuestMemoryAtomic`, whose memory map can change under it (hotplug). If
//! the map loses the rings, every queue operation fails: the device must neither panic nor
//! loop, apply nothing, and serve the queues again once the memory is back.

use std::sync::Arc;

use virtio_balloon::sink::RecordingSink;
use virtio_balloon::spec::{features as f, mmio, status};
use virtio_balloon::transport::MmioTransport;
use virtio_balloon::{Balloon, BalloonConfig, HintState, QueueRole};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

type Mem = GuestMemoryMmap;
type Atomic = GuestMemoryAtomic<Mem>;

const RING_SIZE: u16 = 16;
const WRITE: u16 = 2;

fn wr(t: &mut MmioTransport<Balloon<Atomic>>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Adds `bits` to the status register, as a driver does.
fn add_status(t: &mut MmioTransport<Balloon<Atomic>>, bits: u8) {
    let now = t.status();
    wr(t, mmio::REG_STATUS, u32::from(now | bits));
}

/// Programs queue `index` at the mock ring's addresses.
fn program(t: &mut MmioTransport<Balloon<Atomic>>, index: u32, q: &MockSplitQueue<'_, Mem>) {
    wr(t, mmio::REG_QUEUE_SEL, index);
    wr(t, mmio::REG_QUEUE_NUM, u32::from(RING_SIZE));
    for (low, addr) in [
        (mmio::REG_QUEUE_DESC_LOW, q.desc_table_addr()),
        (mmio::REG_QUEUE_DRIVER_LOW, q.avail_addr()),
        (mmio::REG_QUEUE_DEVICE_LOW, q.used_addr()),
    ] {
        wr(t, low, addr.0 as u32);
        wr(t, low + 4, (addr.0 >> 32) as u32);
    }
    wr(t, mmio::REG_QUEUE_READY, 1);
}

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

    for s in [status::ACKNOWLEDGE, status::DRIVER] {
        add_status(&mut t, s);
    }
    let acked = f::bit(f::VIRTIO_F_VERSION_1) | f::bit(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    for page in 0..2u32 {
        wr(&mut t, mmio::REG_DRIVER_FEATURES_SEL, page);
        wr(
            &mut t,
            mmio::REG_DRIVER_FEATURES,
            (acked >> (32 * page)) as u32,
        );
    }
    add_status(&mut t, status::FEATURES_OK);
    let inflate_q = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), RING_SIZE);
    let fp_q = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), RING_SIZE);
    program(&mut t, inflate as u32, &inflate_q);
    program(&mut t, fpq as u32, &fp_q);
    add_status(&mut t, status::DRIVER_OK);
    assert_eq!(t.status() & status::DRIVER_OK, status::DRIVER_OK);

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
