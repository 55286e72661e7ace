// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The free page reporting queue (`VIRTIO_BALLOON_F_REPORTING`).
//!
//! The driver reports ranges of free guest memory in device-writable descriptors; the device
//! discards them through the page engine and gives each element back with used length 0.
//! With `VIRTIO_BALLOON_F_PAGE_POISON` and a nonzero `poison_val`, or while discards are
//! inhibited ([`Balloon::set_discards_inhibited`]), elements are acknowledged but skipped as
//! a whole: a discarded page would read as zeros, not as the poison pattern. The first
//! element latches `poison_val`.

use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use super::descriptor::check_chain;
use super::queue::serve;
use super::Balloon;
use crate::ratelimit::{warn_limited, RateLimit};

static BAD_CHAIN: RateLimit = RateLimit::new();

impl<M> Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    /// Serves up to `budget` elements of the reporting queue `index`.
    pub(super) fn process_reporting(&mut self, index: usize, budget: usize) {
        // With PAGE_POISON the device must not change reported pages (a discard would make
        // them read as zeros), and inhibited discards skip them too.
        let skip_reports = self.poison_val() != 0 || self.pages.inhibited();
        let guard = self.mem.memory();
        let mem: &M::M = &guard;
        let (Some(queue), Some(evt)) = (self.queues.get_mut(index), self.queue_evts.get(index))
        else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let size = queue.size();
        let pages = &mut self.pages;
        let poison_latched = &mut self.poison_latched;
        serve(queue, mem, index, budget, &self.irq, evt, |chain, _| {
            let head = chain.head_index();
            if let Err(e) = check_chain(chain, size) {
                warn_limited!(BAD_CHAIN, "balloon: queue {}: bad element: {:?}", index, e);
                pages.metrics.malformed_elements += 1;
                return Some(head);
            }
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
        });
    }
}
