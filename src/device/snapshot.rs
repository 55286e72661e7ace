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
//!
//! The stall watch ([`BalloonConfig::stall_timeout`]) keeps its episode across a restore:
//! how close `actual` came to the target, so a guest deflating on OOM in a loop is not taken
//! for progress, and whether the target was stalled. Its clock starts again at the restore
//! (a clock reading of another host means nothing, and the VM was paused in between): a
//! stall not reported yet is reported at most one timeout after the restore. A restored
//! device whose target was stalled is stalled too and raises
//! [`TARGET_STALLED`](super::BalloonEvents::TARGET_STALLED) again, since the VMM restoring
//! it may never have seen the first one; [`BalloonMetrics::target_stalls`] does not count
//! it twice. A restore with no stall timeout drops the stall.
//!
//! States are versioned ([`BALLOON_STATE_VERSION`]); see there for what stays compatible.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use super::{Balloon, BalloonConfig, BalloonError, BalloonMetrics, HintState};
use crate::backend::MemoryBackend;
use crate::defs::features as f;
use crate::sink::FreePageSink;
use crate::transport::{ActivateError, FeatureError, VirtioDevice};

/// The format version of the [`BalloonState`] this crate writes.
///
/// Version 1 is the first layout, which had no `version` field: a state without one is
/// version 1. Version 2 added `version`, the stall watch (`stall_closest`,
/// `target_stalled`) and [`BalloonMetrics::target_stalls`].
///
/// Compatibility rule: [`Balloon::restore`] reads every version from 1 up to this one and
/// refuses a newer one with [`RestoreError::UnsupportedVersion`] (a newer state may hold
/// something this crate would silently drop). So whoever changes what a state holds or
/// means bumps this number; gives every new field a serde default under which an older
/// state restores as it did before; never removes, renames or changes the meaning of a
/// field an older version wrote; and adds a golden file `tests/data/snapshot-v{N}.json`
/// written by the new version. Every golden file of an older version must keep restoring.
pub const BALLOON_STATE_VERSION: u32 = 2;

fn version_1() -> u32 {
    1
}

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
    /// The format version ([`BALLOON_STATE_VERSION`] when this crate saved it; a state
    /// without the field is version 1).
    #[serde(default = "version_1")]
    pub version: u32,
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
    /// The stall watch: how close (in pages) `actual` came to the target since the target
    /// was set or last left; `None` when nothing was watched. Version 2; a version 1 state
    /// restores with a new watch.
    #[serde(default)]
    pub stall_closest: Option<u32>,
    /// Whether the target was stalled ([`Balloon::target_stalled`]). Version 2.
    #[serde(default)]
    pub target_stalled: bool,
}

/// Why a saved state cannot be restored. New versions of the state may bring new reasons.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The state has a format version this crate does not read: newer than the one it
    /// writes (or 0, which no crate writes).
    #[error(
        "the saved balloon state has format version {found}; this version of the crate reads \
     versions 1 to {supported}"
    )]
    UnsupportedVersion {
        /// The version of the state.
        found: u32,
        /// The newest version this crate reads ([`BALLOON_STATE_VERSION`]).
        supported: u32,
    },
    /// The new device could not be created.
    #[error("cannot create the balloon: {0}")]
    Create(BalloonError),
    /// The new device offers other features than the saved one: the driver negotiated
    /// against the saved offer.
    #[error("the saved balloon offered features {saved:#x}, this one offers {offered:#x}")]
    FeaturesDiffer {
        /// What the saved device offered.
        saved: u64,
        /// What the new device offers.
        offered: u64,
    },
    /// The saved acknowledged features are not valid for the device.
    #[error("saved features are invalid: {0}")]
    Features(FeatureError),
    /// The saved state has another number of queues.
    #[error("the state has {saved} queues, the device {expected}")]
    QueueCount {
        /// In the state.
        saved: usize,
        /// On the new device.
        expected: usize,
    },
    /// A saved queue does not fit the device or guest memory.
    #[error("saved queue {index} is invalid")]
    Queue {
        /// The queue index.
        index: usize,
    },
    /// The device could not be activated.
    #[error("cannot activate the restored balloon: {0}")]
    Activate(ActivateError),
}

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
            version: BALLOON_STATE_VERSION,
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
            stall_closest: self.stall.closest(),
            target_stalled: self.stall.stalled(),
        }
    }

    /// Builds a device from `state` over the restored guest memory `mem`. `cfg` must offer
    /// the same features as the saved device. If the saved device was active, the restored
    /// one is active too, its hint state is DONE and the driver gets a configuration
    /// interrupt to notice it. A state of a newer format version is refused before anything
    /// is created ([`BALLOON_STATE_VERSION`]).
    pub fn restore(
        cfg: BalloonConfig,
        mem: M,
        sink: Arc<dyn FreePageSink>,
        backend: Arc<dyn MemoryBackend>,
        state: &BalloonState,
    ) -> Result<Self, RestoreError> {
        if !(1..=BALLOON_STATE_VERSION).contains(&state.version) {
            return Err(RestoreError::UnsupportedVersion {
                found: state.version,
                supported: BALLOON_STATE_VERSION,
            });
        }
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
            // Activation starts the watch from where `actual` is now.
            dev.stall.restore(state.stall_closest, state.target_stalled);
            dev.activate().map_err(RestoreError::Activate)?;
            if dev.target_stalled() {
                dev.add_event(super::BalloonEvents::TARGET_STALLED);
            }
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
                RestoreError::UnsupportedVersion {
                    found: 7,
                    supported: 2,
                },
                "version 7; this version of the crate reads versions 1 to 2",
            ),
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
