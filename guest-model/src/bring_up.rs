// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A driver's bring-up over virtio-mmio registers without the driver model: register access,
//! feature negotiation, queue programming from a [`SplitRing`], and the shortest bring-up
//! (`VERSION_1` + `FREE_PAGE_HINT`, the free page queue, DRIVER_OK). Shared by tests and
//! benchmarks that drive the device by hand, hostile ones included.

use virtio_balloon::defs::features;
use virtio_balloon::transport::{MmioTransport, VirtioDevice};
use vm_memory::GuestAddress;

use std::sync::Arc;

use virtio_balloon::sink::RecordingSink;
use virtio_balloon::{Balloon, BalloonConfig, FreePageHinting};

use crate::mmio::{feature, reg, status as st};
use crate::ring::{GuestMem, Part, RingLayout, SplitRing};

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
    reg_write(t, reg::STATUS, u32::from(now | bits));
}

/// Sets queue `index` up with `size` entries and its three ring addresses.
pub fn program_queue<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    index: usize,
    size: u16,
    [desc, avail, used]: [u64; 3],
) {
    reg_write(t, reg::QUEUE_SEL, index as u32);
    reg_write(t, reg::QUEUE_NUM, u32::from(size));
    for (low, addr) in [
        (reg::QUEUE_DESC_LOW, desc),
        (reg::QUEUE_AVAIL_LOW, avail),
        (reg::QUEUE_USED_LOW, used),
    ] {
        reg_write(t, low, addr as u32);
        reg_write(t, low + 4, (addr >> 32) as u32);
    }
    reg_write(t, reg::QUEUE_READY, 1);
}

/// Brings the device up with only `VERSION_1` and `FREE_PAGE_HINT` accepted (the device must
/// offer no stats queue, or the queue layout check refuses FEATURES_OK). `queues` lists the
/// queues to set up as (index, size, [desc, avail, used]). Panics if the device refuses.
pub fn bring_up_hinting<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    queues: &[(usize, u16, [u64; 3])],
) {
    add_status(t, st::ACKNOWLEDGE as u8);
    add_status(t, st::DRIVER as u8);
    let acked = features::bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
        | features::bit(features::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    for page in 0..2u32 {
        reg_write(t, reg::DRIVER_FEATURES_SEL, page);
        reg_write(t, reg::DRIVER_FEATURES, (acked >> (32 * page)) as u32);
    }
    add_status(t, st::FEATURES_OK as u8);
    assert_ne!(t.status() & st::FEATURES_OK as u8, 0, "FEATURES_OK refused");
    for &(index, size, rings) in queues {
        program_queue(t, index, size, rings);
    }
    add_status(t, st::DRIVER_OK as u8);
    assert!(t.device().is_activated(), "DRIVER_OK refused");
}

/// The device behind virtio-mmio as a [`RawRig`] holds it.
pub type RawTransport = MmioTransport<Balloon<Arc<GuestMem>>>;

/// Guest RAM of a [`RawRig`]: 4 MiB at 0.
pub const RAW_RIG_MEM_SIZE: u64 = 0x40_0000;

/// A balloon behind virtio-mmio over [`RAW_RIG_MEM_SIZE`] of guest memory, with a recording
/// sink, for tests that drive the transport register by register (no driver model, no
/// event loop unless the test makes one).
#[derive(Debug)]
pub struct RawRig {
    /// The transport, driven by hand.
    pub t: RawTransport,
    /// Guest memory.
    pub mem: Arc<GuestMem>,
    /// The migration side's handle on free page hinting.
    pub hints: FreePageHinting,
    /// Every hint the device delivered.
    pub sink: Arc<RecordingSink>,
    /// What the tests' driver accepts by default: everything offered except EVENT_IDX (so
    /// every used buffer raises an interrupt).
    pub ack: u64,
}

impl RawRig {
    /// A device made from `cfg`, status 0.
    pub fn new(cfg: BalloonConfig) -> Self {
        let mem = Arc::new(
            GuestMem::from_ranges(&[(GuestAddress(0), RAW_RIG_MEM_SIZE as usize)])
                .expect("guest memory"),
        );
        let sink = Arc::new(RecordingSink::default());
        let dev = Balloon::new(cfg, mem.clone(), sink.clone()).expect("balloon");
        let hints = dev.hint_control();
        let ack = dev.device_features() & !feature::bit(feature::RING_EVENT_IDX);
        RawRig {
            t: MmioTransport::new(dev),
            mem,
            hints,
            sink,
            ack,
        }
    }

    /// A device made from `cfg` with [`ack`](Self::ack) negotiated (FEATURES_OK, no queue,
    /// no DRIVER_OK).
    pub fn negotiated(cfg: BalloonConfig) -> Self {
        let mut r = RawRig::new(cfg);
        let acked = r.ack;
        assert!(negotiate(&mut r.t, acked), "FEATURES_OK refused");
        r
    }
}

/// `BalloonConfig::default()` changed by `f`.
pub fn config_with(f: impl FnOnce(&mut BalloonConfig)) -> BalloonConfig {
    let mut cfg = BalloonConfig::default();
    f(&mut cfg);
    cfg
}

/// The driver side of queue `index`'s ring of `size` entries, the queues 64 KiB apart from
/// 64 KiB on.
pub fn ring_for(mem: &GuestMem, index: u32, size: u16) -> SplitRing {
    ring_at(mem, 0x1_0000 * (u64::from(index) + 1), size)
}

/// The driver side of a ring of `size` entries laid out (and cleared) at `base` as Linux's
/// `vring_init` does. No callback, no EVENT_IDX: the ring writes no suppression state.
pub fn ring_at(mem: &GuestMem, base: u64, size: u16) -> SplitRing {
    let layout = RingLayout::linux(GuestAddress(base), size);
    SplitRing::new(mem, 0, layout, false, true, None).expect("ring memory")
}

/// Negotiates `acked`, programs `rings` (queue index, ring), sets DRIVER_OK and checks the
/// device is live.
pub fn bring_up_rings(t: &mut RawTransport, acked: u64, rings: &[(u32, &SplitRing)]) {
    assert!(negotiate(t, acked), "FEATURES_OK refused");
    for (index, ring) in rings {
        program_ring(t, *index as usize, ring, true);
    }
    let live = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK;
    write32(t, reg::STATUS, live);
    assert_eq!(read32(t, reg::STATUS), live, "activation failed");
    assert!(t.device().is_activated());
}

/// Reads and clears the interrupt eventfd (0 when it was not signalled).
pub fn take_irq(t: &RawTransport) -> u64 {
    t.device().interrupt().eventfd().read().unwrap_or(0)
}

/// A 32-bit read at offset `off` of the configuration space.
pub fn config_read32<D: VirtioDevice>(t: &MmioTransport<D>, off: u64) -> u32 {
    read32(t, reg::CONFIG + off)
}

/// The first `len` bytes of the configuration space, in one read.
pub fn config_bytes<D: VirtioDevice>(t: &MmioTransport<D>, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    t.read(reg::CONFIG, &mut b);
    b
}

/// Posts a 4-byte command buffer (a start buffer carrying `id`, or STOP) from guest address
/// `slot` on `ring`. Returns its head.
pub fn post_command(ring: &mut SplitRing, mem: &GuestMem, slot: u64, id: u32) -> u16 {
    use vm_memory::Bytes;
    mem.write_obj(id.to_le(), GuestAddress(slot))
        .expect("command slot");
    ring.add(mem, &[Part::out(GuestAddress(slot), 4)], false, 0)
        .expect("post the command")
}
