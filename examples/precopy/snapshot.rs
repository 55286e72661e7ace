// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The demo's snapshot mode (`--snapshot PATH`): sparse memory snapshots of the model
//! guest, without and with free page hinting, restored and checked.
//!
//! Each run boots a fresh guest as the migrations do (same `--mem`, `--dirty`, `--used`,
//! `--pace`, `--writer`, `--dirty-log`, `--seed`), and writes its memory with
//! `virtio_balloon_precopy::snapshot::Snapshot` into a sparse file: zero pages and hinted
//! pages stay holes, and the description (`<file>.layout`) is written last. With hints the
//! balloon's hint round is waited for (`--wait`, `--wait-deadline`) before the guest is
//! stopped (`--snapshot-mode stopped`) or before the first live pass (`live`).
//!
//! Then, with the guest still stopped, the snapshot is read back two ways and every page
//! the guest holds is compared with what the model last wrote there and with the guest's own
//! memory (the checks the migrations make of their destination):
//!
//! * `SnapshotFile::restore_into` fresh anonymous memory of the same regions, with the
//!   file's page cache dropped first (so the restore reads the disk, as it would on another
//!   host or after a reboot); it reads only the file's data extents;
//! * `SnapshotFile::map_private`: each region mapped `MAP_PRIVATE` from the file, the way
//!   Firecracker and Cloud Hypervisor restore.
//!
//! `Snapshot::write` resumes the guest as soon as the snapshot is complete. The model's
//! checks need a guest that writes nothing, so the demo hands it a [`VmControl`] that holds
//! the guest stopped until the checks are done, and resumes it then.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_model::{Guest, GuestVm, MIB};
use virtio_balloon_precopy::snapshot::{
    description_path, RestoreStats, Snapshot, SnapshotError, SnapshotFile, SnapshotMode,
    SnapshotReport,
};
use virtio_balloon_precopy::{VmControl, VmControlError};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::kvm_source::KvmSource;
use crate::{mib, progress, reduction, Options, Runs, Source, VcpuReport};

/// The snapshots one demo run writes: `(label, memory file)`, the one without hints first.
fn snapshot_paths(o: &Options) -> Vec<(&'static str, bool, PathBuf)> {
    let Some(prefix) = &o.snapshot else {
        return Vec::new();
    };
    let dir = prefix.is_dir() || prefix.as_os_str().to_string_lossy().ends_with('/');
    let path = |name: &str| {
        if dir {
            prefix.join(name)
        } else {
            let mut p = prefix.as_os_str().to_owned();
            p.push(".");
            p.push(name);
            PathBuf::from(p)
        }
    };
    let mut paths = Vec::new();
    if o.runs != Runs::Hints {
        paths.push(("without hints", false, path("plain")));
    }
    if o.runs != Runs::Plain {
        paths.push(("with hints", true, path("hints")));
    }
    paths
}

/// Before anything boots: refuses to overwrite an existing snapshot (memory file or
/// description) without `--overwrite`, and creates the `--snapshot` directory when the path
/// ends in `/`. Does nothing without `--snapshot`.
pub(crate) fn check_paths(o: &Options) -> Result<(), String> {
    let Some(prefix) = &o.snapshot else {
        return Ok(());
    };
    if prefix.as_os_str().to_string_lossy().ends_with('/') && !prefix.is_dir() {
        std::fs::create_dir_all(prefix)
            .map_err(|e| format!("--snapshot: creating {}: {e}", prefix.display()))?;
    }
    if o.overwrite {
        return Ok(());
    }
    let existing: Vec<String> = snapshot_paths(o)
        .into_iter()
        .flat_map(|(_, _, p)| [description_path(&p), p].into_iter().rev())
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "--snapshot: {} already exist{}; pass --overwrite to replace {}, or choose another \
             path",
            existing.join(", "),
            if existing.len() == 1 { "s" } else { "" },
            if existing.len() == 1 { "it" } else { "them" }
        ))
    }
}

/// The line that says what the snapshots are of.
pub(crate) fn describe(o: &Options, log_line: &str) {
    println!("{log_line}");
    println!(
        "snapshot mode: {}; guest {} MiB, dirtied and freed {} MiB, uses {} MiB; writer {}; \
         driver pace {:?} per 4 MiB block; wait for the hint round: {}{}",
        match o.snapshot_mode {
            SnapshotMode::Live => format!(
                "live (downtime limit {:?}, bandwidth {})",
                o.downtime,
                o.bandwidth_text()
            ),
            _ => "stopped".into(),
        },
        o.mem / MIB,
        o.dirty / MIB,
        o.used / MIB,
        o.writer_text(),
        o.pace,
        if o.wait { "on" } else { "off" },
        if o.wait {
            format!(" (deadline {:?})", o.wait_deadline)
        } else {
            String::new()
        }
    );
}

/// The guest's [`VmControl`] for a snapshot: stops it when the snapshot asks, but holds a
/// resume until [`release`](Self::release), so the demo checks the snapshot against a guest
/// that writes nothing. It notes when the guest was stopped and when the snapshot asked to
/// resume it: the guest's real pause, which includes making the file durable.
struct HeldStopped {
    vm: GuestVm,
    resume_pending: bool,
    stopped_at: Option<Instant>,
    resume_asked_at: Option<Instant>,
}

impl VmControl for HeldStopped {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        self.vm.stop_vm()?;
        self.stopped_at = Some(Instant::now());
        Ok(())
    }

    fn resume_vm(&mut self) {
        self.resume_asked_at.get_or_insert_with(Instant::now);
        self.resume_pending = true;
    }
}

impl HeldStopped {
    /// Resumes the guest if the snapshot asked for it.
    fn release(&mut self) {
        if std::mem::take(&mut self.resume_pending) {
            self.vm.resume_vm();
        }
    }
}

/// One snapshot's outcome.
struct SnapResult {
    path: PathBuf,
    report: SnapshotReport,
    /// `Snapshot::write` from call to return: the copy, then making the file durable and
    /// writing its description.
    write_time: Duration,
    /// From the guest stopped to the snapshot asking to resume it.
    paused: Duration,
    /// Opening the snapshot and `restore_into` fresh memory (cold page cache).
    restore_time: Duration,
    restore: RestoreStats,
    /// Opening the snapshot and `map_private`.
    map_time: Duration,
    used: u64,
    /// Pages of the guest that differ in the memory `restore_into` filled.
    restored_mismatches: Vec<GuestAddress>,
    /// Pages of the guest that differ in the `MAP_PRIVATE` mapping.
    mapped_mismatches: Vec<GuestAddress>,
    writer_pages: u64,
    vcpu: Option<VcpuReport>,
    log_clear_failures: u64,
}

/// Every page the guest holds that differs in `dst`: against what the model last wrote
/// there, and against the guest's memory. Call it with the guest stopped.
fn differing<B: vm_memory::Bytes<GuestAddress>>(guest: &Guest, dst: &B) -> Vec<GuestAddress> {
    let mut mismatches = guest.stale_pages(dst);
    mismatches.extend(guest.pages_differing_from(dst));
    mismatches.sort();
    mismatches.dedup();
    mismatches
}

/// Drops the file's pages from the page cache (they are clean: the snapshot was synced), so
/// a restore reads the disk. Best effort.
fn drop_page_cache(path: &Path) {
    if let Ok(f) = File::open(path) {
        // SAFETY: posix_fadvise on a descriptor we own, with no pointer argument.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Boots a guest, writes its snapshot to `path`, restores it both ways and checks every page
/// the guest holds.
fn take(o: &Options, hinting: bool, label: &str, path: &Path) -> Result<SnapResult, String> {
    let source = Source::start(o, hinting)?;
    let Source {
        guest,
        kvm,
        chain,
        config,
    } = &source;
    let src = guest.mem().clone();
    let mut snapshot = Snapshot::new(&*src, &guest.bitmap, chain)
        .mode(o.snapshot_mode)
        .config(*config)
        .overwrite(o.overwrite);
    if hinting && o.wait {
        snapshot = snapshot.wait_for_hint_round(guest.hints(), o.wait_deadline);
    }
    let mut vm = HeldStopped {
        vm: guest.vm_control(),
        resume_pending: false,
        stopped_at: None,
        resume_asked_at: None,
    };
    let mut log = source.dirty_log(&src);
    let start = Instant::now();
    let written = snapshot.write(&mut *log, &mut vm, path);
    let write_time = start.elapsed();
    drop(log);
    let report = match written {
        Ok(r) => r,
        Err(e @ SnapshotError::Exists { .. }) => {
            return Err(format!("{e}: pass --overwrite to replace it"))
        }
        Err(e) => return Err(format!("writing {} failed: {e}", path.display())),
    };
    assert!(
        guest.is_stopped(),
        "[{label}] the guest runs after its snapshot: the checks need it stopped"
    );

    // Restore into fresh anonymous memory of the same regions, from a cold page cache.
    let ranges: Vec<(GuestAddress, usize)> = src
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    drop_page_cache(path);
    let start = Instant::now();
    let file = SnapshotFile::open(path).map_err(|e| format!("opening the snapshot: {e}"))?;
    let fresh = GuestMemoryMmap::<()>::from_ranges(&ranges)
        .map_err(|e| format!("allocating fresh memory: {e}"))?;
    let restore = file
        .restore_into(&fresh)
        .map_err(|e| format!("restoring the snapshot: {e}"))?;
    let restore_time = start.elapsed();
    let restored_mismatches = differing(guest, &fresh);
    drop(fresh);

    // Map it MAP_PRIVATE, as a VMM restores: the check faults in the pages it reads.
    let start = Instant::now();
    let file = SnapshotFile::open(path).map_err(|e| format!("opening the snapshot: {e}"))?;
    let mapped = file
        .map_private()
        .map_err(|e| format!("mapping the snapshot: {e}"))?;
    let map_time = start.elapsed();
    let mapped_mismatches = differing(guest, &mapped);
    drop(mapped);

    let writer_pages = if o.writer > 0 {
        guest.stop_writer().pages_written
    } else {
        0
    };
    let paused = match (vm.stopped_at, vm.resume_asked_at) {
        (Some(stop), Some(resume)) => resume.saturating_duration_since(stop),
        _ => Duration::ZERO,
    };
    let result = SnapResult {
        path: path.to_path_buf(),
        report,
        write_time,
        paused,
        restore_time,
        restore,
        map_time,
        used: guest.used_bytes(),
        restored_mismatches,
        mapped_mismatches,
        writer_pages,
        vcpu: kvm.as_ref().and_then(KvmSource::vcpu_stats),
        log_clear_failures: guest.bitmap.log_clear_failures(),
    };
    // The snapshot is checked: let the guest run on, as `Snapshot::write` asked.
    vm.release();
    Ok(result)
}

/// Prints the pages of a run that differ; returns whether there were none.
fn check(label: &str, r: &SnapResult) -> bool {
    let mut ok = true;
    for (how, pages) in [
        ("restored into fresh memory", &r.restored_mismatches),
        ("mapped MAP_PRIVATE", &r.mapped_mismatches),
    ] {
        if pages.is_empty() {
            continue;
        }
        ok = false;
        eprintln!(
            "[{label}] {} pages differ in the snapshot {how}:",
            pages.len()
        );
        for gpa in pages.iter().take(20) {
            eprintln!("  page {:#x}", gpa.0);
        }
    }
    ok
}

/// Takes the snapshots `--runs` asks for, prints the comparison, and returns whether every
/// page the guest holds came back.
pub(crate) fn compare(o: &Options) -> bool {
    let mut ok = true;
    let mut results: Vec<Option<SnapResult>> = Vec::new();
    let paths = snapshot_paths(o);
    for hinting in [false, true] {
        let Some((label, _, path)) = paths.iter().find(|(_, h, _)| *h == hinting) else {
            results.push(None);
            continue;
        };
        println!("snapshot {label} -> {} ...", path.display());
        match take(o, hinting, label, path) {
            Ok(r) => {
                if !o.quiet {
                    // The snapshot has no progress hook: its iterations, afterwards.
                    for it in &r.report.copy.iterations {
                        progress(label, it);
                    }
                }
                results.push(Some(r))
            }
            Err(e) => {
                eprintln!("[{label}] {e}");
                ok = false;
                results.push(None);
            }
        }
    }
    let (plain, hinted) = (&results[0], &results[1]);

    println!();
    println!(
        "{:<34} {:>16} {:>16} {:>10}",
        "", "without hints", "with hints", "reduction"
    );
    let show = |r: &Option<SnapResult>, f: &dyn Fn(&SnapResult) -> String| {
        r.as_ref().map_or_else(|| "-".to_string(), f)
    };
    let reduce = |f: fn(&SnapResult) -> f64| match (plain, hinted) {
        (Some(p), Some(h)) => reduction(f(p), f(h)),
        _ => "-".into(),
    };
    let row = |name: &str, f: &dyn Fn(&SnapResult) -> String, red: String| {
        println!(
            "{:<34} {:>16} {:>16} {:>10}",
            name,
            show(plain, f),
            show(hinted, f),
            red
        );
    };
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    row(
        "file size (apparent)",
        &|r| format!("{:.1} MiB", mib(r.report.file.file_len)),
        String::new(),
    );
    row(
        "allocated on disk (st_blocks)",
        &|r| format!("{:.1} MiB", mib(r.report.file.allocated_bytes)),
        reduce(|r| r.report.file.allocated_bytes as f64),
    );
    row(
        "pages written",
        &|r| r.report.file.data_pages.to_string(),
        reduce(|r| r.report.file.data_pages as f64),
    );
    row(
        "zero pages (left holes)",
        &|r| r.report.file.zero_pages.to_string(),
        String::new(),
    );
    row(
        "pages skipped (hints)",
        &|r| r.report.copy.hinted_pages.to_string(),
        String::new(),
    );
    row(
        "snapshot time (copy)",
        &|r| secs(r.report.copy.total_time),
        reduce(|r| r.report.copy.total_time.as_secs_f64()),
    );
    row(
        "  with fsync and description",
        &|r| secs(r.write_time),
        reduce(|r| r.write_time.as_secs_f64()),
    );
    row(
        "downtime (the copy's)",
        &|r| ms(r.report.copy.downtime),
        String::new(),
    );
    row(
        "  guest stopped until resumed",
        &|r| ms(r.paused),
        reduce(|r| r.paused.as_secs_f64()),
    );
    row(
        "iterations",
        &|r| r.report.copy.iterations.len().to_string(),
        String::new(),
    );
    row(
        "hint round wait",
        &|r| match r.report.copy.hint_round_completed {
            Some(done) => format!(
                "{:.0} ms{}",
                r.report.copy.hint_wait.as_secs_f64() * 1e3,
                if done { "" } else { " (deadline)" }
            ),
            None => "-".into(),
        },
        String::new(),
    );
    row(
        "restore into fresh memory",
        &|r| secs(r.restore_time),
        reduce(|r| r.restore_time.as_secs_f64()),
    );
    row(
        "  read from the file",
        &|r| format!("{:.1} MiB", mib(r.restore.bytes_read)),
        reduce(|r| r.restore.bytes_read as f64),
    );
    row(
        "restore by MAP_PRIVATE (map)",
        &|r| ms(r.map_time),
        String::new(),
    );
    row(
        "the guest holds",
        &|r| format!("{:.1} MiB", mib(r.used)),
        String::new(),
    );
    row(
        "pages differing (restored)",
        &|r| r.restored_mismatches.len().to_string(),
        String::new(),
    );
    row(
        "pages differing (MAP_PRIVATE)",
        &|r| r.mapped_mismatches.len().to_string(),
        String::new(),
    );

    for (label, r) in [("without hints", plain), ("with hints", hinted)] {
        let Some(r) = r else { continue };
        ok &= check(label, r);
        if r.writer_pages > 0 {
            println!("[{label}] the writer wrote {} pages", r.writer_pages);
        }
        if let Some(v) = r.vcpu {
            println!(
                "[{label}] the vCPU wrote {} of them in {} KVM_RUNs",
                v.pages, v.runs
            );
        }
        if r.log_clear_failures > 0 {
            println!(
                "[{label}] {} hinted ranges were written anyway: clearing them in KVM failed",
                r.log_clear_failures
            );
        }
    }
    if let Some(h) = hinted {
        println!(
            "the guest holds {:.1} MiB; with hints its snapshot allocates {:.1} MiB on disk \
             ({:.2} x what it holds)",
            mib(h.used),
            mib(h.report.file.allocated_bytes),
            h.report.file.allocated_bytes as f64 / h.used.max(1) as f64
        );
    }
    let kept: Vec<String> = [plain, hinted]
        .into_iter()
        .flatten()
        .map(|r| r.path.display().to_string())
        .collect();
    if !kept.is_empty() {
        println!(
            "snapshots kept: {} (each with its .layout); see them with du -h --apparent-size \
             and du -h",
            kept.join(", ")
        );
    }
    if ok {
        println!("every page the guest holds is identical in each restored snapshot");
    }
    ok
}
