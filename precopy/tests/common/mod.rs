// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the precopy crate's test binaries share.

use vm_memory::bitmap::NewBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Anonymous guest memory of `regions` (guest address, length), with bitmaps of type `B`.
pub fn memory<B: NewBitmap>(regions: &[(u64, u64)]) -> GuestMemoryMmap<B> {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}
