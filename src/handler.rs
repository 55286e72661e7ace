// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The event-manager subscriber: the balloon's queues are served on an `EventManager` thread.
//!
//! [`Balloon`] implements [`MutEventSubscriber`]. In `init` it registers each queue's
//! eventfd with the queue index as the event data, and its timers (statistics polling,
//! discard flush, stall watch) with [`STATS_TIMER_EVENT`], [`FLUSH_TIMER_EVENT`] and
//! [`STALL_TIMER_EVENT`]. On each event it reads the eventfd and
//! drains that queue with virtio-queue's pattern: disable notifications, pop and handle
//! chains, enable notifications and check again. It handles at most
//! [`chains_per_wakeup`](crate::BalloonConfig::chains_per_wakeup) chains per wakeup; if more
//! are waiting it signals its own eventfd again, so the loop serves the other queues (and
//! the migration thread gets the hint lock) before it comes back. The used-buffer interrupt
//! is raised only when `needs_notification` asks for it.
//!
//! Nothing runs before the driver sets DRIVER_OK or while the device is
//! [paused](crate::Balloon::pause).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use crate::device::descriptor::check_chain;
use crate::device::pages::{for_each_pfn_chunk, for_each_run, log_pfn_stop};
use crate::device::queue::serve;
use crate::device::stats::{self, StatsReport};
use crate::device::{Balloon, BalloonEvents, DeviceEvent, QueueRole, DISCARD_FLUSH_DELAY};
use crate::ratelimit::{warn_limited, RateLimit};

static BAD_EVENT: RateLimit = RateLimit::new();
static BAD_CHAIN: RateLimit = RateLimit::new();
static REGISTER_FAILED: RateLimit = RateLimit::new();

/// The event data of the statistics polling timer.
pub const STATS_TIMER_EVENT: u32 = u32::MAX - 1;
/// The event data of the discard flush timer.
pub const FLUSH_TIMER_EVENT: u32 = u32::MAX - 2;
/// The event data of the stall watch's timer.
pub const STALL_TIMER_EVENT: u32 = u32::MAX - 3;

impl<M> MutEventSubscriber for Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, event) in self.event_fds() {
            let data = event_data(event);
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                warn_limited!(
                    REGISTER_FAILED,
                    "balloon: cannot register event {}: {:?}",
                    data,
                    e
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
        {
            warn_limited!(BAD_EVENT, "balloon: event {} failed, unregistering", data);
            let _ = ops.remove(events);
            return;
        }
        let event = match data {
            STATS_TIMER_EVENT => DeviceEvent::StatsTimer,
            FLUSH_TIMER_EVENT => DeviceEvent::FlushTimer,
            STALL_TIMER_EVENT => DeviceEvent::StallTimer,
            index if (index as usize) < self.queue_evts.len() => DeviceEvent::Queue(index as usize),
            _ => {
                warn_limited!(BAD_EVENT, "balloon: event for unknown queue {}", data);
                return;
            }
        };
        self.handle_event(event);
    }
}

/// The event data the subscriber registers `event` with.
fn event_data(event: DeviceEvent) -> u32 {
    match event {
        // Queue indices are below 8 (the layout has at most five queues).
        DeviceEvent::Queue(index) => u32::try_from(index).unwrap_or(u32::MAX),
        DeviceEvent::StatsTimer => STATS_TIMER_EVENT,
        DeviceEvent::FlushTimer => FLUSH_TIMER_EVENT,
        DeviceEvent::StallTimer => STALL_TIMER_EVENT,
    }
}

impl<M> Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    /// Serves queue `index` once, as the event loop does after its eventfd fired.
    pub fn process_queue(&mut self, index: usize) {
        if !self.activated || self.is_paused() {
            return;
        }
        let budget = usize::from(self.cfg.chains_per_wakeup);
        match self.layout.role(index) {
            Some(QueueRole::FreePage) => self.hint.process(budget),
            Some(role) => self.process_plain_queue(index, role, budget),
            None => {}
        }
    }

    /// Inflate, deflate, statistics and reporting. Every element is given back with used
    /// length 0, except the statistics buffer, which is held until the device wants fresh
    /// numbers (or a second one arrives).
    fn process_plain_queue(&mut self, index: usize, role: QueueRole, budget: usize) {
        // With PAGE_POISON the device must not change reported pages (a discard would make
        // them read as zeros), and inhibited discards skip them too.
        let skip_reports = self.poison_val() != 0 || self.pages.inhibited();
        let must_tell_host =
            self.has_feature(crate::spec::features::VIRTIO_BALLOON_F_MUST_TELL_HOST);
        let guard = self.mem.memory();
        let mem: &M::M = &guard;
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let size = queue.size();
        let pages = &mut self.pages;
        let stats = &mut self.stats;
        let metrics = &mut self.metrics;
        let poison_latched = &mut self.poison_latched;
        let mut stats_arrived = false;
        serve(
            queue,
            mem,
            index,
            budget,
            &self.irq,
            &self.queue_evts[index],
            |chain, _| {
                let head = chain.head_index();
                if let Err(e) = check_chain(chain, size) {
                    warn_limited!(BAD_CHAIN, "balloon: queue {}: bad element: {:?}", index, e);
                    if role == QueueRole::Stats {
                        metrics.stats_malformed += 1;
                    } else {
                        pages.metrics.malformed_elements += 1;
                    }
                    return Some(head);
                }
                match role {
                    QueueRole::Inflate | QueueRole::Deflate => {
                        let inflate = role == QueueRole::Inflate;
                        if inflate {
                            pages.metrics.inflate_elements += 1;
                        } else {
                            pages.metrics.deflate_elements += 1;
                            // Nothing inflated earlier may be discarded after the driver
                            // took a page back.
                            pages.flush(mem);
                        }
                        let mut outside = 0u64;
                        let (_, stop) = for_each_pfn_chunk(chain, |chunk| {
                            for_each_run(chunk, |pfn, n| {
                                outside += if inflate {
                                    pages.inflate(mem, pfn, n)
                                } else {
                                    pages.deflate(mem, pfn, n)
                                };
                            })
                        });
                        pages.metrics.pfns_outside_ram += outside;
                        if inflate {
                            pages.end_inflate_element(mem, must_tell_host);
                        }
                        if let Some(stop) = stop {
                            if stop == crate::device::pages::PfnStop::OverLimit {
                                pages.metrics.pfns_over_limit += 1;
                            } else {
                                pages.metrics.malformed_elements += 1;
                            }
                            log_pfn_stop(if inflate { "inflate" } else { "deflate" }, stop);
                        }
                        Some(head)
                    }
                    QueueRole::Reporting => {
                        // The device acts on poison_val from now on.
                        *poison_latched = true;
                        pages.metrics.reporting_elements += 1;
                        if skip_reports {
                            pages.metrics.reporting_elements_skipped += 1;
                        } else {
                            for desc in chain.clone().filter(|d| d.is_write_only()) {
                                pages.report(mem, desc.addr().0, u64::from(desc.len()));
                            }
                        }
                        Some(head)
                    }
                    QueueRole::Stats => {
                        match stats::parse(chain) {
                            Some((values, entries, unknown_tags)) => {
                                metrics.stats_updates += 1;
                                stats.last = Some(StatsReport {
                                    stats: values,
                                    received: std::time::Instant::now(),
                                    received_at: std::time::SystemTime::now(),
                                    entries,
                                    unknown_tags,
                                });
                                stats_arrived = true;
                            }
                            None => metrics.stats_malformed += 1,
                        }
                        // Keep the new buffer; a second one while one is held (the driver
                        // must not send it) gives the older one back.
                        stats.held.replace(head)
                    }
                    QueueRole::FreePage => Some(head),
                }
            },
        );
        drop(guard);
        if stats_arrived {
            self.add_event(BalloonEvents::STATS_UPDATED);
        }
        if role == QueueRole::Inflate && self.pages.has_pending() && !self.flush_timer.armed() {
            if let Err(e) = self.flush_timer.arm(DISCARD_FLUSH_DELAY, None) {
                // Without the timer, discard now rather than never.
                warn_limited!(
                    REGISTER_FAILED,
                    "balloon: cannot arm the flush timer: {}",
                    e
                );
                self.flush_discards();
            }
        }
    }
}
