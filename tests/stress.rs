// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The precopy stress test: many random migrations of a whole model guest (device, Linux
//! driver model, workload writer) from a source to a fresh destination over loopback TCP,
//! through the reference precopy loop, each checked page by page.
//!
//! Every seed picks its own scenario: guest size and stale free memory, a writer that
//! allocates through the shrinker while the driver holds hints, the driver's pace, a device
//! that lags behind the guest, waiting for the first hint round or not, a small downtime
//! limit and a bandwidth cap so that several bitmap syncs race the guest's hints, and a
//! disruption: a cancel in the middle (then a second migration from scratch, which must
//! still hint), a device reset in the middle (the migration must still lose nothing), or
//! none. After each completed migration (guest stopped) every page the guest holds must be
//! identical on the source and the destination, and must be what the model last wrote.
//!
//! A failing seed is printed with its scenario and the first differing pages; all seeds run
//! and the test fails at the end with the list. Replay or widen locally:
//!
//! ```sh
//! PRECOPY_STRESS_SEED=17 cargo test --release --all-features --test stress -- --nocapture
//! PRECOPY_STRESS_SEEDS=2000 cargo test --release --all-features --test stress -- --nocapture
//! ```
//!
//! `PRECOPY_STRESS_THREADS` sets how many seeds run at once (default 4: much of a seed's
//! time is spent sleeping in rate limits and device lag). A seed's scenario depends only on
//! the seed, whatever thread runs it; the interleavings do not, which is the point.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_model::*;
use virtio_balloon::HintState;
use virtio_balloon_precopy::{
    CancelToken, MigrationReport, PrecopyConfig, PrecopyError, ReceiveStats, VmControl,
    VmControlError, WireError,
};
use vm_memory::GuestMemoryMmap;

/// Seeds run by default (CI). `PRECOPY_STRESS_SEEDS` runs more (or fewer) locally.
const SEEDS: u64 = 200;

/// Differing pages printed per failing migration.
const SHOW_PAGES: usize = 8;

type Dst = GuestMemoryMmap<()>;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

/// The disruption a seed applies to its (first) migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disruption {
    None,
    /// Cancel the migration after this delay; if it was cancelled, migrate again from
    /// scratch (waiting for the driver's DONE first, or not).
    Cancel {
        after: Duration,
        wait_for_done: bool,
    },
    /// Reset the device through the driver model after this delay, then probe again.
    Reset {
        after: Duration,
        give_back_held: bool,
    },
}

impl Disruption {
    fn name(&self) -> &'static str {
        match self {
            Disruption::None => "none",
            Disruption::Cancel { .. } => "cancel",
            Disruption::Reset { .. } => "reset",
        }
    }

    fn index(&self) -> usize {
        match self {
            Disruption::None => 0,
            Disruption::Cancel { .. } => 1,
            Disruption::Reset { .. } => 2,
        }
    }
}

/// Everything a seed decides.
#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    spec: GuestSpec,
    writer: Option<WriterSpec>,
    /// Wait for the first hint round, with this deadline.
    wait: Option<Duration>,
    config: PrecopyConfig,
    disruption: Disruption,
}

impl Scenario {
    fn new(seed: u64) -> Scenario {
        let mut rng = Rng::new(splitmix(seed ^ 0x0005_eed0_fa11_5eed));
        let mem_size = rng.between(12, 40) * 4 * MIB;
        let used = rng.between(2, 6) * 4 * MIB;
        let free_blocks = (mem_size - 4 * MIB - used) / (4 * MIB);
        // Most of the rest was dirtied and freed (stale contents a hint lets us skip).
        let dirtied_freed = free_blocks * rng.between(60, 95) / 100 * 4 * MIB;
        // A few seeds without hinting: if they fail too, the harness or the loop is at
        // fault, not the hints.
        let hinting = rng.below(16) != 0;
        let block_pace = rng.pick(&[
            Duration::ZERO,
            Duration::from_micros(20),
            Duration::from_micros(200),
        ]);
        let device_lag = rng.pick(&[
            Duration::ZERO,
            Duration::from_micros(200),
            Duration::from_millis(2),
            // Longer than a whole round at 200 us per block: hints of a round still on
            // the ring when the next sync comes (the stop_round drain's job).
            Duration::from_millis(20),
        ]);
        let writer = (rng.below(5) != 0).then(|| WriterSpec {
            rate: rng.between(50, 400) * MIB,
            working_set: rng.between(2, 8) * 4 * MIB,
            used_share: rng.between(0, 30) as u32,
            seed: splitmix(seed ^ 0x0077_7269_7465_7200),
        });
        let wait = (rng.below(2) == 0).then(|| Duration::from_millis(rng.between(50, 500)));
        let config = PrecopyConfig::default()
            .with_downtime_limit(Duration::from_millis(rng.between(1, 20)))
            .with_max_bandwidth(Some(rng.between(64, 512) * MIB))
            .with_max_iterations(rng.between(3, 8) as u32)
            .with_postcopy(false);
        let disruption = match rng.below(4) {
            0 => Disruption::Cancel {
                after: Duration::from_millis(rng.between(0, 400)),
                wait_for_done: rng.below(2) == 0,
            },
            1 => Disruption::Reset {
                after: Duration::from_millis(rng.between(0, 300)),
                give_back_held: rng.below(4) != 0,
            },
            _ => Disruption::None,
        };
        Scenario {
            seed,
            spec: GuestSpec {
                hinting,
                block_pace,
                device_lag,
                seed: splitmix(seed),
                ..GuestSpec::new(mem_size, used, dirtied_freed)
            },
            writer,
            wait,
            config,
            disruption,
        }
    }

    /// One line with every knob.
    fn describe(&self) -> String {
        let s = &self.spec;
        let writer = match &self.writer {
            Some(w) => format!(
                "writer {} MiB/s, working set {} MiB, {}% to used pages",
                w.rate / MIB,
                w.working_set / MIB,
                w.used_share
            ),
            None => "no writer".into(),
        };
        let wait = match self.wait {
            Some(d) => format!("wait for the round up to {d:?}"),
            None => "no wait".into(),
        };
        let disruption = match self.disruption {
            Disruption::None => "no disruption".into(),
            Disruption::Cancel {
                after,
                wait_for_done,
            } => format!(
                "cancel after {after:?} (then migrate again, {} DONE first)",
                if wait_for_done {
                    "waiting for"
                } else {
                    "not waiting for"
                }
            ),
            Disruption::Reset {
                after,
                give_back_held,
            } => format!("device reset after {after:?} (give back held blocks: {give_back_held})"),
        };
        format!(
            "seed {}: guest {} MiB, used {} MiB, dirtied+freed {} MiB, hinting {}, driver pace \
             {:?}, device lag {:?}; {writer}; {wait}; downtime limit {:?}, bandwidth {} MiB/s, \
             max {} iterations; {disruption}",
            self.seed,
            s.mem_size / MIB,
            s.used / MIB,
            s.dirtied_freed / MIB,
            if s.hinting { "on" } else { "off" },
            s.block_pace,
            s.device_lag,
            self.config.downtime_limit,
            self.config.max_bandwidth.unwrap_or(0) / MIB,
            self.config.max_iterations
        )
    }
}

/// The guest's [`VmControl`], made exclusive with a device reset: a reset is the guest
/// running (a vCPU writing the status register), so it happens wholly before the guest is
/// stopped or not at all until it is resumed.
#[derive(Clone)]
struct StressVm {
    inner: GuestVm,
    stopped: Arc<Mutex<bool>>,
}

impl VmControl for StressVm {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        let mut stopped = lock(&self.stopped);
        self.inner.stop_vm()?;
        *stopped = true;
        Ok(())
    }

    fn resume_vm(&mut self) {
        let mut stopped = lock(&self.stopped);
        self.inner.resume_vm();
        *stopped = false;
    }
}

/// What a seed did, for the totals.
#[derive(Clone, Debug, Default)]
struct Outcome {
    migrations: u32,
    with_writer: bool,
    lagging_device: bool,
    writer_pages: u64,
    shrinker_blocks: u64,
    /// The first migration returned `Err(Cancelled)`.
    cancelled: bool,
    /// A cancel was planned but the migration finished first.
    cancel_too_late: bool,
    /// The device was reset while the migration ran.
    reset: bool,
    /// A reset was planned but the guest was already stopped.
    reset_too_late: bool,
    rounds: u64,
    hints_accepted: u64,
    hinted_pages: u64,
    pages_sent: u64,
    iterations: u64,
    mismatched_pages: u64,
    failures: Vec<String>,
    time: Duration,
}

/// Resets the device through the driver model unless the guest is stopped: the driver's
/// threads stop, Status = 0, probe again, threads restart. Returns whether it reset.
fn reset_device(
    guest: &Guest,
    stopped: &Mutex<bool>,
    give_back_held: bool,
) -> Result<bool, String> {
    let stopped = lock(stopped);
    if *stopped {
        return Ok(false);
    }
    let driver = guest.driver();
    driver.stop_background();
    driver.reset(give_back_held);
    let probed = driver.probe();
    driver.start_background();
    probed.map_err(|e| format!("probe after the reset failed: {e}"))?;
    Ok(true)
}

/// The bookkeeping after a migration that completed: counts, and the page check.
fn completed(
    guest: &Guest,
    report: &MigrationReport,
    received: Result<ReceiveStats, WireError>,
    dst: &Dst,
    what: &str,
    out: &mut Outcome,
) {
    out.migrations += 1;
    out.hinted_pages += report.hinted_pages;
    out.pages_sent += report.pages_sent;
    out.iterations += report.iterations.len() as u64;
    if let Err(e) = received {
        out.failures
            .push(format!("{what}: the destination failed: {e}"));
    }
    if !guest.is_stopped() {
        out.failures.push(format!(
            "{what}: the migration completed but the guest runs"
        ));
    }
    if let Err((bad, msg)) = guest.check_destination(dst, what, report, SHOW_PAGES) {
        out.mismatched_pages += bad;
        out.failures.push(msg);
    }
}

/// After a migration, resumes the guest and waits for the driver to have every held block
/// back (the DONE the migration ended with).
fn resume_and_expect_blocks_back(guest: &Guest, vm: &mut StressVm, what: &str, out: &mut Outcome) {
    if guest.is_stopped() {
        vm.resume_vm();
    }
    let driver = guest.driver();
    if let Err(e) = wait_until("the driver to have its held blocks back", || {
        driver.held_blocks().is_empty()
    }) {
        out.failures.push(format!(
            "{what}: {e}: {} blocks still held, hint state {:?}",
            driver.held_blocks().len(),
            guest.hints().status()
        ));
    }
}

fn run_seed(sc: &Scenario) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome {
        with_writer: sc.writer.is_some(),
        lagging_device: !sc.spec.device_lag.is_zero(),
        ..Outcome::default()
    };
    let guest = Guest::boot(&sc.spec);
    let stopped = Arc::new(Mutex::new(false));
    let mut vm = StressVm {
        inner: guest.vm_control(),
        stopped: stopped.clone(),
    };
    if let Some(w) = &sc.writer {
        guest.start_writer(w.clone());
    }

    let token = CancelToken::new();
    let (result, received, dst, reset) = std::thread::scope(|s| {
        let disruptor = match sc.disruption {
            Disruption::None => None,
            Disruption::Cancel { after, .. } => {
                let token = token.clone();
                let (tx, handle) = after_delay(s, after, move || {
                    token.cancel();
                    Ok(true)
                });
                Some((tx, handle))
            }
            Disruption::Reset {
                after,
                give_back_held,
            } => {
                let (guest, stopped) = (&guest, &*stopped);
                Some(after_delay(s, after, move || {
                    reset_device(guest, stopped, give_back_held)
                }))
            }
        };
        let cancel = matches!(sc.disruption, Disruption::Cancel { .. }).then(|| token.clone());
        let (result, received, dst) = guest.migrate(sc.config, &mut vm, sc.wait, cancel, sc.seed);
        let fired = disruptor.map(|(tx, handle)| {
            let _ = tx.send(());
            handle.join().expect("the disrupting thread panicked")
        });
        (result, received, dst, fired.flatten())
    });

    match (sc.disruption, &reset) {
        (Disruption::Reset { .. }, Some(Ok(true))) => out.reset = true,
        (Disruption::Reset { .. }, Some(Ok(false)) | None) => out.reset_too_late = true,
        (_, Some(Err(e))) => out.failures.push(e.clone()),
        _ => {}
    }

    match result {
        Ok(report) => {
            out.cancel_too_late = matches!(sc.disruption, Disruption::Cancel { .. });
            completed(&guest, &report, received, &dst, "migration", &mut out);
            resume_and_expect_blocks_back(&guest, &mut vm, "after the migration", &mut out);
        }
        Err(PrecopyError::Cancelled) if token.is_cancelled() => {
            out.cancelled = true;
            drop(dst);
            if received.is_ok() {
                out.failures
                    .push("the destination completed a cancelled stream".into());
            }
            if guest.is_stopped() {
                out.failures
                    .push("the guest stays stopped after the cancel".into());
            }
            let state = guest.hints().status().state;
            if sc.spec.hinting && state != HintState::Done {
                out.failures.push(format!(
                    "hint state {state:?} after the cancel's Cleanup, not DONE"
                ));
            }
            let wait_for_done = matches!(
                sc.disruption,
                Disruption::Cancel {
                    wait_for_done: true,
                    ..
                }
            );
            if wait_for_done {
                resume_and_expect_blocks_back(&guest, &mut vm, "after the cancel", &mut out);
            }
            // Again from scratch, to a new destination, waiting for the whole first round:
            // hinting must still work after a cancelled migration.
            let rounds_before = guest.hints().status().metrics.rounds_started;
            let (result, received, dst) =
                guest.migrate(sc.config, &mut vm, Some(DEADLINE), None, sc.seed);
            match result {
                Ok(report) => {
                    if sc.spec.hinting && report.hint_round_completed != Some(true) {
                        out.failures.push(format!(
                            "after the cancel, the guest did not complete a hint round \
                             ({:?}; rounds started {} -> {}; hint status {:?})",
                            report.hint_round_completed,
                            rounds_before,
                            guest.hints().status().metrics.rounds_started,
                            guest.hints().status()
                        ));
                    }
                    completed(
                        &guest,
                        &report,
                        received,
                        &dst,
                        "the migration after the cancel",
                        &mut out,
                    );
                    resume_and_expect_blocks_back(
                        &guest,
                        &mut vm,
                        "after the migration after the cancel",
                        &mut out,
                    );
                }
                Err(e) => out
                    .failures
                    .push(format!("the migration after the cancel failed: {e}")),
            }
        }
        Err(e) => out.failures.push(format!("the migration failed: {e}")),
    }

    if sc.writer.is_some() {
        let w = guest.stop_writer();
        out.writer_pages = w.pages_written;
        out.shrinker_blocks = w.blocks_from_shrinker;
    }
    let driver = guest.driver();
    out.rounds = driver.rounds().len() as u64;
    out.hints_accepted = guest.hints().status().metrics.hints_accepted;
    let errors = guest.harness.event_loop_errors();
    if !errors.is_empty() {
        out.failures.push(format!("event loop errors: {errors:?}"));
    }
    let errors = driver.errors();
    if !errors.is_empty() {
        out.failures.push(format!(
            "driver model errors: {errors:?}\n      latest MMIO accesses:\n{}",
            guest.harness.recent_mmio()
        ));
    }
    drop(guest);
    out.time = start.elapsed();
    out
}

/// Per-scenario sums.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    seeds: u64,
    migrations: u64,
    with_writer: u64,
    lagging: u64,
    writer_mib: u64,
    shrinker_blocks: u64,
    seeds_with_shrinker: u64,
    cancelled: u64,
    cancel_too_late: u64,
    reset: u64,
    reset_too_late: u64,
    rounds: u64,
    hints_accepted: u64,
    hinted_pages: u64,
    pages_sent: u64,
    iterations: u64,
    mismatched_pages: u64,
    failing_seeds: u64,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.seeds += 1;
        self.migrations += u64::from(o.migrations);
        self.with_writer += u64::from(o.with_writer);
        self.lagging += u64::from(o.lagging_device);
        self.writer_mib += o.writer_pages * PAGE_BYTES / MIB;
        self.shrinker_blocks += o.shrinker_blocks;
        self.seeds_with_shrinker += u64::from(o.shrinker_blocks > 0);
        self.cancelled += u64::from(o.cancelled);
        self.cancel_too_late += u64::from(o.cancel_too_late);
        self.reset += u64::from(o.reset);
        self.reset_too_late += u64::from(o.reset_too_late);
        self.rounds += o.rounds;
        self.hints_accepted += o.hints_accepted;
        self.hinted_pages += o.hinted_pages;
        self.pages_sent += o.pages_sent;
        self.iterations += o.iterations;
        self.mismatched_pages += o.mismatched_pages;
        self.failing_seeds += u64::from(!o.failures.is_empty());
    }
}

fn print_totals(rows: &[(&str, Totals)]) {
    let header = [
        "scenario",
        "seeds",
        "migr",
        "writer",
        "lagging",
        "wr MiB",
        "shrink",
        "shr seeds",
        "cancel",
        "late",
        "reset",
        "late",
        "rounds",
        "hints",
        "hinted pg",
        "sent pg",
        "iters",
        "mismatch",
        "failed",
    ];
    let line: Vec<String> = header.iter().map(|h| format!("{h:>9}")).collect();
    println!("{}", line.join(" "));
    for (name, t) in rows {
        let cells = [
            t.seeds,
            t.migrations,
            t.with_writer,
            t.lagging,
            t.writer_mib,
            t.shrinker_blocks,
            t.seeds_with_shrinker,
            t.cancelled,
            t.cancel_too_late,
            t.reset,
            t.reset_too_late,
            t.rounds,
            t.hints_accepted,
            t.hinted_pages,
            t.pages_sent,
            t.iterations,
            t.mismatched_pages,
            t.failing_seeds,
        ];
        let mut line = vec![format!("{name:>9}")];
        line.extend(cells.iter().map(|c| format!("{c:>9}")));
        println!("{}", line.join(" "));
    }
}

#[test]
fn precopy_stress_loses_no_page() {
    let seeds: Vec<u64> = match env_u64("PRECOPY_STRESS_SEED") {
        Some(one) => vec![one],
        None => (1..=env_u64("PRECOPY_STRESS_SEEDS").unwrap_or(SEEDS)).collect(),
    };
    let threads = env_u64("PRECOPY_STRESS_THREADS")
        .unwrap_or(4)
        .clamp(1, 64)
        .min(seeds.len() as u64) as usize;
    println!("precopy stress: {} seeds on {threads} threads", seeds.len());
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let results: Mutex<Vec<(Scenario, Outcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                let Some(&seed) = seeds.get(i) else { break };
                let sc = Scenario::new(seed);
                let t = Instant::now();
                let outcome =
                    catch_unwind(AssertUnwindSafe(|| run_seed(&sc))).unwrap_or_else(|panic| {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "(no message)".into());
                        Outcome {
                            failures: vec![format!("panicked: {msg}")],
                            time: t.elapsed(),
                            ..Outcome::default()
                        }
                    });
                let status = if outcome.failures.is_empty() {
                    "ok".to_string()
                } else {
                    format!("FAILED ({} problems)", outcome.failures.len())
                };
                println!(
                    "seed {seed:>4} {:<6} {:>6.2} s  {status}",
                    sc.disruption.name(),
                    outcome.time.as_secs_f64()
                );
                lock(&results).push((sc, outcome));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(sc, _)| sc.seed);
    let elapsed = start.elapsed();

    let mut rows = [
        ("none", Totals::default()),
        ("cancel", Totals::default()),
        ("reset", Totals::default()),
        ("all", Totals::default()),
    ];
    let mut failures = Vec::new();
    let mut slowest = (0, Duration::ZERO);
    for (sc, o) in &results {
        rows[sc.disruption.index()].1.add(o);
        rows[3].1.add(o);
        if o.time > slowest.1 {
            slowest = (sc.seed, o.time);
        }
        if !o.failures.is_empty() {
            failures.push(format!(
                "{}\n    {}",
                sc.describe(),
                o.failures.join("\n    ")
            ));
        }
    }
    println!();
    print_totals(&rows);
    println!(
        "{} seeds in {:.1} s (slowest: seed {} in {:.2} s)",
        results.len(),
        elapsed.as_secs_f64(),
        slowest.0,
        slowest.1.as_secs_f64()
    );

    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
    // With the default seeds (or more), the paths this test is for must have been taken.
    if results.len() as u64 >= SEEDS {
        let all = rows[3].1;
        let lagged = results
            .iter()
            .filter(|(_, o)| o.lagging_device && o.migrations > 0)
            .count();
        assert!(
            all.shrinker_blocks > 0,
            "no writer ever took a block back through the shrinker"
        );
        assert!(lagged > 0, "no migration ran with a lagging device");
        assert!(
            all.cancelled > 0,
            "no migration was cancelled in the middle"
        );
        assert!(
            all.reset > 0,
            "no device was reset in the middle of a migration"
        );
        assert!(all.hints_accepted > 0, "no hint was ever accepted");
    }
}
