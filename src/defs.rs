// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio balloon's own constants: feature bits, configuration space layout, free page
//! hint command ids, statistics tags, queue sizes and the balloon's page size.
//!
//! Generic virtio values (the device id, device status bits, `VIRTIO_F_VERSION_1` and the
//! ring feature bits, virtio-mmio registers) come from the `virtio-bindings` crate:
//! `virtio_bindings::virtio_ids`, `virtio_config`, `virtio_ring` and `virtio_mmio`.

/// log2 of the balloon's page size: PFNs and free page hints are in 4 KiB units whatever the
/// host's page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PAGE_SHIFT: u32 = 12;

/// The balloon's page size in bytes (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

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
