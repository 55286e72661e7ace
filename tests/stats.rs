// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The statistics queue with the Linux driver model: the primed buffer and its tags, the
//! buffer the device holds until another arrives, requests, the refill by the stats work,
//! periodic polling, and guests that send fewer or unknown tags.
//!
//! The statistics edge cases driven through raw rings stay with their rigs:
//! `traditional/edge_cases.rs` (items 37 to 39), `transport.rs` (the held buffer on the event
//! loop) and `snapshot.rs` (a held buffer across a restore).

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_model::*;
use virtio_balloon::backend::NoopBackend;
use virtio_balloon::defs::stats_tag as tag;
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::VirtioDevice;
use virtio_balloon::{BalloonEvents, StatsReport};
use virtio_queue::QueueT;

fn harness(cfg: HarnessConfig) -> Harness {
    Harness::new(cfg, Arc::new(RecordingSink::default()))
}

/// A harness with the driver's interrupt and workqueue threads running and a backend that
/// does nothing.
fn background_harness(mut cfg: HarnessConfig) -> Harness {
    cfg.background = true;
    Harness::with_backend(
        cfg,
        Arc::new(RecordingSink::default()),
        Arc::new(NoopBackend),
    )
}

/// The device's next available index on queue `q` (how many buffers it has popped).
fn device_next_avail(h: &Harness, q: u16) -> u16 {
    h.dev
        .lock()
        .unwrap()
        .device()
        .queue(usize::from(q))
        .expect("queue")
        .next_avail()
}

fn latest(h: &Harness) -> Option<StatsReport> {
    dev(h, |b| b.latest_stats().copied())
}

/// The entries of the stats buffer as guest memory holds it.
fn sent(d: &Driver) -> Vec<(u16, u64)> {
    d.read_stats_buf(d.options().num_stats).unwrap()
}

fn assert_report_matches(r: &StatsReport, entries: &[(u16, u64)]) {
    assert_eq!(r.entries as usize, entries.len());
    for &(t, v) in entries {
        if usize::from(t) < tag::COUNT {
            assert_eq!(r.stats.get(t), Some(v), "tag {t} ({:?})", tag::name(t));
        }
    }
}

#[test]
fn stats_round_trips_with_the_16_linux_tags_and_periodic_polling() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.driver.stat_values = LINUX_STATS_ORDER
        .iter()
        .map(|&t| (t, 1000 + 7 * u64::from(t)))
        .collect();
    let h = background_harness(cfg);
    let d = &h.driver;
    let q = d.queue_index(QueueRole::Stats).unwrap();
    let mut ev = EventWatch::new(&h);

    // The primed buffer: parsed and held.
    ev.wait(&h, BalloonEvents::STATS_UPDATED);
    let first = latest(&h).expect("stats");
    let entries = sent(d);
    assert_eq!(
        entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        LINUX_STATS_ORDER
    );
    assert_report_matches(&first, &entries);
    assert_eq!(first.unknown_tags, 0);
    for t in 0..tag::COUNT as u16 {
        assert_eq!(first.stats.get(t), Some(1000 + 7 * u64::from(t)), "tag {t}");
    }
    assert_eq!(d.used_idx(q).unwrap(), 0, "the device holds the buffer");
    assert_eq!(dev(&h, |b| b.metrics()).stats_updates, 1);

    // A request: the buffer goes back, the stats work refills it with new values.
    for &t in &LINUX_STATS_ORDER {
        d.set_stat(t, 50_000 + u64::from(t));
    }
    ev.clear();
    let (once, twice) = dev(&h, |b| {
        b.take_events();
        (b.request_stats(), b.request_stats())
    });
    assert!(once);
    assert!(!twice, "only one request while the buffer is out");
    ev.wait(&h, BalloonEvents::STATS_UPDATED);
    wait_until("the refill", || d.stats_refills() >= 1).unwrap();
    let second = latest(&h).expect("stats");
    assert!(second.received > first.received);
    assert_report_matches(&second, &sent(d));
    for t in 0..tag::COUNT as u16 {
        assert_eq!(second.stats.get(t), Some(50_000 + u64::from(t)), "tag {t}");
    }
    let m = dev(&h, |b| b.metrics());
    assert_eq!((m.stats_updates, m.stats_requests), (2, 1));

    // Polling: updates arrive with no request from the test.
    let base = d.stats_refills();
    dev(&h, |b| b.set_stats_interval(Duration::from_millis(50))).unwrap();
    assert_eq!(dev(&h, |b| b.stats_interval()), Duration::from_millis(50));
    wait_until("three polled updates", || {
        dev(&h, |b| b.metrics()).stats_updates >= 2 + 3
    })
    .unwrap();
    let polled = dev(&h, |b| b.metrics());
    // The one request above, then one per polled update.
    assert!(polled.stats_requests >= 4, "{polled:?}");
    wait_until("three polled refills", || d.stats_refills() >= base + 3).unwrap();

    // Off: the timer is disarmed; at most the request already out comes back.
    let (requests, interval) = dev(&h, |b| {
        b.set_stats_interval(Duration::ZERO).unwrap();
        (b.metrics().stats_requests, b.stats_interval())
    });
    assert_eq!(interval, Duration::ZERO);
    let refills = d.stats_refills();
    std::thread::sleep(Duration::from_millis(6 * 50));
    assert_eq!(
        dev(&h, |b| b.metrics()).stats_requests,
        requests,
        "the device asked again after polling was turned off"
    );
    assert!(d.stats_refills() <= refills + 1);

    // The queue still works on request once the buffer is back.
    let mut updates = 0;
    wait_until("the buffer back at the device", || {
        dev(&h, |b| {
            updates = b.metrics().stats_updates;
            b.request_stats()
        })
    })
    .unwrap();
    wait_until("the requested update", || {
        dev(&h, |b| b.metrics()).stats_updates > updates
    })
    .unwrap();
    h.assert_clean();
}

#[test]
fn stats_from_a_guest_sending_only_the_10_spec_tags() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.driver.stats_tags = (0..10).collect();
    cfg.driver.num_stats = 10;
    let h = background_harness(cfg);
    let d = &h.driver;
    let mut ev = EventWatch::new(&h);
    ev.wait(&h, BalloonEvents::STATS_UPDATED);
    let r = latest(&h).expect("stats");
    assert_eq!((r.entries, r.unknown_tags), (10, 0));
    assert_report_matches(&r, &sent(d));
    assert_eq!(
        r.stats.iter().map(|e| e.0).collect::<Vec<_>>(),
        (0..10).collect::<Vec<u16>>()
    );
    for t in 10..tag::COUNT as u16 {
        assert_eq!(r.stats.get(t), None, "tag {t} was not sent");
    }
    d.set_stat(tag::MEMFREE, 12345);
    ev.clear();
    assert!(dev(&h, |b| {
        b.take_events();
        b.request_stats()
    }));
    ev.wait(&h, BalloonEvents::STATS_UPDATED);
    wait_until("the new free memory", || {
        latest(&h).and_then(|r| r.stats.free_memory()) == Some(12345)
    })
    .unwrap();
    assert_eq!(latest(&h).unwrap().entries, 10);
    h.assert_clean();
}

#[test]
fn stats_with_unknown_tags_in_the_buffer() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.driver.stats_tags = vec![tag::MEMFREE, 16, 99, tag::AVAIL, u16::MAX, tag::MEMTOT];
    cfg.driver.num_stats = 6;
    cfg.driver.stat_values = vec![(tag::MEMFREE, 11), (16, 22), (tag::AVAIL, 33), (99, 44)];
    let h = background_harness(cfg);
    let d = &h.driver;
    let mut ev = EventWatch::new(&h);
    ev.wait(&h, BalloonEvents::STATS_UPDATED);
    let r = latest(&h).expect("stats");
    assert_eq!((r.entries, r.unknown_tags), (6, 3));
    assert_report_matches(&r, &sent(d));
    assert_eq!(
        r.stats.iter().collect::<Vec<_>>(),
        [
            (tag::MEMFREE, 11),
            (tag::MEMTOT, default_stat_value(tag::MEMTOT)),
            (tag::AVAIL, 33),
        ]
    );
    // The same on the next round trip.
    d.set_stat(tag::MEMTOT, 64 * MIB);
    ev.clear();
    assert!(dev(&h, |b| {
        b.take_events();
        b.request_stats()
    }));
    ev.wait(&h, BalloonEvents::STATS_UPDATED);
    wait_until("the new total", || {
        latest(&h).and_then(|r| r.stats.total_memory()) == Some(64 * MIB)
    })
    .unwrap();
    let r = latest(&h).unwrap();
    assert_eq!((r.entries, r.unknown_tags), (6, 3));
    h.assert_clean();
}

#[test]
fn stats_buffer_is_primed_with_the_linux_tags_and_held() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.driver.stat_values = vec![(stat::MEMFREE, 123 << 20), (stat::OOM_KILL, 2)];
    let h = harness(cfg);
    let d = &h.driver;
    let q = d.queue_index(QueueRole::Stats).unwrap();
    assert_eq!(q, 2);
    assert_eq!(d.avail_idx(q).unwrap(), 1, "primed with one buffer");
    let desc = d.read_desc(q, 0).unwrap();
    assert_eq!((desc.addr, desc.len, desc.flags), (d.stats_buf().0, 160, 0));
    let entries = d.read_stats_buf(16).unwrap();
    let tags: Vec<u16> = entries.iter().map(|e| e.0).collect();
    assert_eq!(tags, LINUX_STATS_ORDER);
    assert!(entries.contains(&(stat::MEMFREE, 123 << 20)));
    assert!(entries.contains(&(stat::OOM_KILL, 2)));
    assert!(entries.contains(&(stat::CACHES, default_stat_value(stat::CACHES))));

    // The device pops it and keeps it, even when kicked again.
    wait_until("the device to pop the stats buffer", || {
        device_next_avail(&h, q) == 1
    })
    .unwrap();
    d.notify(q);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(q).unwrap(), 0);
    assert_eq!(d.stats_requests(), 0);

    // stats_handle_request rewrites the values in place, but has nothing to re-add.
    d.set_stat(stat::MEMFREE, 7);
    assert!(!d.run_stats_work().unwrap());
    assert_eq!(d.stats_refills(), 0);
    assert_eq!(d.stats_updates(), 2);
    assert_eq!(d.avail_idx(q).unwrap(), 1);
    assert!(d.read_stats_buf(16).unwrap().contains(&(stat::MEMFREE, 7)));
    h.assert_clean();
}

#[test]
fn stats_tags_and_count_are_configurable() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.driver.stats_tags = vec![stat::MEMFREE, 99, stat::AVAIL, stat::MEMTOT];
    cfg.driver.num_stats = 3;
    cfg.driver.stat_values = vec![(99, 0xdead_beef)];
    let h = harness(cfg);
    let d = &h.driver;
    let q = d.queue_index(QueueRole::Stats).unwrap();
    assert_eq!(d.read_desc(q, 0).unwrap().len, 30);
    assert_eq!(
        d.read_stats_buf(3).unwrap(),
        [
            (stat::MEMFREE, default_stat_value(stat::MEMFREE)),
            (99, 0xdead_beef),
            (stat::AVAIL, default_stat_value(stat::AVAIL)),
        ]
    );
    wait_until("the device to pop the stats buffer", || {
        device_next_avail(&h, q) == 1
    })
    .unwrap();
    assert_eq!(d.used_idx(q).unwrap(), 0);
    h.assert_clean();
}

#[test]
fn a_second_stats_buffer_makes_the_device_return_the_held_one() {
    let h = harness(HarnessConfig::balloon(64 * MIB, 16 * MIB));
    let d = &h.driver;
    let q = d.queue_index(QueueRole::Stats).unwrap();
    wait_until("the device to pop the stats buffer", || {
        device_next_avail(&h, q) == 1
    })
    .unwrap();
    // Not something Linux does: a second buffer.
    let extra = d.alloc_scratch(160, 16).unwrap();
    let extra_head = d.post_and_kick(q, &[Part::out(extra, 160)], false).unwrap();
    assert_eq!(extra_head, 1);
    d.wait_used_idx(q, 1).unwrap();
    assert_eq!(
        d.used_elem(q, 0).unwrap(),
        (0, 0),
        "the primed buffer comes back"
    );

    // Its used interrupt runs statsq's callback, which queues the stats work.
    let deadline = Instant::now() + DEADLINE;
    while d.stats_requests() == 0 && Instant::now() < deadline {
        d.poll_interrupts(Duration::from_millis(50)).unwrap();
    }
    assert_eq!(d.stats_requests(), 1);
    assert!(d.pending_work(WorkKind::UpdateStats));
    d.set_stat(stat::AVAIL, 42);
    assert!(d.run_stats_work().unwrap());
    assert!(!d.pending_work(WorkKind::UpdateStats));
    assert_eq!(d.stats_refills(), 1);
    assert!(d.read_stats_buf(16).unwrap().contains(&(stat::AVAIL, 42)));

    // The refill arrives, so the device returns the extra buffer it held.
    d.wait_used_idx(q, 2).unwrap();
    assert_eq!(d.used_elem(q, 1).unwrap(), (u32::from(extra_head), 0));
    assert_eq!(d.avail_idx(q).unwrap(), 3);
    h.assert_clean();
}

#[test]
fn two_stats_buffers_ping_pong_through_the_background_stats_work() {
    let mut cfg = HarnessConfig::balloon(64 * MIB, 16 * MIB);
    cfg.background = true;
    let h = harness(cfg);
    let d = &h.driver;
    let q = d.queue_index(QueueRole::Stats).unwrap();
    wait_until("the device to pop the stats buffer", || {
        device_next_avail(&h, q) == 1
    })
    .unwrap();
    let extra = d.alloc_scratch(160, 16).unwrap();
    d.post_and_kick(q, &[Part::out(extra, 160)], false).unwrap();
    // Every buffer the device returns makes the guest add one, and every buffer the guest
    // adds makes the device return the one it held: the exchange never ends.
    wait_until("four refills by the stats work", || d.stats_refills() >= 4).unwrap();
    d.stop_background();
    assert!(d.work_runs_of(WorkKind::UpdateStats) >= 4);
    assert!(d.stats_requests() >= 4);
    let heads: Vec<u32> = (0..4).map(|i| d.used_elem(q, i).unwrap().0).collect();
    assert_eq!(heads, [0, 1, 0, 1]);
    h.assert_clean();
}
