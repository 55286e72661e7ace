// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A [`MemoryBackend`] that records every call the device makes on it, for tests that check
//! what the device discarded and populated, where, and when relative to the guest's rings.
//!
//! The recorder either passes each call on to an inner backend ([`RecordingBackend::over`])
//! or only records it ([`RecordingBackend::new`]). It can sample a used index in guest memory
//! on every call ([`RecordingBackend::watch_used`]), so a test can check that a discard came
//! before the device acknowledged the inflate element without looking at a clock.

use std::collections::BTreeSet;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_balloon::backend::{HostRange, MemoryBackend, RegionBacking};
use vm_memory::{Bytes, GuestAddress};

use crate::{lock, Driver, Mem, QueueRole};

/// Frames as the tests count them (the balloon's 4 KiB PFNs).
const FRAME: u64 = 4096;

/// The kind of a backend call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendOp {
    /// [`MemoryBackend::discard`]: the guest gave the range up.
    Discard,
    /// [`MemoryBackend::populate`]: the guest takes the range back.
    Populate,
}

/// One call the device made on its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendCall {
    /// Discard or populate.
    pub op: BackendOp,
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Offset of the first byte in its region.
    pub region_offset: u64,
    /// What backs the region.
    pub backing: RegionBacking,
    /// When the call returned.
    pub at: Instant,
    /// The used index watched for this kind of call (see
    /// [`RecordingBackend::watch_used`]) as the device had published it when the call was
    /// made; `None` when nothing is watched.
    pub used_idx: Option<u16>,
}

impl BackendCall {
    /// First byte past the range.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }

    /// Whether the range covers guest address `gpa`.
    pub fn covers(&self, gpa: u64) -> bool {
        self.gpa <= gpa && gpa < self.end()
    }

    /// The 4 KiB frames (PFNs) the range touches, a partial frame included.
    pub fn pfns(&self) -> Range<u64> {
        self.gpa / FRAME..self.end().div_ceil(FRAME)
    }

    /// Whether the range touches any of `pfns`.
    pub fn touches(&self, pfns: &BTreeSet<u64>) -> bool {
        pfns.range(self.pfns()).next().is_some()
    }
}

/// Where the used indexes sampled on each call live.
#[derive(Debug)]
struct UsedWatch {
    mem: Mem,
    /// The used ring sampled on discards.
    discard_used: GuestAddress,
    /// The used ring sampled on populates.
    populate_used: GuestAddress,
}

/// A [`MemoryBackend`] that records every call (see the module documentation).
pub struct RecordingBackend {
    inner: Option<Arc<dyn MemoryBackend>>,
    page: u64,
    calls: Mutex<Vec<BackendCall>>,
    watch: Mutex<Option<UsedWatch>>,
}

impl std::fmt::Debug for RecordingBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingBackend")
            .field("passes_on", &self.inner.is_some())
            .field("page", &self.page)
            .field("calls", &lock(&self.calls).len())
            .finish()
    }
}

impl RecordingBackend {
    /// A recorder that passes every call on to `inner` and has its host page size.
    pub fn over(inner: Arc<dyn MemoryBackend>) -> Arc<Self> {
        Arc::new(RecordingBackend {
            page: inner.host_page_size(),
            inner: Some(inner),
            calls: Mutex::new(Vec::new()),
            watch: Mutex::new(None),
        })
    }

    /// A recorder that only records: every call succeeds and touches no memory. The host
    /// page size it reports is `page`.
    pub fn new(page: u64) -> Arc<Self> {
        Arc::new(RecordingBackend {
            inner: None,
            page,
            calls: Mutex::new(Vec::new()),
            watch: Mutex::new(None),
        })
    }

    /// From now on, samples the used index of the used ring at `discard_used` on every
    /// discard and of the one at `populate_used` on every populate (the index follows the
    /// ring's 2-byte flags).
    pub fn watch_used(&self, mem: Mem, discard_used: GuestAddress, populate_used: GuestAddress) {
        *lock(&self.watch) = Some(UsedWatch {
            mem,
            discard_used,
            populate_used,
        });
    }

    /// [`watch_used`](Self::watch_used) on the driver model's inflateq (discards) and
    /// deflateq (populates). The model lays its rings out at the same addresses on every
    /// probe, so one call after the first probe is enough.
    pub fn watch_driver_rings(&self, mem: Mem, driver: &Driver) {
        let used = |role: QueueRole| {
            let q = driver.queue_index(role).expect("queue set up");
            driver.ring_layout(q).expect("ring layout").used
        };
        self.watch_used(mem, used(QueueRole::Inflate), used(QueueRole::Deflate));
    }

    fn used_idx(&self, op: BackendOp) -> Option<u16> {
        let watch = lock(&self.watch);
        let w = watch.as_ref()?;
        let used = match op {
            BackendOp::Discard => w.discard_used,
            BackendOp::Populate => w.populate_used,
        };
        w.mem
            .read_obj::<u16>(GuestAddress(used.0.checked_add(2)?))
            .ok()
            .map(u16::from_le)
    }

    fn record(&self, op: BackendOp, range: &HostRange<'_>) -> io::Result<()> {
        let used_idx = self.used_idx(op);
        let r = match (&self.inner, op) {
            (Some(inner), BackendOp::Discard) => inner.discard(range),
            (Some(inner), BackendOp::Populate) => inner.populate(range),
            (None, _) => Ok(()),
        };
        lock(&self.calls).push(BackendCall {
            op,
            gpa: range.gpa.0,
            len: range.len,
            host_addr: range.host_addr as u64,
            region_offset: range.region_offset,
            backing: range.backing,
            at: Instant::now(),
            used_idx,
        });
        r
    }

    /// The host page size this backend reports.
    pub fn page(&self) -> u64 {
        self.page
    }

    /// The number of calls so far (a mark for [`since`](Self::since)).
    pub fn mark(&self) -> usize {
        lock(&self.calls).len()
    }

    /// The calls of kind `op` from `mark` on.
    pub fn since(&self, mark: usize, op: BackendOp) -> Vec<BackendCall> {
        lock(&self.calls)
            .iter()
            .skip(mark)
            .filter(|c| c.op == op)
            .copied()
            .collect()
    }

    /// Every call of kind `op`.
    pub fn of(&self, op: BackendOp) -> Vec<BackendCall> {
        self.since(0, op)
    }

    /// Every call, in order.
    pub fn all(&self) -> Vec<BackendCall> {
        lock(&self.calls).clone()
    }

    /// Whether no call was made (since the last [`clear`](Self::clear)).
    pub fn is_empty(&self) -> bool {
        lock(&self.calls).is_empty()
    }

    /// Forgets every call recorded so far.
    pub fn clear(&self) {
        lock(&self.calls).clear();
    }

    /// Every discard as (gpa, len), in order.
    pub fn discards(&self) -> Vec<(u64, u64)> {
        self.of(BackendOp::Discard)
            .iter()
            .map(|c| (c.gpa, c.len))
            .collect()
    }

    /// Every populate as (gpa, len), in order.
    pub fn populates(&self) -> Vec<(u64, u64)> {
        self.of(BackendOp::Populate)
            .iter()
            .map(|c| (c.gpa, c.len))
            .collect()
    }
}

impl MemoryBackend for RecordingBackend {
    fn host_page_size(&self) -> u64 {
        self.page
    }

    fn discard(&self, range: &HostRange<'_>) -> io::Result<()> {
        self.record(BackendOp::Discard, range)
    }

    fn populate(&self, range: &HostRange<'_>) -> io::Result<()> {
        self.record(BackendOp::Populate, range)
    }
}
