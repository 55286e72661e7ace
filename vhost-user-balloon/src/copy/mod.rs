// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Copies of the frontend's memory, asked for on the control socket: a sparse snapshot file
//! or a precopy migration stream, each with or without free page hints, and a page by page
//! comparison of the copy with the memory it came from.
//!
//! * [`CopySink`] is the balloon's hint sink: it forwards every hint to the daemon's
//!   [`HintCounter`](crate::capture::HintCounter) and, while a copy runs, to that copy's [`CopyHints`], which clears the
//!   copy's [`MigrationBitmap`](virtio_balloon::migration::MigrationBitmap) and records which pages the guest called free.
//! * [`Copier`] runs one copy at a time on a thread of its own. The copy holds the memory
//!   map it started with for its whole run, finds the guest's writes by content
//!   ([`ContentDirtyLog`](virtio_balloon::migration::ContentDirtyLog): vhost-user gives the daemon no dirty log) and, for the final
//!   stage, asks the caller to stop the guest: the job's state becomes `waiting_for_stop`
//!   until the `guest_stopped` request comes (or its timeout passes and the copy fails).
//!   The daemon never resumes the guest itself: the status's `resume` tells the caller
//!   to (a finished snapshot, any failure).
//! * `compare` reads the copy back (a snapshot with [`SnapshotFile`](virtio_balloon_precopy::snapshot::SnapshotFile), a stream applied by a
//!   [`Receiver`](virtio_balloon_precopy::Receiver) to fresh anonymous memory) and compares it with the shared memory page by
//!   page. A differing page is allowed only where the last copy's hints said the page was
//!   free and its dirty log never saw it written after that hint.
//!
//! For proving that comparison, a copy can be started with a deliberate [`Fault`](crate::control::Fault):
//! `shift_hints` (every hint clears the bitmap one page above the range the guest named, so
//! pages the guest still uses are left out) or `forget_later_writes` (pages written after
//! their hint are dropped from the dirty log's harvests, so pages the guest took back are
//! left out).

mod compare;
mod hints;
mod job;
#[cfg(test)]
mod tests;

pub use compare::MAX_LISTED_PAGES;
pub use hints::{CopyHints, CopySink, HintAwareLog};
pub use job::{Copier, DEFAULT_HINT_WAIT, DEFAULT_STOP_TIMEOUT};
