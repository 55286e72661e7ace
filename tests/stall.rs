// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The stall watch (`BalloonConfig::stall_timeout`, `BalloonEvents::TARGET_STALLED`) against
//! the Linux driver model of `guest_model`: its size work (`update_balloon_size_func`),
//! its page allocator under memory pressure, and its OOM notifier.
//!
//! Time is a `ManualClock` the tests move: nothing depends on how fast the machine runs.
//! The device looks at the watch whenever the guest writes `actual` and when the test calls
//! `check_stall` (what its stall timer does in a VMM); one test lets the real timer and
//! clock do it through the event loop, and only waits for the event to come.

use std::sync::Arc;
use std::time::Duration;

use guest_model::*;
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::ManualClock;
use virtio_balloon::{Balloon, BalloonEvents};

const TIMEOUT: Duration = Duration::from_secs(30);
const SECOND: Duration = Duration::from_secs(1);

/// Runs `f` on the device (the event loop waits meanwhile).
fn dev<T>(h: &Harness, f: impl FnOnce(&mut Balloon<Mem>) -> T) -> T {
    f(h.dev.lock().unwrap().device_mut())
}

/// The traditional balloon with a pool of `pool` bytes, DEFLATE_ON_OOM, the stall watch at
/// [`TIMEOUT`] on a manual clock, and no events pending.
fn setup(pool: u64) -> (Harness, Arc<ManualClock>) {
    let mut cfg = HarnessConfig::balloon(64 * MIB, pool);
    cfg.balloon.stall_timeout = Some(TIMEOUT);
    let h = Harness::new(cfg, Arc::new(RecordingSink::default()));
    assert!(h.driver.has_feature(feature::DEFLATE_ON_OOM));
    let clock = Arc::new(ManualClock::new());
    dev(&h, |d| {
        d.set_clock(clock.clone());
        d.take_events();
    });
    (h, clock)
}

/// Looks at the watch now, as the stall timer would; returns (stalled, events since the
/// last call).
fn look(h: &Harness) -> (bool, BalloonEvents) {
    dev(h, |d| (d.check_stall(), d.take_events()))
}

fn stalls(h: &Harness) -> u64 {
    dev(h, |d| d.metrics().target_stalls)
}

#[test]
fn a_guest_that_stops_inflating_under_memory_pressure_stalls_after_the_timeout() {
    let (h, clock) = setup(16 * MIB);
    let d = &h.driver;
    let pool = d.pool_free_pages();
    assert_eq!(pool, 4096);
    // A workload holds half of the memory the balloon would need.
    let held = d.guest_alloc_pages(2048);
    dev(&h, |dev| dev.set_target(3072));
    let su = d.run_size_work();
    assert_eq!((su.actual, su.end), (2048, SizeEnd::OutOfMemory));
    assert_eq!(dev(&h, |dev| dev.actual()), 2048);

    // Short of the timeout: nothing. At the timeout: the event, once.
    clock.advance(TIMEOUT - SECOND);
    let (stalled, events) = look(&h);
    assert!(!stalled);
    assert!(!events.contains(BalloonEvents::TARGET_STALLED));
    clock.advance(SECOND);
    let (stalled, events) = look(&h);
    assert!(stalled);
    assert!(events.contains(BalloonEvents::TARGET_STALLED));
    assert!(dev(&h, |dev| dev.target_stalled()));
    assert_eq!(stalls(&h), 1);
    // Linux retries every 200 ms; each retry finds no memory and rewrites the same `actual`.
    for _ in 0..5 {
        clock.advance(TIMEOUT);
        let su = d.run_size_work();
        assert_eq!((su.actual, su.end), (2048, SizeEnd::OutOfMemory));
        let (stalled, events) = look(&h);
        assert!(stalled);
        assert!(
            !events.contains(BalloonEvents::TARGET_STALLED),
            "raised twice"
        );
    }
    assert_eq!(stalls(&h), 1);

    // The workload gives memory back: progress clears the stall, the target is reached.
    d.guest_free_pages(&held[..512]);
    let su = d.run_size_work();
    assert_eq!((su.actual, su.end), (2560, SizeEnd::OutOfMemory));
    let (stalled, events) = look(&h);
    assert!(!stalled, "progress clears the stall");
    assert!(!events.contains(BalloonEvents::TARGET_STALLED));
    // ... and restarts the clock.
    clock.advance(TIMEOUT - SECOND);
    assert!(!look(&h).0);
    d.guest_free_pages(&held[512..]);
    let su = d.run_size_work();
    assert_eq!((su.actual, su.end), (3072, SizeEnd::Reached));
    let (stalled, events) = look(&h);
    assert!(!stalled);
    assert!(events.contains(BalloonEvents::TARGET_REACHED));
    clock.advance(TIMEOUT * 10);
    assert!(!look(&h).0, "a reached target never stalls");
    assert_eq!(stalls(&h), 1);
    h.assert_clean();
}

#[test]
fn a_new_target_restarts_the_clock_and_a_pause_stops_it() {
    let (h, clock) = setup(16 * MIB);
    let d = &h.driver;
    dev(&h, |dev| dev.set_target(8192));
    let su = d.run_size_work();
    assert_eq!((su.actual, su.end), (4096, SizeEnd::OutOfMemory));
    clock.advance(TIMEOUT);
    assert!(look(&h).0);
    assert_eq!(stalls(&h), 1);

    // Another target the guest cannot reach either: not stalled until a whole timeout.
    dev(&h, |dev| dev.set_target(6000));
    assert!(!dev(&h, |dev| dev.target_stalled()));
    clock.advance(TIMEOUT - SECOND);
    assert!(!look(&h).0);
    // The same target again is not a new one.
    dev(&h, |dev| dev.set_target(6000));
    clock.advance(SECOND);
    let (stalled, events) = look(&h);
    assert!(stalled && events.contains(BalloonEvents::TARGET_STALLED));
    assert_eq!(stalls(&h), 2);

    // While paused the guest cannot move: no clock. After resume, a whole timeout again.
    dev(&h, |dev| dev.set_target(7000));
    dev(&h, |dev| dev.pause());
    clock.advance(TIMEOUT * 5);
    assert!(!look(&h).0);
    dev(&h, |dev| dev.resume());
    clock.advance(TIMEOUT - SECOND);
    assert!(!look(&h).0);
    clock.advance(SECOND);
    assert!(look(&h).0);
    assert_eq!(stalls(&h), 3);
    h.assert_clean();
}

#[test]
fn a_guest_that_makes_progress_never_stalls() {
    let (h, clock) = setup(16 * MIB);
    let d = &h.driver;
    dev(&h, |dev| dev.set_target(4096));
    // One request at a time, each just inside the timeout: 16 requests take 16 timeouts.
    let mut requests = 0;
    while d.towards_target() > 0 {
        clock.advance(TIMEOUT - SECOND);
        assert_eq!(d.fill_balloon(256).unwrap(), 256);
        d.update_balloon_size();
        requests += 1;
        let (stalled, events) = look(&h);
        assert!(!stalled, "after request {requests}");
        assert!(!events.contains(BalloonEvents::TARGET_STALLED));
    }
    assert_eq!(requests, 16);
    assert!(dev(&h, |dev| dev.target_reached()));
    // Deflating towards a lower target is progress too.
    dev(&h, |dev| dev.set_target(1024));
    while d.towards_target() < 0 {
        clock.advance(TIMEOUT - SECOND);
        assert_eq!(d.leak_balloon(256).unwrap(), 256);
        d.update_balloon_size();
        assert!(!look(&h).0);
    }
    assert_eq!(dev(&h, |dev| dev.actual()), 1024);
    clock.advance(TIMEOUT * 10);
    assert!(!look(&h).0);
    assert_eq!(stalls(&h), 0);
    h.assert_clean();
}

#[test]
fn a_guest_that_deflates_on_oom_in_a_loop_stalls() {
    let (h, clock) = setup(16 * MIB);
    let d = &h.driver;
    dev(&h, |dev| dev.set_target(8192));
    let su = d.run_size_work();
    assert_eq!((su.actual, su.end), (4096, SizeEnd::OutOfMemory));

    // Every 5 s the OOM notifier deflates 256 pages, and every 5 s later the size work
    // inflates them again: `actual` keeps moving, but never closer than 4096.
    let mut raised_at = Vec::new();
    let mut elapsed = Duration::ZERO;
    for round in 0..8 {
        assert_eq!(d.oom_notify().unwrap(), 256);
        assert_eq!(dev(&h, |dev| dev.actual()), 3840);
        if dev(&h, |dev| dev.take_events()).contains(BalloonEvents::TARGET_STALLED) {
            raised_at.push((round, elapsed));
        }
        clock.advance(5 * SECOND);
        elapsed += 5 * SECOND;
        let su = d.run_size_work();
        assert_eq!((su.actual, su.end), (4096, SizeEnd::OutOfMemory));
        if dev(&h, |dev| dev.take_events()).contains(BalloonEvents::TARGET_STALLED) {
            raised_at.push((round, elapsed));
        }
        clock.advance(5 * SECOND);
        elapsed += 5 * SECOND;
    }
    // The guest's own writes of `actual` found the stall, at the first one 30 s after it
    // last came closer, without the timer, and only once.
    assert_eq!(raised_at, [(3, TIMEOUT)]);
    assert!(dev(&h, |dev| dev.target_stalled()));
    assert_eq!(stalls(&h), 1);
    h.assert_clean();
}

#[test]
fn a_reset_forgets_the_stall_and_the_next_driver_is_watched_again() {
    let (h, clock) = setup(16 * MIB);
    let d = &h.driver;
    dev(&h, |dev| dev.set_target(8192));
    d.run_size_work();
    clock.advance(TIMEOUT);
    assert!(look(&h).0);

    // The guest reboots: the driver deflates on removal and resets the device.
    d.remove();
    assert!(!dev(&h, |dev| dev.target_stalled()), "no driver, no stall");
    clock.advance(TIMEOUT * 3);
    assert!(!look(&h).0, "nothing is watched without a driver");
    // The next driver comes up with the target set: watched from DRIVER_OK on.
    d.probe().expect("probe");
    clock.advance(TIMEOUT - SECOND);
    assert!(!look(&h).0);
    clock.advance(SECOND);
    let (stalled, events) = look(&h);
    assert!(stalled && events.contains(BalloonEvents::TARGET_STALLED));
    assert_eq!(stalls(&h), 2);
    h.assert_clean();
}

#[test]
fn the_stall_timer_raises_the_event_through_the_event_loop() {
    // The real clock and the device's timerfd on the event manager: a guest that gets stuck
    // and writes nothing more is still reported. Only the event's arrival is awaited.
    let mut cfg = HarnessConfig::balloon(64 * MIB, MIB);
    cfg.balloon.stall_timeout = Some(Duration::from_millis(20));
    let h = Harness::new(cfg, Arc::new(RecordingSink::default()));
    // The device's own clock: a MonotonicClock.
    dev(&h, |d| d.take_events());
    dev(&h, |d| d.set_target(1024));
    let su = h.driver.run_size_work();
    assert_eq!((su.actual, su.end), (256, SizeEnd::OutOfMemory));
    let mut seen = BalloonEvents::empty();
    wait_until("TARGET_STALLED", || {
        seen |= dev(&h, |d| d.take_events());
        seen.contains(BalloonEvents::TARGET_STALLED)
    })
    .unwrap();
    assert!(dev(&h, |d| d.target_stalled()));
    assert_eq!(stalls(&h), 1);
    h.assert_clean();
}
