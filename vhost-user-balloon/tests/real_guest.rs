// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real Linux 6.1 `virtio_balloon` driver drives the device: User-Mode Linux (a real
//! kernel running as a process, a vhost-user frontend through `virtio_uml`) boots against the
//! daemon binary, and each test drives the guest through its agent and the daemon through
//! its control socket, printing the figures it checks.
//!
//! Needs `scripts/real-guest/setup.sh` (user-mode-linux, busybox-static and the guest
//! initramfs); the tests fail, they do not skip, without it. Guests run one at a time.

mod guest;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use guest::daemon::{kib, one_guest_at_a_time, u, wait_until, Daemon, T};
use serde_json::{json, Value};
use vhost_user_balloon::control;

const MIB: u64 = 1 << 20;
/// Linux's hint block: one order-10 block of 4 KiB pages.
const HINT_BLOCK: u64 = 4 * MIB;

/// What this file asks of the daemon beyond the shared harness.
impl Daemon {
    /// Sets the target and waits until the driver's `actual` reaches it.
    fn reach_target(&self, bytes: u64, timeout: Duration) -> Duration {
        let start = Instant::now();
        self.req(json!({"cmd": "set_target", "bytes": bytes}));
        wait_until("actual to reach the target", timeout, || {
            let s = self.status();
            s["actual"] == s["num_pages"]
        });
        start.elapsed()
    }

    /// Bytes the host holds of the guest's memory file.
    fn allocated(&self) -> u64 {
        allocated(&self.control)
    }
}

/// Bytes the host holds of the guest's memory file, from the daemon at `control`.
fn allocated(control: &Path) -> u64 {
    let status = control::request(control, &json!({"cmd": "status"}), T)
        .unwrap_or_else(|e| panic!("status: {e}"));
    status["memory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["allocated_bytes"].as_u64().expect("a file-backed region"))
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn feature_bit(status: &Value, bit: u32) -> bool {
    let hex = status["features"]["negotiated"].as_str().unwrap();
    let v = u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
    v & (1 << bit) != 0
}

/// Linux 6.1 acknowledges the features twice (the second time without PAGE_POISON, which
/// it keeps only with init_on_free or page poisoning); the device takes both, numbers the
/// queues the same way, and the guest sees the features the daemon ended with.
#[test]
fn linux_negotiates_features_and_both_acks_are_handled() {
    let _one = one_guest_at_a_time();
    let d = Daemon::start("features", &[]);
    let mut g = d.boot(512, &[]);
    let s = d.status();
    let negotiated = s["features"]["negotiated"].as_str().unwrap().to_string();
    println!(
        "offered {}, negotiated {negotiated} ({}), feature acks {}",
        s["features"]["offered"], s["features"]["names"], s["backend"]["feature_acks"]
    );
    assert_eq!(
        u(&s["backend"]["feature_acks"]),
        2,
        "Linux acknowledges twice"
    );
    assert_eq!(u(&s["backend"]["feature_errors"]), 0);
    assert_eq!(u(&s["backend"]["activations"]), 1);
    // Every balloon feature but PAGE_POISON (no init_on_free, no page poisoning).
    for bit in [0, 1, 2, 3, 5, 32] {
        assert!(
            feature_bit(&s, bit),
            "bit {bit} not negotiated: {negotiated}"
        );
    }
    assert!(!feature_bit(&s, 4), "PAGE_POISON kept without poisoning");
    let guest_mask = g.feature_mask().unwrap();
    let mask = u64::from_str_radix(negotiated.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(guest_mask, mask, "the guest sees {guest_mask:#x}");
    let log = std::fs::read_to_string(&d.log).unwrap();
    let acks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("acknowledged features"))
        .collect();
    println!("daemon log: {acks:#?}");
    assert_eq!(acks.len(), 2);
}

/// The statistics Linux reports match the guest's own /proc/meminfo and /proc/vmstat.
#[test]
fn statistics_match_the_guest() {
    let _one = one_guest_at_a_time();
    let d = Daemon::start("stats", &[]);
    let mut g = d.boot(512, &[]);
    g.dirty(64).unwrap();
    // The driver's first buffer arrived at probe; ask for fresh numbers.
    let first = d.req(json!({"cmd": "stats"}))["stats"]["received_unix_ms"].clone();
    d.req(json!({"cmd": "request_stats"}));
    wait_until("fresh statistics", T, || {
        let s = d.req(json!({"cmd": "stats"}));
        !s["stats"].is_null() && s["stats"]["received_unix_ms"] != first
    });
    let meminfo = g.meminfo().unwrap();
    let vmstat = g.vmstat().unwrap();
    let stats = d.req(json!({"cmd": "stats"}))["stats"].clone();
    let v = &stats["values"];
    println!("statistics: {stats}");
    let tolerance = 16 * MIB;
    let close = |name: &str, stat: u64, guest: u64| {
        println!(
            "{name}: device {:.1} MiB, guest {:.1} MiB",
            mib(stat),
            mib(guest)
        );
        assert!(
            stat.abs_diff(guest) <= tolerance,
            "{name}: {stat} vs {guest}"
        );
    };
    close(
        "total_memory",
        u(&v["total_memory"]),
        kib(&meminfo, "MemTotal"),
    );
    close(
        "free_memory",
        u(&v["free_memory"]),
        kib(&meminfo, "MemFree"),
    );
    close(
        "available_memory",
        u(&v["available_memory"]),
        kib(&meminfo, "MemAvailable"),
    );
    let caches = kib(&meminfo, "Cached") + kib(&meminfo, "Buffers") + kib(&meminfo, "SwapCached");
    close("disk_caches", u(&v["disk_caches"]), caches);
    // Event counters only grow: the device's copy is older than the agent's read.
    let page = 4096;
    assert!(u(&v["swap_in"]) <= vmstat["pswpin"] * page);
    assert!(u(&v["swap_out"]) <= vmstat["pswpout"] * page);
    let majflt = vmstat["pgmajfault"];
    assert!(u(&v["major_faults"]) <= majflt);
    let minflt = vmstat["pgfault"] - majflt;
    assert!(u(&v["minor_faults"]) <= minflt && u(&v["minor_faults"]) > 0);
    println!(
        "minor faults: device {}, guest {minflt}; major: device {}, guest {majflt}",
        v["minor_faults"], v["major_faults"]
    );
    // The statistics buffer is held again, ready for the next request.
    assert_eq!(
        d.req(json!({"cmd": "request_stats"}))["requested"],
        json!(true)
    );
}

/// Inflate to a target and back: `actual` reaches it, MemTotal falls by it, the memory
/// file really shrinks, discard calls stay within twice the runs the guest gave, and after
/// the deflate the guest uses the memory again.
#[test]
fn inflate_frees_the_memory_file_and_deflate_gives_it_back() {
    let _one = one_guest_at_a_time();
    // No reporting (it would free memory too) and no deflate on OOM (with it Linux keeps
    // inflated pages in MemTotal).
    let d = Daemon::start("inflate", &["--no-reporting", "--no-deflate-on-oom"]);
    let mut g = d.boot(512, &[]);
    let dirtied = g.dirty(300).unwrap();
    println!("dirtied 300 MiB in {} ms", dirtied["ms"]);
    let total_before = kib(&g.meminfo().unwrap(), "MemTotal");
    let file_before = d.allocated();

    let target = 100 * MIB;
    let took = d.reach_target(target, Duration::from_secs(120));
    // Let the flush timer discard what waited to be merged.
    wait_until("the discards", T, || {
        u(&d.status()["discards"]["bytes"]) >= target
    });
    let s = d.status();
    let total_after = kib(&g.meminfo().unwrap(), "MemTotal");
    let file_after = d.allocated();
    let calls = u(&s["discards"]["calls"]);
    let runs = u(&s["discards"]["runs"]);
    let elements = u(&s["metrics"]["pages"]["inflate_elements"]);
    println!(
        "inflated {} MiB in {took:?}: {elements} elements, {calls} discard calls for {runs} \
         contiguous runs ({:.0} calls per GiB); MemTotal {:.1} -> {:.1} MiB; memory file \
         {:.1} -> {:.1} MiB",
        mib(target),
        calls as f64 * 1024.0 / mib(target),
        mib(total_before),
        mib(total_after),
        mib(file_before),
        mib(file_after)
    );
    assert_eq!(u(&s["actual_bytes"]), target);
    assert_eq!(
        total_before - total_after,
        target,
        "MemTotal falls by the target"
    );
    assert!(
        file_before.saturating_sub(file_after) >= target * 9 / 10,
        "the memory file freed only {:.1} MiB",
        mib(file_before.saturating_sub(file_after))
    );
    assert!(calls <= 2 * runs, "{calls} discard calls for {runs} runs");
    assert_eq!(u(&s["metrics"]["pages"]["discards_failed"]), 0);

    let took = d.reach_target(0, Duration::from_secs(120));
    let total_back = kib(&g.meminfo().unwrap(), "MemTotal");
    println!("deflated in {took:?}; MemTotal {:.1} MiB", mib(total_back));
    assert_eq!(total_back, total_before);
    assert_eq!(u(&d.status()["actual"]), 0);
    // The guest uses its memory again: it allocates more than it could while inflated.
    let free = kib(&g.meminfo().unwrap(), "MemFree");
    let want = (free - 48 * MIB) / MIB;
    assert!(want * MIB > target);
    let reply = g.alloc(want).unwrap();
    println!(
        "after the deflate the guest allocated {want} MiB: {}",
        reply.body
    );
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.kv_u64("got_mib"), Some(want));
    g.release().unwrap();
}

/// A guest that allocates past its free memory while the balloon holds memory: the driver
/// deflates on OOM and nothing is killed.
#[test]
fn deflate_on_oom_saves_the_guest() {
    let _one = one_guest_at_a_time();
    let d = Daemon::start("oom", &["--no-reporting"]);
    let mut g = d.boot(512, &[]);
    let free = kib(&g.meminfo().unwrap(), "MemFree");
    // Leave the guest about 64 MiB.
    let target = (free - 64 * MIB) / MIB * MIB;
    d.reach_target(target, Duration::from_secs(120));
    let held = u(&d.status()["actual_bytes"]);
    let want = 192;
    let reply = g.alloc(want).unwrap();
    let s = d.status();
    let after = u(&s["actual_bytes"]);
    println!(
        "balloon held {:.0} MiB; the guest allocated {:?} of {want} MiB; the balloon then \
         held {:.0} MiB ({} deflate elements)",
        mib(held),
        reply.kv_u64("got_mib"),
        mib(after),
        s["metrics"]["pages"]["deflate_elements"]
    );
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.kv_u64("got_mib"), Some(want));
    assert!(after < held, "the balloon did not shrink");
    let dmesg = g.dmesg().unwrap();
    assert!(
        !dmesg.contains("Killed process"),
        "the OOM killer ran:\n{dmesg}"
    );
    assert!(u(&s["metrics"]["pages"]["deflate_elements"]) > 0);
    g.release().unwrap();
}

/// Free page reporting: the guest reports the memory it freed and the device frees it in
/// the memory file.
#[test]
fn free_page_reporting_frees_the_memory_file() {
    let _one = one_guest_at_a_time();
    let d = Daemon::start("reporting", &["--no-free-page-hint"]);
    let mut g = d.boot(512, &[]);
    let s = d.status();
    assert!(feature_bit(&s, 5), "REPORTING negotiated");
    let reported_before = u(&s["metrics"]["pages"]["reported_bytes"]);
    let file_before = d.allocated();
    // The guest may report what it freed within milliseconds of the `dirty` answer: watch
    // the file while it dirties. Pages in use cannot be reported, so the file peaks just
    // before the agent frees them.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let file_dirty = thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                peak = peak.max(allocated(&d.control));
                thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let dirtied = g.dirty(300);
        stop.store(true, std::sync::atomic::Ordering::Release);
        dirtied.unwrap();
        sampler.join().unwrap()
    });
    assert!(
        file_dirty >= file_before + 250 * MIB,
        "dirtying grew the file only from {} to {} bytes",
        file_before,
        file_dirty
    );
    // Linux reports every free block once, a few elements every two seconds, the blocks
    // the guest never touched among them: wait until the dirtied ones were reported too.
    let start = Instant::now();
    wait_until("the memory file to shrink", Duration::from_secs(90), || {
        d.allocated() + 250 * MIB <= file_dirty
    });
    let took = start.elapsed();
    let s = d.status();
    let file_after = d.allocated();
    assert!(u(&s["metrics"]["pages"]["reported_bytes"]) >= reported_before + 250 * MIB);
    println!(
        "reported {:.0} MiB in {} elements ({} skipped); memory file {:.1} MiB at boot, \
         {:.1} MiB at its peak while dirtying, {:.1} MiB {took:?} after the dirtying ended",
        mib(u(&s["metrics"]["pages"]["reported_bytes"])),
        s["metrics"]["pages"]["reporting_elements"],
        s["metrics"]["pages"]["reporting_elements_skipped"],
        mib(file_before),
        mib(file_dirty),
        mib(file_after)
    );
    assert!(file_dirty - file_after >= 250 * MIB);
    assert_eq!(u(&s["metrics"]["pages"]["reporting_elements_skipped"]), 0);
}

/// With init_on_free the driver keeps PAGE_POISON (poison value 0: freed pages read as
/// zeros), so the device may still discard reported pages.
#[test]
fn page_poison_with_init_on_free() {
    let _one = one_guest_at_a_time();
    let d = Daemon::start("poison", &[]);
    let mut g = d.boot(512, &["init_on_free=1"]);
    let s = d.status();
    println!(
        "init_on_free=1: negotiated {}, poison_val {}",
        s["features"]["negotiated"], s["poison_val"]
    );
    assert!(feature_bit(&s, 4), "PAGE_POISON kept with init_on_free");
    assert_eq!(u(&s["poison_val"]), 0);
    // Keeping PAGE_POISON, the driver acknowledges once.
    assert_eq!(u(&s["backend"]["feature_acks"]), 1);
    let reported_before = u(&s["metrics"]["pages"]["reported_bytes"]);
    g.dirty(200).unwrap();
    wait_until("the guest's reports", Duration::from_secs(60), || {
        u(&d.status()["metrics"]["pages"]["reported_bytes"]) > reported_before
    });
    let s = d.status();
    assert_eq!(u(&s["metrics"]["pages"]["reporting_elements_skipped"]), 0);
    assert_eq!(u(&s["metrics"]["late_poison_writes"]), 0);
}

/// A 4 GiB guest that dirtied and freed 3.5 GiB: the round hints every free order-10 block
/// the guest's buddy allocator showed, the guest ends the round itself, DONE gives it its
/// memory back, and the round is captured in the format of `tests/data/` (set
/// `REAL_GUEST_CAPTURE` to keep the file).
#[test]
fn hint_round_of_a_4g_guest_is_every_free_block() {
    let _one = one_guest_at_a_time();
    let dir = std::env::temp_dir().join(format!("vub-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let capture = dir.join("round.txt");
    let capture_arg = capture.to_str().unwrap().to_string();
    let d = Daemon::start(
        "round4g",
        &["--hint-sink", "capture", "--capture", &capture_arg],
    );
    let mut g = d.boot(4096, &[]);
    // Through the page cache (`fill`): ten times faster under UML than touching anonymous
    // memory, and the pages end up free all the same.
    let dirtied = g.fill(3500).unwrap();
    println!("dirtied and freed 3500 MiB in {} ms", dirtied["ms"]);
    let before = g.meminfo().unwrap();
    let buddy = g.buddyinfo().unwrap();
    let free_blocks = buddy.get(10).copied().unwrap_or(0);
    println!(
        "buddyinfo per order {buddy:?}: {free_blocks} free order-10 blocks = {} MiB; \
         MemFree {:.0} MiB",
        free_blocks * 4,
        mib(kib(&before, "MemFree"))
    );

    let start = Instant::now();
    let id = u(&d.req(json!({"cmd": "start_round"}))["cmd_id"]);
    let waited = d.req(json!({"cmd": "wait_round", "timeout_ms": 60_000}));
    let took = start.elapsed();
    assert_eq!(waited["complete"], json!(true), "{waited}");
    let s = d.status();
    let h = &s["metrics"]["hint"];
    let hinted = u(&h["bytes_accepted"]);
    println!(
        "round {id}: {} hints, {:.0} MiB, complete after {took:?} (start_round to the \
         guest's STOP, through the control socket); metrics {h}",
        h["hints_accepted"],
        mib(hinted)
    );
    assert!(
        hinted.abs_diff(free_blocks * HINT_BLOCK) <= HINT_BLOCK,
        "hinted {hinted} bytes, the guest had {free_blocks} free order-10 blocks"
    );
    for reject in [
        "malformed_elements",
        "hints_wrong_state",
        "hints_zero_length",
        "hints_overflow",
        "hints_misaligned",
        "hints_outside_ram",
        "stale_commands",
    ] {
        assert_eq!(u(&h[reject]), 0, "{reject}");
    }
    assert_eq!(
        u(&h["rounds_stopped_by_guest"]),
        1,
        "the guest ends the round"
    );
    assert_eq!(s["hint"]["round_complete"], json!(true));

    // The guest holds the hinted pages until DONE.
    let during = kib(&g.meminfo().unwrap(), "MemFree");
    d.req(json!({
        "cmd": "save_capture",
        "description": format!(
            "User-Mode Linux {}, mem=4G, 3500 MiB dirtied and freed, virtio_uml to \
             vhost-user-balloon",
            g.setup().kernel_version
        ),
    }));
    d.req(json!({"cmd": "finish_round"}));
    let mut after = 0;
    wait_until("the guest's free memory back", T, || {
        after = kib(&g.meminfo().unwrap(), "MemFree");
        after + 64 * MIB >= kib(&before, "MemFree")
    });
    println!(
        "MemFree {:.0} MiB before the round, {:.0} MiB while the driver held the hinted \
         pages, {:.0} MiB after DONE",
        mib(kib(&before, "MemFree")),
        mib(during),
        mib(after)
    );
    assert!(during + hinted / 2 < kib(&before, "MemFree"));
    assert_eq!(s["hint_sink"]["round_bytes"], json!(hinted));

    // The capture: a start buffer, every hint, the STOP.
    let text = std::fs::read_to_string(&capture).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let hints = lines.iter().filter(|l| l.ends_with(" 2")).count() as u64;
    println!(
        "capture: {} lines, {} of them hints, header {:?}",
        lines.len(),
        hints,
        text.lines().take(2).collect::<Vec<_>>()
    );
    assert_eq!(hints, u(&h["hints_accepted"]));
    assert_eq!(lines.len() as u64, hints + 2);
    assert!(text.contains(&format!("# cmd_id {id}")));
    if let Some(keep) = std::env::var_os("REAL_GUEST_CAPTURE") {
        std::fs::copy(&capture, Path::new(&keep)).unwrap();
        println!("capture kept in {}", Path::new(&keep).display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
