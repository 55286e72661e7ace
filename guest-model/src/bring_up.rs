// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The shortest driver bring-up: negotiate `VERSION_1` + `FREE_PAGE_HINT` over virtio-mmio
//! registers, set up the free page queue and set DRIVER_OK. Shared by
//! tests and benchmarks that need a device in a known state without the driver model.

use virtio_balloon::spec::{features, mmio, status};
use virtio_balloon::transport::{MmioTransport, VirtioDevice};

fn reg_write<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
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
