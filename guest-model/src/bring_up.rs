// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A driver's bring-up over virtio-mmio registers without the driver model: register access,
//! feature negotiation, queue programming from a [`SplitRing`], and the shortest bring-up
//! (`VERSION_1` + `FREE_PAGE_HINT`, the free page queue, DRIVER_OK). Shared by tests and
//! benchmarks that drive the device by hand, hostile ones included.

use virtio_balloon::spec::{features, mmio, status};
use virtio_balloon::transport::{MmioTransport, VirtioDevice};
use vm_memory::GuestAddress;

use crate::mmio::{reg, status as st};
use crate::ring::{GuestMem, RingLayout, SplitRing};

fn reg_write<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Reads the 32-bit register at `offset`, as a driver does.
pub fn read32<D: VirtioDevice>(t: &MmioTransport<D>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes `value` to the 32-bit register at `offset`, as a driver does.
pub fn write32<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, value: u32) {
    reg_write(t, offset, value);
}

/// The 64 feature bits the device offers, read through both `DeviceFeaturesSel` pages.
pub fn device_features<D: VirtioDevice>(t: &mut MmioTransport<D>) -> u64 {
    reg_write(t, reg::DEVICE_FEATURES_SEL, 0);
    let lo = read32(t, reg::DEVICE_FEATURES);
    reg_write(t, reg::DEVICE_FEATURES_SEL, 1);
    let hi = read32(t, reg::DEVICE_FEATURES);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// Writes `acked` through both `DriverFeaturesSel` pages.
pub fn write_driver_features<D: VirtioDevice>(t: &mut MmioTransport<D>, acked: u64) {
    for page in 0..2u32 {
        reg_write(t, reg::DRIVER_FEATURES_SEL, page);
        reg_write(t, reg::DRIVER_FEATURES, (acked >> (32 * page)) as u32);
    }
}

/// The driver's first steps from a reset device: ACKNOWLEDGE, DRIVER (checked to read back),
/// the features `acked`, FEATURES_OK. Returns whether FEATURES_OK stuck.
pub fn negotiate<D: VirtioDevice>(t: &mut MmioTransport<D>, acked: u64) -> bool {
    reg_write(t, reg::STATUS, st::ACKNOWLEDGE);
    reg_write(t, reg::STATUS, st::ACKNOWLEDGE | st::DRIVER);
    assert_eq!(
        read32(t, reg::STATUS),
        st::ACKNOWLEDGE | st::DRIVER,
        "DRIVER refused"
    );
    write_driver_features(t, acked);
    reg_write(
        t,
        reg::STATUS,
        st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
    );
    read32(t, reg::STATUS) & st::FEATURES_OK != 0
}

/// Selects queue `index` and programs the size and the three addresses of `ring`; sets
/// `QueueReady` when `ready`.
pub fn program_ring<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    index: usize,
    ring: &SplitRing,
    ready: bool,
) {
    let l = ring.layout;
    reg_write(t, reg::QUEUE_SEL, index as u32);
    reg_write(t, reg::QUEUE_NUM, u32::from(l.size));
    for (low, addr) in [
        (reg::QUEUE_DESC_LOW, l.desc.0),
        (reg::QUEUE_AVAIL_LOW, l.avail.0),
        (reg::QUEUE_USED_LOW, l.used.0),
    ] {
        reg_write(t, low, addr as u32);
        reg_write(t, low + 4, (addr >> 32) as u32);
    }
    if ready {
        reg_write(t, reg::QUEUE_READY, 1);
    }
}

/// Lays queue `index` out as Linux does, with the device's maximum size (`QueueNumMax`), in
/// fresh ring memory at `base`, which must hold at most `room` bytes, and programs it
/// ([`program_ring`]). No callback, no EVENT_IDX: the ring writes no suppression state.
pub fn set_up_queue<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    mem: &GuestMem,
    index: usize,
    base: GuestAddress,
    room: u64,
    ready: bool,
) -> SplitRing {
    reg_write(t, reg::QUEUE_SEL, index as u32);
    let size = u16::try_from(read32(t, reg::QUEUE_NUM_MAX)).expect("queue size");
    assert!(size > 0, "queue {index} exists");
    let layout = RingLayout::linux(base, size);
    assert!(
        layout.end() <= base.0 + room,
        "ring of {size} entries too big"
    );
    let ring = SplitRing::new(mem, index as u16, layout, false, true, None).expect("ring memory");
    program_ring(t, index, &ring, ready);
    ring
}

/// Adds `bits` to the status register, as a driver does.
pub fn add_status<D: VirtioDevice>(t: &mut MmioTransport<D>, bits: u8) {
    let now = t.status();
    reg_write(t, mmio::REG_STATUS, u32::from(now | bits));
}

/// Sets queue `index` up with `size` entries and its three ring addresses.
pub fn program_queue<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    index: usize,
    size: u16,
    [desc, avail, used]: [u64; 3],
) {
    reg_write(t, mmio::REG_QUEUE_SEL, index as u32);
    reg_write(t, mmio::REG_QUEUE_NUM, u32::from(size));
    for (low, addr) in [
        (mmio::REG_QUEUE_DESC_LOW, desc),
        (mmio::REG_QUEUE_DRIVER_LOW, avail),
        (mmio::REG_QUEUE_DEVICE_LOW, used),
    ] {
        reg_write(t, low, addr as u32);
        reg_write(t, low + 4, (addr >> 32) as u32);
    }
    reg_write(t, mmio::REG_QUEUE_READY, 1);
}

/// Brings the device up with only `VERSION_1` and `FREE_PAGE_HINT` accepted (the device must
/// offer no stats queue, or the queue layout check refuses FEATURES_OK). `queues` lists the
/// queues to set up as (index, size, [desc, avail, used]). Panics if the device refuses.
pub fn bring_up_hinting<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    queues: &[(usize, u16, [u64; 3])],
) {
    add_status(t, status::ACKNOWLEDGE);
    add_status(t, status::DRIVER);
    let acked = features::bit(features::VIRTIO_F_VERSION_1)
        | features::bit(features::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    for page in 0..2u32 {
        reg_write(t, mmio::REG_DRIVER_FEATURES_SEL, page);
        reg_write(t, mmio::REG_DRIVER_FEATURES, (acked >> (32 * page)) as u32);
    }
    add_status(t, status::FEATURES_OK);
    assert_ne!(t.status() & status::FEATURES_OK, 0, "FEATURES_OK refused");
    for &(index, size, rings) in queues {
        program_queue(t, index, size, rings);
    }
    add_status(t, status::DRIVER_OK);
    assert!(t.device().is_activated(), "DRIVER_OK refused");
}
