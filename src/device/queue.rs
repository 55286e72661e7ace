// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The bounded drain loop every queue of the device is served with.

use std::num::Wrapping;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::descriptor::check_chain;
use crate::ratelimit::{warn_limited, RateLimit};
use crate::transport::Interrupt;

static RING_ERROR: RateLimit = RateLimit::new();
static BAD_CHAIN: RateLimit = RateLimit::new();

/// [`serve`] for the queues whose elements are checked as a whole before anything is read
/// (inflate, deflate, statistics, reporting). Nothing is served while the queue is not
/// ready. A chain that fails [`check_chain`] is logged (rate-limited) and given back at once;
/// the others go to `handle`, which returns the head to put on the used ring, if any.
/// Returns how many chains were bad.
pub(super) fn serve_checked<'m, Mem>(
    queue: &mut Queue,
    mem: &'m Mem,
    index: usize,
    budget: usize,
    irq: &Interrupt,
    evt: &EventFd,
    mut handle: impl FnMut(&DescriptorChain<&'m Mem>) -> Option<u16>,
) -> u64
where
    Mem: GuestMemoryBackend,
{
    if !queue.ready() {
        return 0;
    }
    let size = queue.size();
    let mut bad = 0u64;
    serve(queue, mem, index, budget, irq, evt, |chain, _| {
        if let Err(e) = check_chain(chain, size) {
            warn_limited!(BAD_CHAIN, "balloon: queue {}: bad element: {:?}", index, e);
            bad += 1;
            return Some(chain.head_index());
        }
        handle(chain)
    });
    bad
}

/// Serves up to `budget` chains of queue `index` with virtio-queue's pattern: disable
/// notifications, pop and handle chains, enable notifications and check again.
///
/// `handle` gets each chain with its position in the available ring and returns the head to
/// put on the used ring (used length 0), if any: the statistics queue keeps its buffer. An
/// element is put on the used ring only after `handle` returned. The used-buffer interrupt is
/// raised only when `needs_notification` asks for it. When chains are left after `budget`,
/// the queue's eventfd `evt` is signalled again so the event loop comes back after serving
/// the others; returns whether that happened.
pub(super) fn serve<'m, Mem>(
    queue: &mut Queue,
    mem: &'m Mem,
    index: usize,
    budget: usize,
    irq: &Interrupt,
    evt: &EventFd,
    mut handle: impl FnMut(&DescriptorChain<&'m Mem>, Wrapping<u16>) -> Option<u16>,
) -> bool
where
    Mem: GuestMemoryBackend,
{
    let mut handled = 0usize;
    let mut used = false;
    let mut more = false;
    'drain: loop {
        if let Err(e) = queue.disable_notification(mem) {
            warn_limited!(RING_ERROR, "balloon: queue {}: {}", index, e);
            break;
        }
        let before = handled;
        loop {
            if handled >= budget {
                more = true;
                break 'drain;
            }
            let pos = Wrapping(queue.next_avail());
            // `iter` tells an empty ring from an available index the driver set more than a
            // queue ahead, which `pop_descriptor_chain` reports as empty while
            // `enable_notification` keeps saying there is more: a loop trusting both would
            // never end. Nothing can be popped until the driver fixes it; the next kick
            // retries.
            let chain = match queue.iter(mem).map(|mut it| it.next()) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    warn_limited!(RING_ERROR, "balloon: queue {}: {}", index, e);
                    let _ = queue.enable_notification(mem);
                    break 'drain;
                }
            };
            handled += 1;
            if let Some(head) = handle(&chain, pos) {
                match queue.add_used(mem, head, 0) {
                    Ok(()) => used = true,
                    Err(e) => warn_limited!(RING_ERROR, "balloon: queue {}: {}", index, e),
                }
            }
        }
        match queue.enable_notification(mem) {
            // More is available but this round popped nothing: the ring cannot be read, or
            // the driver placed it so that the device's own writes (the used ring's flags
            // over the available index) change it. Looping would never end; the next kick
            // retries.
            Ok(true) if handled == before => {
                warn_limited!(
                    RING_ERROR,
                    "balloon: queue {}: ring makes no progress",
                    index
                );
                break;
            }
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                warn_limited!(RING_ERROR, "balloon: queue {}: {}", index, e);
                break;
            }
        }
    }
    if used && queue.needs_notification(mem).unwrap_or(true) {
        irq.signal_used(index);
    }
    if more {
        if let Err(e) = evt.write(1) {
            warn_limited!(RING_ERROR, "balloon: queue {}: cannot re-arm: {}", index, e);
        }
    }
    more
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// A driver may place the used ring so that its `flags` word is the available index
    /// (used ring = available ring + 2). Then every `disable_notification` /
    /// `enable_notification` pair rewrites the index the device is about to compare against:
    /// the loop must stop once a round pops nothing (found by the balloon_device fuzzer).
    #[test]
    fn used_flags_over_the_available_index_does_not_loop() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (desc, avail, used) = (0x1000u64, 0x2002u64, 0x2004u64);
        let mut q = Queue::new(4).unwrap();
        q.set_size(4);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        // One readable descriptor at index 0, made available.
        mem.write_obj(0x5000u64, GuestAddress(desc)).unwrap();
        mem.write_obj(4u32, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let irq = Interrupt::new().unwrap();
        let evt = EventFd::new(0).unwrap();
        let mut seen = 0;
        let more = serve(&mut q, &mem, 0, 64, &irq, &evt, |chain, _| {
            seen += 1;
            Some(chain.head_index())
        });
        assert!((1..64).contains(&seen), "popped {seen} chains");
        assert!(!more, "no re-arm for a ring that makes no progress");
    }
}
