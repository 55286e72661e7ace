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

use virtio_queue::Queue;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::pages::PageEngine;
use super::queue::serve_checked;
use crate::transport::Interrupt;

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
    let mut arrived = false;
    let bad = serve_checked(queue, mem, index, budget, irq, evt, |chain| {
        arrived = true;
        pages.metrics.reporting_elements += 1;
        if skip_reports {
            pages.metrics.reporting_elements_skipped += 1;
        } else {
            for desc in chain.clone().filter(|d| d.is_write_only()) {
                pages.report(mem, desc.addr().0, u64::from(desc.len()));
            }
        }
        Some(chain.head_index())
    });
    pages.metrics.malformed_elements += bad;
    arrived
}
