// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The event-manager subscriber: the balloon's queues are served on an `EventManager` thread.
//!
//! [`Balloon`] implements [`MutEventSubscriber`]. In `init` it registers each file descriptor
//! of [`Balloon::event_fds`]: each queue's eventfd with the queue index as the event data,
//! and its timers (statistics polling, discard flush, stall watch) with
//! [`STATS_TIMER_EVENT`], [`FLUSH_TIMER_EVENT`] and [`STALL_TIMER_EVENT`]. On each event it
//! turns the event data back into a [`DeviceEvent`] and hands it to
//! [`Balloon::handle_event`]; nothing else happens here. The device serves the queue in a
//! bounded batch of [`chains_per_wakeup`](crate::BalloonConfig::chains_per_wakeup) chains
//! and signals the queue's eventfd again if more are waiting, so the loop serves the other
//! queues (and the migration thread gets the hint lock) before it comes back.
//!
//! Nothing runs before the driver sets DRIVER_OK or while the device is
//! [paused](crate::Balloon::pause).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use crate::device::{Balloon, DeviceEvent};
use crate::ratelimit::{warn_limited, RateLimit};
use crate::transport::VirtioDevice;

static BAD_EVENT: RateLimit = RateLimit::new();
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
            index if (index as usize) < self.num_queues() => DeviceEvent::Queue(index as usize),
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
