// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Tests of the copies: requests, hints, the job and comparisons.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::{self};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon::migration::{
    DirtyLog, DirtyLogError, HarvestedLog, MigrationBitmap, PrecopyEvent, PrecopyNotifierChain,
    RegionInfo,
};
use virtio_balloon::sink::FreePageSink;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::hints::*;
use super::job::*;
use crate::capture::HintCounter;
use crate::control::{parse_request, response};
use crate::control::{CopyMode, Fault, Request};
use crate::Mem;
use virtio_balloon::{Balloon, BalloonConfig};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::tempdir::TempDir;

const MIB: u64 = 1 << 20;

fn req(line: &str) -> Result<Request, String> {
    parse_request(line.as_bytes())
}

fn job(line: &str) -> Result<CopyJob, String> {
    CopyJob::from_request(&req(line)?).expect("a copy request")
}

#[test]
fn copy_requests_parse_and_are_checked() {
    let j = job(r#"{"cmd":"snapshot","path":"/tmp/x","hints":true,"mode":"live","overwrite":true,"hint_wait_ms":5,"fault":"shift_hints"}"#)
        .unwrap();
    assert_eq!(
        j,
        CopyJob {
            kind: CopyKind::Snapshot {
                mode: CopyMode::Live
            },
            path: "/tmp/x".into(),
            hints: true,
            overwrite: true,
            hint_wait: Duration::from_millis(5),
            hint_rounds: None,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            fault: Some(Fault::ShiftHints),
        }
    );
    let j = job(r#"{"cmd":"snapshot","path":"/s"}"#).unwrap();
    assert_eq!(
        j.kind,
        CopyKind::Snapshot {
            mode: CopyMode::Stopped
        }
    );
    assert!(!j.hints && !j.overwrite && j.fault.is_none());
    let j = job(r#"{"cmd":"migrate","path":"/dev/null","hints":true,"max_iterations":1,"hint_rounds":1,"stop_timeout_ms":100}"#)
        .unwrap();
    assert_eq!(j.kind, CopyKind::Migrate { max_iterations: 1 });
    assert_eq!(j.hint_rounds, Some(1));
    assert_eq!(j.hint_wait, DEFAULT_HINT_WAIT);
    assert_eq!(j.stop_timeout, Duration::from_millis(100));
    let j = job(r#"{"cmd":"migrate","path":"/m"}"#).unwrap();
    assert_eq!(j.kind, CopyKind::Migrate { max_iterations: 30 });

    assert_eq!(req(r#"{"cmd":"guest_stopped"}"#), Ok(Request::GuestStopped));
    assert_eq!(req(r#"{"cmd":"copy_status"}"#), Ok(Request::CopyStatus));
    assert_eq!(
        req(r#"{"cmd":"copy_wait","timeout_ms":7}"#),
        Ok(Request::CopyWait { timeout_ms: 7 })
    );
    assert_eq!(
        req(r#"{"cmd":"compare","stream":"/s"}"#),
        Ok(Request::Compare {
            snapshot: None,
            stream: Some("/s".into())
        })
    );
    assert!(CopyJob::from_request(&Request::Status).is_none());

    // Malformed requests: serde's errors.
    for (bad, needle) in [
        (r#"{"cmd":"snapshot"}"#, "missing field `path`"),
        (
            r#"{"cmd":"snapshot","path":"/x","mode":"fast"}"#,
            "unknown variant",
        ),
        (
            r#"{"cmd":"snapshot","path":"/x","fault":"drop"}"#,
            "unknown variant",
        ),
        (
            r#"{"cmd":"snapshot","path":"/x","hints":1}"#,
            "invalid type",
        ),
        (
            r#"{"cmd":"snapshot","path":"/x","max_iterations":1}"#,
            "unknown field",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","max_iterations":-1}"#,
            "invalid value",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","max_iterations":4294967296}"#,
            "invalid value",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","hint_wait_ms":18446744073709551616}"#,
            "expected u64",
        ),
        (r#"{"cmd":"copy_wait"}"#, "missing field `timeout_ms`"),
        (r#"{"cmd":"compare","snapshot":5}"#, "invalid type"),
    ] {
        let e = req(bad).unwrap_err();
        assert!(e.contains(needle), "{bad}: {e:?} should mention {needle:?}");
    }
    // Well-formed but refused.
    for (bad, needle) in [
        (r#"{"cmd":"snapshot","path":"relative"}"#, "absolute"),
        (r#"{"cmd":"snapshot","path":""}"#, "absolute"),
        (
            r#"{"cmd":"snapshot","path":"/x","hint_wait_ms":5}"#,
            "hint_wait_ms needs",
        ),
        (
            r#"{"cmd":"snapshot","path":"/x","fault":"shift_hints"}"#,
            "fault needs",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","hint_rounds":1}"#,
            "hint_rounds needs",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","hints":true,"hint_rounds":0}"#,
            "at least 1",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","max_iterations":0}"#,
            "at least 1",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","hints":true,"hint_wait_ms":0}"#,
            "between",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","hints":true,"hint_wait_ms":3600001}"#,
            "between",
        ),
        (
            r#"{"cmd":"migrate","path":"/x","stop_timeout_ms":18446744073709551615}"#,
            "between",
        ),
    ] {
        let e = job(bad).unwrap_err();
        assert!(e.contains(needle), "{bad}: {e:?} should mention {needle:?}");
    }
}

fn ranges() -> Vec<(GuestAddress, u64)> {
    // [0, 1 MiB) and [2 MiB, 3 MiB).
    vec![(GuestAddress(0), MIB), (GuestAddress(2 * MIB), MIB)]
}

fn hints_over(fault: Option<Fault>) -> (Arc<MigrationBitmap>, Arc<CopyHints>) {
    let bitmap = Arc::new(MigrationBitmap::from_ranges(&ranges()).unwrap());
    bitmap.mark_all_dirty();
    let hints = Arc::new(CopyHints::new(&ranges(), bitmap.clone(), fault));
    (bitmap, hints)
}

#[test]
fn the_sink_forwards_to_the_counter_and_the_attached_copy() {
    let counter = Arc::new(HintCounter::new());
    let sink = CopySink::new(counter.clone());
    let (bitmap, hints) = hints_over(None);
    let total = bitmap.dirty_pages();
    // No copy attached: the counter only.
    sink.free_page_hint(2, GuestAddress(0x1000), 0x2000);
    assert_eq!(counter.snapshot().total_hints, 1);
    assert_eq!(bitmap.dirty_pages(), total);
    sink.attach(hints.clone());
    sink.free_page_hint(3, GuestAddress(0x1000), 0x2000);
    // A range across the hole between the regions: the parts inside RAM count.
    sink.free_page_hint(3, GuestAddress(MIB - 0x1000), MIB + 0x2000);
    assert_eq!(counter.snapshot().total_hints, 3);
    assert_eq!(counter.snapshot().round_bytes, 0x2000 + MIB + 0x2000);
    assert_eq!(bitmap.dirty_pages(), total - 2 - 1 - 1);
    assert!(!bitmap.is_dirty(GuestAddress(0x1000)));
    assert!(!bitmap.is_dirty(GuestAddress(0x2000)));
    assert!(bitmap.is_dirty(GuestAddress(0x3000)));
    assert_eq!(hints.hints(), 2);
    assert_eq!(hints.hinted_clean_pages(), 4);
    assert!(hints.is_hinted_clean(GuestAddress(MIB - 0x1000)));
    assert!(hints.is_hinted_clean(GuestAddress(2 * MIB)));
    assert!(!hints.is_hinted_clean(GuestAddress(2 * MIB + 0x1000)));
    sink.detach();
    sink.free_page_hint(4, GuestAddress(0x8000), 0x1000);
    assert!(bitmap.is_dirty(GuestAddress(0x8000)));
    assert_eq!(hints.hints(), 2);
    assert_eq!(counter.snapshot().total_hints, 4);
}

#[test]
fn shift_hints_clears_the_page_above_and_records_the_true_range() {
    let sink = CopySink::new(Arc::new(HintCounter::new()));
    let (bitmap, hints) = hints_over(Some(Fault::ShiftHints));
    sink.attach(hints.clone());
    sink.free_page_hint(2, GuestAddress(0x4000), 0x2000);
    // The bitmap: [0x5000, 0x7000) cleared instead of [0x4000, 0x6000).
    assert!(bitmap.is_dirty(GuestAddress(0x4000)));
    assert!(!bitmap.is_dirty(GuestAddress(0x5000)));
    assert!(!bitmap.is_dirty(GuestAddress(0x6000)));
    assert!(bitmap.is_dirty(GuestAddress(0x7000)));
    // The record: what the guest said.
    assert!(hints.is_hinted_clean(GuestAddress(0x4000)));
    assert!(hints.is_hinted_clean(GuestAddress(0x5000)));
    assert!(!hints.is_hinted_clean(GuestAddress(0x6000)));
    // At the top of a region the shifted page lies outside RAM: nothing more is cleared.
    let before = bitmap.dirty_pages();
    sink.free_page_hint(2, GuestAddress(MIB - 0x1000), 0x1000);
    assert_eq!(bitmap.dirty_pages(), before);
    // A hint at the top of the address space cannot be shifted: it is recorded only.
    sink.free_page_hint(2, GuestAddress(u64::MAX - 0xfff), 0x1000);
    assert_eq!(bitmap.dirty_pages(), before);
}

/// A log that reports the pages it is given, once.
struct Scripted(Vec<(usize, Vec<u64>)>);

impl DirtyLog for Scripted {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        let words = self
            .0
            .iter()
            .position(|(i, _)| *i == region.index)
            .map(|p| self.0.remove(p).1)
            .unwrap_or_default();
        Ok(HarvestedLog {
            page_size: PAGE_SIZE,
            words,
        })
    }
}

#[test]
fn harvests_count_hinted_pages_written_later() {
    let (bitmap, hints) = hints_over(None);
    hints.hint(GuestAddress(0), 0x4000); // pages 0..4 of region 0
    hints.hint(GuestAddress(2 * MIB), 0x2000); // pages 0..2 of region 1
                                               // Region 0 reports pages 1 and 5 written, region 1 page 0.
    let mut log = HintAwareLog::new(
        Scripted(vec![(0, vec![0b10_0010]), (1, vec![1])]),
        hints.clone(),
    );
    bitmap.sync(&mut log).unwrap();
    assert_eq!(hints.hinted_later_written(), 2);
    assert_eq!(hints.hinted_clean_pages(), 4);
    assert!(!hints.is_hinted_clean(GuestAddress(0x1000)));
    assert!(hints.is_hinted_clean(GuestAddress(0x2000)));
    assert!(!hints.is_hinted_clean(GuestAddress(2 * MIB)));
    // Hinted again, written again: still one page.
    hints.hint(GuestAddress(0x1000), 0x1000);
    let mut log = HintAwareLog::new(Scripted(vec![(0, vec![0b10])]), hints.clone());
    bitmap.sync(&mut log).unwrap();
    assert_eq!(hints.hinted_later_written(), 2);
    // A log with larger pages: a 16 KiB page covers four 4 KiB pages (0x1000 was
    // counted already).
    hints.harvested(
        &RegionInfo {
            index: 0,
            start: GuestAddress(0),
            len: MIB,
        },
        &HarvestedLog {
            page_size: 0x4000,
            words: vec![1],
        },
    );
    assert_eq!(hints.hinted_later_written(), 5);
    assert_eq!(hints.hinted_clean_pages(), 1);
    assert!(hints.is_hinted_clean(GuestAddress(2 * MIB + 0x1000)));
}

#[test]
fn forget_later_writes_drops_pages_written_after_their_hint() {
    let (bitmap, hints) = hints_over(Some(Fault::ForgetLaterWrites));
    bitmap.sync(&mut Scripted(vec![])).unwrap();
    let before = bitmap.dirty_pages();
    hints.hint(GuestAddress(0), 0x4000); // pages 0..4 of region 0
    assert_eq!(bitmap.dirty_pages(), before - 4);
    // Pages 1 (hinted) and 5 (not) written: only page 5 comes back.
    let mut log = HintAwareLog::new(Scripted(vec![(0, vec![0b10_0010])]), hints.clone());
    bitmap.sync(&mut log).unwrap();
    assert_eq!(hints.hinted_later_written(), 1);
    assert!(!bitmap.is_dirty(GuestAddress(0x1000)));
    assert!(bitmap.is_dirty(GuestAddress(0x5000)));
    // Without the fault the written page comes back.
    let (bitmap, hints) = hints_over(None);
    bitmap.sync(&mut Scripted(vec![])).unwrap();
    hints.hint(GuestAddress(0), 0x4000);
    let mut log = HintAwareLog::new(Scripted(vec![(0, vec![0b10])]), hints.clone());
    bitmap.sync(&mut log).unwrap();
    assert!(bitmap.is_dirty(GuestAddress(0x1000)));
    assert_eq!(Fault::ForgetLaterWrites.name(), "forget_later_writes");
    assert_eq!(Fault::ShiftHints.name(), "shift_hints");
}

#[test]
fn the_round_limit_starts_only_so_many_rounds() {
    let mem: Mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
    );
    let b = Balloon::new(
        BalloonConfig::default(),
        mem,
        Arc::new(CopySink::new(Arc::new(HintCounter::new()))),
    )
    .unwrap();
    let limit = RoundLimit {
        hinting: b.hint_control(),
        limit: Some(1),
        started: AtomicU32::new(0),
    };
    let mut chain = PrecopyNotifierChain::new();
    let limit = Arc::new(limit);
    chain.add(limit.clone());
    let running = virtio_balloon::migration::MigrationState {
        vm_running: true,
        postcopy: false,
    };
    for _ in 0..3 {
        chain
            .notify(PrecopyEvent::AfterBitmapSync, running)
            .unwrap();
    }
    assert_eq!(limit.started.load(Ordering::Relaxed), 1);
}

// The whole job over anonymous memory, without a driver (so without hints).

struct Fixture {
    _dir: TempDir,
    dir: PathBuf,
    guest: GuestMemoryMmap<()>,
    copier: Copier,
}

fn fixture() -> Fixture {
    let dir = TempDir::new_with_prefix("/tmp/vub-copy").unwrap();
    let guest = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x40_0000),
        (GuestAddress(0x100_0000), 0x20_0000),
    ])
    .unwrap();
    let mem: Mem = GuestMemoryAtomic::new(guest.clone());
    let sink = Arc::new(CopySink::new(Arc::new(HintCounter::new())));
    let b = Balloon::new(BalloonConfig::default(), mem.clone(), sink.clone()).unwrap();
    let copier = Copier::new(mem, b.hint_control(), sink);
    for i in 0..64u64 {
        guest
            .write_obj(0x5a5a_0000_u64 + i, GuestAddress(i * 0x9000))
            .unwrap();
    }
    Fixture {
        dir: dir.as_path().to_path_buf(),
        _dir: dir,
        guest,
        copier,
    }
}

fn ask(c: &Copier, line: &str) -> Value {
    response(c.handle(parse_request(line.as_bytes()).unwrap()))
}

fn wait_state(c: &Copier, want: &str) -> Value {
    let v = ask(c, r#"{"cmd":"copy_wait","timeout_ms":20000}"#);
    assert_eq!(v["state"], want, "{v}");
    v
}

#[test]
fn a_snapshot_and_a_stream_compare_equal_and_a_change_shows() {
    let f = fixture();
    let c = &f.copier;
    assert_eq!(ask(c, r#"{"cmd":"copy_status"}"#)["state"], "idle");
    let snap = f.dir.join("mem.snap");
    let line = json!({"cmd": "snapshot", "path": snap}).to_string();
    let v = ask(c, &line);
    assert_eq!(v["state"], "running", "{v}");
    wait_state(c, "waiting_for_stop");
    // One copy at a time.
    let again = ask(c, &line);
    assert_eq!(again["ok"], false);
    assert!(again["error"].as_str().unwrap().contains("already running"));
    let cmp = ask(c, &json!({"cmd": "compare", "snapshot": snap}).to_string());
    assert!(cmp["error"].as_str().unwrap().contains("copy is running"));
    assert_eq!(ask(c, r#"{"cmd":"guest_stopped"}"#)["ok"], true);
    let done = wait_state(c, "done");
    assert_eq!(done["resume"], true, "a snapshot resumes the guest: {done}");
    assert_eq!(done["pages_sent"], 64, "{done}");
    assert_eq!(done["kind"], "snapshot");
    assert_eq!(done["mode"], "stopped");
    assert_eq!(done["hinted_later_written"], 0);
    assert_eq!(done["file_len"], 0x120_0000);
    assert!(done["allocated_bytes"].as_u64().unwrap() >= 64 * PAGE_SIZE);
    assert!(done["allocated_bytes"].as_u64().unwrap() < 0x40_0000);
    assert_error(&ask(c, r#"{"cmd":"guest_stopped"}"#), "no copy is waiting");

    let cmp = ask(c, &json!({"cmd": "compare", "snapshot": snap}).to_string());
    assert_eq!(cmp["pages_differing"], 0, "{cmp}");
    assert_eq!(cmp["pages_compared"], 0x600);
    f.guest
        .write_obj(1u8, GuestAddress(0x10_0000 + 0x10))
        .unwrap();
    let cmp = ask(c, &json!({"cmd": "compare", "snapshot": snap}).to_string());
    assert_eq!(cmp["pages_differing"], 1, "{cmp}");
    assert_eq!(cmp["differing_other"], 1);
    assert_eq!(cmp["first_differing"], json!(["0x100000"]));
    assert_eq!(cmp["differing_zero_in_copy"], 1);

    // A migration stream, kept stopped at the end.
    let stream = f.dir.join("mem.stream");
    let v = ask(
        c,
        &json!({"cmd": "migrate", "path": stream, "max_iterations": 1}).to_string(),
    );
    assert_eq!(v["ok"], true, "{v}");
    wait_state(c, "waiting_for_stop");
    ask(c, r#"{"cmd":"guest_stopped"}"#);
    let done = wait_state(c, "done");
    assert_eq!(done["resume"], false, "{done}");
    let len = std::fs::metadata(&stream).unwrap().len();
    assert_eq!(done["bytes"], len, "{done}");
    let cmp = ask(c, &json!({"cmd": "compare", "stream": stream}).to_string());
    assert_eq!(cmp["pages_differing"], 0, "{cmp}");
    assert_eq!(cmp["stream"]["pages"], 65, "{cmp}");
    // An existing stream file is not replaced without overwrite.
    let v = ask(c, &json!({"cmd": "migrate", "path": stream}).to_string());
    assert_eq!(v["ok"], true);
    let failed = wait_state(c, "failed");
    assert!(
        failed["error"].as_str().unwrap().contains("exists"),
        "{failed}"
    );
    // /dev/null takes a stream, and its bytes are still counted.
    ask(
        c,
        r#"{"cmd":"migrate","path":"/dev/null","max_iterations":1}"#,
    );
    wait_state(c, "waiting_for_stop");
    ask(c, r#"{"cmd":"guest_stopped"}"#);
    let done = wait_state(c, "done");
    // The same pages; where a pass ends early (the loop measures its bandwidth) a run
    // of zero pages takes one more 16-byte header.
    let bytes = done["bytes"].as_u64().unwrap();
    assert!(
        bytes >= 65 * PAGE_SIZE && bytes.abs_diff(len) <= 64,
        "{done}"
    );
    assert_error(
        &ask(c, r#"{"cmd":"compare","stream":"/dev/null"}"#),
        "cannot apply",
    );
    assert_error(&ask(c, r#"{"cmd":"compare"}"#), "exactly one");
    // A pipe without a reader would block the copy: refused.
    let fifo = f.dir.join("fifo");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path and touches no other memory.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    ask(c, &json!({"cmd": "migrate", "path": fifo}).to_string());
    let failed = wait_state(c, "failed");
    assert!(
        failed["error"].as_str().unwrap().contains("pipe"),
        "{failed}"
    );
}

fn assert_error(v: &Value, needle: &str) {
    assert_eq!(v["ok"], false, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains(needle), "{e:?} should mention {needle:?}");
}

#[test]
fn a_stop_that_never_comes_fails_the_copy_and_leaves_no_snapshot() {
    let f = fixture();
    let c = &f.copier;
    let snap = f.dir.join("late.snap");
    let line = json!({"cmd": "snapshot", "path": snap, "stop_timeout_ms": 200}).to_string();
    assert_eq!(ask(c, &line)["ok"], true);
    wait_state(c, "waiting_for_stop");
    // copy_wait returns at once while the copy waits for the stop: poll.
    let deadline = Instant::now() + Duration::from_secs(20);
    let failed = loop {
        let v = ask(c, r#"{"cmd":"copy_status"}"#);
        if v["state"] != "waiting_for_stop" || Instant::now() > deadline {
            break v;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("guest_stopped"),
        "{failed}"
    );
    assert_eq!(failed["resume"], true);
    assert!(!snap.exists());
    assert!(!virtio_balloon_precopy::snapshot::description_path(&snap).exists());
    // The next copy runs.
    assert_eq!(ask(c, &line)["ok"], true);
    wait_state(c, "waiting_for_stop");
    ask(c, r#"{"cmd":"guest_stopped"}"#);
    wait_state(c, "done");
    // Hints need a driver that negotiated them.
    assert_error(
        &ask(c, r#"{"cmd":"snapshot","path":"/tmp/none","hints":true}"#),
        "did not negotiate",
    );
}
