// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sparse snapshots: both modes, multi-region layouts, hints (and hinted pages taken back),
//! restore into fresh memory and by `MAP_PRIVATE`, refusals, and failures in the middle.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_balloon::migration::{
    DirtyLog, DirtyLogError, GuestMemoryDirtyLog, HarvestedLog, MigrationBitmap, NotifierError,
    PrecopyContext, PrecopyEvent, PrecopyNotifier, PrecopyNotifierChain, RegionInfo,
};
use virtio_balloon::sink::FreePageSink;
use virtio_balloon::{Balloon, BalloonConfig};
use virtio_balloon_precopy::snapshot::{
    description_path, Snapshot, SnapshotError, SnapshotFile, SnapshotLayout, SnapshotMode,
    SnapshotRegion, SnapshotWriter,
};
use virtio_balloon_precopy::{
    CancelToken, PageDestination, PrecopyConfig, VmControl, VmControlError,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

mod common;
use common::memory;

type Mem = GuestMemoryMmap<AtomicBitmap>;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

fn pattern(gpa: u64, generation: u8) -> [u8; PAGE as usize] {
    let mut p = [0u8; PAGE as usize];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (gpa >> 12) as u8 ^ (i as u8).wrapping_mul(31) ^ generation | 1;
    }
    p
}

/// A directory of its own for each test, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "snapshot-test-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Counts stops and resumes; optionally fails to stop.
#[derive(Default)]
struct Vm {
    stops: u32,
    resumes: u32,
    fail: bool,
}

impl VmControl for Vm {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        if self.fail {
            return Err("the guest would not stop".into());
        }
        self.stops += 1;
        Ok(())
    }
    fn resume_vm(&mut self) {
        self.resumes += 1;
    }
}

/// Pages of `a` and `b` that differ, over `regions`.
fn differing<A: GuestMemory, B: GuestMemory>(a: &A, b: &B, regions: &[(u64, u64)]) -> Vec<u64> {
    let mut x = [0u8; PAGE as usize];
    let mut y = [0u8; PAGE as usize];
    let mut out = Vec::new();
    for &(start, len) in regions {
        for gpa in (start..start + len).step_by(PAGE as usize) {
            a.read_slice(&mut x, GuestAddress(gpa)).unwrap();
            b.read_slice(&mut y, GuestAddress(gpa)).unwrap();
            if x != y {
                out.push(gpa);
            }
        }
    }
    out
}

const REGIONS: [(u64, u64); 2] = [(0, 4 * MIB), (1 << 32, 2 * MIB)];

fn filled(regions: &[(u64, u64)], every: u64) -> Mem {
    let mem = memory(regions);
    for &(start, len) in regions {
        for gpa in (start..start + len).step_by((every * PAGE) as usize) {
            mem.write_slice(&pattern(gpa, 0), GuestAddress(gpa))
                .unwrap();
        }
    }
    mem
}

#[test]
fn a_stopped_snapshot_restores_both_ways_and_is_sparse() {
    let dir = Dir::new("stopped");
    let mem = filled(&REGIONS, 8);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    let path = dir.path("mem");
    let mut vm = Vm::default();
    let report = Snapshot::new(&mem, &bitmap, &chain)
        .write(&mut GuestMemoryDirtyLog::new(&mem), &mut vm, &path)
        .unwrap();
    assert_eq!((vm.stops, vm.resumes), (1, 1));
    let data_pages = 6 * MIB / PAGE / 8;
    assert_eq!(report.file.data_pages, data_pages);
    assert_eq!(report.copy.pages_sent, data_pages);
    // One final stage only.
    assert_eq!(report.copy.iterations.len(), 1);
    assert!(report.copy.iterations[0].final_stage);
    assert_eq!(report.file.file_len, (1 << 32) + 2 * MIB);
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(report.file.allocated_bytes, meta.blocks() * 512);
    assert!(
        report.file.allocated_bytes < 2 * data_pages * PAGE,
        "allocated {} for {} data pages",
        report.file.allocated_bytes,
        data_pages
    );
    assert!(description_path(&path).exists());

    let snap = SnapshotFile::open(&path).unwrap();
    let restored = memory::<()>(&REGIONS);
    let stats = snap.restore_into(&restored).unwrap();
    assert!(stats.bytes_read >= data_pages * PAGE);
    assert!(differing(&mem, &restored, &REGIONS).is_empty());
    let mapped = snap.map_private().unwrap();
    assert!(differing(&mem, &mapped, &REGIONS).is_empty());
    // Writes to the private mapping never reach the file.
    mapped.write_obj(0xdead_u64, GuestAddress(0)).unwrap();
    let mut page = [0u8; PAGE as usize];
    assert!(snap.read_page(GuestAddress(0), &mut page).unwrap());
    assert_eq!(page, pattern(0, 0));
    assert!(!snap.read_page(GuestAddress(8 * MIB), &mut page).unwrap());
}

#[test]
fn a_layout_of_the_vmms_choice_is_honoured() {
    let dir = Dir::new("layout");
    let mem = filled(&REGIONS, 3);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    // The high region first in the file, then a gap, then the low one.
    let layout = SnapshotLayout::new(vec![
        SnapshotRegion {
            gpa: GuestAddress(0),
            len: 4 * MIB,
            file_offset: 3 * MIB,
        },
        SnapshotRegion {
            gpa: GuestAddress(1 << 32),
            len: 2 * MIB,
            file_offset: 0,
        },
    ])
    .unwrap();
    let path = dir.path("mem");
    let report = Snapshot::new(&mem, &bitmap, &chain)
        .layout(layout.clone())
        .write(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            &path,
        )
        .unwrap();
    assert_eq!(report.file.file_len, 7 * MIB);
    let snap = SnapshotFile::open(&path).unwrap();
    assert_eq!(snap.layout(), &layout);
    let restored = memory::<()>(&REGIONS);
    snap.restore_into(&restored).unwrap();
    assert!(differing(&mem, &restored, &REGIONS).is_empty());
    assert!(differing(&mem, &snap.map_private().unwrap(), &REGIONS).is_empty());
    // The packed layout too.
    let packed = SnapshotLayout::packed(&mem).unwrap();
    assert_eq!(packed.file_len(), 6 * MIB);
    let path = dir.path("packed");
    Snapshot::new(&mem, &bitmap, &chain)
        .layout(packed)
        .write(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            &path,
        )
        .unwrap();
    let restored = memory::<()>(&REGIONS);
    SnapshotFile::open(&path)
        .unwrap()
        .restore_into(&restored)
        .unwrap();
    assert!(differing(&mem, &restored, &REGIONS).is_empty());
    // A layout that misses a region of the bitmap is refused before anything is written.
    let short = SnapshotLayout::new(vec![SnapshotRegion {
        gpa: GuestAddress(0),
        len: 4 * MIB,
        file_offset: 0,
    }])
    .unwrap();
    let path = dir.path("short");
    let err = Snapshot::new(&mem, &bitmap, &chain)
        .layout(short)
        .write(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            &path,
        )
        .unwrap_err();
    assert!(matches!(err, SnapshotError::LayoutMismatch { .. }), "{err}");
    assert!(!path.exists());
}

/// Plays the guest and its balloon: at the round's start (AfterBitmapSync with the guest
/// running) it hints `hinted` pages, then takes `reused` of them back and writes them;
/// at DONE (AfterBitmapSync with the guest stopped) it checks the file is complete.
struct Guest {
    mem: Arc<Mem>,
    bitmap: Arc<MigrationBitmap>,
    hinted: Vec<u64>,
    reused: Vec<u64>,
    file: PathBuf,
    done_checked: AtomicBool,
    events: Mutex<Vec<(PrecopyEvent, bool)>>,
}

impl PrecopyNotifier for Guest {
    fn name(&self) -> &str {
        "guest"
    }
    fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
        self.events.lock().unwrap().push((event, ctx.vm_running()));
        if event != PrecopyEvent::AfterBitmapSync {
            return Ok(());
        }
        if ctx.vm_running() {
            for &gpa in &self.hinted {
                self.bitmap.free_page_hint(2, GuestAddress(gpa), PAGE);
            }
            for &gpa in &self.reused {
                self.mem
                    .write_slice(&pattern(gpa, 7), GuestAddress(gpa))
                    .unwrap();
            }
        } else {
            // DONE: every reused page must already be in the file.
            let data = fs::read(&self.file).unwrap();
            for &gpa in &self.reused {
                let at = gpa as usize;
                assert_eq!(&data[at..at + PAGE as usize], &pattern(gpa, 7)[..]);
            }
            self.done_checked.store(true, Ordering::Release);
        }
        Ok(())
    }
}

#[test]
fn hinted_pages_become_holes_and_pages_taken_back_are_written_before_done() {
    for mode in [SnapshotMode::Stopped, SnapshotMode::Live] {
        let dir = Dir::new("hints");
        let regions = [(0, 4 * MIB)];
        let mem = Arc::new(filled(&regions, 1));
        let bitmap = Arc::new(MigrationBitmap::new(&*mem).unwrap());
        // The guest frees (and hints) the upper half; it takes back every 16th page.
        let hinted: Vec<u64> = (2 * MIB..4 * MIB).step_by(PAGE as usize).collect();
        let reused: Vec<u64> = hinted.iter().copied().step_by(16).collect();
        let path = dir.path("mem");
        let guest = Arc::new(Guest {
            mem: mem.clone(),
            bitmap: bitmap.clone(),
            hinted: hinted.clone(),
            reused: reused.clone(),
            file: path.clone(),
            done_checked: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
        });
        let mut chain = PrecopyNotifierChain::new();
        chain.add(guest.clone());
        let report = Snapshot::new(&*mem, &bitmap, &chain)
            .mode(mode)
            .config(PrecopyConfig::default().with_max_iterations(1))
            .write(
                &mut GuestMemoryDirtyLog::new(&mem),
                &mut Vm::default(),
                &path,
            )
            .unwrap();
        assert!(guest.done_checked.load(Ordering::Acquire), "{mode:?}");
        let snap = SnapshotFile::open(&path).unwrap();
        let restored = memory::<()>(&regions);
        snap.restore_into(&restored).unwrap();
        // Exactly the hinted pages not taken back differ (they read as zeros).
        let diff = differing(&*mem, &restored, &regions);
        let expected: Vec<u64> = hinted
            .iter()
            .copied()
            .filter(|g| !reused.contains(g))
            .collect();
        assert_eq!(diff, expected, "{mode:?}");
        let kept = 2 * MIB / PAGE + reused.len() as u64;
        assert!(
            report.file.allocated_bytes <= (kept + 16) * PAGE,
            "{mode:?}: allocated {} bytes for {kept} pages",
            report.file.allocated_bytes
        );
        assert!(report.copy.hinted_pages >= (hinted.len() - reused.len()) as u64);
        // The DONE (AfterBitmapSync, stopped) is the last event before Cleanup.
        let events = guest.events.lock().unwrap();
        assert_eq!(
            events[events.len() - 2..],
            [
                (PrecopyEvent::AfterBitmapSync, false),
                (PrecopyEvent::Cleanup, false)
            ]
        );
    }
}

#[test]
fn a_live_snapshot_rewrites_pages_and_punches_zeroed_ones() {
    let dir = Dir::new("live");
    let regions = [(0, 2 * MIB)];
    let mem = Arc::new(filled(&regions, 1));
    let bitmap = MigrationBitmap::new(&*mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    // A log that, at its second harvest, changes some pages and zeroes others first.
    struct Racing {
        mem: Arc<Mem>,
        harvests: u32,
    }
    impl DirtyLog for Racing {
        fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
            self.harvests += 1;
            if self.harvests == 2 {
                for i in 0..64u64 {
                    let gpa = i * 7 * PAGE;
                    let page = if i % 2 == 0 {
                        [0u8; PAGE as usize]
                    } else {
                        pattern(gpa, 9)
                    };
                    self.mem.write_slice(&page, GuestAddress(gpa)).unwrap();
                }
            }
            GuestMemoryDirtyLog::new(&self.mem).take_dirty_log(region)
        }
    }
    let path = dir.path("mem");
    let report = Snapshot::new(&*mem, &bitmap, &chain)
        .mode(SnapshotMode::Live)
        .config(PrecopyConfig::default().with_max_iterations(1))
        .write(
            &mut Racing {
                mem: mem.clone(),
                harvests: 0,
            },
            &mut Vm::default(),
            &path,
        )
        .unwrap();
    assert_eq!(report.copy.iterations.len(), 2);
    assert_eq!(report.file.holes_punched, 32);
    let restored = memory::<()>(&regions);
    SnapshotFile::open(&path)
        .unwrap()
        .restore_into(&restored)
        .unwrap();
    assert!(differing(&*mem, &restored, &regions).is_empty());
    assert_eq!(
        fs::metadata(&path).unwrap().blocks() * 512,
        report.file.allocated_bytes
    );
    // 32 pages punched out; the file system may spend a block or two on its extent tree.
    assert!(
        report.file.allocated_bytes <= 2 * MIB - 28 * PAGE,
        "allocated {}",
        report.file.allocated_bytes
    );
}

#[test]
fn an_existing_snapshot_is_only_replaced_when_asked() {
    let dir = Dir::new("exists");
    let mem = filled(&REGIONS, 64);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    let path = dir.path("mem");
    fs::write(&path, b"precious").unwrap();
    let mut vm = Vm::default();
    let err = Snapshot::new(&mem, &bitmap, &chain)
        .write(&mut GuestMemoryDirtyLog::new(&mem), &mut vm, &path)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("exists"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");
    assert_eq!(vm.stops, 0);
    // A description alone is refused too.
    fs::remove_file(&path).unwrap();
    fs::write(description_path(&path), b"x").unwrap();
    assert!(matches!(
        Snapshot::new(&mem, &bitmap, &chain)
            .write(&mut GuestMemoryDirtyLog::new(&mem), &mut vm, &path)
            .unwrap_err(),
        SnapshotError::Exists { .. }
    ));
    Snapshot::new(&mem, &bitmap, &chain)
        .overwrite(true)
        .write(&mut GuestMemoryDirtyLog::new(&mem), &mut vm, &path)
        .unwrap();
    let restored = memory::<()>(&REGIONS);
    SnapshotFile::open(&path)
        .unwrap()
        .restore_into(&restored)
        .unwrap();
    assert!(differing(&mem, &restored, &REGIONS).is_empty());
    // A guest restored from the old snapshot by mapping keeps its memory when the snapshot
    // is replaced under it (the old file is unlinked, not truncated).
    let running = SnapshotFile::open(&path).unwrap().map_private().unwrap();
    mem.write_slice(&pattern(0, 5), GuestAddress(0)).unwrap();
    Snapshot::new(&mem, &bitmap, &chain)
        .overwrite(true)
        .write(&mut GuestMemoryDirtyLog::new(&mem), &mut vm, &path)
        .unwrap();
    assert!(differing(&restored, &running, &REGIONS).is_empty());
    assert_eq!(
        differing(&mem, &running, &REGIONS),
        vec![0],
        "the old mapping holds the old page 0"
    );
}

/// Fails the harvest of the final stage.
struct FailFinalSync(u32);

impl DirtyLog for FailFinalSync {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        self.0 += 1;
        if self.0 > 2 {
            return Err("the dirty log went away".into());
        }
        Ok(HarvestedLog {
            page_size: PAGE,
            words: vec![0; (region.len / PAGE).div_ceil(64) as usize],
        })
    }
}

#[test]
fn a_failed_copy_resumes_the_guest_and_leaves_no_snapshot() {
    let dir = Dir::new("fail");
    let mem = filled(&REGIONS, 4);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    let path = dir.path("mem");
    let mut vm = Vm::default();
    let err = Snapshot::new(&mem, &bitmap, &chain)
        .write(&mut FailFinalSync(0), &mut vm, &path)
        .unwrap_err();
    assert!(err.to_string().contains("the dirty log went away"), "{err}");
    assert_eq!((vm.stops, vm.resumes), (1, 1));
    assert!(!description_path(&path).exists());
    assert!(matches!(
        SnapshotFile::open(&path).unwrap_err(),
        SnapshotError::Incomplete { .. }
    ));
    // A guest that will not stop: nothing claims to be complete either.
    let mut vm = Vm {
        fail: true,
        ..Vm::default()
    };
    let err = Snapshot::new(&mem, &bitmap, &chain)
        .write(&mut GuestMemoryDirtyLog::new(&mem), &mut vm, &path)
        .unwrap_err();
    assert!(err.to_string().contains("would not stop"), "{err}");
    assert!(!description_path(&path).exists());
}

/// Runs `scenario` in a child process (this test binary, filtered to `test`), where it may
/// change process-wide limits. Passes when the child passes.
fn in_child(test: &str) -> bool {
    if std::env::var_os("SNAPSHOT_TEST_CHILD").is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("SNAPSHOT_TEST_CHILD", "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "child ran no test:\n{text}");
    false
}

#[test]
fn a_full_disk_in_the_middle_is_a_clear_error_and_no_snapshot() {
    if !in_child("a_full_disk_in_the_middle_is_a_clear_error_and_no_snapshot") {
        return;
    }
    // The file system refuses to grow the file past 1 MiB (EFBIG), as a full disk refuses
    // with ENOSPC: in the middle of the 6 MiB of data.
    // SAFETY: ignoring SIGXFSZ (so the write fails instead of killing the process) and
    // lowering this child's own file size limit touch no memory of ours.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: MIB,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let dir = Dir::new("full");
    let regions = [(0, 6 * MIB)];
    let mem = filled(&regions, 1);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    let path = dir.path("mem");
    let mut vm = Vm::default();
    let err = Snapshot::new(&mem, &bitmap, &chain)
        .write(&mut GuestMemoryDirtyLog::new(&mem), &mut vm, &path)
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("writing the migration stream failed"),
        "{text}"
    );
    assert!(text.to_lowercase().contains("file too large"), "{text}");
    assert_eq!((vm.stops, vm.resumes), (1, 1));
    assert!(!description_path(&path).exists());
    assert!(!path.exists(), "the partial memory file is removed");
}

fn snapshot_of(dir: &Dir, regions: &[(u64, u64)]) -> (Mem, PathBuf) {
    let mem = filled(regions, 2);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    let path = dir.path("mem");
    Snapshot::new(&mem, &bitmap, &chain)
        .write(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            &path,
        )
        .unwrap();
    (mem, path)
}

fn untouched(mem: &GuestMemoryMmap<()>, regions: &[(u64, u64)]) -> bool {
    let zero = memory::<()>(regions);
    differing(mem, &zero, regions).is_empty()
}

#[test]
fn bad_snapshots_are_refused_and_nothing_is_written() {
    let dir = Dir::new("bad");
    let regions = [(0, MIB), (16 * MIB, MIB)];
    let (_mem, path) = snapshot_of(&dir, &regions);
    let desc = description_path(&path);
    let good = fs::read(&desc).unwrap();

    // Regions that do not match the target memory.
    let other = memory::<()>(&[(0, MIB), (16 * MIB, 2 * MIB)]);
    let err = SnapshotFile::open(&path)
        .unwrap()
        .restore_into(&other)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::LayoutMismatch { .. }), "{err}");
    assert!(untouched(&other, &[(0, MIB), (16 * MIB, 2 * MIB)]));

    // A damaged description, a newer version, no magic.
    let mut damaged = good.clone();
    damaged[30] ^= 1;
    fs::write(&desc, &damaged).unwrap();
    let err = SnapshotFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    let mut newer = good.clone();
    newer[8] = 9;
    fs::write(&desc, &newer).unwrap();
    let err = SnapshotFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("version 9"), "{err}");
    fs::write(&desc, b"hello, world, this is not a description").unwrap();
    assert!(matches!(
        SnapshotFile::open(&path).unwrap_err(),
        SnapshotError::BadDescription(_)
    ));

    // A truncated memory file.
    fs::write(&desc, &good).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(16 * MIB + 4096).unwrap();
    let err = SnapshotFile::open(&path).unwrap_err();
    assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("needs"), "{err}");

    // No description at all.
    fs::remove_file(&desc).unwrap();
    assert!(matches!(
        SnapshotFile::open(&path).unwrap_err(),
        SnapshotError::Incomplete { .. }
    ));
}

/// The copy's final-stage order: a snapshot with a real `FreePageHinting`-like notifier is
/// covered in the workspace's daemon tests; here the plain loop keeps its event order.
#[test]
fn waiting_for_a_round_that_never_started_does_not_hold_up_a_snapshot() {
    let dir = Dir::new("wait");
    let regions = [(0, MIB)];
    let mem = filled(&regions, 1);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    let path = dir.path("mem");
    let start = std::time::Instant::now();
    let _ = Duration::ZERO;
    let report = Snapshot::new(&mem, &bitmap, &chain)
        .write(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            &path,
        )
        .unwrap();
    assert_eq!(report.copy.hint_round_completed, None);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(Path::new(&path).exists());
}

#[test]
fn a_cancelled_snapshot_is_no_snapshot() {
    let dir = Dir::new("cancel");
    let regions = [(0, MIB)];
    let mem = filled(&regions, 1);
    let bitmap = MigrationBitmap::new(&mem).unwrap();
    let chain = PrecopyNotifierChain::new();
    let token = CancelToken::new();
    token.cancel();
    let path = dir.path("mem");
    let snapshot = Snapshot::new(&mem, &bitmap, &chain)
        .mode(SnapshotMode::Live)
        .cancel_token(token);
    assert!(format!("{snapshot:?}").contains("Live"));
    let err = snapshot
        .write(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            &path,
        )
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert!(!path.exists());
    assert!(!description_path(&path).exists());
}

#[test]
fn a_balloon_without_hinting_does_not_hold_up_a_snapshot() {
    // The driver never negotiated hinting: the wait returns at once, not completed.
    let dir = Dir::new("nohint");
    let regions = [(0, MIB)];
    let mem = Arc::new(filled(&regions, 1));
    let bitmap = Arc::new(MigrationBitmap::new(&*mem).unwrap());
    let balloon = Balloon::new(BalloonConfig::default(), mem.clone(), bitmap.clone()).unwrap();
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Arc::new(balloon.hint_control()));
    let path = dir.path("mem");
    let report = Snapshot::new(&*mem, &bitmap, &chain)
        .wait_for_hint_round(balloon.hint_control(), Duration::from_secs(30))
        .write(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            &path,
        )
        .unwrap();
    assert_eq!(report.copy.hint_round_completed, Some(false));
    assert!(report.copy.hint_wait < Duration::from_secs(30));
    assert_eq!(report.file.data_pages, MIB / PAGE);
}

#[test]
fn the_writer_refuses_pages_outside_its_layout() {
    let dir = Dir::new("outside");
    let layout = SnapshotLayout::new(vec![SnapshotRegion {
        gpa: GuestAddress(0x10_0000),
        len: 0x2000,
        file_offset: 0,
    }])
    .unwrap();
    let mut w = SnapshotWriter::create(&dir.path("mem"), layout.clone(), false).unwrap();
    assert_eq!(w.layout(), &layout);
    let page = [1u8; PAGE as usize];
    for gpa in [0u64, 0x10_2000, u64::MAX - 0xfff] {
        let err = w.page(GuestAddress(gpa), &page).unwrap_err();
        assert!(err.to_string().contains("outside"), "{gpa:#x}: {err}");
        assert!(w.zero_page(GuestAddress(gpa)).is_err());
    }
    let err = w.page(GuestAddress(0x10_0800), &page).unwrap_err();
    assert!(err.to_string().contains("whole page"), "{err}");
    w.page(GuestAddress(0x10_1000), &page).unwrap();
    w.end().unwrap();
    assert_eq!(w.bytes(), PAGE);
    let stats = w.finish().unwrap();
    assert_eq!(stats.file_len, 0x2000);
    let snap = SnapshotFile::open(&dir.path("mem")).unwrap();
    let mut buf = [0u8; PAGE as usize];
    assert!(snap.read_page(GuestAddress(0x10_1000), &mut buf).unwrap());
    assert_eq!(buf, page);
    assert!(!snap.read_page(GuestAddress(0x10_1800), &mut buf).unwrap());
    assert!(!snap.read_page(GuestAddress(0), &mut buf).unwrap());
    // A file cut short after it was opened: reading is an error, not a panic.
    assert!(snap.file().metadata().unwrap().len() >= 0x2000);
    fs::OpenOptions::new()
        .write(true)
        .open(dir.path("mem"))
        .unwrap()
        .set_len(0x1000)
        .unwrap();
    let err = snap
        .read_page(GuestAddress(0x10_1000), &mut buf)
        .unwrap_err();
    assert!(err.to_string().contains("reading"), "{err}");
}
