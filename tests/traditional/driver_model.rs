// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest model's traditional balloon (Linux 6.12 `fill_balloon`, `leak_balloon`,
//! `tell_host`, `update_balloon_size_func`, the OOM notifier, the statistics queue and free
//! page reporting) against the device as it is today: inflate, deflate and reporting
//! elements come back with used length 0, and the statistics buffer is held until another
//! one arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_model::ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use guest_model::*;
use virtio_balloon::sink::RecordingSink;
use vm_memory::{Bytes, GuestAddress};

fn harness(cfg: HarnessConfig) -> Harness {
    Harness::new(cfg, Arc::new(RecordingSink::default()))
}

/// `actual` as the device took it.
fn device_actual(h: &Harness) -> u32 {
    h.dev.lock().unwrap().device().actual()
}

/// The PFN of a guest-physical address.
fn pfn(addr: u64) -> u32 {
    (addr >> VIRTIO_BALLOON_PFN_SHIFT) as u32
}

/// Values written to `actual`, oldest first, among the remembered MMIO accesses.
fn actual_writes(h: &Harness) -> Vec<u64> {
    h.bus
        .recent()
        .iter()
        .filter(|a| a.write && a.offset == reg::CONFIG + config::ACTUAL)
        .map(|a| a.value)
        .collect()
}

/// Places where consecutive PFNs are not neighbours (0 for one ascending or descending run).
fn breaks(pfns: &[u32]) -> usize {
    pfns.windows(2).filter(|w| w[0].abs_diff(w[1]) != 1).count()
}

#[test]
fn fill_and_leak_are_acked_and_update_balloon_size_writes_actual() {
    let h = harness(HarnessConfig::balloon(64 * MIB, 16 * MIB));
    let d = &h.driver;
    assert_eq!(d.pages_per_page(), 1);
    let pool = d.pool_free_pages();
    assert_eq!(pool, 16 * MIB / 4096);
    let inflateq = d.queue_index(QueueRole::Inflate).unwrap();
    let deflateq = d.queue_index(QueueRole::Deflate).unwrap();
    assert_eq!((inflateq, deflateq), (0, 1));

    // One request holds at most 256 PFNs.
    assert_eq!(d.fill_balloon(300).unwrap(), 256);
    let inflates = d.requests_on(QueueRole::Inflate);
    assert_eq!(inflates.len(), 1);
    let r = &inflates[0];
    assert_eq!(r.queue, inflateq);
    assert_eq!(r.used_len, Some(0), "the device acks with used length 0");
    assert!(r.acked.expect("acked") >= r.posted);
    // Ascending allocation, then fill_balloon's list_add: one descending run of pages.
    let first = pfn(4 * MIB);
    let expected: Vec<u32> = (first..first + 256).rev().collect();
    assert_eq!(r.pfns, expected);
    // The buffer the device read: one readable descriptor over vb->pfns, le32 PFNs.
    let desc = d.read_desc(inflateq, r.head).unwrap();
    assert_eq!(
        (desc.addr, desc.len, desc.flags),
        (d.pfns_slot().0, 1024, 0)
    );
    let mut raw = [0u8; 1024];
    d.mem().read_slice(&mut raw, d.pfns_slot()).unwrap();
    assert_eq!(
        u32::from_le_bytes(raw[..4].try_into().unwrap()),
        first + 255
    );
    assert_eq!(u32::from_le_bytes(raw[1020..].try_into().unwrap()), first);
    assert_eq!(d.used_idx(inflateq).unwrap(), 1);
    assert_eq!(d.balloon_num_pages(), 256);
    assert_eq!(d.pool_free_pages(), pool - 256);

    // fill_balloon does not write actual; update_balloon_size does.
    assert_eq!(device_actual(&h), 0);
    d.update_balloon_size();
    assert_eq!(device_actual(&h), 256);
    assert_eq!(d.read_config32(config::ACTUAL), 256);

    // leak_balloon takes the head of the balloon list first: the page enqueued last, which
    // is the first one allocated.
    assert_eq!(d.leak_balloon(100).unwrap(), 100);
    let deflates = d.requests_on(QueueRole::Deflate);
    assert_eq!(deflates.len(), 1);
    let r = &deflates[0];
    assert_eq!(r.queue, deflateq);
    assert_eq!(r.pfns, (first..first + 100).collect::<Vec<u32>>());
    assert_eq!(r.used_len, Some(0));
    assert!(r.released.expect("released") >= r.acked.expect("acked"));
    assert_eq!(d.balloon_num_pages(), 156);
    d.update_balloon_size();
    assert_eq!(device_actual(&h), 156);
    // Deflated pages are back in the allocator, the first one deflated reused first.
    assert_eq!(d.pool_free_pages(), pool - 156);
    assert_eq!(d.guest_alloc_pages(1), [GuestAddress(4 * MIB)]);
    h.assert_clean();
}

#[test]
fn guest_pages_of_64k_are_sixteen_consecutive_pfns() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.driver.page_size = 64 << 10;
    let h = harness(cfg);
    let d = &h.driver;
    assert_eq!(d.pages_per_page(), 16);

    // 40 PFNs asked: whole pages until 40 is reached, so 3 pages, 48 PFNs.
    assert_eq!(d.fill_balloon(40).unwrap(), 48);
    let r = &d.requests_on(QueueRole::Inflate)[0];
    assert_eq!(r.used_len, Some(0));
    let base = pfn(4 * MIB);
    let expected: Vec<u32> = [2u32, 1, 0]
        .iter()
        .flat_map(|page| (0..16).map(move |i| base + page * 16 + i))
        .collect();
    assert_eq!(r.pfns, expected);
    for chunk in r.pfns.chunks(16) {
        assert_eq!(chunk[0] % 16, 0, "a guest page starts its run: {chunk:?}");
        assert_eq!(breaks(chunk), 0);
    }
    assert_eq!(d.balloon_num_pages(), 48);

    // A leak of one PFN still gives back a whole guest page: the head of the balloon.
    assert_eq!(d.leak_balloon(1).unwrap(), 16);
    let r = &d.requests_on(QueueRole::Deflate)[0];
    assert_eq!(r.pfns, (base..base + 16).collect::<Vec<u32>>());

    // The OOM notifier counts guest pages: 256 PFNs are 16 pages of 64 KiB.
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    assert_eq!(d.balloon_num_pages(), 32 + 256);
    assert_eq!(d.oom_notify().unwrap(), 16);
    assert_eq!(device_actual(&h), 32);

    // The device's target is 0: the size work deflates the rest and writes actual.
    assert_eq!(d.towards_target(), -32);
    let su = d.run_size_work();
    assert_eq!(
        su,
        SizeUpdate {
            num_pages: 0,
            actual: 0,
            inflated: 0,
            deflated: 32,
            requests: 1,
            end: SizeEnd::Reached,
        }
    );
    assert_eq!(device_actual(&h), 0);
    assert_eq!(d.pool_free_pages(), 16 * MIB / (64 << 10));
    h.assert_clean();
}

#[test]
fn update_balloon_size_func_deflates_to_the_device_target_one_request_at_a_time() {
    let h = harness(HarnessConfig::balloon(64 * MIB, 16 * MIB));
    let d = &h.driver;
    let pool = d.pool_free_pages();
    for _ in 0..3 {
        assert_eq!(d.fill_balloon(256).unwrap(), 256);
    }
    d.update_balloon_size();
    assert_eq!(device_actual(&h), 768);
    // The device never asks for pages (num_pages stays 0), so the target is an empty
    // balloon.
    assert_eq!(d.read_config32(config::NUM_PAGES), 0);
    assert_eq!(d.towards_target(), -768);

    let su = d.run_size_work();
    assert_eq!(
        su,
        SizeUpdate {
            num_pages: 0,
            actual: 0,
            inflated: 0,
            deflated: 768,
            requests: 3,
            end: SizeEnd::Reached,
        }
    );
    assert_eq!(device_actual(&h), 0);
    // actual was written after each request.
    let writes = actual_writes(&h);
    assert!(writes.ends_with(&[512, 256, 0]), "{writes:?}");
    let deflates = d.requests_on(QueueRole::Deflate);
    assert_eq!(deflates.len(), 3);
    assert!(deflates
        .iter()
        .all(|r| r.pfns.len() == 256 && r.used_len == Some(0)));
    // LIFO: the balloon gives back the pages of the last inflate first.
    let last_inflate = &d.requests_on(QueueRole::Inflate)[2];
    let mut newest: Vec<u32> = last_inflate.pfns.clone();
    newest.reverse();
    assert_eq!(deflates[0].pfns, newest);
    assert_eq!(d.pool_free_pages(), pool);
    assert_eq!(d.used_idx(1).unwrap(), 3);
    h.assert_clean();
}

/// Linux tells the host before it frees deflated pages, with or without MUST_TELL_HOST.
fn deflate_waits_for_the_ack_before_releasing_pages(must_tell_host: bool) {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.balloon.must_tell_host = must_tell_host;
    let h = harness(cfg);
    let d = &h.driver;
    assert_eq!(d.has_feature(feature::MUST_TELL_HOST), must_tell_host);
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    let free_before = d.pool_free_pages();

    h.dev.lock().unwrap().device_mut().pause();
    let leaker = {
        let d = d.clone();
        std::thread::spawn(move || d.leak_balloon(256))
    };
    wait_until("the deflate request", || {
        d.requests_on(QueueRole::Deflate).len() == 1
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let r = &d.requests_on(QueueRole::Deflate)[0];
    assert_eq!((r.acked, r.released), (None, None));
    assert_eq!(d.used_idx(1).unwrap(), 0, "a paused device moves nothing");
    assert_eq!(d.pool_free_pages(), free_before, "pages held until the ack");

    let resumed = Instant::now();
    h.dev.lock().unwrap().device_mut().resume();
    assert_eq!(leaker.join().unwrap().unwrap(), 256);
    let r = &d.requests_on(QueueRole::Deflate)[0];
    let acked = r.acked.expect("acked after resume");
    assert!(acked >= resumed);
    assert!(r.released.expect("released") >= acked);
    assert_eq!(d.pool_free_pages(), free_before + 256);
    h.assert_clean();
}

#[test]
fn deflate_waits_for_the_ack_before_releasing_pages_without_must_tell_host() {
    deflate_waits_for_the_ack_before_releasing_pages(false);
}

#[test]
fn deflate_waits_for_the_ack_before_releasing_pages_with_must_tell_host() {
    deflate_waits_for_the_ack_before_releasing_pages(true);
}

#[test]
fn oom_notify_deflates_256_pages_only_with_deflate_on_oom() {
    let h = harness(HarnessConfig::balloon(64 * MIB, 16 * MIB));
    let d = &h.driver;
    assert!(d.has_feature(feature::DEFLATE_ON_OOM));
    d.fill_balloon(256).unwrap();
    d.fill_balloon(256).unwrap();
    d.update_balloon_size();
    assert_eq!(d.oom_notify().unwrap(), 256);
    assert_eq!(d.balloon_num_pages(), 256);
    assert_eq!(device_actual(&h), 256, "the notifier writes actual");
    let deflates = d.requests_on(QueueRole::Deflate);
    assert_eq!(deflates.len(), 1);
    assert_eq!(deflates[0].pfns.len(), 256);
    assert_eq!(deflates[0].used_len, Some(0));
    h.assert_clean();

    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.balloon.deflate_on_oom = false;
    let h = harness(cfg);
    let d = &h.driver;
    assert!(!d.has_feature(feature::DEFLATE_ON_OOM));
    d.fill_balloon(256).unwrap();
    assert_eq!(d.oom_notify().unwrap(), 0, "no notifier registered");
    assert!(d.requests_on(QueueRole::Deflate).is_empty());
    assert_eq!(d.balloon_num_pages(), 256);
    h.assert_clean();
}

#[test]
fn reporting_sends_chains_of_up_to_32_writable_entries_and_gets_acked() {
    let h = harness(HarnessConfig::balloon(64 * MIB, 16 * MIB));
    let d = &h.driver;
    let q = d.queue_index(QueueRole::Reporting).unwrap();
    assert_eq!(q, 3, "no free page queue: reporting follows stats");
    let ranges: Vec<(GuestAddress, u64)> = (0..40u64)
        .map(|i| (GuestAddress(24 * MIB + i * (512 << 10)), 512 << 10))
        .collect();

    let seqs = d.report_free_pages(&ranges[..32]).unwrap();
    assert_eq!(seqs.len(), 1);
    let r = &d.requests_on(QueueRole::Reporting)[0];
    assert_eq!((r.queue, r.head, r.indirect), (q, 0, false));
    assert_eq!(r.ranges, ranges[..32]);
    assert_eq!(r.used_len, Some(0));
    assert!(r.acked.is_some());
    // One chain over all 32 descriptors, every one device-writable.
    let mut i = r.head;
    for (k, &(addr, len)) in ranges[..32].iter().enumerate() {
        let desc = d.read_desc(q, i).unwrap();
        let last = k == 31;
        let flags = VRING_DESC_F_WRITE | if last { 0 } else { VRING_DESC_F_NEXT };
        assert_eq!(
            (desc.addr, u64::from(desc.len), desc.flags),
            (addr.0, len, flags)
        );
        i = desc.next;
    }

    // More than the capacity: one chain per 32 entries.
    let seqs = d.report_free_pages(&ranges).unwrap();
    assert_eq!(seqs.len(), 2);
    let reqs = d.requests_on(QueueRole::Reporting);
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[2].ranges, ranges[32..]);
    assert!(reqs.iter().all(|r| r.used_len == Some(0)));
    assert_eq!(d.used_idx(q).unwrap(), 3);
    h.assert_clean();
}

#[test]
fn reporting_uses_an_indirect_table_when_negotiated() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.driver.ack_indirect = true;
    cfg.driver.indirect_per_head = 32;
    let h = harness(cfg);
    let d = &h.driver;
    let q = d.queue_index(QueueRole::Reporting).unwrap();
    let ranges: Vec<(GuestAddress, u64)> = (0..32u64)
        .map(|i| (GuestAddress(24 * MIB + i * MIB), 2 * MIB))
        .collect();
    d.report_free_pages(&ranges).unwrap();
    let r = &d.requests_on(QueueRole::Reporting)[0];
    assert!(r.indirect);
    let desc = d.read_desc(q, r.head).unwrap();
    assert_eq!((desc.len, desc.flags), (32 * 16, VRING_DESC_F_INDIRECT));
    assert_eq!(r.used_len, Some(0));
    // A single entry goes direct, as virtqueue_use_indirect decides.
    d.report_free_pages(&ranges[..1]).unwrap();
    let r = &d.requests_on(QueueRole::Reporting)[1];
    assert!(!r.indirect);
    assert_eq!(r.used_len, Some(0));
    assert_eq!(d.used_idx(q).unwrap(), 2);
    h.assert_clean();
}

#[test]
fn config_interrupt_runs_the_size_work_in_background_mode() {
    let mut cfg = HarnessConfig::simple(64 * MIB, 0);
    cfg.balloon.stats = true;
    cfg.driver.balloon_pool = vec![(GuestAddress(8 * MIB), 8 * MIB)];
    cfg.background = true;
    let h = harness(cfg);
    let d = &h.driver;
    assert!(d.has_feature(feature::FREE_PAGE_HINT));
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    d.update_balloon_size();
    assert_eq!(device_actual(&h), 512);
    assert_eq!(d.work_runs_of(WorkKind::UpdateSize), 0);

    // Any config change queues update_balloon_size_work; the target is 0.
    h.hints.done();
    wait_until("the size work to empty the balloon", || {
        device_actual(&h) == 0 && d.balloon_num_pages() == 0
    })
    .unwrap();
    d.wait_idle(WorkKind::UpdateSize).unwrap();
    assert!(d.work_runs_of(WorkKind::UpdateSize) >= 1);
    assert!(d.config_interrupts() >= 1);
    let su = d.size_updates();
    assert_eq!(su.last().unwrap().end, SizeEnd::Reached);
    assert_eq!(su.iter().map(|s| s.deflated).sum::<u64>(), 512);
    let deflates = d.requests_on(QueueRole::Deflate);
    assert_eq!(deflates.len(), 2);
    assert!(deflates.iter().all(|r| r.used_len == Some(0)));
    // The same interrupt still drives hinting: the free page work saw DONE.
    d.wait_work_idle().unwrap();
    assert!(d.work_runs() >= 1);
    h.assert_clean();
}

#[test]
fn remove_deflates_the_whole_balloon_before_the_reset() {
    let h = harness(HarnessConfig::balloon(64 * MIB, 16 * MIB));
    let d = &h.driver;
    let pool = d.pool_free_pages();
    d.fill_balloon(256).unwrap();
    d.fill_balloon(100).unwrap();
    d.update_balloon_size();
    assert_eq!(device_actual(&h), 356);
    d.remove();
    let deflates = d.requests_on(QueueRole::Deflate);
    assert_eq!(
        deflates.iter().map(|r| r.pfns.len()).collect::<Vec<_>>(),
        [256, 100]
    );
    assert!(deflates.iter().all(|r| r.used_len == Some(0)));
    assert_eq!(d.balloon_num_pages(), 0);
    assert_eq!(d.pool_free_pages(), pool);
    // actual = 0 reached the device before the reset.
    let trace = h.bus.recent();
    let actual0 = trace
        .iter()
        .rposition(|a| a.write && a.offset == reg::CONFIG + config::ACTUAL && a.value == 0)
        .expect("actual written");
    let reset = trace
        .iter()
        .rposition(|a| a.write && a.offset == reg::STATUS && a.value == 0)
        .expect("reset");
    assert!(actual0 < reset, "{}", h.recent_mmio());
    h.assert_clean();
}

#[test]
fn scattered_pages_are_deterministic_and_break_the_runs() {
    let inflate_with = |order: PageOrder| {
        let mut cfg = HarnessConfig::balloon(64 * MIB, MIB);
        cfg.driver.page_order = order;
        let h = harness(cfg);
        assert_eq!(h.driver.fill_balloon(256).unwrap(), 256);
        assert_eq!(h.driver.fill_balloon(256).unwrap(), 0, "the pool is empty");
        let r = h.driver.requests_on(QueueRole::Inflate);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].used_len, Some(0));
        h.assert_clean();
        r[0].pfns.clone()
    };
    let ascending = inflate_with(PageOrder::Ascending);
    let a = inflate_with(PageOrder::Scattered { seed: 7 });
    let b = inflate_with(PageOrder::Scattered { seed: 7 });
    let c = inflate_with(PageOrder::Scattered { seed: 8 });
    assert_eq!(a, b, "same seed, same order");
    assert_ne!(a, c);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    let first = pfn(4 * MIB);
    assert_eq!(sorted, (first..first + 256).collect::<Vec<u32>>());
    assert_eq!(breaks(&ascending), 0);
    assert!(breaks(&a) > 200, "{} breaks", breaks(&a));
}

#[test]
fn a_dry_allocator_stops_the_size_work_and_sends_what_it_got() {
    let h = harness(HarnessConfig::balloon(64 * MIB, 16 << 12));
    let d = &h.driver;
    let used = d.guest_alloc_pages(10);
    assert_eq!(used.len(), 10);
    assert_eq!(d.fill_balloon(256).unwrap(), 6);
    assert!(d.kernel_log().iter().any(|l| l.contains("Out of puff")));
    assert_eq!(d.fill_balloon(256).unwrap(), 0);
    assert_eq!(
        d.requests_on(QueueRole::Inflate).len(),
        1,
        "nothing sent for 0 pages"
    );
    assert_eq!(d.avail_idx(0).unwrap(), 1);
    // The guest frees its pages; the size work (target 0) deflates everything.
    d.guest_free_pages(&used);
    let su = d.run_size_work();
    assert_eq!((su.deflated, su.end), (6, SizeEnd::Reached));
    assert_eq!(d.pool_free_pages(), 16);
    h.assert_clean();
}

#[test]
fn many_requests_wrap_a_small_ring_with_event_idx_indirect_and_mmio_kicks() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.balloon.reporting = false;
    cfg.driver.max_queue_size = Some(8);
    cfg.driver.ack_event_idx = true;
    cfg.driver.ack_indirect = true;
    cfg.driver.kick = KickMode::Mmio;
    let h = harness(cfg);
    let d = &h.driver;
    assert!(d.has_feature(feature::RING_EVENT_IDX));
    for i in 0..40u32 {
        assert_eq!(d.fill_balloon(u64::from(i % 7) + 1).unwrap(), i % 7 + 1);
        d.update_balloon_size();
        assert_eq!(d.leak_balloon(1).unwrap(), 1);
        d.update_balloon_size();
        assert_eq!(device_actual(&h), d.balloon_num_pages());
    }
    for q in [0u16, 1] {
        assert_eq!(d.avail_idx(q).unwrap(), 40);
        assert_eq!(d.used_idx(q).unwrap(), 40);
    }
    assert!(d
        .balloon_requests()
        .iter()
        .all(|r| r.acked.is_some() && r.used_len == Some(0)));
    let su = d.run_size_work();
    assert_eq!(su.end, SizeEnd::Reached);
    assert_eq!(device_actual(&h), 0);
    h.assert_clean();
}
