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

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::descriptor::check_chain;
use super::pages::PageEngine;
use super::queue::serve;
use crate::ratelimit::{warn_limited, RateLimit};
use crate::transport::Interrupt;

static BAD_CHAIN: RateLimit = RateLimit::new();

/// Serves up to `budget` elements of the free page reporting queue `index`; with
/// `skip_reports` (page poison in use, or discards inhibited) the reported pages are kept.
/// Returns whether an element arrived (which latches `poison_val`).
#[allow(clippy::too_many_arguments)]
pub(super) fn serve_reports<B: GuestMemoryBackend>(
    queue: &mut Queue,
    mem: &B,
    index: usize,
    budget: usize,
    irq: &Interrupt,
    evt: &EventFd,
    pages: &mut PageEngine,
    skip_reports: bool,
) -> bool {
    if !queue.ready() {
        return false;
    }
    let size = queue.size();
    let mut arrived = false;
    serve(queue, mem, index, budget, irq, evt, |chain, _| {
        let head = chain.head_index();
        if let Err(e) = check_chain(chain, size) {
            warn_limited!(BAD_CHAIN, "balloon: queue {}: bad element: {:?}", index, e);
            pages.metrics.malformed_elements += 1;
            return Some(head);
        }
        arrived = true;
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
    arrived
}
