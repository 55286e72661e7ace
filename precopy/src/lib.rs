// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A reference precopy migration over `virtio-balloon`'s migration hooks.
//!
//! * [`Precopy`]: the loop. It drives a [`MigrationBitmap`](virtio_balloon::migration::MigrationBitmap)
//!   and a [`PrecopyNotifierChain`](virtio_balloon::migration::PrecopyNotifierChain) (where
//!   the balloon device starts and stops hint rounds) and writes the pages it sends to any
//!   `Write` in the [`wire`] format.
//! * [`Receiver`]: applies that stream to the destination's guest memory.
//! * [`snapshot`]: the same loop with a sparse file as the destination: memory snapshots that
//!   leave out the pages the guest hinted free, and their restore.
//!
//! A VMM with its own migration keeps only the hooks in `virtio_balloon::migration` and
//! follows the order this loop documents.

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

mod destination;
mod precopy;
pub mod snapshot;
pub mod wire;

pub use destination::PageDestination;
pub use precopy::{
    CancelToken, IterationStats, MigrationReport, Precopy, PrecopyConfig, PrecopyError, VmControl,
    VmControlError,
};
pub use wire::{ReceiveStats, Receiver, WireError};
