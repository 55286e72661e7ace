// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The inflate and deflate queues: arrays of PFNs the guest gives up or takes back.
//!
//! Each element is checked ([`check_chain`]), its PFNs are read in chunks, sorted and merged
//! into runs ([`for_each_pfn_chunk`], [`for_each_run`]), and the runs go to the page engine
//! ([`PageEngine`](super::pages::PageEngine)), which discards inflated pages through the
//! memory backend and repopulates deflated ones. Every element is given back with used
//! length 0. Inflated pages may wait a little to be merged with the next element; the flush
//! timer (`DISCARD_FLUSH_DELAY`, armed by the device when this returns true) discards what is
//! left.

use virtio_queue::Queue;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::pages::{for_each_pfn_chunk, for_each_run, log_pfn_stop, PageEngine, PfnStop};
use super::queue::serve_checked;
use crate::transport::Interrupt;

/// Serves up to `budget` elements of the inflate (`inflate`) or deflate queue `index`.
/// Returns whether inflated pages wait for the flush timer.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve_pfns<B: GuestMemoryBackend>(
    queue: &mut Queue,
    mem: &B,
    index: usize,
    budget: usize,
    irq: &Interrupt,
    evt: &EventFd,
    pages: &mut PageEngine,
    inflate: bool,
    must_tell_host: bool,
) -> bool {
    let bad = serve_checked(queue, mem, index, budget, irq, evt, |chain| {
        if inflate {
            pages.metrics.inflate_elements += 1;
        } else {
            pages.metrics.deflate_elements += 1;
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
        Some(chain.head_index())
    });
    pages.metrics.malformed_elements += bad;
    inflate && pages.has_pending()
}
