// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device side of the virtio memory balloon for rust-vmm based VMMs, built around free
//! page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`).
//!
//! During a live migration the guest driver tells the device which of its pages are free;
//! the device clears those pages from the migration dirty bitmap, so the migration never
//! sends them. An idle guest that has touched most of its memory then migrates in a fraction
//! of the time.
//!
//! # The pieces
//!
//! * [`Balloon`] with [`BalloonConfig`]: the device. It implements
//!   [`transport::VirtioDevice`] (put it behind [`transport::MmioTransport`], virtio-mmio
//!   version 2) and `event_manager::MutEventSubscriber` ([`event_handler`]): each queue has
//!   an eventfd a VMM registers as an ioeventfd, and the event loop hands every event to
//!   [`Balloon::handle_event`], which serves the queue in a bounded batch.
//! * Free page hinting: every hint element is validated (direction decides what a
//!   descriptor is, checked arithmetic, page rounding, splitting at memory regions) before
//!   anything reaches the sink. [`FreePageHinting`] is the migration thread's handle on the
//!   hint state machine ([`HintState`], [`HintRound`]); it is also the device's
//!   [`PrecopyNotifier`](migration::PrecopyNotifier).
//! * The traditional balloon on the same device: inflate and deflate towards
//!   [`Balloon::set_target`] through a [`MemoryBackend`](backend::MemoryBackend) (by default
//!   `madvise`, [`backend`]), statistics ([`StatsReport`]), free page reporting, page
//!   poison, [`BalloonMetrics`] and snapshot/restore ([`BalloonState`]).
//! * [`sink`]: the [`FreePageSink`](sink::FreePageSink) trait through which the device hands
//!   over validated free ranges.
//! * [`migration`]: [`MigrationBitmap`](migration::MigrationBitmap), the "to send" bitmap of
//!   a precopy migration per guest memory region with its dirty page counter, fed by a
//!   [`DirtyLog`](migration::DirtyLog) (KVM's, vm-memory's, or page hashes for memory
//!   nothing else tracks) and trimmed by hints; the
//!   [`PrecopyNotifierChain`](migration::PrecopyNotifierChain) that tells the device when
//!   hint rounds start and stop; [`count_one`](migration::count_one),
//!   [`count_one_with_offset`](migration::count_one_with_offset) and
//!   [`DirtyBitmap`](migration::DirtyBitmap), a lock-free atomic bitmap.
//! * [`defs`]: the balloon's own constants (feature bits, configuration layout, command
//!   ids, statistics tags, page size).
//!
//! The device's types are at the crate root; `transport`, `migration`, `backend`, `sink`
//! and `defs` are modules. `docs/modules.md` draws how the modules depend on each other.
//!
//! The README shows how a VMM wires the device in.
//!
//! # Example
//!
//! A precopy pass with a hint arriving between the sync and the send:
//!
//! ```
//! use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap};
//! use virtio_balloon::sink::FreePageSink;
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem =
//!     GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
//! let to_send = MigrationBitmap::new(&mem).unwrap();
//! to_send.mark_all_dirty(); // the first pass sends everything...
//!
//! // ...except what the guest reports free (here through the sink the device calls).
//! to_send.free_page_hint(2, GuestAddress(0x20_0000), 0x20_0000);
//! let mut sent = 0;
//! for page in to_send.iter_dirty() {
//!     if to_send.test_and_clear(page) {
//!         sent += 1;
//!     }
//! }
//! assert_eq!(sent, 512);
//!
//! // The guest reuses a hinted page: the write log has it, so the next pass sends it.
//! mem.write_obj(7u32, GuestAddress(0x30_0000)).unwrap();
//! assert_eq!(to_send.sync(&mut GuestMemoryDirtyLog::new(&mem)).unwrap(), 1);
//! assert!(to_send.is_dirty(GuestAddress(0x30_0000)));
//! ```

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod defs;
mod device;
pub mod event_handler;
pub mod migration;
mod ratelimit;
pub mod sink;
pub mod transport;

pub use device::snapshot::{BalloonState, QueueSnapshot, RestoreError, BALLOON_STATE_VERSION};
pub use device::{
    Balloon, BalloonConfig, BalloonError, BalloonEvents, BalloonMetrics, BalloonStats, Clock,
    DeviceEvent, FreePageHinting, HintMetrics, HintRound, HintState, ManualClock, MonotonicClock,
    PageMetrics, QueueLayout, QueueRole, StatsReport, DISCARD_FLUSH_DELAY, MAX_PFNS_PER_ELEMENT,
    MAX_STATS_ENTRIES, PENDING_CAP, PENDING_RANGES,
};

/// The README's code blocks, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The wiring guide's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../docs/wiring.md")]
pub struct WiringDoctests;

/// The migration guide's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../docs/migration.md")]
pub struct MigrationDoctests;
