// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The traditional balloon end to end, on every queue: the Linux 6.12 driver model of
//! `guest_model` (`fill_balloon`, `leak_balloon`, `update_balloon_size_func`, the OOM
//! notifier, `stats_handle_request`, `virtballoon_free_page_report`, with its background
//! interrupt and workqueue threads where the test says so) reaches the device through real
//! MMIO, split rings in guest memory and eventfds; the device is served by an `EventManager`
//! thread. A recording [`MemoryBackend`] wraps [`MadviseBackend`] (when the test looks at
//! guest memory) or [`NoopBackend`] and shows every discard and populate the device asked for,
//! with the used index the device had published on inflateq or deflateq at that moment (read
//! from the guest's ring in guest memory, so "before the ack" is checked without a clock).
//!
//! Waits use the model's generous [`DEADLINE`] as a hang guard only; nothing asserts how long
//! anything took. The one bound that involves time (discard calls per GiB with
//! MUST_TELL_HOST) is derived from the elapsed time itself, so a slow machine raises the bound
//! instead of failing the test.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_model::driver::PAGE_POISON_VAL;
use guest_model::*;
use virtio_balloon::backend::{MadviseBackend, MemoryBackend, NoopBackend};
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::VirtioDevice;
use virtio_balloon::BalloonEvents;
use virtio_balloon::DISCARD_FLUSH_DELAY;
use virtio_balloon::PENDING_CAP;
use vm_memory::{Bytes, GuestAddress};

/// The frame a PFN names.
const PAGE: u64 = BALLOON_PFN_BYTES;
/// 1 GiB.
const GIB: u64 = 1 << 30;
/// Salts of the patterns the guest writes into its pages.
const SALT_BEFORE: u64 = 0x5a5a_0000_0000_0001;
const SALT_AFTER: u64 = 0xc3c3_0000_0000_0001;

// ---------------------------------------------------------------------------------------------
// The recording backend (`guest_model::backend`).

use guest_model::backend::{BackendCall, BackendOp, RecordingBackend};

/// A harness whose device uses a recorder over `inner`.
fn rig(cfg: HarnessConfig, inner: Arc<dyn MemoryBackend>) -> (Harness, Arc<RecordingBackend>) {
    let rec = RecordingBackend::over(inner);
    let h = Harness::with_backend(cfg, Arc::new(RecordingSink::default()), rec.clone());
    rec.watch_driver_rings(h.mem.clone(), &h.driver);
    (h, rec)
}

/// MadviseBackend, if the host has 4 KiB pages (the exact-coverage checks below assume one
/// host page per PFN).
fn madvise_4k(test: &str) -> Option<Arc<dyn MemoryBackend>> {
    let b = MadviseBackend::new();
    if b.host_page_size() != PAGE {
        eprintln!(
            "{test}: skipped, host pages are {:#x} bytes",
            b.host_page_size()
        );
        return None;
    }
    Some(Arc::new(b))
}

// ---------------------------------------------------------------------------------------------
// Page sets and guest memory.

/// The union of the frames the calls touch.
fn union(calls: &[BackendCall]) -> BTreeSet<u64> {
    calls.iter().flat_map(|c| c.pfns()).collect()
}

/// The union of the frames the calls touch; asserts no frame is touched twice.
fn union_once(calls: &[BackendCall]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for c in calls {
        for p in c.pfns() {
            assert!(out.insert(p), "frame {p:#x} touched twice: {c:?}");
        }
    }
    out
}

/// Asserts that every call lies inside RAM `[0, ram_end)` and covers whole host pages.
fn assert_inside_ram_and_aligned(calls: &[BackendCall], ram_end: u64, host_page: u64) {
    for c in calls {
        assert!(c.len > 0, "{c:?}");
        assert!(c.gpa + c.len <= ram_end, "outside RAM: {c:?}");
        assert_eq!(c.gpa % host_page, 0, "unaligned start: {c:?}");
        assert_eq!(c.len % host_page, 0, "unaligned length: {c:?}");
        assert_eq!(c.host_addr % host_page, 0, "unaligned host address: {c:?}");
    }
}

/// The frames in the model's balloon.
fn balloon_pfns(d: &Driver) -> BTreeSet<u64> {
    let size = d.options().page_size;
    d.balloon_pages()
        .iter()
        .flat_map(|p| p.0 / PAGE..(p.0 + size) / PAGE)
        .collect()
}

/// The frames of `[start, start + len)`.
fn pfn_range(start: u64, len: u64) -> BTreeSet<u64> {
    (start / PAGE..(start + len) / PAGE).collect()
}

fn assert_pages_hold(mem: &Mem, pfns: &BTreeSet<u64>, salt: u64, what: &str) {
    for &p in pfns {
        let v = pattern(p, salt);
        assert_eq!(read_page(mem, p), (v, v), "{what}: frame {p:#x}");
    }
}

fn assert_pages_zero(mem: &Mem, pfns: &BTreeSet<u64>, what: &str) {
    for &p in pfns {
        assert_eq!(read_page(mem, p), (0, 0), "{what}: frame {p:#x}");
    }
}

/// Gives the one-shot discard flush timer every chance to fire, then flushes explicitly: what
/// the device would still discard on its own, it discards now.
fn let_the_device_flush(h: &Harness) {
    std::thread::sleep(3 * DISCARD_FLUSH_DELAY);
    dev(h, |b| b.flush_discards());
}

// ---------------------------------------------------------------------------------------------
// Device events.

/// Sets the target (dropping events of earlier targets in the same critical section) and waits
/// for TARGET_REACHED on `events_fd`, then for the size work to go idle.
fn set_target_and_wait(h: &Harness, ev: &mut EventWatch, pages: u32) {
    ev.clear();
    dev(h, |b| {
        b.take_events();
        b.set_target(pages);
    });
    ev.wait(h, BalloonEvents::TARGET_REACHED);
    h.driver.wait_idle(WorkKind::UpdateSize).unwrap();
    assert_eq!(dev(h, |b| b.actual()), pages);
    assert_eq!(dev(h, |b| b.num_pages()), pages);
    assert_eq!(h.driver.balloon_num_pages(), pages);
}

fn background(mut cfg: HarnessConfig) -> HarnessConfig {
    cfg.background = true;
    cfg
}

// ---------------------------------------------------------------------------------------------
// 1. Inflate to a target, deflate.

#[test]
fn inflate_and_deflate_to_a_target_discard_and_populate_exactly_the_balloon_pages() {
    let ram = 64 * MIB;
    let (h, rec) = rig(
        background(HarnessConfig::balloon(ram, 32 * MIB)),
        Arc::new(NoopBackend),
    );
    let d = &h.driver;
    assert!(d.has_feature(feature::MUST_TELL_HOST));
    assert!(dev(&h, |b| b.has_feature(feature::MUST_TELL_HOST)));
    let page = rec.host_page_size();
    let mut ev = EventWatch::new(&h);

    set_target_and_wait(&h, &mut ev, 4096);
    assert!(ev.seen().contains(BalloonEvents::ACTUAL_CHANGED));
    assert!(dev(&h, |b| b.target_reached()));
    assert_eq!(dev(&h, |b| b.actual_bytes()), 16 * MIB);
    let inflated = balloon_pfns(d);
    assert_eq!(inflated.len(), 4096);
    let discards = rec.of(BackendOp::Discard);
    assert_inside_ram_and_aligned(&discards, ram, page);
    assert_eq!(
        union_once(&discards),
        inflated,
        "reaching the target flushed: the discards cover exactly the balloon"
    );
    assert!(rec.of(BackendOp::Populate).is_empty());
    let m = dev(&h, |b| b.metrics()).pages;
    assert_eq!(m.inflate_elements, 16);
    assert_eq!(m.inflated_pages, 4096);
    assert_eq!(m.discard_calls, discards.len() as u64);
    assert_eq!(m.discarded_bytes, 16 * MIB);
    eprintln!(
        "inflate 16 MiB: {} discard call(s) for {} inflate elements",
        discards.len(),
        m.inflate_elements
    );

    // Lower the target: the size work deflates.
    let mark = rec.mark();
    set_target_and_wait(&h, &mut ev, 1024);
    let kept = balloon_pfns(d);
    assert_eq!(kept.len(), 1024);
    assert!(kept.is_subset(&inflated));
    let deflated: BTreeSet<u64> = inflated.difference(&kept).copied().collect();
    let populates = rec.since(mark, BackendOp::Populate);
    assert_inside_ram_and_aligned(&populates, ram, page);
    assert_eq!(
        union(&populates),
        deflated,
        "populates cover the deflated pages"
    );
    let deflates = d.requests_on(QueueRole::Deflate);
    assert_eq!(deflates.len(), 12);
    assert!(deflates.iter().all(|r| r.used_len == Some(0)));
    let m = dev(&h, |b| b.metrics()).pages;
    assert_eq!((m.deflate_elements, m.deflated_pages), (12, 3072));

    // Whatever the device does on its own later, it never discards a deflated page.
    let_the_device_flush(&h);
    let late = rec.since(mark, BackendOp::Discard);
    assert!(
        late.iter().all(|c| !c.touches(&deflated)),
        "a deflated page was discarded: {late:?}"
    );
    assert!(late.is_empty(), "nothing was left to discard: {late:?}");
    h.assert_clean();
}

#[test]
fn discarded_balloon_pages_read_zero_and_deflated_pages_keep_what_the_guest_writes() {
    let Some(backend) = madvise_4k("madvise") else {
        return;
    };
    let ram = 64 * MIB;
    let (h, rec) = rig(background(HarnessConfig::balloon(ram, 32 * MIB)), backend);
    let d = &h.driver;
    let mem = &h.mem;
    let pool = pfn_range(4 * MIB, 32 * MIB);
    let outside = pfn_range(40 * MIB, 4 * MIB);
    write_pages(mem, &pool, SALT_BEFORE);
    write_pages(mem, &outside, SALT_BEFORE);
    let mut ev = EventWatch::new(&h);

    set_target_and_wait(&h, &mut ev, 4096);
    let inflated = balloon_pfns(d);
    assert_eq!(union_once(&rec.of(BackendOp::Discard)), inflated);
    assert_pages_zero(mem, &inflated, "discarded balloon page");
    let untouched: BTreeSet<u64> = pool.difference(&inflated).copied().collect();
    assert_pages_hold(mem, &untouched, SALT_BEFORE, "pool page the guest kept");
    assert_pages_hold(mem, &outside, SALT_BEFORE, "page outside the pool");

    // Deflate; the guest uses its pages again at once.
    let mark = rec.mark();
    set_target_and_wait(&h, &mut ev, 1024);
    let kept = balloon_pfns(d);
    let deflated: BTreeSet<u64> = inflated.difference(&kept).copied().collect();
    assert_eq!(deflated.len(), 3072);
    assert!(union(&rec.since(mark, BackendOp::Populate)).is_superset(&deflated));
    write_pages(mem, &deflated, SALT_AFTER);
    let_the_device_flush(&h);
    assert_pages_hold(mem, &deflated, SALT_AFTER, "deflated page after the flush");
    assert_pages_zero(mem, &kept, "page still in the balloon");

    // Inflate again: the allocator hands freed pages out first, so the new pending range
    // grows right next to pages the guest is using.
    let mark2 = rec.mark();
    set_target_and_wait(&h, &mut ev, 2048);
    let last = balloon_pfns(d);
    let again: BTreeSet<u64> = last.difference(&kept).copied().collect();
    assert_eq!(again.len(), 1024);
    let_the_device_flush(&h);
    let since_deflate = rec.since(mark, BackendOp::Discard);
    assert!(
        since_deflate
            .iter()
            .all(|c| c.pfns().all(|p| last.contains(&p))),
        "after the deflate only re-inflated pages may be discarded: {since_deflate:?}"
    );
    assert_eq!(union_once(&rec.since(mark2, BackendOp::Discard)), again);
    let in_use: BTreeSet<u64> = deflated.difference(&again).copied().collect();
    assert_pages_hold(mem, &in_use, SALT_AFTER, "deflated page the guest kept");
    assert_pages_zero(mem, &last, "page in the balloon");
    assert_pages_hold(mem, &outside, SALT_BEFORE, "page outside the pool");
    h.assert_clean();
}

#[test]
fn a_deflate_right_after_an_inflate_is_never_discarded_later() {
    let Some(backend) = madvise_4k("deflate after inflate") else {
        return;
    };
    // Step mode: the test drives fill_balloon and leak_balloon itself, with no `actual`
    // write in between, so the device still holds the inflated pages pending (unless its
    // flush timer already fired, which the checks below do not depend on).
    let (h, rec) = rig(HarnessConfig::balloon(64 * MIB, 16 * MIB), backend);
    let d = &h.driver;
    let mem = &h.mem;
    let pool = pfn_range(4 * MIB, 16 * MIB);
    write_pages(mem, &pool, SALT_BEFORE);
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    let inflated = balloon_pfns(d);
    assert_eq!(d.leak_balloon(256).unwrap(), 256);
    let released: BTreeSet<u64> = d.requests_on(QueueRole::Deflate)[0]
        .pfns
        .iter()
        .map(|&p| u64::from(p))
        .collect();
    let kept = balloon_pfns(d);
    assert_eq!(released.len(), 256);
    assert!(released.is_disjoint(&kept));

    // The deflate flushed the pending range first: every inflated page was discarded once,
    // before any deflated page was populated.
    let calls = rec.all();
    let first_populate = calls
        .iter()
        .position(|c| c.op == BackendOp::Populate)
        .expect("a populate");
    assert_eq!(union_once(&rec.of(BackendOp::Discard)), inflated);
    assert!(calls[first_populate..]
        .iter()
        .all(|c| c.op == BackendOp::Populate));
    assert_eq!(union(&rec.of(BackendOp::Populate)), released);

    // The guest uses the released pages; the device's timer and flushes leave them alone.
    write_pages(mem, &released, SALT_AFTER);
    let_the_device_flush(&h);
    d.update_balloon_size();
    let_the_device_flush(&h);
    assert!(rec.since(first_populate, BackendOp::Discard).is_empty());
    assert_pages_hold(mem, &released, SALT_AFTER, "released page");
    assert_pages_zero(mem, &kept, "page in the balloon");
    let rest: BTreeSet<u64> = pool.difference(&inflated).copied().collect();
    assert_pages_hold(mem, &rest, SALT_BEFORE, "pool page never inflated");
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 2. Discard calls per GiB.

/// What inflating 1 GiB cost.
#[derive(Debug)]
struct GibFigures {
    discard_calls: usize,
    elements: usize,
    elapsed: Duration,
}

/// Inflates 1 GiB (262,144 PFNs) with the background size work and checks that the discards
/// cover exactly the inflated pages, inside RAM and aligned, each once. Without
/// MUST_TELL_HOST it also checks, from inside the backend, that each discard covers pages of
/// one element only and happened before that element's used entry was published.
fn inflate_one_gib(order: PageOrder, must_tell_host: bool) -> GibFigures {
    let ram = GIB + 8 * MIB;
    let mut cfg = background(HarnessConfig::balloon(ram, GIB));
    cfg.balloon.must_tell_host = must_tell_host;
    cfg.balloon.reporting = false;
    cfg.driver.page_order = order;
    let (h, rec) = rig(cfg, Arc::new(NoopBackend));
    let d = &h.driver;
    assert_eq!(d.has_feature(feature::MUST_TELL_HOST), must_tell_host);
    let pfns = GIB / PAGE;
    let mut ev = EventWatch::new(&h);

    let start = Instant::now();
    set_target_and_wait(&h, &mut ev, pfns as u32);
    let elapsed = start.elapsed();
    let at_target = rec.mark();
    let_the_device_flush(&h);
    assert_eq!(
        rec.mark(),
        at_target,
        "reaching the target left nothing to discard"
    );

    let inflates = d.requests_on(QueueRole::Inflate);
    assert_eq!(inflates.len() as u64, pfns / VIRTIO_BALLOON_ARRAY_PFNS_MAX);
    // The element each frame was inflated by.
    let mut owner = vec![u32::MAX; (ram / PAGE) as usize];
    for (i, r) in inflates.iter().enumerate() {
        assert_eq!(r.used_len, Some(0));
        for &p in &r.pfns {
            assert_eq!(owner[p as usize], u32::MAX, "frame {p:#x} inflated twice");
            owner[p as usize] = i as u32;
        }
    }
    let discards = rec.of(BackendOp::Discard);
    assert_inside_ram_and_aligned(&discards, ram, rec.host_page_size());
    let mut covered = vec![false; owner.len()];
    for c in &discards {
        let first = owner[(c.gpa / PAGE) as usize];
        for p in c.pfns() {
            let p = p as usize;
            assert!(!covered[p], "frame {p:#x} discarded twice: {c:?}");
            covered[p] = true;
            assert_ne!(
                owner[p],
                u32::MAX,
                "discard of a frame never inflated: {c:?}"
            );
            if !must_tell_host {
                assert_eq!(owner[p], first, "one discard across elements: {c:?}");
            }
        }
        if !must_tell_host {
            let used = c.used_idx.expect("inflateq used index");
            assert!(
                u32::from(used) <= first,
                "element {first} was acked (used idx {used}) before its pages were discarded"
            );
        }
    }
    let n_covered = covered.iter().filter(|&&c| c).count() as u64;
    assert_eq!(n_covered, pfns, "every inflated frame was discarded");
    let m = dev(&h, |b| b.metrics()).pages;
    assert_eq!(m.discard_calls, discards.len() as u64);
    assert_eq!((m.inflated_pages, m.discarded_bytes), (pfns, GIB));
    h.assert_clean();
    GibFigures {
        discard_calls: discards.len(),
        elements: inflates.len(),
        elapsed,
    }
}

fn report_gib(what: &str, f: &GibFigures) {
    eprintln!(
        "syscalls per GiB: {what}: {} discard calls for {} inflate elements of 256 PFNs \
         (262,144 PFNs) in {:?}",
        f.discard_calls, f.elements, f.elapsed
    );
}

/// Contiguous pages with MUST_TELL_HOST: runs merge across elements. A flush ends the pending
/// range when the next run is not adjacent (never, here: element k+1 starts where element k
/// ends), when it reaches PENDING_CAP (at most GiB / 256 MiB = 4 times), when the flush timer
/// fires (one-shot, re-armed by the next inflate: at most once per DISCARD_FLUSH_DELAY of
/// inflating), and when the target is reached (once). Each flush is one discard call, so the
/// worst case is 4 + 1 + elapsed / 100 ms + 1 (the first timer may fire in a partial window):
/// 16 calls for a 1 s inflation, and it stays below 64 unless 1024 round trips take more
/// than 5.8 s. The bound is computed from the measured time, so it cannot flake.
#[test]
fn syscalls_per_gib_contiguous_with_must_tell_host() {
    let f = inflate_one_gib(PageOrder::Ascending, true);
    report_gib("ascending pages, MUST_TELL_HOST", &f);
    let timer_fires = (f.elapsed.as_nanos() / DISCARD_FLUSH_DELAY.as_nanos()) as usize + 1;
    let bound = (GIB / PENDING_CAP) as usize + 1 + timer_fires;
    assert!(
        f.discard_calls <= bound,
        "{} calls, bound {bound} for {:?}",
        f.discard_calls,
        f.elapsed
    );
    assert!(f.discard_calls < f.elements, "{f:?}");
}

/// Contiguous pages without MUST_TELL_HOST: every element is flushed before its ack, as QEMU
/// does; each element's 256 PFNs are one run, so exactly one call per element.
#[test]
fn syscalls_per_gib_contiguous_without_must_tell_host() {
    let f = inflate_one_gib(PageOrder::Ascending, false);
    report_gib("ascending pages, no MUST_TELL_HOST", &f);
    assert!(f.discard_calls <= f.elements, "{f:?}");
    assert_eq!(f.discard_calls, f.elements, "{f:?}");
}

/// Scattered pages with MUST_TELL_HOST: almost no two PFNs are neighbours, so merging cannot
/// help; the calls are bounded by the PFNs.
#[test]
fn syscalls_per_gib_scattered_with_must_tell_host() {
    let f = inflate_one_gib(PageOrder::Scattered { seed: 0x6a09_e667 }, true);
    report_gib("scattered pages, MUST_TELL_HOST", &f);
    assert!(f.discard_calls as u64 <= GIB / PAGE, "{f:?}");
    assert!(f.discard_calls > f.elements, "{f:?}");
}

/// Scattered pages without MUST_TELL_HOST: at least one call per element, at most one per PFN.
#[test]
fn syscalls_per_gib_scattered_without_must_tell_host() {
    let f = inflate_one_gib(PageOrder::Scattered { seed: 0x6a09_e667 }, false);
    report_gib("scattered pages, no MUST_TELL_HOST", &f);
    assert!(f.discard_calls as u64 <= GIB / PAGE, "{f:?}");
    assert!(f.discard_calls >= f.elements, "{f:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. Deflate on OOM.

#[test]
fn oom_deflates_256_pages_below_the_target_and_the_device_accepts_it() {
    let (h, rec) = rig(
        background(HarnessConfig::balloon(64 * MIB, 16 * MIB)),
        Arc::new(NoopBackend),
    );
    let d = &h.driver;
    assert!(d.has_feature(feature::DEFLATE_ON_OOM));
    assert!(dev(&h, |b| b.has_feature(feature::DEFLATE_ON_OOM)));
    let mut ev = EventWatch::new(&h);
    set_target_and_wait(&h, &mut ev, 2048);
    let before = balloon_pfns(d);

    ev.clear();
    dev(&h, |b| b.take_events());
    let mark = rec.mark();
    assert_eq!(d.oom_notify().unwrap(), 256);
    ev.wait(&h, BalloonEvents::ACTUAL_CHANGED);
    assert!(
        !ev.seen().contains(BalloonEvents::TARGET_REACHED),
        "{:?}",
        ev.seen()
    );
    let (actual, num_pages, reached) = dev(&h, |b| (b.actual(), b.num_pages(), b.target_reached()));
    assert_eq!((actual, num_pages), (2048 - 256, 2048));
    assert!(actual < num_pages);
    assert!(!reached);

    let after = balloon_pfns(d);
    let deflated: BTreeSet<u64> = before.difference(&after).copied().collect();
    assert_eq!(deflated.len() as u64, VIRTIO_BALLOON_OOM_NR_PAGES);
    assert_eq!(union(&rec.since(mark, BackendOp::Populate)), deflated);
    assert!(rec.since(mark, BackendOp::Discard).is_empty());
    let r = d.requests_on(QueueRole::Deflate);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].used_len, Some(0));
    let m = dev(&h, |b| b.metrics()).pages;
    assert_eq!((m.deflate_elements, m.deflated_pages), (1, 256));
    h.assert_clean();
}

#[test]
fn without_deflate_on_oom_the_oom_notifier_does_nothing() {
    let mut cfg = background(HarnessConfig::balloon(64 * MIB, 16 * MIB));
    cfg.balloon.deflate_on_oom = false;
    let (h, rec) = rig(cfg, Arc::new(NoopBackend));
    let d = &h.driver;
    assert!(!d.has_feature(feature::DEFLATE_ON_OOM));
    let mut ev = EventWatch::new(&h);
    set_target_and_wait(&h, &mut ev, 1024);
    let before = balloon_pfns(d);
    dev(&h, |b| b.take_events());
    let mark = rec.mark();
    assert_eq!(d.oom_notify().unwrap(), 0);
    assert_eq!(balloon_pfns(d), before);
    assert!(d.requests_on(QueueRole::Deflate).is_empty());
    let (actual, reached, events) = dev(&h, |b| (b.actual(), b.target_reached(), b.take_events()));
    assert_eq!(actual, 1024);
    assert!(reached);
    assert!(
        !events.contains(BalloonEvents::ACTUAL_CHANGED),
        "{events:?}"
    );
    assert_eq!(rec.mark(), mark, "no backend call");
    assert_eq!(dev(&h, |b| b.metrics()).pages.deflate_elements, 0);
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 4. MUST_TELL_HOST: populate before the ack.

#[test]
fn with_must_tell_host_every_deflated_page_is_populated_before_its_ack() {
    let (h, rec) = rig(
        background(HarnessConfig::balloon(64 * MIB, 16 * MIB)),
        Arc::new(NoopBackend),
    );
    let d = &h.driver;
    assert!(d.has_feature(feature::MUST_TELL_HOST));
    let mut ev = EventWatch::new(&h);
    set_target_and_wait(&h, &mut ev, 2048);
    let mark = rec.mark();
    set_target_and_wait(&h, &mut ev, 0);

    let deflates = d.requests_on(QueueRole::Deflate);
    assert_eq!(deflates.len(), 8);
    let populates = rec.since(mark, BackendOp::Populate);
    assert!(
        populates
            .iter()
            .all(|c| usize::from(c.used_idx.expect("deflateq used index")) < deflates.len()),
        "a populate after every deflate was acked: {populates:?}"
    );
    for (i, r) in deflates.iter().enumerate() {
        let acked = r.acked.expect("acked");
        let released = r.released.expect("released");
        assert!(acked <= released, "pages released before the ack: {r:?}");
        // The populates made while element i's used entry was not yet published.
        let mine: Vec<BackendCall> = populates
            .iter()
            .filter(|c| c.used_idx == Some(i as u16))
            .copied()
            .collect();
        let pfns: BTreeSet<u64> = r.pfns.iter().map(|&p| u64::from(p)).collect();
        assert_eq!(union(&mine), pfns, "element {i}");
        assert!(
            mine.iter().all(|c| c.at <= acked),
            "element {i}: a populate returned after the driver saw the ack"
        );
    }
    assert_eq!(union(&populates).len(), 2048);
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 6. Free page reporting.

/// Aligned buddy blocks the guest reports (two of them adjacent).
const REPORTED: [(u64, u64); 4] = [
    (32 * MIB, 2 * MIB),
    (34 * MIB, 2 * MIB),
    (40 * MIB, 4 * MIB),
    (48 * MIB, 2 * MIB),
];

fn reported_pfns() -> BTreeSet<u64> {
    REPORTED
        .iter()
        .flat_map(|&(a, l)| pfn_range(a, l))
        .collect()
}

/// Guest pages around and inside the reported blocks.
fn around_reported() -> BTreeSet<u64> {
    pfn_range(30 * MIB, 22 * MIB)
}

fn reporting_rig(
    guest_poison: Option<u32>,
    test: &str,
) -> Option<(Harness, Arc<RecordingBackend>)> {
    let backend = madvise_4k(test)?;
    let mut cfg = HarnessConfig::balloon(64 * MIB, 8 * MIB);
    cfg.driver.guest_poison = guest_poison;
    let (h, rec) = rig(cfg, backend);
    assert!(h.driver.has_feature(feature::REPORTING));
    assert_eq!(
        h.driver.has_feature(feature::PAGE_POISON),
        guest_poison.is_some()
    );
    write_pages(&h.mem, &around_reported(), SALT_BEFORE);
    Some((h, rec))
}

/// Reports [`REPORTED`] in one request; returns the device's page metrics afterwards.
fn report(h: &Harness) -> virtio_balloon::PageMetrics {
    let ranges: Vec<(GuestAddress, u64)> = REPORTED
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    let before = h.driver.requests_on(QueueRole::Reporting).len();
    assert_eq!(h.driver.report_free_pages(&ranges).unwrap().len(), 1);
    let r = h.driver.requests_on(QueueRole::Reporting);
    assert_eq!(r.len(), before + 1);
    assert_eq!(r[before].used_len, Some(0), "acked with used length 0");
    dev(h, |b| b.metrics()).pages
}

fn assert_reported_blocks_discarded(h: &Harness, rec: &RecordingBackend, mark: usize) {
    let discards: Vec<(u64, u64)> = rec
        .since(mark, BackendOp::Discard)
        .iter()
        .map(|c| (c.gpa, c.len))
        .collect();
    assert_eq!(discards, REPORTED, "one discard per reported block");
    let reported = reported_pfns();
    assert_pages_zero(&h.mem, &reported, "reported page");
    let rest: BTreeSet<u64> = around_reported().difference(&reported).copied().collect();
    assert_pages_hold(&h.mem, &rest, SALT_BEFORE, "page next to a reported block");
}

#[test]
fn reporting_without_page_poison_discards_exactly_the_reported_blocks() {
    let Some((h, rec)) = reporting_rig(None, "reporting") else {
        return;
    };
    let m = report(&h);
    assert_eq!(
        (
            m.reporting_elements,
            m.reporting_elements_skipped,
            m.reported_bytes
        ),
        (1, 0, 10 * MIB)
    );
    assert_reported_blocks_discarded(&h, &rec, 0);
    h.assert_clean();
}

#[test]
fn reporting_with_poison_value_zero_discards_exactly_the_reported_blocks() {
    let Some((h, rec)) = reporting_rig(Some(0), "reporting, poison 0") else {
        return;
    };
    assert_eq!(dev(&h, |b| b.poison_val()), 0);
    let m = report(&h);
    assert_eq!(
        (m.reporting_elements_skipped, m.reported_bytes),
        (0, 10 * MIB)
    );
    assert_reported_blocks_discarded(&h, &rec, 0);
    h.assert_clean();
}

#[test]
fn reporting_with_a_poison_value_discards_nothing() {
    let Some((h, rec)) = reporting_rig(Some(PAGE_POISON_VAL), "reporting, poisoned") else {
        return;
    };
    assert_eq!(dev(&h, |b| b.poison_val()), PAGE_POISON_VAL);
    let m = report(&h);
    assert_eq!(
        (
            m.reporting_elements,
            m.reporting_elements_skipped,
            m.reported_bytes
        ),
        (1, 1, 0)
    );
    assert!(rec.of(BackendOp::Discard).is_empty());
    assert_pages_hold(&h.mem, &around_reported(), SALT_BEFORE, "poisoned page");
    h.assert_clean();
}

#[test]
fn reporting_while_discards_are_inhibited_is_skipped() {
    let Some((h, rec)) = reporting_rig(None, "reporting, inhibited") else {
        return;
    };
    dev(&h, |b| b.set_discards_inhibited(true));
    assert!(dev(&h, |b| b.discards_inhibited()));
    let m = report(&h);
    assert_eq!(
        (
            m.reporting_elements,
            m.reporting_elements_skipped,
            m.reported_bytes
        ),
        (1, 1, 0)
    );
    assert!(rec.of(BackendOp::Discard).is_empty());
    assert_pages_hold(
        &h.mem,
        &around_reported(),
        SALT_BEFORE,
        "page reported while inhibited",
    );

    // Allowed again: the same report discards.
    dev(&h, |b| b.set_discards_inhibited(false));
    let m = report(&h);
    assert_eq!(
        (
            m.reporting_elements,
            m.reporting_elements_skipped,
            m.reported_bytes
        ),
        (2, 1, 10 * MIB)
    );
    assert_reported_blocks_discarded(&h, &rec, 0);
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 7. Reset in the middle of inflation.

#[test]
fn a_reset_in_the_middle_of_inflation_drops_the_pending_discards() {
    let Some(backend) = madvise_4k("reset") else {
        return;
    };
    // Step mode: the test drives the driver.
    let (h, rec) = rig(HarnessConfig::balloon(64 * MIB, 16 * MIB), backend);
    let d = &h.driver;
    let mem = &h.mem;
    write_pages(mem, &pfn_range(4 * MIB, 16 * MIB), SALT_BEFORE);
    // Two elements through fill_balloon (acked; `actual` not written yet, so with
    // MUST_TELL_HOST the device may keep them pending until its flush timer fires).
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    assert_eq!(d.fill_balloon(256).unwrap(), 256);
    let a = balloon_pfns(d);
    // A third element the device handles while this thread holds it, followed by the reset
    // in the same critical section: neither the flush timer nor anything else can discard it
    // in between.
    let b: BTreeSet<u64> = d
        .guest_alloc_pages(256)
        .iter()
        .map(|p| p.0 / PAGE)
        .collect();
    assert_eq!(b.len(), 256);
    let raw: Vec<u8> = b
        .iter()
        .rev()
        .flat_map(|&p| (p as u32).to_le_bytes())
        .collect();
    let buf = d.alloc_scratch(raw.len() as u64, 16).unwrap();
    mem.write_slice(&raw, buf).unwrap();
    let q = d.queue_index(QueueRole::Inflate).unwrap();
    let (pending, mark) = {
        let mut t = lock(&h.dev);
        d.post(q, &[Part::out(buf, raw.len() as u32)], false)
            .unwrap();
        t.device_mut().process_queue(usize::from(q));
        let m = t.device().metrics().pages;
        assert_eq!((m.inflate_elements, m.inflated_pages), (3, 768));
        let pending = m.inflated_pages * PAGE - m.discarded_bytes;
        let mark = rec.mark();
        // The guest reboots: Status = 0.
        t.write(reg::STATUS, &0u32.to_le_bytes());
        assert!(!t.device().is_activated());
        (pending, mark)
    };
    assert!(
        pending >= 256 * PAGE,
        "the last element was pending at the reset"
    );
    d.reset(false);
    let_the_device_flush(&h);
    assert!(
        rec.since(mark, BackendOp::Discard).is_empty(),
        "a discard after the reset"
    );

    // The next driver instance owns every page: the balloon it starts with is empty.
    d.probe().unwrap();
    rec.watch_driver_rings(h.mem.clone(), &h.driver);
    assert_eq!(d.balloon_num_pages(), 0);
    let owned: BTreeSet<u64> = a.union(&b).copied().collect();
    write_pages(mem, &owned, SALT_AFTER);
    let_the_device_flush(&h);
    assert!(rec.since(mark, BackendOp::Discard).is_empty());
    assert_pages_hold(mem, &owned, SALT_AFTER, "page of the new driver");

    // Its own inflation discards its own balloon pages only.
    dev(&h, |b| b.set_target(512));
    let su = d.run_size_work();
    assert_eq!((su.end, su.inflated), (SizeEnd::Reached, 512));
    assert!(dev(&h, |b| b.target_reached()));
    let_the_device_flush(&h);
    let now = balloon_pfns(d);
    assert_eq!(union_once(&rec.since(mark, BackendOp::Discard)), now);
    assert_pages_zero(mem, &now, "page in the new balloon");
    let in_use: BTreeSet<u64> = owned.difference(&now).copied().collect();
    assert!(!in_use.is_empty());
    assert_pages_hold(mem, &in_use, SALT_AFTER, "page of the new driver");
    h.assert_clean();
}

#[test]
fn a_reset_while_the_size_work_inflates_discards_nothing_afterwards() {
    let (h, rec) = rig(
        background(HarnessConfig::balloon(GIB / 2 + 8 * MIB, GIB / 2)),
        Arc::new(NoopBackend),
    );
    let d = &h.driver;
    let target = (GIB / 2 / PAGE) as u32;
    dev(&h, |b| b.set_target(target));
    wait_until("a few acked inflate elements", || {
        d.requests_on(QueueRole::Inflate)
            .iter()
            .filter(|r| r.acked.is_some())
            .count()
            >= 8
    })
    .unwrap();
    // The guest reboots: its work items stop (the size work gives up waiting for an ack),
    // then Status = 0.
    d.stop_background();
    let (mark, inflated) = {
        let mut t = lock(&h.dev);
        let mark = rec.mark();
        let inflated = t.device().metrics().pages.inflated_pages;
        t.write(reg::STATUS, &0u32.to_le_bytes());
        (mark, inflated)
    };
    assert!(inflated >= 8 * 256);
    d.reset(false);
    let_the_device_flush(&h);
    assert!(rec.since(mark, BackendOp::Discard).is_empty());

    // A new driver instance: the target is still there, but nothing happens until it runs
    // its size work; nothing is discarded meanwhile.
    d.probe().unwrap();
    assert_eq!(d.balloon_num_pages(), 0);
    assert_eq!(dev(&h, |b| b.num_pages()), target);
    let_the_device_flush(&h);
    assert!(rec.since(mark, BackendOp::Discard).is_empty());
    h.assert_clean();
}
