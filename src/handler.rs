// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The event-manager subscriber: the balloon's queues are served on an `EventManager` thread.
//!
//! [`Balloon`] implements [`MutEventSubscriber`]. In `init` it registers each queue's
//! eventfd with the queue index as the event data. On each event it reads the eventfd and
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
use crate::device::queue::serve;
use crate::device::{Balloon, QueueRole};
use crate::ratelimit::{warn_limited, RateLimit};

static BAD_EVENT: RateLimit = RateLimit::new();
static BAD_CHAIN: RateLimit = RateLimit::new();
static REGISTER_FAILED: RateLimit = RateLimit::new();

impl<M> MutEventSubscriber for Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                warn_limited!(
                    REGISTER_FAILED,
                    "balloon: cannot register queue {}: {:?}",
                    index,
                    e
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(evt) = self.queue_evts.get(index) else {
            warn_limited!(BAD_EVENT, "balloon: event for unknown queue {}", index);
            return;
        };
        if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
        {
            warn_limited!(
                BAD_EVENT,
                "balloon: queue {} eventfd failed, unregistering",
                index
            );
            let _ = ops.remove(events);
            return;
        }
        // Clear the counter; an empty counter (a spurious wakeup) is fine.
        let _ = evt.read();
        if !self.activated || self.is_paused() {
            return;
        }
        self.process_queue(index);
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

    /// The queues whose full behaviour lives elsewhere: each element is checked and given
    /// back with used length 0, except that the statistics buffer is held until the next one
    /// arrives (the driver refills it only when the device returns it).
    fn process_plain_queue(&mut self, index: usize, role: QueueRole, budget: usize) {
        let guard = self.mem.memory();
        let mem: &M::M = &guard;
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let stats_held = &mut self.stats_held;
        let size = queue.size();
        serve(
            queue,
            mem,
            index,
            budget,
            &self.irq,
            &self.queue_evts[index],
            |chain, _| {
                let shape = check_chain(chain, size);
                if let Err(e) = shape {
                    warn_limited!(BAD_CHAIN, "balloon: queue {}: bad element: {:?}", index, e);
                }
                let head = chain.head_index();
                if role == QueueRole::Stats && shape.is_ok() {
                    stats_held.replace(head)
                } else {
                    Some(head)
                }
            },
        );
    }
}
