// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The balloon device: features, queue layout, configuration space, activate and reset.
//!
//! [`Balloon`] implements [`VirtioDevice`] (put it behind a transport such as
//! [`MmioTransport`](crate::transport::MmioTransport)) and
//! [`MutEventSubscriber`](event_manager::MutEventSubscriber) (register it with an
//! `EventManager`; see [`event_handler`](crate::event_handler)). The migration thread drives free page
//! hinting through the [`FreePageHinting`] from [`Balloon::hint_control`].

mod config;
mod descriptor;
mod hint;
mod inflate;
mod pages;
mod queue;
mod regions;
mod reporting;
pub(crate) mod snapshot;
mod stats;
mod timer;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use serde::{Deserialize, Serialize};

use crate::backend::{MadviseBackend, MemoryBackend};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::defs::{self, features as f};
use crate::ratelimit::{warn_limited, RateLimit};
use crate::sink::FreePageSink;
use crate::transport::{
    ActivateError, FeatureError, Interrupt, InterruptDelivery, QueueHandover, VirtioDevice,
};
use config::ConfigSpace;
pub use hint::{FreePageHinting, HintMetrics, HintRound, HintState};
use hint::{FreePageQueue, HintShared};
use pages::PageEngine;
pub use pages::{PageMetrics, MAX_PFNS_PER_ELEMENT, PENDING_CAP, PENDING_RANGES};
use stats::StatsState;
pub use stats::{BalloonStats, StatsReport, MAX_STATS_ENTRIES};
pub use timer::{Clock, ManualClock, MonotonicClock};
use timer::{StallCheck, StallWatch, Timer};

static STALL_TIMER_FAILED: RateLimit = RateLimit::new();
static FLUSH_TIMER_FAILED: RateLimit = RateLimit::new();

/// How long inflated pages may wait to be merged with the next inflate element before they
/// are discarded.
pub const DISCARD_FLUSH_DELAY: Duration = Duration::from_millis(100);

/// What the device waits for: one of the file descriptors from [`Balloon::event_fds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// The kick eventfd of the queue with this index.
    Queue(usize),
    /// The statistics polling timer ([`Balloon::set_stats_interval`]).
    StatsTimer,
    /// The timer that discards inflated pages left waiting to be merged
    /// ([`DISCARD_FLUSH_DELAY`]).
    FlushTimer,
    /// The timer of the stall watch ([`BalloonConfig::stall_timeout`]).
    StallTimer,
}

bitflags::bitflags! {
    /// Things that happened on the device that a VMM may want to react to, from
    /// [`Balloon::take_events`]. The device signals [`Balloon::events_fd`] when one is added.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub struct BalloonEvents: u32 {
        /// The driver's `actual` reached the target (`num_pages`).
        const TARGET_REACHED = 1;
        /// The driver wrote a new `actual` (also when it deflated on its own, on OOM).
        const ACTUAL_CHANGED = 2;
        /// A statistics buffer arrived ([`Balloon::latest_stats`]).
        const STATS_UPDATED = 4;
        /// `actual` has not come closer to the target for [`BalloonConfig::stall_timeout`]
        /// while the driver was live ([`Balloon::target_stalled`]). Raised once per stall.
        const TARGET_STALLED = 8;
    }
}

/// Counters a VMM can export. Backend-independent, kept across snapshot and restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BalloonMetrics {
    /// Inflate, deflate and reporting.
    pub pages: PageMetrics,
    /// Statistics buffers parsed.
    pub stats_updates: u64,
    /// Statistics buffers returned to the driver to ask for fresh numbers.
    pub stats_requests: u64,
    /// Statistics buffers that could not be read (held anyway).
    pub stats_malformed: u64,
    /// Driver writes to `poison_val` after DRIVER_OK (ignored: the value is latched).
    pub late_poison_writes: u64,
    /// Free page hinting.
    pub hint: HintMetrics,
    /// Stalls of the target ([`BalloonEvents::TARGET_STALLED`]).
    #[serde(default)]
    pub target_stalls: u64,
}

/// What the device offers and how it sizes its queues.
///
/// Start from [`BalloonConfig::default`] and change fields with the `with_<field>` methods:
///
/// ```
/// use virtio_balloon::BalloonConfig;
///
/// let cfg = BalloonConfig::default()
///     .with_reporting(true)
///     .with_free_page_queue_size(256);
/// assert!(cfg.reporting && cfg.free_page_hint);
/// assert_eq!(cfg.free_page_queue_size, 256);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonConfig {
    /// Offer `VIRTIO_BALLOON_F_MUST_TELL_HOST` (on by default). A driver that accepts it
    /// waits for the device to acknowledge a deflate before it touches the pages again
    /// (Linux always does). Only then may the device merge inflated pages across elements
    /// and discard them after the inflate was acknowledged; without it every inflate element
    /// is discarded before its acknowledgement, as QEMU does, which costs at least one
    /// discard per element.
    pub must_tell_host: bool,
    /// Offer `VIRTIO_BALLOON_F_STATS_VQ` (a statistics queue).
    pub stats: bool,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (a free page queue).
    pub free_page_hint: bool,
    /// Offer `VIRTIO_BALLOON_F_PAGE_POISON` (16-byte configuration space).
    pub page_poison: bool,
    /// Offer `VIRTIO_BALLOON_F_REPORTING` (a free page reporting queue).
    pub reporting: bool,
    /// The size of the inflate, deflate and statistics queues (a power of two).
    pub queue_size: u16,
    /// The size of the free page queue (a power of two, at least 2; QEMU uses 1024).
    pub free_page_queue_size: u16,
    /// The size of the reporting queue (a power of two, at least 32).
    pub reporting_queue_size: u16,
    /// The most chains the event loop handles per wakeup of one queue before it lets the
    /// other queues run (it re-arms itself for the rest).
    pub chains_per_wakeup: u16,
    /// Accept hints into file-backed memory regions. Off by default: memory shared with other
    /// processes may change behind the guest's back, so its dirty state must not be dropped.
    pub hint_file_backed_memory: bool,
    /// How long `actual` may go without coming closer to `num_pages`, while the driver is
    /// live and the device not paused, before the device raises
    /// [`BalloonEvents::TARGET_STALLED`] (and counts it in
    /// [`BalloonMetrics::target_stalls`]). `None` (the default) or zero: no watch.
    ///
    /// Progress is `actual` coming closer to the target than it has been since the target
    /// was set or last left: a guest that deflates on OOM and inflates back to where it was
    /// never gets there and is caught. Progress restarts the timeout and clears a stall; a
    /// new (different) target restarts it; reaching the target ends the watch and clears
    /// the stall; a pause stops it and the timeout runs in full after
    /// [`resume`](Balloon::resume). Linux retries a failed inflation every 200 ms and
    /// writes `actual` after every request, so a few tens of seconds is a reasonable value.
    /// Time comes from the device's [`Clock`] ([`Balloon::set_clock`]).
    pub stall_timeout: Option<Duration>,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            must_tell_host: true,
            stats: true,
            deflate_on_oom: false,
            free_page_hint: true,
            page_poison: true,
            reporting: false,
            queue_size: defs::queue::DEFAULT_SIZE,
            free_page_queue_size: defs::queue::DEFAULT_FREE_PAGE_SIZE,
            reporting_queue_size: defs::queue::MIN_REPORTING_SIZE,
            chains_per_wakeup: 256,
            hint_file_backed_memory: false,
            stall_timeout: None,
        }
    }
}

impl BalloonConfig {
    // One `with_<field>` per field: the struct is `#[non_exhaustive]`, so code outside the
    // crate builds a configuration from `BalloonConfig::default()` with these.

    /// Sets [`must_tell_host`](Self::must_tell_host).
    #[must_use]
    pub const fn with_must_tell_host(mut self, must_tell_host: bool) -> Self {
        self.must_tell_host = must_tell_host;
        self
    }

    /// Sets [`stats`](Self::stats).
    #[must_use]
    pub const fn with_stats(mut self, stats: bool) -> Self {
        self.stats = stats;
        self
    }

    /// Sets [`deflate_on_oom`](Self::deflate_on_oom).
    #[must_use]
    pub const fn with_deflate_on_oom(mut self, deflate_on_oom: bool) -> Self {
        self.deflate_on_oom = deflate_on_oom;
        self
    }

    /// Sets [`free_page_hint`](Self::free_page_hint).
    #[must_use]
    pub const fn with_free_page_hint(mut self, free_page_hint: bool) -> Self {
        self.free_page_hint = free_page_hint;
        self
    }

    /// Sets [`page_poison`](Self::page_poison).
    #[must_use]
    pub const fn with_page_poison(mut self, page_poison: bool) -> Self {
        self.page_poison = page_poison;
        self
    }

    /// Sets [`reporting`](Self::reporting).
    #[must_use]
    pub const fn with_reporting(mut self, reporting: bool) -> Self {
        self.reporting = reporting;
        self
    }

    /// Sets [`queue_size`](Self::queue_size).
    #[must_use]
    pub const fn with_queue_size(mut self, queue_size: u16) -> Self {
        self.queue_size = queue_size;
        self
    }

    /// Sets [`free_page_queue_size`](Self::free_page_queue_size).
    #[must_use]
    pub const fn with_free_page_queue_size(mut self, free_page_queue_size: u16) -> Self {
        self.free_page_queue_size = free_page_queue_size;
        self
    }

    /// Sets [`reporting_queue_size`](Self::reporting_queue_size).
    #[must_use]
    pub const fn with_reporting_queue_size(mut self, reporting_queue_size: u16) -> Self {
        self.reporting_queue_size = reporting_queue_size;
        self
    }

    /// Sets [`chains_per_wakeup`](Self::chains_per_wakeup).
    #[must_use]
    pub const fn with_chains_per_wakeup(mut self, chains_per_wakeup: u16) -> Self {
        self.chains_per_wakeup = chains_per_wakeup;
        self
    }

    /// Sets [`hint_file_backed_memory`](Self::hint_file_backed_memory).
    #[must_use]
    pub const fn with_hint_file_backed_memory(mut self, hint_file_backed_memory: bool) -> Self {
        self.hint_file_backed_memory = hint_file_backed_memory;
        self
    }

    /// Sets [`stall_timeout`](Self::stall_timeout).
    #[must_use]
    pub const fn with_stall_timeout(mut self, stall_timeout: Option<Duration>) -> Self {
        self.stall_timeout = stall_timeout;
        self
    }

    /// The balloon feature bits this configuration offers, plus `VIRTIO_F_VERSION_1`,
    /// `VIRTIO_F_RING_EVENT_IDX` and `VIRTIO_F_RING_INDIRECT_DESC`.
    pub fn device_features(&self) -> u64 {
        let mut bits = f::bit(VIRTIO_F_VERSION_1)
            | f::bit(VIRTIO_RING_F_EVENT_IDX)
            | f::bit(VIRTIO_RING_F_INDIRECT_DESC);
        for (on, bit) in [
            (self.must_tell_host, f::VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (self.stats, f::VIRTIO_BALLOON_F_STATS_VQ),
            (self.deflate_on_oom, f::VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            (self.free_page_hint, f::VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            (self.page_poison, f::VIRTIO_BALLOON_F_PAGE_POISON),
            (self.reporting, f::VIRTIO_BALLOON_F_REPORTING),
        ] {
            if on {
                bits |= f::bit(bit);
            }
        }
        bits
    }

    /// The configuration space length: 16 bytes with page poison, 12 with free page hinting,
    /// else 8 (QEMU's guest-visible sizes).
    pub fn config_len(&self) -> usize {
        if self.page_poison {
            16
        } else if self.free_page_hint {
            12
        } else {
            8
        }
    }
}

/// The role of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueRole {
    /// inflateq: PFNs the guest gives up.
    Inflate,
    /// deflateq: PFNs the guest takes back.
    Deflate,
    /// statsq: memory statistics.
    Stats,
    /// free_page_vq: free page hints.
    FreePage,
    /// reporting_vq: free page reporting.
    Reporting,
}

/// Which queue index each role has. Queues are numbered by the *offered* features, with
/// absent queues compacted away (as Linux, QEMU, Firecracker and crosvm do): inflate 0,
/// deflate 1, then stats, free page and reporting, each only if offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLayout {
    roles: Vec<QueueRole>,
}

impl QueueLayout {
    /// The layout for a configuration.
    pub fn new(cfg: &BalloonConfig) -> Self {
        let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
        if cfg.stats {
            roles.push(QueueRole::Stats);
        }
        if cfg.free_page_hint {
            roles.push(QueueRole::FreePage);
        }
        if cfg.reporting {
            roles.push(QueueRole::Reporting);
        }
        QueueLayout { roles }
    }

    /// The number of queues.
    pub fn len(&self) -> usize {
        self.roles.len()
    }

    /// Always false: inflate and deflate always exist.
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    /// The role of queue `index`.
    pub fn role(&self, index: usize) -> Option<QueueRole> {
        self.roles.get(index).copied()
    }

    /// The index of the queue with `role`.
    pub fn index(&self, role: QueueRole) -> Option<usize> {
        self.roles.iter().position(|&r| r == role)
    }
}

/// Why a balloon could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalloonError {
    /// A queue size is 0, above 32768 or not a power of two.
    #[error("{role:?} queue size {size} is not a power of two in 1..=32768")]
    InvalidQueueSize {
        /// Which queue.
        role: QueueRole,
        /// The size asked for.
        size: u16,
    },
    /// The free page queue needs at least 2 entries, the reporting queue at least 32.
    #[error("{role:?} queue size {size} is too small for the Linux driver")]
    QueueTooSmall {
        /// Which queue.
        role: QueueRole,
        /// The size asked for.
        size: u16,
    },
    /// `chains_per_wakeup` is 0.
    #[error("chains_per_wakeup must be at least 1")]
    ZeroBudget,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// The virtio balloon device.
///
/// `M` is how the device reaches guest memory: `Arc<GuestMemoryMmap<B>>`,
/// `GuestMemoryAtomic<GuestMemoryMmap<B>>` (memory hotplug), or anything else implementing
/// [`GuestAddressSpace`] over a [`GuestMemoryBackend`].
pub struct Balloon<M> {
    cfg: BalloonConfig,
    layout: QueueLayout,
    acked: u64,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: Arc<Interrupt>,
    config: ConfigSpace,
    hint: Arc<HintShared>,
    mem: M,
    activated: bool,
    /// `poison_val` no longer changes: set at DRIVER_OK, or for a device activated from a
    /// handover (which has no DRIVER_OK) when the value is first used.
    poison_latched: bool,
    stats: StatsState,
    pages: PageEngine,
    flush_timer: Timer,
    events_fd: EventFd,
    events: BalloonEvents,
    metrics: BalloonMetrics,
    stall: StallWatch,
    stall_timer: Timer,
    clock: Arc<dyn Clock>,
}

impl<M> fmt::Debug for Balloon<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balloon")
            .field("cfg", &self.cfg)
            .field("layout", &self.layout)
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("config", &self.config)
            .field("activated", &self.activated)
            .field("paused", &self.is_paused())
            .field("hint", &self.hint)
            .field("stats_held", &self.stats.held)
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

fn check_size(role: QueueRole, size: u16, min: u16) -> Result<(), BalloonError> {
    if size == 0 || !size.is_power_of_two() || size > defs::queue::MAX_SIZE {
        return Err(BalloonError::InvalidQueueSize { role, size });
    }
    if size < min {
        return Err(BalloonError::QueueTooSmall { role, size });
    }
    Ok(())
}

impl<M> Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    /// Creates a balloon over guest memory `mem` that reports accepted free page hints to
    /// `sink` and discards inflated and reported pages with [`MadviseBackend`].
    pub fn new(
        cfg: BalloonConfig,
        mem: M,
        sink: Arc<dyn FreePageSink>,
    ) -> Result<Self, BalloonError> {
        Self::with_backend(cfg, mem, sink, Arc::new(MadviseBackend::new()))
    }

    /// [`new`](Self::new) with the memory backend that discards inflated and reported pages
    /// and repopulates deflated ones.
    pub fn with_backend(
        cfg: BalloonConfig,
        mem: M,
        sink: Arc<dyn FreePageSink>,
        backend: Arc<dyn MemoryBackend>,
    ) -> Result<Self, BalloonError> {
        if cfg.chains_per_wakeup == 0 {
            return Err(BalloonError::ZeroBudget);
        }
        let layout = QueueLayout::new(&cfg);
        let mut queues = Vec::with_capacity(layout.len());
        let mut queue_evts = Vec::with_capacity(layout.len());
        for &role in &layout.roles {
            let (size, min) = match role {
                QueueRole::FreePage => (cfg.free_page_queue_size, defs::queue::MIN_FREE_PAGE_SIZE),
                QueueRole::Reporting => (cfg.reporting_queue_size, defs::queue::MIN_REPORTING_SIZE),
                _ => (cfg.queue_size, 1),
            };
            check_size(role, size, min)?;
            queues
                .push(Queue::new(size).map_err(|_| BalloonError::InvalidQueueSize { role, size })?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd)?);
        }
        let irq = Arc::new(Interrupt::new().map_err(BalloonError::EventFd)?);
        let hint = Arc::new(HintShared::new(
            irq.clone(),
            sink,
            cfg.hint_file_backed_memory,
        ));
        Ok(Balloon {
            cfg,
            layout,
            acked: 0,
            queues,
            queue_evts,
            irq,
            config: ConfigSpace::new(cfg.config_len()),
            hint,
            mem,
            activated: false,
            poison_latched: false,
            stats: StatsState {
                held: None,
                last: None,
                interval: Duration::ZERO,
                timer: Timer::new().map_err(BalloonError::EventFd)?,
            },
            pages: PageEngine::new(backend),
            flush_timer: Timer::new().map_err(BalloonError::EventFd)?,
            events_fd: EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd)?,
            events: BalloonEvents::empty(),
            metrics: BalloonMetrics::default(),
            stall: StallWatch::new(cfg.stall_timeout),
            stall_timer: Timer::new().map_err(BalloonError::EventFd)?,
            clock: Arc::new(MonotonicClock::new()),
        })
    }

    /// Activates the device from queues a VMM set up itself, for transports without a
    /// DRIVER_OK register (vhost-user) and for VMMs that own their queue state.
    ///
    /// `queues[i]` is queue `i` of the [`QueueLayout`] (fewer than the device has is fine:
    /// the rest stay unready). The features must have been negotiated
    /// ([`VirtioDevice::ack_features`]). Each queue's state is checked, and each VMM kick
    /// eventfd takes the place of the device's own ([`Balloon::queue_event`](
    /// VirtioDevice::queue_event) then returns it), before anything changes: on an error the
    /// device is left as it was. Then the device activates as on DRIVER_OK and looks at
    /// every queue once, since a driver may post buffers (Linux: the statistics buffer)
    /// before it is live.
    ///
    /// Interrupts go wherever [`set_interrupt_delivery`](Self::set_interrupt_delivery)
    /// said, by default to the [`Interrupt`]'s eventfd. A VMM that registered the device
    /// with an `EventManager` hands over no kick eventfds (`kick: None`): the subscriber
    /// watches the device's own.
    pub fn activate_with(&mut self, queues: Vec<QueueHandover>) -> Result<(), ActivateError> {
        if self.activated {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() > self.queues.len() {
            return Err(ActivateError::TooManyQueues {
                given: queues.len(),
                max: self.queues.len(),
            });
        }
        let mut staged = Vec::with_capacity(queues.len());
        for (index, handover) in queues.into_iter().enumerate() {
            let mut state = handover.state;
            state.max_size = self.queues[index].max_size();
            let queue =
                Queue::try_from(state).map_err(|_| ActivateError::InvalidQueue { index })?;
            staged.push((queue, handover.kick));
        }
        let mut previous = Vec::with_capacity(staged.len());
        for (index, (queue, kick)) in staged.into_iter().enumerate() {
            let old_queue = std::mem::replace(&mut self.queues[index], queue);
            let old_kick = kick.map(|k| std::mem::replace(&mut self.queue_evts[index], k));
            previous.push((old_queue, old_kick));
        }
        if let Err(e) = self.activate() {
            for (index, (queue, kick)) in previous.into_iter().enumerate() {
                self.queues[index] = queue;
                if let Some(k) = kick {
                    self.queue_evts[index] = k;
                }
            }
            return Err(e);
        }
        // Without a DRIVER_OK the driver may still be probing: Linux writes `poison_val`
        // after it kicked its statistics buffer. The value stays writable until the device
        // first uses it (the first free page report).
        self.poison_latched = false;
        Ok(())
    }

    /// The state of queue `index` as the device serves it: where it stopped reading the
    /// available ring (`next_avail`) and writing the used ring. A vhost-user backend answers
    /// `GET_VRING_BASE` with it; the queue the transport shows may lag for the free page
    /// queue, which the event loop owns while the device is active.
    pub fn live_queue_state(&self, index: usize) -> Option<QueueState> {
        if self.activated && self.layout.role(index) == Some(QueueRole::FreePage) {
            if let (_, _, Some(state), _) = self.hint.snapshot() {
                return Some(state);
            }
        }
        self.queues.get(index).map(|q| q.state())
    }

    /// The file descriptors the device needs watched for readability, with what each one
    /// is: every queue's kick eventfd (the VMM's own after
    /// [`activate_with`](Self::activate_with)) and the device's three timers. They do not
    /// change while the device lives, except the kick eventfds a VMM hands over. Pass each
    /// event to [`handle_event`](Self::handle_event); the event-manager subscriber
    /// ([`event_handler`](crate::event_handler)) does exactly that.
    pub fn event_fds(&self) -> Vec<(RawFd, DeviceEvent)> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(index, evt)| (evt.as_raw_fd(), DeviceEvent::Queue(index)))
            .chain([
                (self.stats.timer.as_raw_fd(), DeviceEvent::StatsTimer),
                (self.flush_timer.as_raw_fd(), DeviceEvent::FlushTimer),
                (self.stall_timer.as_raw_fd(), DeviceEvent::StallTimer),
            ])
            .collect()
    }

    /// Handles `event` after its file descriptor became readable: consumes the counter,
    /// then serves the queue, asks for statistics, discards waiting pages or looks at the
    /// stall watch ([`check_stall`](Self::check_stall)). A VMM whose
    /// own loop already consumed a kick (vhost-user-backend does) calls
    /// [`process_queue`](Self::process_queue) instead.
    pub fn handle_event(&mut self, event: DeviceEvent) {
        match event {
            DeviceEvent::Queue(index) => {
                if let Some(evt) = self.queue_evts.get(index) {
                    // Clear the counter; an empty counter (a spurious wakeup) is fine.
                    let _ = evt.read();
                    self.process_queue(index);
                }
            }
            DeviceEvent::StatsTimer => {
                if self.stats.timer.consume(true) > 0 {
                    self.request_stats();
                }
            }
            DeviceEvent::FlushTimer => {
                if self.flush_timer.consume(false) > 0 {
                    self.flush_discards();
                }
            }
            DeviceEvent::StallTimer => {
                // The clock decides, not the expiration count: a spurious wakeup re-arms.
                self.stall_timer.consume(false);
                self.check_stall();
            }
        }
    }

    /// Serves queue `index` once, as the event loop does after its eventfd fired: up to
    /// [`chains_per_wakeup`](BalloonConfig::chains_per_wakeup) elements, handed to the code
    /// of the queue's role (free page hints, inflate and deflate, statistics, free page
    /// reporting). Does nothing before DRIVER_OK or while the device is paused.
    pub fn process_queue(&mut self, index: usize) {
        if !self.activated || self.is_paused() {
            return;
        }
        let budget = usize::from(self.cfg.chains_per_wakeup);
        match self.layout.role(index) {
            Some(QueueRole::FreePage) => self.hint.process(budget),
            Some(QueueRole::Inflate) => self.serve_pfns(index, true, budget),
            Some(QueueRole::Deflate) => self.serve_pfns(index, false, budget),
            Some(QueueRole::Stats) => self.serve_stats(index, budget),
            Some(QueueRole::Reporting) => self.serve_reports(index, budget),
            None => {}
        }
    }

    /// Inflate or deflate: the PFN arrays go to the page engine; inflated pages left waiting
    /// for a merge arm the flush timer.
    fn serve_pfns(&mut self, index: usize, inflate: bool, budget: usize) {
        let must_tell_host = self.has_feature(f::VIRTIO_BALLOON_F_MUST_TELL_HOST);
        let guard = self.mem.memory();
        let (Some(queue), Some(evt)) = (self.queues.get_mut(index), self.queue_evts.get(index))
        else {
            return;
        };
        let pending = inflate::serve_pfns(
            queue,
            &*guard,
            index,
            budget,
            &self.irq,
            evt,
            &mut self.pages,
            inflate,
            must_tell_host,
        );
        drop(guard);
        if pending && !self.flush_timer.armed() {
            if let Err(e) = self.flush_timer.arm(DISCARD_FLUSH_DELAY, None) {
                warn_limited!(
                    FLUSH_TIMER_FAILED,
                    "balloon: cannot arm the flush timer: {}",
                    e
                );
                self.flush_discards();
            }
        }
    }

    /// Statistics: the newest buffer is kept and announced with
    /// [`BalloonEvents::STATS_UPDATED`].
    fn serve_stats(&mut self, index: usize, budget: usize) {
        let guard = self.mem.memory();
        let (Some(queue), Some(evt)) = (self.queues.get_mut(index), self.queue_evts.get(index))
        else {
            return;
        };
        let served = stats::serve_stats(
            queue,
            &*guard,
            index,
            budget,
            &self.irq,
            evt,
            &mut self.stats,
        );
        drop(guard);
        self.metrics.stats_updates += served.updates;
        self.metrics.stats_malformed += served.malformed;
        if served.updates > 0 {
            self.add_event(BalloonEvents::STATS_UPDATED);
        }
    }

    /// Free page reporting: reported pages are discarded unless page poison is in use or
    /// discards are inhibited. The first element latches `poison_val`.
    fn serve_reports(&mut self, index: usize, budget: usize) {
        let skip_reports = self.poison_val() != 0 || self.pages.inhibited();
        let guard = self.mem.memory();
        let (Some(queue), Some(evt)) = (self.queues.get_mut(index), self.queue_evts.get(index))
        else {
            return;
        };
        let arrived = reporting::serve_reports(
            queue,
            &*guard,
            index,
            budget,
            &self.irq,
            evt,
            &mut self.pages,
            skip_reports,
        );
        if arrived {
            self.poison_latched = true;
        }
    }

    /// Sets the target size in 4 KiB pages (`num_pages`) and tells the driver (configuration
    /// interrupt). The driver inflates or deflates towards it and reports its progress in
    /// `actual`; [`BalloonEvents::TARGET_REACHED`] follows when they meet.
    pub fn set_target(&mut self, pages: u32) {
        let new_target = self.config.num_pages != pages;
        self.config.num_pages = pages;
        self.irq.signal_config_change();
        if self.target_reached() {
            self.add_event(BalloonEvents::TARGET_REACHED);
        }
        self.watch_stall(new_target);
    }

    /// Sets the target in bytes, rounded down to whole 4 KiB pages (and capped at the
    /// largest 32-bit page count, 16 TiB).
    pub fn set_target_bytes(&mut self, bytes: u64) {
        let pages = u32::try_from(bytes >> defs::PAGE_SHIFT).unwrap_or(u32::MAX);
        self.set_target(pages);
    }

    /// Asks the driver for fresh statistics by giving it back the buffer the device holds.
    /// Returns false if there is none (statistics not negotiated, or a request is already
    /// out). The answer arrives as [`BalloonEvents::STATS_UPDATED`].
    pub fn request_stats(&mut self) -> bool {
        if !self.activated || self.is_paused() {
            return false;
        }
        let Some(index) = self.layout.index(QueueRole::Stats) else {
            return false;
        };
        let Some(head) = self.stats.held else {
            return false;
        };
        let guard = self.mem.memory();
        let mem: &M::M = &guard;
        let queue = &mut self.queues[index];
        if queue.add_used(mem, head, 0).is_err() {
            return false;
        }
        self.stats.held = None;
        self.metrics.stats_requests += 1;
        if queue.needs_notification(mem).unwrap_or(true) {
            self.irq.signal_used(index);
        }
        true
    }

    /// Stops queue processing while the VM is paused (no element moves on any ring until
    /// [`resume`](Self::resume)). Elements being handled finish first, and inflated pages
    /// waiting to be merged are discarded.
    pub fn pause(&mut self) {
        self.hint.set_paused(true);
        let guard = self.mem.memory();
        self.pages.flush(&*guard);
        drop(guard);
        self.watch_stall(false);
    }

    /// Discards inflated pages still waiting to be merged with later ones (the device does
    /// this on its own after [`DISCARD_FLUSH_DELAY`], when the target is reached, before a
    /// deflate, on pause and on save).
    pub fn flush_discards(&mut self) {
        let guard = self.mem.memory();
        self.pages.flush(&*guard);
        let _ = self.flush_timer.disarm();
    }
}

impl<M> Balloon<M> {
    /// The migration thread's handle on free page hinting (also the device's precopy
    /// notifier).
    pub fn hint_control(&self) -> FreePageHinting {
        FreePageHinting::new(self.hint.clone())
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &BalloonConfig {
        &self.cfg
    }

    /// The queue layout.
    pub fn queue_layout(&self) -> &QueueLayout {
        &self.layout
    }

    /// Sends the device's interrupts to `delivery` (per-queue used-buffer notifications and
    /// configuration changes) instead of the [`Interrupt`]'s eventfd.
    pub fn set_interrupt_delivery(&self, delivery: Arc<dyn InterruptDelivery>) {
        self.irq.set_delivery(delivery);
    }

    /// The shared interrupt (also reachable through [`VirtioDevice::interrupt`]).
    pub fn interrupt_handle(&self) -> Arc<Interrupt> {
        self.irq.clone()
    }

    /// The target size in 4 KiB pages (`num_pages`).
    pub fn num_pages(&self) -> u32 {
        self.config.num_pages
    }

    /// The size the driver reports in 4 KiB pages (`actual`).
    pub fn actual(&self) -> u32 {
        self.config.actual
    }

    /// The driver's `poison_val` (0 unless PAGE_POISON was negotiated and written).
    pub fn poison_val(&self) -> u32 {
        self.config.poison_val
    }

    /// Whether the driver negotiated `feature` (a bit number from [`defs::features`]).
    pub fn has_feature(&self, feature: u32) -> bool {
        feature < 64 && self.acked & f::bit(feature) != 0
    }

    /// Whether the driver uses queue `index` with the features it negotiated: inflate and
    /// deflate always, the others only with their feature. A VMM that activates the device
    /// from queues it set up ([`activate_with`](Self::activate_with)) waits for these.
    pub fn queue_negotiated(&self, index: usize) -> bool {
        match self.layout.role(index) {
            Some(QueueRole::Inflate | QueueRole::Deflate) => true,
            Some(QueueRole::Stats) => self.has_feature(f::VIRTIO_BALLOON_F_STATS_VQ),
            Some(QueueRole::FreePage) => self.has_feature(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            Some(QueueRole::Reporting) => self.has_feature(f::VIRTIO_BALLOON_F_REPORTING),
            None => false,
        }
    }

    /// The memory host pages the backend discards are made of.
    pub fn host_page_size(&self) -> u64 {
        self.pages.host_page()
    }

    /// Whether the target is reached: the driver is running and `actual == num_pages`.
    pub fn target_reached(&self) -> bool {
        self.activated && self.config.actual == self.config.num_pages
    }

    /// `actual` in bytes.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.config.actual) << defs::PAGE_SHIFT
    }

    /// An eventfd signalled whenever [`take_events`](Self::take_events) has something new.
    /// Register it with the VMM's event loop, or poll `take_events`.
    pub fn events_fd(&self) -> &EventFd {
        &self.events_fd
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> BalloonEvents {
        let _ = self.events_fd.read();
        std::mem::take(&mut self.events)
    }

    fn add_event(&mut self, e: BalloonEvents) {
        self.events |= e;
        let _ = self.events_fd.write(1);
    }

    /// The last statistics the driver sent, with the time they arrived.
    pub fn latest_stats(&self) -> Option<&StatsReport> {
        self.stats.last.as_ref()
    }

    /// Polls the driver's statistics every `interval` (the event loop asks for them with
    /// [`request_stats`](Self::request_stats)); `Duration::ZERO` stops polling. May be
    /// changed at any time.
    pub fn set_stats_interval(&mut self, interval: Duration) -> io::Result<()> {
        if interval.is_zero() {
            self.stats.timer.disarm()?;
        } else {
            self.stats.timer.arm(interval, Some(interval))?;
        }
        self.stats.interval = interval;
        Ok(())
    }

    /// The statistics polling interval (zero: off).
    pub fn stats_interval(&self) -> Duration {
        self.stats.interval
    }

    /// Stops (or allows again) every discard of inflated or reported pages, for example
    /// while a device does DMA to pinned guest memory or during postcopy. Elements are still
    /// acknowledged; reporting elements are skipped as a whole. Inhibiting drops inflated
    /// pages not yet discarded.
    pub fn set_discards_inhibited(&mut self, on: bool) {
        self.pages.set_inhibited(on);
    }

    /// Whether discards are inhibited.
    pub fn discards_inhibited(&self) -> bool {
        self.pages.inhibited()
    }

    /// The device's counters.
    pub fn metrics(&self) -> BalloonMetrics {
        BalloonMetrics {
            pages: self.pages.metrics,
            hint: self.hint.status().metrics,
            ..self.metrics
        }
    }

    /// Resumes queue processing and looks at every queue again.
    pub fn resume(&mut self) {
        self.hint.set_paused(false);
        for evt in &self.queue_evts {
            // A full eventfd counter still wakes the loop, so an error here loses nothing.
            let _ = evt.write(1);
        }
        self.watch_stall(false);
    }

    /// Whether the target is stalled: `actual` has not come closer to `num_pages` for
    /// [`BalloonConfig::stall_timeout`] ([`BalloonEvents::TARGET_STALLED`] was raised) and
    /// neither progress, a new target nor reaching it has cleared that since. As of the
    /// last look ([`check_stall`](Self::check_stall) looks now).
    pub fn target_stalled(&self) -> bool {
        self.stall.stalled()
    }

    /// Looks at the stall watch now, as the device does when its stall timer fires and
    /// whenever `actual` or the target changes: raises [`BalloonEvents::TARGET_STALLED`]
    /// if the timeout has just passed, and re-arms the timer for the rest of it. Returns
    /// whether the target is stalled. A VMM that polls instead of watching
    /// [`DeviceEvent::StallTimer`] calls it.
    pub fn check_stall(&mut self) -> bool {
        match self.stall.check(self.clock.now()) {
            StallCheck::Pending(left) => {
                if let Err(e) = self.stall_timer.arm(left, None) {
                    // Left unarmed, the watch still looks at every write of `actual`.
                    warn_limited!(
                        STALL_TIMER_FAILED,
                        "balloon: cannot arm the stall timer: {}",
                        e
                    );
                }
            }
            StallCheck::Stalled { new } => {
                self.disarm_stall_timer();
                if new {
                    self.metrics.target_stalls = self.metrics.target_stalls.saturating_add(1);
                    self.add_event(BalloonEvents::TARGET_STALLED);
                }
            }
            StallCheck::Idle => self.disarm_stall_timer(),
        }
        self.stall.stalled()
    }

    fn disarm_stall_timer(&mut self) {
        // With the watch off this runs on every write of `actual`: no syscall then.
        if self.stall_timer.armed() {
            let _ = self.stall_timer.disarm();
        }
    }

    /// Makes the stall watch read the time from `clock` (by default a [`MonotonicClock`]).
    /// A timeout already running starts again at the new clock's present.
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
        self.stall.restart_clock(self.clock.now());
        self.check_stall();
    }

    /// Tells the stall watch where `actual` and the target are (`retarget`: the target
    /// changed), then looks at it.
    fn watch_stall(&mut self, retarget: bool) {
        let now = self.clock.now();
        let live = self.activated && !self.is_paused();
        let distance = self.config.num_pages.abs_diff(self.config.actual);
        if retarget {
            self.stall.retarget(now, live, distance);
        } else {
            self.stall.observe(now, live, distance);
        }
        self.check_stall();
    }

    /// Whether queue processing is paused.
    pub fn is_paused(&self) -> bool {
        self.hint.paused()
    }
}

impl<M> VirtioDevice for Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    fn queue_mut(&mut self, index: usize) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(index)
    }

    fn queue_event(&self, index: usize) -> Option<&EventFd> {
        self.queue_evts.get(index)
    }

    fn device_features(&self) -> u64 {
        self.cfg.device_features()
    }

    fn driver_features(&self) -> u64 {
        self.acked
    }

    fn set_driver_features(&mut self, page: u32, value: u32) {
        match page {
            0 => self.acked = (self.acked & !0xffff_ffff) | u64::from(value),
            1 => self.acked = (self.acked & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }

    fn validate_features(&self) -> Result<(), FeatureError> {
        let offered = self.device_features();
        let extra = self.acked & !offered;
        if extra != 0 {
            return Err(FeatureError::NotOffered(extra));
        }
        if self.acked & f::bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(FeatureError::NoVersion1);
        }
        // A driver numbering queues by the features it accepted (Linux) would number them
        // differently if it drops an optional queue that has an accepted one after it.
        let mut missing = 0u64;
        for bit in [
            f::VIRTIO_BALLOON_F_STATS_VQ,
            f::VIRTIO_BALLOON_F_FREE_PAGE_HINT,
            f::VIRTIO_BALLOON_F_REPORTING,
        ] {
            let mask = f::bit(bit);
            if offered & mask == 0 {
                continue;
            }
            if self.acked & mask == 0 {
                missing |= mask;
            } else if missing != 0 {
                return Err(FeatureError::QueueLayout(missing));
            }
        }
        Ok(())
    }

    fn features_ok(&mut self) {
        // A poison value written while PAGE_POISON was still acknowledged does not survive
        // a driver that then dropped the feature. The device changed the configuration: a
        // new generation, no interrupt (before DRIVER_OK there is none anyway).
        if !self.has_feature(f::VIRTIO_BALLOON_F_PAGE_POISON) && self.config.poison_val != 0 {
            self.config.poison_val = 0;
            self.irq.bump_config_generation();
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data, self.hint.config_value());
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // poison_val is latched at DRIVER_OK (after a handover: at its first use): the
        // reporting decision must not change under the device.
        let negotiated = self.has_feature(f::VIRTIO_BALLOON_F_PAGE_POISON);
        let poison_ok = negotiated && !self.poison_latched;
        let w = self
            .config
            .write(offset, data, self.hint.config_value(), poison_ok);
        if negotiated && self.poison_latched && w.poison_touched {
            self.metrics.late_poison_writes += 1;
        }
        if w.actual_changed {
            self.add_event(BalloonEvents::ACTUAL_CHANGED);
            if self.target_reached() {
                self.add_event(BalloonEvents::TARGET_REACHED);
                let guard = self.mem.memory();
                self.pages.flush(&*guard);
            }
            self.watch_stall(false);
        }
    }

    fn interrupt(&self) -> &Interrupt {
        &self.irq
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        if self.activated {
            return Err(ActivateError::AlreadyActive);
        }
        if !self.has_feature(VIRTIO_F_VERSION_1) {
            return Err(ActivateError::LegacyDriver);
        }
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        {
            let guard = self.mem.memory();
            let mem: &M::M = &guard;
            for (index, q) in self.queues.iter_mut().enumerate() {
                if q.ready() && !q.is_valid(mem) {
                    return Err(ActivateError::InvalidQueue { index });
                }
                q.set_event_idx(event_idx);
            }
        }
        let fph = self.has_feature(f::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        // Everything that can fail comes before the device commits to being active.
        let mut free_page_queue = None;
        if let Some(idx) = self.layout.index(QueueRole::FreePage) {
            if fph && self.queues[idx].ready() {
                let invalid = |_| ActivateError::InvalidQueue { index: idx };
                let evt = self.queue_evts[idx].try_clone().map_err(invalid)?;
                // The event loop owns the real queue from now on; the transport keeps a copy
                // for its read-only registers.
                let copy = Queue::try_from(self.queues[idx].state())
                    .map_err(|_| ActivateError::InvalidQueue { index: idx })?;
                free_page_queue = Some((idx, evt, copy));
            }
        }
        self.hint.set_negotiated(fph);
        self.irq.set_driver_ok(true);
        self.activated = true;
        self.poison_latched = true;
        if let Some((idx, evt, copy)) = free_page_queue {
            let queue = std::mem::replace(&mut self.queues[idx], copy);
            self.hint.activate(Box::new(FreePageQueue {
                queue,
                mem: self.mem.clone(),
                index: idx,
                evt,
            }));
        }
        // Look at every queue once: the driver may have posted buffers before DRIVER_OK.
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
        // The guest has the balloon now: a target it has not reached is watched.
        self.watch_stall(false);
        Ok(())
    }

    fn reset(&mut self) {
        self.irq.set_driver_ok(false);
        self.hint.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.acked = 0;
        let num_pages = self.config.num_pages;
        self.config = ConfigSpace::new(self.cfg.config_len());
        self.config.num_pages = num_pages;
        self.activated = false;
        self.poison_latched = false;
        self.stats.held = None;
        self.stats.last = None;
        // The new driver owns every page again: nothing inflated may be discarded later.
        self.pages.reset();
        let _ = self.flush_timer.disarm();
        self.stall.forget();
        self.disarm_stall_timer();
    }

    fn is_activated(&self) -> bool {
        self.activated
    }
}
