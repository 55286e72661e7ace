// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Constants of the virtio balloon specification.

/// log2 of the balloon's page size: PFNs and free page hints are in 4 KiB units whatever the
/// host's page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PAGE_SHIFT: u32 = 12;

/// The balloon's page size in bytes (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// The virtio device id of the traditional memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// Feature bits of the balloon device (bit numbers).
pub mod features {
    /// The driver tells the device before it reuses ballooned pages.
    pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
    /// A statistics queue exists.
    pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
    /// The driver may deflate on its own when the guest runs out of memory.
    pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
    /// A free page hint queue exists and `free_page_hint_cmd_id` is valid.
    pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
    /// The driver reports the value it fills freed pages with (`poison_val`).
    pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
    /// A free page reporting queue exists.
    pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

    /// The ring supports indirect descriptor tables.
    pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
    /// The ring supports the `used_event` and `avail_event` fields.
    pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
    /// The device complies with virtio 1.0 or later (required by virtio-mmio version 2).
    pub const VIRTIO_F_VERSION_1: u32 = 32;
    /// The device is behind an IOMMU. Never offered: the Linux balloon driver clears it.
    pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

    /// The mask of one feature bit.
    pub const fn bit(feature: u32) -> u64 {
        1u64 << feature
    }
}

/// Reserved values of `free_page_hint_cmd_id`.
pub mod cmd_id {
    /// The device stopped the round, or the guest ends its round.
    pub const STOP: u32 = 0;
    /// The device no longer needs the hinted pages: the guest may free them.
    pub const DONE: u32 = 1;
    /// The smallest id that names a round.
    pub const MIN_ROUND: u32 = 2;
}

/// Byte offsets of the fields of the balloon's configuration space (all little-endian `u32`).
pub mod config {
    /// `num_pages`: the target size in 4 KiB pages, written by the device.
    pub const NUM_PAGES: u64 = 0x00;
    /// `actual`: the current size in 4 KiB pages, written by the driver.
    pub const ACTUAL: u64 = 0x04;
    /// `free_page_hint_cmd_id`, written by the device (valid with FREE_PAGE_HINT).
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 0x08;
    /// `poison_val`, written by the driver (valid with PAGE_POISON).
    pub const POISON_VAL: u64 = 0x0c;
    /// The largest configuration space (all fields present).
    pub const MAX_LEN: usize = 16;
}

/// Queue sizes.
pub mod queue {
    /// The largest split queue (virtio 1.x).
    pub const MAX_SIZE: u16 = 32768;
    /// The Linux driver refuses a free page queue with fewer entries.
    pub const MIN_FREE_PAGE_SIZE: u16 = 2;
    /// The Linux driver refuses a reporting queue with fewer entries.
    pub const MIN_REPORTING_SIZE: u16 = 32;
    /// QEMU's free page queue size, the default here.
    pub const DEFAULT_FREE_PAGE_SIZE: u16 = 1024;
    /// The default size of the inflate, deflate and stats queues.
    pub const DEFAULT_SIZE: u16 = 256;
}

/// Bits of the device status register.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Bits of the interrupt status register.
pub mod interrupt {
    /// The device used a buffer in at least one queue.
    pub const USED_BUFFER: u8 = 1;
    /// The configuration space changed.
    pub const CONFIG_CHANGE: u8 = 2;
}

/// Register offsets of the virtio-mmio transport, version 2.
pub mod mmio {
    /// "virt" in little-endian.
    pub const MAGIC_VALUE: u32 = 0x7472_6976;
    /// The transport version (2: virtio 1.x).
    pub const VERSION: u32 = 2;
    /// The vendor id this crate reports.
    pub const VENDOR_ID: u32 = 0;

    /// MagicValue (R).
    pub const REG_MAGIC_VALUE: u64 = 0x000;
    /// Version (R).
    pub const REG_VERSION: u64 = 0x004;
    /// DeviceID (R).
    pub const REG_DEVICE_ID: u64 = 0x008;
    /// VendorID (R).
    pub const REG_VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (R).
    pub const REG_DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (W).
    pub const REG_DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel (W).
    pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel (W).
    pub const REG_QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax (R).
    pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum (W).
    pub const REG_QUEUE_NUM: u64 = 0x038;
    /// QueueReady (RW).
    pub const REG_QUEUE_READY: u64 = 0x044;
    /// QueueNotify (W).
    pub const REG_QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus (R).
    pub const REG_INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK (W).
    pub const REG_INTERRUPT_ACK: u64 = 0x064;
    /// Status (RW).
    pub const REG_STATUS: u64 = 0x070;
    /// QueueDescLow (W).
    pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh (W).
    pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (W): the available ring.
    pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh (W).
    pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (W): the used ring.
    pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh (W).
    pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// ConfigGeneration (R).
    pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
    /// The start of the device configuration space.
    pub const CONFIG_SPACE: u64 = 0x100;
    /// The size of the register window.
    pub const WINDOW_SIZE: u64 = 0x1000;
}

/// Statistics tags (`VIRTIO_BALLOON_S_*`). 0-9 are in the virtio spec; Linux 6.12 added
/// 10-15.
pub mod stats_tag {
    /// The size of one entry of a statistics buffer: a `le16` tag and a `le64` value.
    pub const ENTRY_SIZE: usize = 10;

    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJFLT: u16 = 2;
    /// Minor page faults.
    pub const MINFLT: u16 = 3;
    /// Free memory in bytes.
    pub const MEMFREE: u16 = 4;
    /// Total memory in bytes.
    pub const MEMTOT: u16 = 5;
    /// Available memory in bytes (as in /proc/meminfo).
    pub const AVAIL: u16 = 6;
    /// Disk caches in bytes.
    pub const CACHES: u16 = 7;
    /// Successful hugetlb page allocations.
    pub const HTLB_PGALLOC: u16 = 8;
    /// Failed hugetlb page allocations.
    pub const HTLB_PGFAIL: u16 = 9;
    /// OOM killer invocations.
    pub const OOM_KILL: u16 = 10;
    /// Allocation stalls.
    pub const ALLOC_STALL: u16 = 11;
    /// Pages scanned by kswapd.
    pub const ASYNC_SCAN: u16 = 12;
    /// Pages scanned directly.
    pub const DIRECT_SCAN: u16 = 13;
    /// Pages reclaimed by kswapd.
    pub const ASYNC_RECLAIM: u16 = 14;
    /// Pages reclaimed directly.
    pub const DIRECT_RECLAIM: u16 = 15;
    /// The number of known tags (`VIRTIO_BALLOON_S_NR`).
    pub const COUNT: usize = 16;

    /// The name Linux gives the tag (without the `VIRTIO_BALLOON_S_` prefix), lower case.
    pub fn name(tag: u16) -> Option<&'static str> {
        NAMES.get(usize::from(tag)).copied()
    }

    const NAMES: [&str; COUNT] = [
        "swap_in",
        "swap_out",
        "major_faults",
        "minor_faults",
        "free_memory",
        "total_memory",
        "available_memory",
        "disk_caches",
        "hugetlb_allocations",
        "hugetlb_failures",
        "oom_kills",
        "alloc_stalls",
        "async_scans",
        "direct_scans",
        "async_reclaims",
        "direct_reclaims",
    ];
}
