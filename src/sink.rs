// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Where accepted free page hints go.
//!
//! The device validates every hint descriptor the guest posts and hands the surviving ranges
//! to a [`FreePageSink`]. The migration dirty bitmap
//! ([`MigrationBitmap`](crate::migration::MigrationBitmap)) is the sink that makes live
//! migration skip free pages; [`RecordingSink`] keeps what it is given, for tests and tools.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestAddress;

/// Receives the free page ranges the guest hinted during a hint round.
///
/// The device calls [`free_page_hint`](Self::free_page_hint) only for ranges that are
/// already validated: page aligned (4 KiB), non-empty, inside one guest RAM region, from a
/// device-writable descriptor of an element accepted while the round `cmd_id` was in the
/// START state. Implementations must not block for long: the device's event loop is waiting.
pub trait FreePageSink: Send + Sync {
    /// The guest reports `[gpa, gpa + len)` as free in the round `cmd_id`.
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64);

    /// Whether the sink wants [`free_page_element`](Self::free_page_element) calls. Asked
    /// once, when the device is created; the default (false) keeps the hint path free of
    /// the extra descriptor read.
    fn records_elements(&self) -> bool {
        false
    }

    /// Every element popped from the free page queue, as the driver posted it, before the
    /// device handles it (whatever the hint state). For tools that capture real rounds so
    /// they can be replayed; called only if [`records_elements`](Self::records_elements)
    /// said so. Nothing in `element` is validated.
    fn free_page_element(&self, _element: &FreePageElement) {}
}

/// One element of the free page queue as the driver made it available: its position in the
/// available ring, its head and the head descriptor's fields (unvalidated guest values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreePageElement {
    /// The position in the available ring (the ring index, wrapping at 65536).
    pub position: u16,
    /// The head descriptor's index.
    pub head: u16,
    /// The head descriptor's address.
    pub addr: u64,
    /// The head descriptor's length.
    pub len: u32,
    /// The head descriptor's flags (`VRING_DESC_F_WRITE` is 2).
    pub flags: u16,
}

impl<T: FreePageSink + ?Sized> FreePageSink for Arc<T> {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        (**self).free_page_hint(cmd_id, gpa, len)
    }

    fn records_elements(&self) -> bool {
        (**self).records_elements()
    }

    fn free_page_element(&self, element: &FreePageElement) {
        (**self).free_page_element(element)
    }
}

impl<T: FreePageSink + ?Sized> FreePageSink for &T {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        (**self).free_page_hint(cmd_id, gpa, len)
    }

    fn records_elements(&self) -> bool {
        (**self).records_elements()
    }

    fn free_page_element(&self, element: &FreePageElement) {
        (**self).free_page_element(element)
    }
}

/// One hint as a [`RecordingSink`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedHint {
    /// The round the hint belongs to.
    pub cmd_id: u32,
    /// First byte of the free range.
    pub gpa: GuestAddress,
    /// Length of the free range in bytes.
    pub len: u64,
}

/// A sink that records every hint it receives, in order.
///
/// Meant for tests and diagnostics: it allocates as hints arrive, so it is not for the
/// production hint path.
///
/// # Example
///
/// ```
/// use virtio_balloon::sink::{FreePageSink, RecordedHint, RecordingSink};
/// use vm_memory::GuestAddress;
///
/// let sink = RecordingSink::default();
/// sink.free_page_hint(2, GuestAddress(0x40_0000), 0x40_0000);
/// assert_eq!(
///     sink.take(),
///     [RecordedHint { cmd_id: 2, gpa: GuestAddress(0x40_0000), len: 0x40_0000 }]
/// );
/// assert!(sink.hints().is_empty());
/// ```
#[derive(Debug, Default)]
pub struct RecordingSink {
    hints: Mutex<Vec<RecordedHint>>,
}

impl RecordingSink {
    fn lock(&self) -> MutexGuard<'_, Vec<RecordedHint>> {
        // A panic while holding the lock cannot leave the vector half-written: keep going.
        self.hints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the hints recorded so far.
    pub fn hints(&self) -> Vec<RecordedHint> {
        self.lock().clone()
    }

    /// Removes and returns the hints recorded so far.
    pub fn take(&self) -> Vec<RecordedHint> {
        std::mem::take(&mut *self.lock())
    }

    /// Total bytes hinted so far.
    pub fn total_bytes(&self) -> u64 {
        self.lock().iter().map(|h| h.len).sum()
    }
}

impl FreePageSink for RecordingSink {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        self.lock().push(RecordedHint { cmd_id, gpa, len });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint_through(sink: &dyn FreePageSink, id: u32) {
        sink.free_page_hint(id, GuestAddress(0x1000 * u64::from(id)), 0x1000);
    }

    #[test]
    fn recording_sink_through_arc_and_reference() {
        let sink = Arc::new(RecordingSink::default());
        hint_through(&sink, 3);
        hint_through(&&*sink, 4);
        let dyn_sink: Arc<dyn FreePageSink> = sink.clone();
        hint_through(&dyn_sink, 5);
        assert_eq!(sink.total_bytes(), 0x3000);
        let ids: Vec<u32> = sink.hints().iter().map(|h| h.cmd_id).collect();
        assert_eq!(ids, [3, 4, 5]);
        assert_eq!(sink.take().len(), 3);
        assert_eq!(sink.total_bytes(), 0);
    }

    #[test]
    fn recording_sink_survives_a_poisoned_lock() {
        let sink = Arc::new(RecordingSink::default());
        let s = sink.clone();
        let _ = std::thread::spawn(move || {
            let _guard = s.hints.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        sink.free_page_hint(2, GuestAddress(0), 0x1000);
        assert_eq!(sink.hints().len(), 1);
    }
}
