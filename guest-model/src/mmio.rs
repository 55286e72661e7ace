// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-mmio (version 2) register map, status and feature bits, and the [`Bus`] through
//! which the guest model reaches the device.

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;

/// Register offsets of the virtio-mmio version 2 transport.
pub mod reg {
    /// MagicValue.
    pub const MAGIC: u64 = 0x000;
    /// Version (2 for modern).
    pub const VERSION: u64 = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status.
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (avail ring).
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// QueueDriverHigh.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// QueueDeviceLow (used ring).
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// ConfigGeneration.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 64;
    /// FAILED.
    pub const FAILED: u32 = 128;
}

/// Feature bit numbers.
pub mod feature {
    /// VIRTIO_BALLOON_F_MUST_TELL_HOST.
    pub const MUST_TELL_HOST: u32 = 0;
    /// VIRTIO_BALLOON_F_STATS_VQ.
    pub const STATS_VQ: u32 = 1;
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// VIRTIO_BALLOON_F_FREE_PAGE_HINT.
    pub const FREE_PAGE_HINT: u32 = 3;
    /// VIRTIO_BALLOON_F_PAGE_POISON.
    pub const PAGE_POISON: u32 = 4;
    /// VIRTIO_BALLOON_F_REPORTING.
    pub const REPORTING: u32 = 5;
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// VIRTIO_RING_F_EVENT_IDX.
    pub const RING_EVENT_IDX: u32 = 29;
    /// VIRTIO_F_VERSION_1.
    pub const VERSION_1: u32 = 32;
    /// VIRTIO_F_ACCESS_PLATFORM.
    pub const ACCESS_PLATFORM: u32 = 33;

    /// The mask of one bit.
    pub const fn bit(b: u32) -> u64 {
        1 << b
    }
}

/// InterruptStatus bits.
pub mod isr {
    /// Used buffer notification.
    pub const VRING: u32 = 1;
    /// Configuration change notification.
    pub const CONFIG: u32 = 2;
}

/// Offsets in the balloon's config space.
pub mod config {
    /// num_pages.
    pub const NUM_PAGES: u64 = 0x00;
    /// actual.
    pub const ACTUAL: u64 = 0x04;
    /// free_page_hint_cmd_id.
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 0x08;
    /// poison_val.
    pub const POISON_VAL: u64 = 0x0c;
}

/// Reserved command ids.
pub mod cmd {
    /// VIRTIO_BALLOON_CMD_ID_STOP.
    pub const STOP: u32 = 0;
    /// VIRTIO_BALLOON_CMD_ID_DONE.
    pub const DONE: u32 = 1;
}

/// A virtio-mmio device as the guest reaches it: byte-addressed accesses at offsets from the
/// start of the device's MMIO window.
pub trait Bus: Send + Sync {
    /// An MMIO read of `data.len()` bytes.
    fn read(&self, offset: u64, data: &mut [u8]);

    /// An MMIO write of `data.len()` bytes.
    fn write(&self, offset: u64, data: &[u8]);

    /// A 4-byte little-endian register read.
    fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A 4-byte little-endian register write.
    fn write32(&self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }
}

/// One recorded MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Write (true) or read.
    pub write: bool,
    /// Offset in the MMIO window.
    pub offset: u64,
    /// Width in bytes.
    pub width: usize,
    /// Value read or written (little endian, zero-extended).
    pub value: u64,
}

/// A [`Bus`] that remembers the most recent accesses, for evidence in failure messages.
pub struct TracingBus<B> {
    inner: B,
    log: std::sync::Mutex<std::collections::VecDeque<Access>>,
    capacity: usize,
}

impl<B: Bus> TracingBus<B> {
    /// Keeps the last `capacity` accesses to `inner`.
    pub fn new(inner: B, capacity: usize) -> Self {
        TracingBus {
            inner,
            log: std::sync::Mutex::new(std::collections::VecDeque::new()),
            capacity,
        }
    }

    /// The remembered accesses, oldest first.
    pub fn recent(&self) -> Vec<Access> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    fn record(&self, write: bool, offset: u64, data: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == self.capacity {
            log.pop_front();
        }
        log.push_back(Access {
            write,
            offset,
            width: data.len(),
            value: u64::from_le_bytes(v),
        });
    }
}

impl<B: Bus> Bus for TracingBus<B> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.inner.read(offset, data);
        self.record(false, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.inner.write(offset, data);
        self.record(true, offset, data);
    }
}
