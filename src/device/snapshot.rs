// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Snapshot and restore of the balloon device.
//!
//! [`Balloon::save_state`] gives a serde-serializable [`BalloonState`]; [`Balloon::restore`]
//! builds a device from one over the restored guest memory. Pause the device (and the VM)
//! before saving. Save the transport's registers with it
//! ([`MmioTransport::save_state`](crate::transport::MmioTransport::save_state)).
//!
//! After a restore, free page hinting is DONE: a guest that was in the middle of a round
//! hands its hinted pages back (the migration that asked for them is gone), and the id
//! counter continues where it was, so the guest never sees an old id again.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use super::{Balloon, BalloonConfig, BalloonError, BalloonMetrics, HintState};
use crate::backend::MemoryBackend;
use crate::sink::FreePageSink;
use crate::spec::features as f;
use crate::transport::{ActivateError, FeatureError, VirtioDevice};

/// The state of one virtqueue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc_table: u64,
    /// The available ring's guest address.
    pub avail_ring: u64,
    /// The used ring's guest address.
    pub used_ring: u64,
    /// The next available ring position the device reads.
    pub next_avail: u16,
    /// The next used ring position the device writes.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// Everything a balloon needs to continue on another host or after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The features the device offered.
    pub device_features: u64,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// Whether the driver had set DRIVER_OK.
    pub activated: bool,
    /// The target in 4 KiB pages.
    pub num_pages: u32,
    /// The driver's `actual`.
    pub actual: u32,
    /// The driver's `poison_val`.
    pub poison_val: u32,
    /// Every queue, in queue index order.
    pub queues: Vec<QueueSnapshot>,
    /// The last free page hint round id (the counter continues from it).
    pub hint_cmd_id: u32,
    /// The hint state when saved (a restored device is DONE).
    pub hint_state: HintState,
    /// The head of the statistics buffer the device held.
    pub stats_held: Option<u16>,
    /// The statistics polling interval in milliseconds (0: off).
    pub stats_interval_ms: u64,
    /// Whether discards were inhibited.
    pub discards_inhibited: bool,
    /// The interrupt status bits.
    pub interrupt_status: u8,
    /// The configuration generation.
    pub config_generation: u32,
    /// The counters.
    pub metrics: BalloonMetrics,
}

/// Why a saved state cannot be restored.
#[derive(Debug)]
pub enum RestoreError {
    /// The new device could not be created.
    Create(BalloonError),
    /// The new device offers other features than the saved one: the driver negotiated
    /// against the saved offer.
    FeaturesDiffer {
        /// What the saved device offered.
        saved: u64,
        /// What the new device offers.
        offered: u64,
    },
    /// The saved acknowledged features are not valid for the device.
    Features(FeatureError),
    /// The saved state has another number of queues.
    QueueCount {
        /// In the state.
        saved: usize,
        /// On the new device.
        expected: usize,
    },
    /// A saved queue does not fit the device or guest memory.
    Queue {
        /// The queue index.
        index: usize,
    },
    /// The device could not be activated.
    Activate(ActivateError),
}

impl fmt::Display for RestoreError {
    fn fmt(&self, fm: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::Create(e) => write!(fm, "cannot create the balloon: {e}"),
            RestoreError::FeaturesDiffer { saved, offered } => write!(
                fm,
                "the saved balloon offered features {saved:#x}, this one offers {offered:#x}"
            ),
            RestoreError::Features(e) => write!(fm, "saved features are invalid: {e}"),
            RestoreError::QueueCount { saved, expected } => {
                write!(fm, "the state has {saved} queues, the device {expected}")
            }
            RestoreError::Queue { index } => write!(fm, "saved queue {index} is invalid"),
            RestoreError::Activate(e) => write!(fm, "cannot activate the restored balloon: {e}"),
        }
    }
}

impl std::error::Error for RestoreError {}

impl<M> Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    /// Saves the device. Pause it first ([`pause`](Balloon::pause)): inflated pages still
    /// waiting to be merged are discarded here, and an element being handled finishes first.
    pub fn save_state(&mut self) -> BalloonState {
        self.flush_discards();
        let (hint_cmd_id, hint_state, fpq, hint_metrics) = self.hint.snapshot();
        let fpq_index = self.layout.index(super::QueueRole::FreePage);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| match fpq {
                Some(s) if Some(i) == fpq_index => QueueSnapshot::from(s),
                _ => QueueSnapshot::from(q.state()),
            })
            .collect();
        let mut metrics = self.metrics();
        metrics.hint = hint_metrics;
        BalloonState {
            device_features: self.device_features(),
            acked_features: self.acked,
            activated: self.activated,
            num_pages: self.config.num_pages,
            actual: self.config.actual,
            poison_val: self.config.poison_val,
            queues,
            hint_cmd_id,
            hint_state,
            stats_held: self.stats.held,
            stats_interval_ms: u64::try_from(self.stats.interval.as_millis()).unwrap_or(u64::MAX),
            discards_inhibited: self.pages.inhibited(),
            interrupt_status: self.irq.status(),
            config_generation: self.irq.config_generation(),
            metrics,
        }
    }

    /// Builds a device from `state` over the restored guest memory `mem`. `cfg` must offer
    /// the same features as the saved device. If the saved device was active, the restored
    /// one is active too, its hint state is DONE and the driver gets a configuration
    /// interrupt to notice it.
    pub fn restore(
        cfg: BalloonConfig,
        mem: M,
        sink: Arc<dyn FreePageSink>,
        backend: Arc<dyn MemoryBackend>,
        state: &BalloonState,
    ) -> Result<Self, RestoreError> {
        let mut dev =
            Balloon::with_backend(cfg, mem, sink, backend).map_err(RestoreError::Create)?;
        let offered = dev.device_features();
        if state.device_features != offered {
            return Err(RestoreError::FeaturesDiffer {
                saved: state.device_features,
                offered,
            });
        }
        if state.queues.len() != dev.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                expected: dev.queues.len(),
            });
        }
        dev.acked = state.acked_features;
        if state.activated {
            dev.validate_features().map_err(RestoreError::Features)?;
        }
        for (index, (q, saved)) in dev.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(RestoreError::Queue { index });
            }
            *q = Queue::try_from(QueueState::from(*saved))
                .map_err(|_| RestoreError::Queue { index })?;
        }
        dev.config.num_pages = state.num_pages;
        dev.config.actual = state.actual;
        dev.config.poison_val = if dev.has_feature(f::VIRTIO_BALLOON_F_PAGE_POISON) {
            state.poison_val
        } else {
            0
        };
        dev.hint.restore(state.hint_cmd_id, state.metrics.hint);
        dev.pages.metrics = state.metrics.pages;
        dev.metrics = BalloonMetrics {
            hint: Default::default(),
            pages: Default::default(),
            ..state.metrics
        };
        dev.pages.set_inhibited(state.discards_inhibited);
        let stats_size = dev
            .layout
            .index(super::QueueRole::Stats)
            .map(|i| dev.queues[i].size());
        dev.stats.held = state
            .stats_held
            .filter(|&h| stats_size.is_some_and(|s| h < s));
        if state.stats_interval_ms > 0 {
            // A timer that cannot be armed leaves polling off; the VMM can set it again.
            let _ = dev.set_stats_interval(Duration::from_millis(state.stats_interval_ms));
        }
        if state.activated {
            dev.activate().map_err(RestoreError::Activate)?;
            dev.irq
                .restore(state.interrupt_status, state.config_generation);
            if dev.hint.negotiated() {
                dev.hint_control().done();
            }
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_differs() {
        let cases = [
            (
                RestoreError::Create(BalloonError::ZeroBudget),
                "chains_per_wakeup",
            ),
            (
                RestoreError::FeaturesDiffer {
                    saved: 0x10,
                    offered: 0x20,
                },
                "0x10",
            ),
            (
                RestoreError::Features(FeatureError::NoVersion1),
                "VERSION_1",
            ),
            (
                RestoreError::QueueCount {
                    saved: 3,
                    expected: 4,
                },
                "3 queues",
            ),
            (RestoreError::Queue { index: 2 }, "queue 2"),
            (
                RestoreError::Activate(ActivateError::LegacyDriver),
                "activate",
            ),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert!(text.contains(want), "{text:?} lacks {want:?}");
        }
    }
}
