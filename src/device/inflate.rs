// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The inflate and deflate queues: arrays of PFNs the guest gives up or takes back.
//!
//! Each element is checked ([`check_chain`]), its PFNs are read in chunks, sorted and merged
//! into runs ([`for_each_pfn_chunk`], [`for_each_run`]), and the runs go to the page engine
//! ([`PageEngine`](super::pages::PageEngine)), which discards inflated pages through the
//! memory backend and repopulates deflated ones. Every element is given back with used
//! length 0. Inflated pages may wait a little to be merged with the next element; the flush
//! timer ([`DISCARD_FLUSH_DELAY`]) discards what is left.

use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use super::descriptor::check_chain;
use super::pages::{for_each_pfn_chunk, for_each_run, log_pfn_stop, PfnStop};
use super::queue::serve;
use super::{Balloon, DISCARD_FLUSH_DELAY};
use crate::defs::features as f;
use crate::ratelimit::{warn_limited, RateLimit};

static BAD_CHAIN: RateLimit = RateLimit::new();
static FLUSH_TIMER_FAILED: RateLimit = RateLimit::new();

impl<M> Balloon<M>
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    /// Serves up to `budget` elements of the inflate (`inflate`) or deflate queue `index`.
    pub(super) fn process_inflate_deflate(&mut self, index: usize, inflate: bool, budget: usize) {
        let must_tell_host = self.has_feature(f::VIRTIO_BALLOON_F_MUST_TELL_HOST);
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
        serve(queue, mem, index, budget, &self.irq, evt, |chain, _| {
            let head = chain.head_index();
            if let Err(e) = check_chain(chain, size) {
                warn_limited!(BAD_CHAIN, "balloon: queue {}: bad element: {:?}", index, e);
                pages.metrics.malformed_elements += 1;
                return Some(head);
            }
            if inflate {
                pages.metrics.inflate_elements += 1;
            } else {
                pages.metrics.deflate_elements += 1;
                // Nothing inflated earlier may be discarded after the driver took a page
                // back.
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
                if stop == PfnStop::OverLimit {
                    pages.metrics.pfns_over_limit += 1;
                } else {
                    pages.metrics.malformed_elements += 1;
                }
                log_pfn_stop(if inflate { "inflate" } else { "deflate" }, stop);
            }
            Some(head)
        });
        drop(guard);
        if inflate && self.pages.has_pending() && !self.flush_timer.armed() {
            if let Err(e) = self.flush_timer.arm(DISCARD_FLUSH_DELAY, None) {
                // Without the timer, discard now rather than never.
                warn_limited!(
                    FLUSH_TIMER_FAILED,
                    "balloon: cannot arm the flush timer: {}",
                    e
                );
                self.flush_discards();
            }
        }
    }
}
