// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live migration of a guest, without and with free page hinting, in one process.
//!
//! The source guest is real `vm-memory` guest memory with vm-memory's dirty bitmap, the
//! balloon device behind virtio-mmio with its split rings, eventfds and `event-manager`
//! thread, and a model of the Linux driver (the `guest-model` crate) running on its own threads with
//! a page allocator and an optional writer workload. The reference precopy loop
//! (`virtio_balloon_precopy::Precopy`) sends its memory over a loopback TCP socket to a
//! destination that applies it with `Receiver`. After each migration every page the guest
//! holds as allocated is compared between source and destination.
//!
//! The migration's dirty log comes from real KVM when the example is built with the `kvm`
//! feature and `/dev/kvm` works: the source guest memory is registered with a KVM VM as a
//! dirty-logged memory slot, `KVM_GET_DIRTY_LOG` (with manual protection, cleared before
//! each page is sent or hinted) reports what a vCPU wrote, and the writer workload's pages
//! are written by that vCPU, so only KVM's log sees them. What the host writes itself (the
//! device's used ring, the driver model's rings and allocator, the vCPU's code and buffers)
//! goes through vm-memory, whose write tracking is joined to KVM's log. Otherwise, or with
//! `--dirty-log tracking`, vm-memory's write tracking is the whole dirty log and the writer
//! writes through vm-memory too.
//!
//! With `--snapshot PATH` the demo writes sparse memory snapshots instead
//! (`virtio_balloon_precopy::snapshot`): one without and one with hints, each restored into
//! fresh memory and mapped `MAP_PRIVATE`, and every page the guest holds compared; see
//! [`snapshot`].
//!
//! The files: `main.rs` the flags and the migrations, `snapshot.rs` the snapshot mode,
//! `kvm_source.rs` KVM's side of either.
//!
//! ```sh
//! cargo run --release --example precopy                 # 4 GiB guest, 3.5 GiB freed, idle
//! cargo run --release --features kvm --example precopy  # the same on KVM's dirty log
//! cargo run --release --example precopy -- --snapshot /tmp/demo-snap  # snapshots instead
//! cargo run --release --example precopy -- --help       # the flags
//! ```

mod kvm_source;
mod snapshot;

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_model::{Destination, Guest, GuestSpec, WriterSpec, MIB};
use kvm_source::KvmSource;
use virtio_balloon::migration::{DirtyLog, GuestMemoryDirtyLog, PrecopyNotifierChain};
use virtio_balloon_precopy::snapshot::SnapshotMode;
use virtio_balloon_precopy::{
    IterationStats, MigrationReport, Precopy, PrecopyConfig, ReceiveStats,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const GIB: u64 = 1 << 30;

const HELP: &str = "\
Live-migrates a model guest from a source to a destination in this process, over loopback
TCP, first without and then with free page hinting, and prints what each run cost. With
--snapshot PATH it writes sparse memory snapshots of the guest instead, without and with
hints, restores them and compares every page.

USAGE: cargo run --release --example precopy -- [FLAGS]

  --mem SIZE          guest memory (default 4G)
  --dirty SIZE        memory the guest dirtied with non-zero data and then freed before the
                      migration (default 3.5G; at most what is free)
  --used SIZE         memory the guest really uses, written at boot (default 48M)
  --writer MIB_PER_S  a workload that keeps dirtying memory at this rate during the migration,
                      like a kernel build: it allocates 4 MiB blocks (taking them back from
                      the balloon driver through its shrinker when none is free), writes
                      them, and frees the oldest beyond its working set (default 0: idle)
  --working-set SIZE  what the writer keeps allocated (default 256M)
  --pace DURATION     the driver's pause per hinted 4 MiB block: 0 = as fast as it can,
                      1ms = like a guest under software emulation (default 0)
  --wait on|off       before the first pass, wait for the guest to finish its hint round, so
                      pages are not sent just before their hint arrives (default on)
  --wait-deadline DURATION  the longest that wait lasts (default 10s)
  --downtime DURATION the downtime limit that decides convergence (default 300ms)
  --bandwidth MIB_PER_S  cap the sending rate while the guest runs (default 0: unlimited)
  --runs both|plain|hints  which migrations to run (default both)
  --sweep sizes|pace  instead of one comparison: a table over guest sizes 1, 2, 4, 8 GiB
                      (dirty = 7/8 of the guest), or over the driver's pace with and without
                      waiting for the round
  --dirty-log kvm|tracking  where the migration's dirty log comes from. kvm: the source
                      memory is a KVM memory slot and KVM_GET_DIRTY_LOG (manual protection)
                      reports what a vCPU wrote: the writer's pages. It is joined with
                      vm-memory's write tracking for what the host writes (device, driver
                      model). Needs /dev/kvm and a build with --features kvm. Where the
                      vCPU's code is emulated (PVM) it takes about 1 ms a page, which caps
                      the writer near 4 MiB/s; the demo prints the rate it got.
                      tracking: vm-memory's write tracking only, the writer writing through
                      vm-memory. Default: kvm when it is usable, else tracking
  --snapshot PATH     instead of migrating: write a sparse memory snapshot of the guest
                      without hints (PATH.plain) and one with hints (PATH.hints), each
                      with its description (PATH.plain.layout, PATH.hints.layout); if PATH
                      is a directory (or ends in /): PATH/plain and PATH/hints. Each is
                      restored into fresh memory and mapped MAP_PRIVATE, and every page the
                      guest holds is compared. The files stay for you to inspect (du -h).
                      Takes the flags above except --sweep; --downtime and --bandwidth
                      matter in live mode only
  --snapshot-mode stopped|live  stopped: the guest runs its hint round (--wait), then is
                      stopped and written in one stage. live: precopy iterations into the
                      file while it runs, then a final stage stopped (default stopped)
  --overwrite         replace existing snapshots at the --snapshot path (without it the
                      demo refuses, before booting anything)
  --seed N            seed of the page contents and the writer (default 1)
  --quiet             no progress line per iteration
  --help              this text

SIZE: a number of bytes with an optional K, M or G suffix (3.5G, 512M).
DURATION: a number with ns, us, ms or s (1ms, 250us, 10s); a bare 0 is zero.

Exit status 1 if any page the guest holds differs on the destination (or in a restored
snapshot), 2 on bad flags, when --dirty-log kvm cannot be had, or when a snapshot exists
and --overwrite was not given.";

#[derive(Clone, Debug)]
struct Options {
    mem: u64,
    dirty: u64,
    used: u64,
    writer: u64,
    working_set: u64,
    pace: Duration,
    wait: bool,
    wait_deadline: Duration,
    downtime: Duration,
    bandwidth: u64,
    runs: Runs,
    sweep: Option<Sweep>,
    /// As asked on the command line (`None`: pick).
    dirty_log_flag: Option<LogSource>,
    /// What runs (resolved in `main`).
    dirty_log: LogSource,
    seed: u64,
    quiet: bool,
    /// `--snapshot`: where the snapshots go (`None`: migrate).
    snapshot: Option<PathBuf>,
    snapshot_mode: SnapshotMode,
    overwrite: bool,
}

/// Where the migration's dirty log comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogSource {
    /// KVM's dirty log of the vCPU's writes, joined with vm-memory's write tracking.
    Kvm,
    /// vm-memory's write tracking only.
    Tracking,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runs {
    Both,
    Plain,
    Hints,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sweep {
    Sizes,
    Pace,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mem: 4 * GIB,
            dirty: 3584 * MIB,
            used: 48 * MIB,
            writer: 0,
            working_set: 256 * MIB,
            pace: Duration::ZERO,
            wait: true,
            wait_deadline: Duration::from_secs(10),
            downtime: Duration::from_millis(300),
            bandwidth: 0,
            runs: Runs::Both,
            sweep: None,
            dirty_log_flag: None,
            dirty_log: LogSource::Tracking,
            seed: 1,
            quiet: false,
            snapshot: None,
            snapshot_mode: SnapshotMode::Stopped,
            overwrite: false,
        }
    }
}

impl Options {
    /// The writer's rate, or that there is none, for the run's description.
    fn writer_text(&self) -> String {
        if self.writer > 0 {
            format!("{} MiB/s", self.writer)
        } else {
            "off (idle guest)".into()
        }
    }

    /// The bandwidth limit, for the run's description.
    fn bandwidth_text(&self) -> String {
        if self.bandwidth > 0 {
            format!("{} MiB/s", self.bandwidth)
        } else {
            "unlimited".into()
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], MIB),
        Some('G') => (&s[..s.len() - 1], GIB),
        _ => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad size '{s}'"))?;
    if !(0.0..=(1u64 << 50) as f64).contains(&v) {
        return Err(format!("size '{s}' out of range"));
    }
    Ok((v * mult as f64) as u64)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad duration '{s}'"))?;
    let secs = match unit {
        "ns" => v / 1e9,
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "" if v == 0.0 => 0.0,
        _ => return Err(format!("bad duration '{s}' (use ns, us, ms or s)")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_args() -> Result<Option<Options>, String> {
    let mut o = Options::default();
    let mut dirty_set = false;
    let mut snapshot_mode_set = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        if flag == "--quiet" {
            o.quiet = true;
            continue;
        }
        if flag == "--overwrite" {
            o.overwrite = true;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value (see --help)"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("bad number '{v}'"));
        match flag.as_str() {
            "--mem" => o.mem = parse_size(&value)?,
            "--dirty" => {
                o.dirty = parse_size(&value)?;
                dirty_set = true;
            }
            "--used" => o.used = parse_size(&value)?,
            "--writer" => o.writer = num(&value)?,
            "--working-set" => o.working_set = parse_size(&value)?,
            "--pace" => o.pace = parse_duration(&value)?,
            "--wait" => {
                o.wait = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("--wait takes on or off, not '{value}'")),
                }
            }
            "--wait-deadline" => o.wait_deadline = parse_duration(&value)?,
            "--downtime" => o.downtime = parse_duration(&value)?,
            "--bandwidth" => o.bandwidth = num(&value)?,
            "--runs" => {
                o.runs = match value.as_str() {
                    "both" => Runs::Both,
                    "plain" => Runs::Plain,
                    "hints" => Runs::Hints,
                    _ => return Err(format!("--runs takes both, plain or hints, not '{value}'")),
                }
            }
            "--sweep" => {
                o.sweep = Some(match value.as_str() {
                    "sizes" => Sweep::Sizes,
                    "pace" => Sweep::Pace,
                    _ => return Err(format!("--sweep takes sizes or pace, not '{value}'")),
                })
            }
            "--dirty-log" => {
                o.dirty_log_flag = Some(match value.as_str() {
                    "kvm" => LogSource::Kvm,
                    "tracking" => LogSource::Tracking,
                    _ => return Err(format!("--dirty-log takes kvm or tracking, not '{value}'")),
                })
            }
            "--seed" => o.seed = num(&value)?,
            "--snapshot" => {
                if value.is_empty() {
                    return Err("--snapshot needs a path".into());
                }
                o.snapshot = Some(PathBuf::from(value));
            }
            "--snapshot-mode" => {
                snapshot_mode_set = true;
                o.snapshot_mode = match value.as_str() {
                    "stopped" => SnapshotMode::Stopped,
                    "live" => SnapshotMode::Live,
                    _ => {
                        return Err(format!(
                            "--snapshot-mode takes stopped or live, not '{value}'"
                        ))
                    }
                }
            }
            _ => return Err(format!("unknown flag {flag} (see --help)")),
        }
    }
    if o.mem % (4 * MIB) != 0 || o.mem < 64 * MIB {
        return Err("--mem must be a multiple of 4M and at least 64M".into());
    }
    if o.snapshot.is_none() && (snapshot_mode_set || o.overwrite) {
        return Err("--snapshot-mode and --overwrite go with --snapshot PATH".into());
    }
    if o.snapshot.is_some() && o.sweep.is_some() {
        return Err("--sweep migrates; it does not go with --snapshot".into());
    }
    if !dirty_set && o.mem != Options::default().mem {
        o.dirty = o.mem / 8 * 7;
    }
    Ok(Some(o))
}

/// What the vCPU that writes the writer's pages did in one migration.
#[derive(Clone, Copy, Debug)]
struct VcpuReport {
    /// Pages it wrote.
    pages: u64,
    /// Its `KVM_RUN`s.
    runs: u64,
    /// Time spent writing them.
    busy: Duration,
    /// Writer pages the vCPU cannot write (at or above 4 GiB, or the local APIC's page),
    /// written through vm-memory instead.
    host_pages: u64,
}

/// One migration's outcome.
struct RunResult {
    report: MigrationReport,
    received: ReceiveStats,
    used: u64,
    mismatches: Vec<GuestAddress>,
    writer_pages: u64,
    shrinker_blocks: u64,
    /// With KVM and a writer: what the vCPU did.
    vcpu: Option<VcpuReport>,
    /// Hinted ranges kept in the bitmap because clearing them in KVM failed.
    log_clear_failures: u64,
}

fn progress(label: &str, it: &IterationStats) {
    let stage = if it.final_stage {
        "final stage".to_string()
    } else {
        format!("iteration {}", it.iteration)
    };
    println!(
        "  [{label}] {stage}: sent {:.1} MiB ({} pages, {} zero), {} pages skipped by hints, \
         {:.3} s, {} pages dirty after the sync",
        it.bytes as f64 / MIB as f64,
        it.pages_sent,
        it.zero_pages,
        it.hinted_pages,
        it.duration.as_secs_f64(),
        it.dirty_after_sync
    );
}

/// A source guest as every run starts it: booted; KVM's side if the run uses KVM's dirty log
/// (the memory slot, the dirty log with manual protection as the bitmap's clear step, and
/// the vCPU for the writer); its writer running; the run's notifier chain and loop settings.
struct Source {
    guest: Guest,
    kvm: Option<KvmSource>,
    chain: PrecopyNotifierChain,
    config: PrecopyConfig,
}

impl Source {
    fn start(o: &Options, hinting: bool) -> Result<Source, String> {
        let spec = GuestSpec {
            hinting,
            block_pace: o.pace,
            seed: o.seed,
            ..GuestSpec::new(o.mem, o.used, o.dirty)
        };
        let guest = Guest::boot(&spec);
        let mut kvm = (o.dirty_log == LogSource::Kvm)
            .then(|| KvmSource::new(&guest, o.writer > 0))
            .transpose()
            .map_err(|e| format!("setting up KVM failed: {e}"))?;
        if o.writer > 0 {
            let writer = WriterSpec {
                seed: o.seed,
                ..WriterSpec::new(o.writer * MIB, o.working_set)
            };
            match kvm.as_mut().and_then(KvmSource::take_page_writer) {
                Some(vcpu) => guest.start_writer_with(writer, vcpu),
                None => guest.start_writer(writer),
            }
        }
        let mut chain = PrecopyNotifierChain::new();
        if hinting {
            chain.add(Arc::new(guest.hints()));
        }
        let config = PrecopyConfig::default()
            .with_downtime_limit(o.downtime)
            .with_max_bandwidth((o.bandwidth > 0).then_some(o.bandwidth * MIB));
        Ok(Source {
            guest,
            kvm,
            chain,
            config,
        })
    }

    /// The run's dirty log over `src` (the guest's memory): KVM's or vm-memory's bitmaps.
    fn dirty_log<'a>(&'a self, src: &'a GuestMemoryMmap<AtomicBitmap>) -> Box<dyn DirtyLog + 'a> {
        match &self.kvm {
            Some(k) => k.dirty_log(src),
            None => Box::new(GuestMemoryDirtyLog::new(src)),
        }
    }
}

/// Boots a source guest, migrates it to a fresh destination over loopback TCP, and checks
/// every allocated page.
fn migrate(o: &Options, hinting: bool, label: &str) -> RunResult {
    let (destination, stream) = Destination::spawn(o.mem, true, "destination".into(), 1 << 20);
    let source = Source::start(o, hinting).unwrap_or_else(|e| panic!("[{label}] {e}"));
    let Source {
        guest,
        kvm,
        chain,
        config,
    } = &source;
    let src = guest.mem().clone();
    let mut precopy = Precopy::new(&*src, &guest.bitmap, chain).config(*config);
    if hinting && o.wait {
        precopy = precopy.wait_for_hint_round(guest.hints(), o.wait_deadline);
    }
    if !o.quiet {
        precopy = precopy.on_iteration(|it| progress(label, it));
    }
    let mut vm = guest.vm_control();
    let mut log = source.dirty_log(&src);
    let report = precopy
        .run(
            &mut *log,
            &mut vm,
            BufWriter::with_capacity(1 << 20, stream),
        )
        .unwrap_or_else(|e| panic!("[{label}] migration failed: {e}"));
    drop(log);
    let (received, dst) = destination.join();
    let received = received.unwrap_or_else(|e| panic!("[{label}] destination failed: {e}"));

    // The guest is stopped: compare every page it holds, source against destination, and
    // against what the model last wrote there.
    let mut mismatches = guest.stale_pages(&*dst);
    mismatches.extend(guest.pages_differing_from(&*dst));
    mismatches.sort();
    mismatches.dedup();
    let (writer_pages, shrinker_blocks) = if o.writer > 0 {
        let w = guest.stop_writer();
        (w.pages_written, w.blocks_from_shrinker)
    } else {
        (0, 0)
    };
    RunResult {
        report,
        received,
        used: guest.used_bytes(),
        mismatches,
        writer_pages,
        shrinker_blocks,
        vcpu: kvm.as_ref().and_then(KvmSource::vcpu_stats),
        log_clear_failures: guest.bitmap.log_clear_failures(),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn reduction(before: f64, after: f64) -> String {
    if before > 0.0 {
        format!("{:.1}%", 100.0 * (1.0 - after / before))
    } else {
        "-".into()
    }
}

/// Prints the mismatches of a run; returns whether there were none.
fn check(label: &str, r: &RunResult) -> bool {
    if r.mismatches.is_empty() {
        return true;
    }
    eprintln!(
        "[{label}] {} pages differ on the destination:",
        r.mismatches.len()
    );
    for gpa in r.mismatches.iter().take(20) {
        eprintln!("  page {:#x}", gpa.0);
    }
    false
}

fn describe(o: &Options, log_line: &str) {
    println!("{log_line}");
    println!(
        "guest {} MiB, dirtied and freed {} MiB, uses {} MiB; writer {}; driver pace {:?} per \
         4 MiB block; wait for the hint round: {}; downtime limit {:?}; bandwidth {}",
        o.mem / MIB,
        o.dirty / MIB,
        o.used / MIB,
        o.writer_text(),
        o.pace,
        if o.wait { "on" } else { "off" },
        o.downtime,
        o.bandwidth_text()
    );
}

fn compare(o: &Options) -> bool {
    let plain = (o.runs != Runs::Hints).then(|| {
        println!("migrating without hints ...");
        migrate(o, false, "without hints")
    });
    let hinted = (o.runs != Runs::Plain).then(|| {
        println!("migrating with hints ...");
        migrate(o, true, "with hints")
    });
    println!();
    println!(
        "{:<28} {:>16} {:>16} {:>10}",
        "", "without hints", "with hints", "reduction"
    );
    let show = |r: &Option<RunResult>, f: fn(&RunResult) -> String| {
        r.as_ref().map_or_else(|| "-".to_string(), f)
    };
    let reduce = |f: fn(&RunResult) -> f64| match (&plain, &hinted) {
        (Some(p), Some(h)) => reduction(f(p), f(h)),
        _ => "-".into(),
    };
    let row = |name: &str, f: fn(&RunResult) -> String, red: String| {
        println!(
            "{:<28} {:>16} {:>16} {:>10}",
            name,
            show(&plain, f),
            show(&hinted, f),
            red
        );
    };
    row(
        "migration time",
        |r| format!("{:.2} s", r.report.total_time.as_secs_f64()),
        reduce(|r| r.report.total_time.as_secs_f64()),
    );
    row(
        "sent",
        |r| format!("{:.1} MiB", mib(r.report.bytes)),
        reduce(|r| r.report.bytes as f64),
    );
    row(
        "pages skipped (hints)",
        |r| r.report.hinted_pages.to_string(),
        String::new(),
    );
    row(
        "downtime",
        |r| format!("{:.1} ms", r.report.downtime.as_secs_f64() * 1e3),
        String::new(),
    );
    row(
        "iterations",
        |r| r.report.iterations.len().to_string(),
        String::new(),
    );
    row(
        "hint round wait",
        |r| match r.report.hint_round_completed {
            Some(done) => format!(
                "{:.0} ms{}",
                r.report.hint_wait.as_secs_f64() * 1e3,
                if done { "" } else { " (deadline)" }
            ),
            None => "-".into(),
        },
        String::new(),
    );
    row(
        "pages differing",
        |r| r.mismatches.len().to_string(),
        String::new(),
    );
    let mut ok = true;
    for (label, r) in [("without hints", &plain), ("with hints", &hinted)] {
        if let Some(r) = r {
            ok &= check(label, r);
            if r.writer_pages > 0 {
                println!(
                    "[{label}] the writer wrote {} pages ({} blocks taken back through the \
                     shrinker; {:.1} MiB/s over the migration)",
                    r.writer_pages,
                    r.shrinker_blocks,
                    mib(r.writer_pages * 4096) / r.report.total_time.as_secs_f64().max(1e-9)
                );
            }
            if let Some(v) = r.vcpu {
                println!(
                    "[{label}] the vCPU wrote {} of them in {} KVM_RUNs, {:.2} ms per page \
                     ({:.1} MiB/s at most){}",
                    v.pages,
                    v.runs,
                    v.busy.as_secs_f64() * 1e3 / v.pages.max(1) as f64,
                    mib(v.pages * 4096) / v.busy.as_secs_f64().max(1e-9),
                    if v.host_pages > 0 {
                        format!(
                            "; {} out of its reach (above 4 GiB, or the local APIC's page) \
                             went through vm-memory",
                            if v.host_pages == 1 {
                                "1 page".to_string()
                            } else {
                                format!("{} pages", v.host_pages)
                            }
                        )
                    } else {
                        String::new()
                    }
                );
            }
            if r.log_clear_failures > 0 {
                println!(
                    "[{label}] {} hinted ranges were sent anyway: clearing them in KVM failed",
                    r.log_clear_failures
                );
            }
        }
    }
    if let Some(h) = &hinted {
        let bound = h.used as f64 * 1.5 + 16.0 * MIB as f64;
        println!(
            "the guest holds {:.1} MiB; with hints {:.1} MiB went out ({:.2} x what it holds; \
             target at most 1.5 x + 16 MiB = {:.1} MiB: {})",
            mib(h.used),
            mib(h.report.bytes),
            h.report.bytes as f64 / h.used as f64,
            bound / MIB as f64,
            if (h.report.bytes as f64) <= bound {
                "met"
            } else {
                "missed"
            }
        );
        println!(
            "the destination applied {} pages and {} zero pages ({} of them over data)",
            h.received.pages, h.received.zero_pages, h.received.zero_pages_written
        );
    }
    if ok {
        println!("every page the guest holds is identical on the destination");
    }
    ok
}

fn sweep_sizes(o: &Options) -> bool {
    println!(
        "{:>6} {:>9} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "guest", "freed", "time plain", "time hints", "MiB plain", "MiB hints", "time -", "MiB -"
    );
    let mut ok = true;
    for gib in [1u64, 2, 4, 8] {
        let opts = Options {
            mem: gib * GIB,
            dirty: gib * GIB / 8 * 7,
            quiet: true,
            ..o.clone()
        };
        let p = migrate(&opts, false, "without hints");
        let h = migrate(&opts, true, "with hints");
        ok &= check("without hints", &p) & check("with hints", &h);
        let (tp, th) = (
            p.report.total_time.as_secs_f64(),
            h.report.total_time.as_secs_f64(),
        );
        println!(
            "{:>4}G {:>6} MiB {:>10.2} s {:>10.3} s {:>12.1} {:>12.1} {:>10} {:>10}",
            gib,
            opts.dirty / MIB,
            tp,
            th,
            mib(p.report.bytes),
            mib(h.report.bytes),
            reduction(tp, th),
            reduction(p.report.bytes as f64, h.report.bytes as f64)
        );
    }
    ok
}

fn sweep_pace(o: &Options) -> bool {
    println!(
        "{:>8} {:>6} {:>10} {:>10} {:>12} {:>10}",
        "pace", "wait", "time", "MiB sent", "skipped", "round wait"
    );
    let mut ok = true;
    for pace in [0u64, 100, 1000] {
        for wait in [false, true] {
            let opts = Options {
                pace: Duration::from_micros(pace),
                wait,
                quiet: true,
                ..o.clone()
            };
            let h = migrate(&opts, true, "with hints");
            ok &= check("with hints", &h);
            println!(
                "{:>6}us {:>6} {:>8.3} s {:>10.1} {:>12} {:>8.0} ms",
                pace,
                if wait { "on" } else { "off" },
                h.report.total_time.as_secs_f64(),
                mib(h.report.bytes),
                h.report.hinted_pages,
                h.report.hint_wait.as_secs_f64() * 1e3
            );
        }
    }
    ok
}

/// Picks the dirty log: what `--dirty-log` asked for, else KVM when it is usable. Returns it
/// with the line saying which one runs and why, or the reason `--dirty-log kvm` cannot be had.
fn choose_dirty_log(asked: Option<LogSource>) -> Result<(LogSource, String), String> {
    const KVM: &str = "dirty log: kvm (KVM_GET_DIRTY_LOG with manual protection) + vm-memory \
                       write tracking for host-side writes; the writer's pages are written by a \
                       vCPU";
    const TRACKING: &str = "dirty log: tracking (vm-memory write tracking only; the writer \
                            writes through vm-memory)";
    match asked {
        Some(LogSource::Tracking) => Ok((
            LogSource::Tracking,
            format!("{TRACKING}: --dirty-log tracking"),
        )),
        Some(LogSource::Kvm) => match KvmSource::unusable() {
            None => Ok((LogSource::Kvm, format!("{KVM}: --dirty-log kvm"))),
            Some(why) => Err(format!("--dirty-log kvm: KVM cannot be used: {why}")),
        },
        None => match KvmSource::unusable() {
            None => Ok((LogSource::Kvm, format!("{KVM}: /dev/kvm works"))),
            Some(why) => Ok((LogSource::Tracking, format!("{TRACKING}: {why}"))),
        },
    }
}

fn main() -> ExitCode {
    let mut o = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let log_line = match choose_dirty_log(o.dirty_log_flag) {
        Ok((source, line)) => {
            o.dirty_log = source;
            line
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Refuse to overwrite before booting anything.
    if let Err(e) = snapshot::check_paths(&o) {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    let start = Instant::now();
    if o.snapshot.is_some() {
        snapshot::describe(&o, &log_line);
    } else {
        describe(&o, &log_line);
    }
    let ok = match o.sweep {
        None if o.snapshot.is_some() => snapshot::compare(&o),
        None => compare(&o),
        Some(Sweep::Sizes) => sweep_sizes(&o),
        Some(Sweep::Pace) => sweep_pace(&o),
    };
    println!("(whole run {:.1} s)", start.elapsed().as_secs_f64());
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
