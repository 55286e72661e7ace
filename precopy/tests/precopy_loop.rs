// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The reference precopy loop on its own: event order, the wire format applied on a
//! destination, convergence with a concurrent writer, zero pages, hints, failures and
//! cancellation. (The whole stack with the device and the guest driver model is in
//! `precopy_stress.rs` and `examples/precopy/`.)

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_balloon::migration::{
    DirtyLog, DirtyLogError, GuestMemoryDirtyLog, HarvestedLog, MigrationBitmap, MigrationState,
    NotifierError, PrecopyContext, PrecopyEvent, PrecopyNotifier, PrecopyNotifierChain, RegionInfo,
};
use virtio_balloon::sink::FreePageSink;
use virtio_balloon_precopy::{
    CancelToken, Precopy, PrecopyConfig, PrecopyError, Receiver, VmControl, VmControlError,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod common;
use common::memory;

type Mem = GuestMemoryMmap<AtomicBitmap>;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

fn page_pattern(gpa: u64, generation: u64) -> [u8; PAGE as usize] {
    let mut p = [0u8; PAGE as usize];
    for (i, chunk) in p.chunks_exact_mut(8).enumerate() {
        let v = gpa ^ (generation << 48) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    p
}

/// Every page of `src` and `dst` in `regions` is equal; names the first page that is not.
fn assert_same(src: &Mem, dst: &GuestMemoryMmap<()>, regions: &[(u64, u64)]) {
    let mut a = [0u8; PAGE as usize];
    let mut b = [0u8; PAGE as usize];
    for &(start, len) in regions {
        for gpa in (start..start + len).step_by(PAGE as usize) {
            src.read_slice(&mut a, GuestAddress(gpa)).unwrap();
            dst.read_slice(&mut b, GuestAddress(gpa)).unwrap();
            assert!(a == b, "page {gpa:#x} differs on the destination");
        }
    }
}

/// Records events (and whether the VM ran) into a journal.
struct Journal {
    events: Mutex<Vec<(PrecopyEvent, bool)>>,
    fail_on: Option<PrecopyEvent>,
}

impl Journal {
    fn new(fail_on: Option<PrecopyEvent>) -> Arc<Self> {
        Arc::new(Journal {
            events: Mutex::new(Vec::new()),
            fail_on,
        })
    }

    fn events(&self) -> Vec<(PrecopyEvent, bool)> {
        self.events.lock().unwrap().clone()
    }
}

impl PrecopyNotifier for Journal {
    fn name(&self) -> &str {
        "journal"
    }

    fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
        self.events.lock().unwrap().push((event, ctx.vm_running()));
        if self.fail_on == Some(event) {
            return Err(format!("journal refuses {event}").into());
        }
        Ok(())
    }
}

/// A VM that records stops and resumes, optionally refusing to stop.
#[derive(Default)]
struct Vm {
    stops: u32,
    resumes: u32,
    refuse: bool,
    on_stop: Option<Box<dyn FnMut()>>,
}

impl VmControl for Vm {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        if self.refuse {
            return Err("the guest does not stop".into());
        }
        if let Some(f) = self.on_stop.as_mut() {
            f();
        }
        self.stops += 1;
        Ok(())
    }

    fn resume_vm(&mut self) {
        self.resumes += 1;
    }
}

#[test]
fn events_follow_qemus_order_and_the_destination_matches() {
    let regions = [(0, 4 * MIB), (8 * MIB, 2 * MIB)];
    let src = memory(&regions);
    for gpa in (0..4 * MIB).step_by(3 * PAGE as usize) {
        src.write_slice(&page_pattern(gpa, 0), GuestAddress(gpa))
            .unwrap();
    }
    src.write_slice(&page_pattern(9 * MIB, 0), GuestAddress(9 * MIB))
        .unwrap();
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let journal = Journal::new(None);
    let mut chain = PrecopyNotifierChain::new();
    chain.add(journal.clone());
    let mut stream = Vec::new();
    let mut vm = Vm::default();
    let mut seen = Vec::new();
    let report = Precopy::new(&src, &bitmap, &chain)
        .on_iteration(|it| seen.push(*it))
        .run(&mut GuestMemoryDirtyLog::new(&src), &mut vm, &mut stream)
        .unwrap();
    use PrecopyEvent::*;
    let events = journal.events();
    // Start: sync, setup; each iteration closes with a sync while the VM runs; the final
    // stage: complete and the last sync with the VM stopped; cleanup.
    assert_eq!(
        &events[..3],
        &[
            (BeforeBitmapSync, true),
            (AfterBitmapSync, true),
            (Setup, true)
        ]
    );
    assert_eq!(
        &events[events.len() - 4..],
        &[
            (Complete, false),
            (BeforeBitmapSync, false),
            (AfterBitmapSync, false),
            (Cleanup, false)
        ]
    );
    let running_syncs = events
        .iter()
        .filter(|e| **e == (BeforeBitmapSync, true))
        .count();
    assert_eq!(running_syncs, report.iterations.len());
    assert_eq!((vm.stops, vm.resumes), (1, 0));
    assert_eq!(seen, report.iterations);
    let last = report.iterations.last().unwrap();
    assert!(last.final_stage);
    assert!(report.iterations[..report.iterations.len() - 1]
        .iter()
        .all(|it| !it.final_stage));

    let data_pages = (4 * MIB).div_ceil(3 * PAGE) + 1;
    assert_eq!(report.pages_sent, data_pages);
    assert_eq!(report.zero_pages, (6 * MIB / PAGE) - data_pages);
    assert_eq!(report.hinted_pages, 0);
    assert_eq!(report.bytes, stream.len() as u64);
    // Zero pages cost a header per run, not a page.
    assert!(report.bytes < (data_pages + 64) * (PAGE + 16));

    let dst = memory::<()>(&regions);
    let got = Receiver::new(&dst).unwrap().receive(&stream[..]).unwrap();
    assert_eq!(got.pages, report.pages_sent);
    assert_eq!(got.zero_pages, report.zero_pages);
    assert_eq!(got.iterations as usize, report.iterations.len());
    assert_same(&src, &dst, &regions);
}

#[test]
fn a_writer_racing_the_loop_loses_nothing() {
    let regions = [(0, 32 * MIB)];
    let src = Arc::new(memory(&regions));
    let bitmap = MigrationBitmap::new(&*src).unwrap();
    let chain = PrecopyNotifierChain::new();
    let stop = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (src, stop, parked, writes) =
            (src.clone(), stop.clone(), parked.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut x = 0x1234_5678_9abc_def1u64;
            let mut generation = 1;
            while !stop.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let gpa = (x % (32 * MIB / PAGE)) * PAGE;
                src.write_slice(&page_pattern(gpa, generation), GuestAddress(gpa))
                    .unwrap();
                generation += 1;
                writes.fetch_add(1, Ordering::Relaxed);
            }
            parked.store(true, Ordering::Release);
        })
    };
    let mut vm = Vm {
        on_stop: Some(Box::new({
            let (stop, parked) = (stop.clone(), parked.clone());
            move || {
                stop.store(true, Ordering::Release);
                while !parked.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
            }
        })),
        ..Vm::default()
    };
    // Let the writer get going, so the first passes race it.
    while writes.load(Ordering::Relaxed) < 1000 {
        std::thread::yield_now();
    }
    let mut stream = Vec::new();
    let config = PrecopyConfig::default()
        .with_max_iterations(4)
        // A low limit keeps the loop iterating while the writer runs.
        .with_max_bandwidth(Some(256 * MIB));
    let report = Precopy::new(&*src, &bitmap, &chain)
        .config(config)
        .run(&mut GuestMemoryDirtyLog::new(&src), &mut vm, &mut stream)
        .unwrap();
    writer.join().unwrap();
    assert!(report.iterations.len() >= 2);
    let dst = memory::<()>(&regions);
    Receiver::new(&dst).unwrap().receive(&stream[..]).unwrap();
    assert_same(&src, &dst, &regions);
}

#[test]
fn hinted_pages_are_skipped_and_reused_pages_come_back() {
    let regions = [(0, 16 * MIB)];
    let src = Arc::new(memory(&regions));
    for gpa in (0..16 * MIB).step_by(PAGE as usize) {
        src.write_slice(&page_pattern(gpa, 0), GuestAddress(gpa))
            .unwrap();
    }
    let bitmap = Arc::new(MigrationBitmap::new(&*src).unwrap());

    /// Hints [4 MiB, 12 MiB) after each running sync, as a guest would; then the guest
    /// reuses one hinted page before the next sync.
    struct Guest {
        bitmap: Arc<MigrationBitmap>,
        src: Arc<Mem>,
        rounds: AtomicU64,
    }
    impl PrecopyNotifier for Guest {
        fn name(&self) -> &str {
            "guest"
        }
        fn notify(
            &self,
            event: PrecopyEvent,
            ctx: &PrecopyContext<'_>,
        ) -> Result<(), NotifierError> {
            if event == PrecopyEvent::AfterBitmapSync && ctx.vm_running() {
                // One round of hints, then the guest reuses one of the hinted pages.
                if self.rounds.fetch_add(1, Ordering::SeqCst) == 0 {
                    self.bitmap
                        .free_page_hint(2, GuestAddress(4 * MIB), 8 * MIB);
                    let gpa = 5 * MIB;
                    self.src
                        .write_slice(&page_pattern(gpa, 7), GuestAddress(gpa))
                        .unwrap();
                }
            }
            Ok(())
        }
    }
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Arc::new(Guest {
        bitmap: bitmap.clone(),
        src: src.clone(),
        rounds: AtomicU64::new(0),
    }));
    let mut stream = Vec::new();
    let report = Precopy::new(&*src, &bitmap, &chain)
        .run(
            &mut GuestMemoryDirtyLog::new(&src),
            &mut Vm::default(),
            &mut stream,
        )
        .unwrap();
    // The first pass skips the 2048 hinted pages; the reused page is sent later.
    assert_eq!(report.iterations[0].hinted_pages, 2048);
    assert_eq!(report.pages_sent, 16 * MIB / PAGE - 2048 + 1);
    let dst = memory::<()>(&regions);
    Receiver::new(&dst).unwrap().receive(&stream[..]).unwrap();
    assert_same(
        &src,
        &dst,
        &[(0, 4 * MIB), (5 * MIB, PAGE), (12 * MIB, 4 * MIB)],
    );
}

/// A writer that fails after `ok` bytes.
struct Failing {
    ok: usize,
    /// Fails every write once set.
    broken: Option<Arc<AtomicBool>>,
}

impl Write for Failing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let broken = self
            .broken
            .as_ref()
            .is_some_and(|b| b.load(Ordering::SeqCst));
        if self.ok == 0 || broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer went away"));
        }
        let n = buf.len().min(self.ok);
        self.ok -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn failures_and_cancel_still_clean_up() {
    use PrecopyEvent::*;
    let regions = [(0, 2 * MIB)];
    let src = memory(&regions);
    src.write_slice(&[1u8; 4096], GuestAddress(0)).unwrap();
    let bitmap = MigrationBitmap::new(&src).unwrap();

    // The stream breaks in the first pass: the VM never stopped, cleanup ran.
    let journal = Journal::new(None);
    let mut chain = PrecopyNotifierChain::new();
    chain.add(journal.clone());
    let mut vm = Vm::default();
    let err = Precopy::new(&src, &bitmap, &chain)
        .run(
            &mut GuestMemoryDirtyLog::new(&src),
            &mut vm,
            Failing {
                ok: 100,
                broken: None,
            },
        )
        .unwrap_err();
    assert!(matches!(err, PrecopyError::Io(_)), "{err}");
    assert!(err.to_string().contains("peer went away"));
    assert_eq!(journal.events().last(), Some(&(Cleanup, true)));
    assert_eq!((vm.stops, vm.resumes), (0, 0));

    // The guest refuses to stop: the migration fails, nothing to resume.
    let journal = Journal::new(None);
    let mut chain = PrecopyNotifierChain::new();
    chain.add(journal.clone());
    let mut vm = Vm {
        refuse: true,
        ..Vm::default()
    };
    let err = Precopy::new(&src, &bitmap, &chain)
        .run(&mut GuestMemoryDirtyLog::new(&src), &mut vm, io::sink())
        .unwrap_err();
    assert!(matches!(err, PrecopyError::StopVm(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "stopping the guest failed: the guest does not stop"
    );
    assert_eq!(journal.events().last(), Some(&(Cleanup, true)));
    assert_eq!(vm.resumes, 0);

    // The stream breaks in the final stage: the stopped guest is resumed.
    let broken = Arc::new(AtomicBool::new(false));
    let journal = Journal::new(None);
    let mut chain = PrecopyNotifierChain::new();
    chain.add(journal.clone());
    let mut vm = Vm {
        on_stop: Some(Box::new({
            let broken = broken.clone();
            move || broken.store(true, Ordering::SeqCst)
        })),
        ..Vm::default()
    };
    let err = Precopy::new(&src, &bitmap, &chain)
        .run(
            &mut GuestMemoryDirtyLog::new(&src),
            &mut vm,
            Failing {
                ok: usize::MAX,
                broken: Some(broken),
            },
        )
        .unwrap_err();
    assert!(matches!(err, PrecopyError::Io(_)), "{err}");
    assert_eq!((vm.stops, vm.resumes), (1, 1));
    assert_eq!(journal.events().last(), Some(&(Cleanup, false)));

    // A Setup failure fails the migration; other notifier failures are counted.
    for (fail_on, fails) in [(Setup, true), (BeforeBitmapSync, false), (Complete, false)] {
        let journal = Journal::new(Some(fail_on));
        let mut chain = PrecopyNotifierChain::new();
        chain.add(journal.clone());
        let r = Precopy::new(&src, &bitmap, &chain).run(
            &mut GuestMemoryDirtyLog::new(&src),
            &mut Vm::default(),
            io::sink(),
        );
        match r {
            Err(PrecopyError::Setup(e)) if fails => {
                assert!(e.to_string().contains("journal refuses setup"), "{e}")
            }
            Ok(report) if !fails => assert!(report.notifier_errors >= 1),
            other => panic!("{fail_on}: {other:?}"),
        }
        assert_eq!(journal.events().last().map(|e| e.0), Some(Cleanup));
    }

    // Cancelled before it starts sending: cleanup, no stop.
    let token = CancelToken::new();
    token.cancel();
    let journal = Journal::new(None);
    let mut chain = PrecopyNotifierChain::new();
    chain.add(journal.clone());
    let mut vm = Vm::default();
    let err = Precopy::new(&src, &bitmap, &chain)
        .cancel_token(token.clone())
        .run(&mut GuestMemoryDirtyLog::new(&src), &mut vm, io::sink())
        .unwrap_err();
    assert!(matches!(err, PrecopyError::Cancelled));
    assert_eq!(err.to_string(), "migration cancelled");
    assert_eq!(journal.events().last(), Some(&(Cleanup, true)));
    assert_eq!(vm.stops, 0);
}

#[test]
fn a_cancel_in_the_final_stage_resumes_the_guest() {
    let regions = [(0, 4 * MIB)];
    let src = memory(&regions);
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let chain = PrecopyNotifierChain::new();
    let token = CancelToken::new();
    let mut vm = Vm {
        on_stop: Some(Box::new({
            let token = token.clone();
            move || token.cancel()
        })),
        ..Vm::default()
    };
    let err = Precopy::new(&src, &bitmap, &chain).cancel_token(token).run(
        &mut GuestMemoryDirtyLog::new(&src),
        &mut vm,
        io::sink(),
    );
    // The final stage has few pages; a cancel is seen only every 64 pages, so the stage
    // may finish first. Either way a stopped guest is not left stopped by an error.
    match err {
        Err(PrecopyError::Cancelled) => assert_eq!((vm.stops, vm.resumes), (1, 1)),
        Ok(_) => assert_eq!((vm.stops, vm.resumes), (1, 0)),
        Err(e) => panic!("{e}"),
    }
}

/// A dirty log that fails on its second harvest.
struct FlakyLog {
    calls: u32,
}

impl DirtyLog for FlakyLog {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        self.calls += 1;
        if self.calls == 2 {
            return Err("the log is gone".into());
        }
        Ok(HarvestedLog {
            page_size: PAGE,
            words: vec![0; (region.len / PAGE).div_ceil(64) as usize],
        })
    }
}

#[test]
fn a_failed_sync_fails_the_migration() {
    let src = memory(&[(0, MIB)]);
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let journal = Journal::new(None);
    let mut chain = PrecopyNotifierChain::new();
    chain.add(journal.clone());
    let err = Precopy::new(&src, &bitmap, &chain)
        .run(&mut FlakyLog { calls: 0 }, &mut Vm::default(), io::sink())
        .unwrap_err();
    assert!(matches!(err, PrecopyError::Sync(_)), "{err}");
    assert!(err.to_string().contains("the log is gone"), "{err}");
    assert_eq!(
        journal.events().last(),
        Some(&(PrecopyEvent::Cleanup, true))
    );
    // Postcopy is passed to the notifiers.
    let journal = Journal::new(None);
    let mut chain = PrecopyNotifierChain::new();
    chain.add(journal.clone());
    let state_seen = Arc::new(Mutex::new(None));
    struct Postcopy(Arc<Mutex<Option<bool>>>);
    impl PrecopyNotifier for Postcopy {
        fn name(&self) -> &str {
            "postcopy"
        }
        fn notify(&self, _: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
            *self.0.lock().unwrap() = Some(ctx.postcopy_enabled());
            Ok(())
        }
    }
    chain.add(Arc::new(Postcopy(state_seen.clone())));
    Precopy::new(&src, &bitmap, &chain)
        .config(PrecopyConfig::default().with_postcopy(true))
        .run(
            &mut GuestMemoryDirtyLog::new(&src),
            &mut Vm::default(),
            io::sink(),
        )
        .unwrap();
    assert_eq!(*state_seen.lock().unwrap(), Some(true));
    let _ = MigrationState::default();
}

#[test]
fn the_iteration_limit_forces_the_switchover() {
    // A log that always reports the whole memory dirty never converges on bandwidth.
    struct AllDirty;
    impl DirtyLog for AllDirty {
        fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
            Ok(HarvestedLog {
                page_size: PAGE,
                words: vec![u64::MAX; (region.len / PAGE).div_ceil(64) as usize],
            })
        }
    }
    let src: Mem = memory(&[(0, 64 * MIB)]);
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let chain = PrecopyNotifierChain::new();
    let report = Precopy::new(&src, &bitmap, &chain)
        .config(
            PrecopyConfig::default()
                .with_max_iterations(3)
                .with_downtime_limit(Duration::ZERO),
        )
        .run(&mut AllDirty, &mut Vm::default(), io::sink())
        .unwrap();
    assert_eq!(report.iterations.len(), 4);
    assert!(report
        .iterations
        .iter()
        .all(|it| it.zero_pages == 64 * MIB / PAGE));
    assert_eq!(report.iterations[3].iteration, 4);
    assert!(report.iterations[3].final_stage);
}

/// Cancels `token` once `after` bytes went through.
struct CancelAfter {
    token: CancelToken,
    after: usize,
    seen: usize,
}

impl Write for CancelAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.seen += buf.len();
        if self.seen >= self.after {
            self.token.cancel();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_cancel_in_the_middle_of_a_pass_stops_it() {
    let src = memory(&[(0, 16 * MIB)]);
    for gpa in (0..16 * MIB).step_by(PAGE as usize) {
        src.write_slice(&page_pattern(gpa, 0), GuestAddress(gpa))
            .unwrap();
    }
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let chain = PrecopyNotifierChain::new();
    let token = CancelToken::new();
    let mut vm = Vm::default();
    let out = CancelAfter {
        token: token.clone(),
        after: MIB as usize,
        seen: 0,
    };
    let err = Precopy::new(&src, &bitmap, &chain)
        .cancel_token(token.clone())
        .run(&mut GuestMemoryDirtyLog::new(&src), &mut vm, out)
        .unwrap_err();
    assert!(matches!(err, PrecopyError::Cancelled));
    assert!(token.is_cancelled());
    assert_eq!(vm.stops, 0);
    // It stopped within a check interval of the cancel: most pages are still to send.
    assert!(
        bitmap.dirty_pages() > 3 * MIB / PAGE,
        "{}",
        bitmap.dirty_pages()
    );
}

#[test]
fn a_bandwidth_limit_still_delivers_everything() {
    let regions = [(0, 4 * MIB)];
    let src = memory(&regions);
    for gpa in (0..4 * MIB).step_by(PAGE as usize) {
        src.write_slice(&page_pattern(gpa, 0), GuestAddress(gpa))
            .unwrap();
    }
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let chain = PrecopyNotifierChain::new();
    let mut stream = Vec::new();
    // 16 MiB/s: 1.6 MiB per 100 ms window, so the loop sleeps between windows.
    let report = Precopy::new(&src, &bitmap, &chain)
        .config(PrecopyConfig::default().with_max_bandwidth(Some(16 * MIB)))
        .run(
            &mut GuestMemoryDirtyLog::new(&src),
            &mut Vm::default(),
            &mut stream,
        )
        .unwrap();
    assert_eq!(report.pages_sent, 4 * MIB / PAGE);
    assert!(report.bandwidth > 0.0 && report.bandwidth <= (16 * MIB) as f64);
    let dst = memory::<()>(&regions);
    Receiver::new(&dst).unwrap().receive(&stream[..]).unwrap();
    assert_same(&src, &dst, &regions);
}

#[test]
fn waiting_for_a_round_the_guest_never_started_returns_at_once() {
    use virtio_balloon::{Balloon, BalloonConfig};
    let mem = Arc::new(memory(&[(0, 4 * MIB)]));
    let bitmap = Arc::new(MigrationBitmap::new(&*mem).unwrap());
    let balloon = Balloon::new(
        BalloonConfig::default().with_free_page_hint(true),
        mem.clone(),
        bitmap.clone(),
    )
    .unwrap();
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Arc::new(balloon.hint_control()));
    // No driver: hinting is not negotiated, the notifier does nothing and the wait ends
    // without a round, long before its deadline.
    let precopy = Precopy::new(&*mem, &bitmap, &chain)
        .wait_for_hint_round(balloon.hint_control(), Duration::from_secs(3600));
    assert!(format!("{precopy:?}").contains("wait_for_hints: Some(3600s)"));
    let report = precopy
        .run(
            &mut GuestMemoryDirtyLog::new(&mem),
            &mut Vm::default(),
            io::sink(),
        )
        .unwrap();
    assert_eq!(report.hint_round_completed, Some(false));
    assert_eq!(report.zero_pages, 4 * MIB / PAGE);
}

#[test]
fn errors_name_their_cause() {
    use std::error::Error as _;
    let io_err = PrecopyError::Io(io::Error::other("pipe"));
    assert_eq!(
        io_err.to_string(),
        "writing the migration stream failed: pipe"
    );
    assert!(io_err.source().is_some());
    let mem_err = PrecopyError::Memory {
        addr: GuestAddress(0x5000),
    };
    assert_eq!(mem_err.to_string(), "reading guest memory at 0x5000 failed");
    assert!(mem_err.source().is_none());
    assert!(PrecopyError::Cancelled.source().is_none());
    let stop = PrecopyError::StopVm("busy".into());
    assert_eq!(stop.source().unwrap().to_string(), "busy");

    // A Setup failure and a sync failure carry their sources.
    let src = memory(&[(0, MIB)]);
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Journal::new(Some(PrecopyEvent::Setup)));
    let err = Precopy::new(&src, &bitmap, &chain)
        .run(
            &mut GuestMemoryDirtyLog::new(&src),
            &mut Vm::default(),
            io::sink(),
        )
        .unwrap_err();
    assert!(err.to_string().starts_with("migration setup failed: "));
    assert!(err.source().is_some());
    let err = Precopy::new(&src, &bitmap, &PrecopyNotifierChain::new())
        .run(&mut FlakyLog { calls: 0 }, &mut Vm::default(), io::sink())
        .unwrap_err();
    assert!(err.source().is_some());
}

#[test]
fn every_page_sent_is_reported_to_the_log_with_its_bytes() {
    // A log that records what `page_sent` was told, over vm-memory's write tracking.
    struct Recording<'a> {
        inner: GuestMemoryDirtyLog<'a>,
        sent: Vec<(u64, Vec<u8>)>,
    }
    impl DirtyLog for Recording<'_> {
        fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
            self.inner.take_dirty_log(region)
        }
        fn page_sent(&mut self, addr: GuestAddress, data: &[u8]) {
            self.sent.push((addr.0, data.to_vec()));
        }
    }
    let regions = [(0, MIB)];
    let src = memory(&regions);
    for gpa in (0..MIB).step_by(3 * PAGE as usize) {
        src.write_slice(&page_pattern(gpa, 1), GuestAddress(gpa))
            .unwrap();
    }
    let bitmap = MigrationBitmap::new(&src).unwrap();
    let chain = PrecopyNotifierChain::new();
    let mut log = Recording {
        inner: GuestMemoryDirtyLog::new(&src),
        sent: Vec::new(),
    };
    let report = Precopy::new(&src, &bitmap, &chain)
        .stopped()
        .run(&mut log, &mut Vm::default(), io::sink())
        .unwrap();
    // Stopped: one final stage, every page once.
    assert_eq!(report.iterations.len(), 1);
    assert_eq!(log.sent.len() as u64, MIB / PAGE);
    assert_eq!(report.pages_sent + report.zero_pages, MIB / PAGE);
    for (gpa, data) in &log.sent {
        let mut page = [0u8; PAGE as usize];
        src.read_slice(&mut page, GuestAddress(*gpa)).unwrap();
        assert_eq!(&page[..], &data[..], "page {gpa:#x}");
    }
}
