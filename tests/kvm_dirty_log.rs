// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The migration bitmap on KVM's real dirty log: a vCPU writes the pages each test chooses.

#![cfg(feature = "kvm")]

use guest_model::require_kvm;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use guest_model::kvm::{KvmVm, PageVcpu};
use proptest::prelude::*;
use virtio_balloon::migration::{
    DirtyLog, DirtyLogClear, DirtyLogError, Error as BitmapError, HarvestedLog, KvmDirtyLog,
    KvmError, KvmProtection, MigrationBitmap, NotifierError, PrecopyContext, PrecopyEvent,
    PrecopyNotifier, PrecopyNotifierChain, RegionInfo,
};
use virtio_balloon_precopy::{
    MigrationReport, Precopy, PrecopyConfig, PrecopyError, Receiver, VmControl, VmControlError,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;
const MEM: u64 = 64 << 20;
const FIRMWARE: GuestAddress = GuestAddress(0x1000_0000);

/// A VM with one 64 MiB region, its dirty log and a page-writing vCPU.
struct Setup {
    vm: KvmVm,
    mem: guest_model::Mem,
    log: Arc<KvmDirtyLog>,
    bitmap: Arc<MigrationBitmap>,
    vcpu: PageVcpu,
}

fn setup(protection: KvmProtection, clear_step: bool) -> Setup {
    let mem = guest_model::guest_memory(&[(GuestAddress(0), MEM)]);
    let mut vm = KvmVm::new().expect("open /dev/kvm");
    let slots = vm.register(&mem).expect("register guest memory");
    let fw = vm.add_firmware_slot(FIRMWARE).expect("firmware slot");
    let vcpu = PageVcpu::new(&vm, fw).expect("vCPU");
    let log = Arc::new(KvmDirtyLog::new(vm.vm.clone(), slots, protection).expect("dirty log"));
    let bitmap = Arc::new(MigrationBitmap::new(&*mem).expect("bitmap"));
    if clear_step {
        assert!(bitmap.set_log_clear(log.clone()));
    }
    Setup {
        vm,
        mem,
        log,
        bitmap,
        vcpu,
    }
}

fn pages(list: &[u64]) -> Vec<GuestAddress> {
    list.iter().map(|p| GuestAddress(p * PAGE)).collect()
}

fn dirty(b: &MigrationBitmap) -> Vec<u64> {
    b.iter_dirty().map(|a| a.0 / PAGE).collect()
}

#[test]
fn log_reports_exactly_the_pages_written() {
    require_kvm!();
    for protection in [KvmProtection::Automatic, KvmProtection::Manual] {
        let mut s = setup(protection, true);
        let mut log = &*s.log;
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), Vec::<u64>::new(), "{protection:?}");
        s.vcpu.fill_pages(&pages(&[3, 5]), 0xaa).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), vec![3, 5], "{protection:?}");
        for p in pages(&[3, 5]) {
            assert!(s.bitmap.take_page(p).unwrap());
        }
        s.vcpu.fill_pages(&pages(&[7]), 0xbb).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), vec![7], "{protection:?}");
    }
}

const MODES: [KvmProtection; 2] = [KvmProtection::Automatic, KvmProtection::Manual];

#[test]
fn manual_protection_keeps_pages_dirty_until_cleared() {
    require_kvm!();
    let mut s = setup(KvmProtection::Manual, true);
    let region = s.bitmap.regions().next().unwrap();
    s.vcpu.fill_pages(&pages(&[3, 5]), 1).unwrap();
    // Without a clear, KVM reports the same pages at every harvest.
    for _ in 0..2 {
        assert_eq!(s.log.harvest(&region).unwrap().words[0], 0x28);
    }
    assert_eq!(s.log.uncleared_pages(&region), 2);
    // Sending page 3 clears its chunk in KVM first; page 5 was in that chunk too.
    let mut log = &*s.log;
    s.bitmap.sync(&mut log).unwrap();
    assert!(s.bitmap.take_page(GuestAddress(3 * PAGE)).unwrap());
    assert_eq!(s.log.uncleared_pages(&region), 0);
    assert_eq!(s.log.harvest(&region).unwrap().words[0], 0);
    // A write after the clear is logged again.
    s.vcpu.fill_pages(&pages(&[5]), 2).unwrap();
    assert_eq!(s.log.harvest(&region).unwrap().words[0], 0x20);
}

#[test]
fn a_page_hinted_then_written_comes_back() {
    require_kvm!();
    for protection in MODES {
        let mut s = setup(protection, true);
        let mut log = &*s.log;
        s.vcpu.fill_pages(&pages(&[10, 11]), 1).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), vec![10, 11]);
        // The guest frees and hints both, then reuses page 10.
        assert_eq!(
            s.bitmap.clear_free_range(GuestAddress(10 * PAGE), 2 * PAGE),
            2
        );
        s.vcpu.fill_pages(&pages(&[10]), 2).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), vec![10], "{protection:?}");
    }
}

#[test]
fn a_page_hinted_and_not_written_stays_clean_to_the_final_sync() {
    require_kvm!();
    for protection in MODES {
        let mut s = setup(protection, true);
        let mut log = &*s.log;
        s.vcpu.fill_pages(&pages(&[20, 21, 22]), 1).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(
            s.bitmap.clear_free_range(GuestAddress(20 * PAGE), 3 * PAGE),
            3
        );
        // Next sync, with the guest running and writing elsewhere.
        s.vcpu.fill_pages(&pages(&[30]), 1).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), vec![30], "{protection:?}");
        assert!(s.bitmap.take_page(GuestAddress(30 * PAGE)).unwrap());
        // The final sync (guest stopped).
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), Vec::<u64>::new(), "{protection:?}");
        assert_eq!(s.bitmap.log_clear_failures(), 0);
    }
}

#[test]
fn without_the_clear_step_manual_protection_brings_hinted_pages_back() {
    require_kvm!();
    // The clear step left out on purpose: with manual protection every hinted page comes
    // back at the next sync, so the hint saves nothing. With automatic protection KVM has
    // already reset the bits, and the hint holds.
    for (protection, comes_back) in [
        (KvmProtection::Manual, true),
        (KvmProtection::Automatic, false),
    ] {
        let mut s = setup(protection, false);
        let mut log = &*s.log;
        s.vcpu.fill_pages(&pages(&[20, 21, 22]), 1).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(
            s.bitmap.clear_free_range(GuestAddress(20 * PAGE), 3 * PAGE),
            3
        );
        s.bitmap.sync(&mut log).unwrap();
        let want: Vec<u64> = if comes_back { vec![20, 21, 22] } else { vec![] };
        assert_eq!(dirty(&s.bitmap), want, "{protection:?}");
    }
}

#[test]
fn a_hint_never_clears_a_write_made_after_the_sync() {
    require_kvm!();
    for protection in MODES {
        let mut s = setup(protection, true);
        let mut log = &*s.log;
        s.vcpu.fill_pages(&pages(&[40]), 1).unwrap();
        s.bitmap.sync(&mut log).unwrap();
        assert!(s.bitmap.take_page(GuestAddress(40 * PAGE)).unwrap());
        // Page 41 was clean at the sync; the guest writes it, then (wrongly or late)
        // hints both. Clearing the log for 41 would lose that write: it must come back.
        s.vcpu.fill_pages(&pages(&[41]), 2).unwrap();
        s.bitmap.mark_dirty(GuestAddress(40 * PAGE), 2 * PAGE);
        s.bitmap.clear_free_range(GuestAddress(40 * PAGE), 2 * PAGE);
        s.bitmap.sync(&mut log).unwrap();
        assert_eq!(dirty(&s.bitmap), vec![41], "{protection:?}");
    }
}

/// What the race test knows of each page: its last event.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    Untouched,
    Written,
    Hinted,
}

/// Sends every dirty page of `s` from `src` to `dst`, clearing the log first.
fn send_pass(bitmap: &MigrationBitmap, src: &guest_model::Mem, dst: &GuestMemoryMmap<()>) {
    let mut buf = vec![0u8; PAGE as usize];
    let dirty: Vec<GuestAddress> = bitmap.iter_dirty().collect();
    for addr in dirty {
        if bitmap.take_page(addr).unwrap() {
            src.read_slice(&mut buf, addr).unwrap();
            dst.write_slice(&buf, addr).unwrap();
        }
    }
}

fn race(protection: KvmProtection, seed: u64, rounds: u32) {
    const POOL: u64 = 512;
    let s = setup(protection, true);
    let Setup {
        vm: _vm,
        mem,
        log,
        bitmap,
        mut vcpu,
    } = s;
    let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let state = Arc::new(Mutex::new(vec![Last::Untouched; POOL as usize]));
    // Held by the hinter while it applies a hint and by the migration during a sync: the
    // device's hint lock and BeforeBitmapSync give the same exclusion.
    let hint_gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU32::new(0));

    let writer = {
        let (state, stop, writes) = (state.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut rng = seed | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            while !stop.load(Ordering::Relaxed) {
                let page = next() % POOL;
                let mut content = [0u8; 4096];
                for c in content.chunks_mut(8) {
                    c.copy_from_slice(&next().to_le_bytes());
                }
                let mut st = state.lock().unwrap();
                vcpu.write_pages(&[GuestAddress(page * PAGE)], &[content])
                    .unwrap();
                st[page as usize] = Last::Written;
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let hinter = {
        let (state, stop, gate, bitmap) = (
            state.clone(),
            stop.clone(),
            hint_gate.clone(),
            bitmap.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = seed.rotate_left(17) | 1;
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let first = rng % POOL;
                let len = (1 + (rng >> 32) % 8).min(POOL - first);
                let _g = gate.lock().unwrap();
                let mut st = state.lock().unwrap();
                bitmap.clear_free_range(GuestAddress(first * PAGE), len * PAGE);
                for p in first..first + len {
                    st[p as usize] = Last::Hinted;
                }
                drop(st);
                drop(_g);
                std::thread::yield_now();
            }
        })
    };

    bitmap.mark_all_dirty();
    let mut l = &*log;
    for _ in 0..rounds {
        send_pass(&bitmap, &mem, &dst);
        let _g = hint_gate.lock().unwrap();
        bitmap.sync(&mut l).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    hinter.join().unwrap();
    // The guest is stopped: final sync and pass.
    bitmap.sync(&mut l).unwrap();
    send_pass(&bitmap, &mem, &dst);

    let st = state.lock().unwrap();
    let (mut a, mut b) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
    let mut checked = 0;
    for page in 0..MEM / PAGE {
        let last = st.get(page as usize).copied().unwrap_or(Last::Untouched);
        if last == Last::Hinted {
            // Free in the guest: its contents do not matter.
            continue;
        }
        mem.read_slice(&mut a, GuestAddress(page * PAGE)).unwrap();
        dst.read_slice(&mut b, GuestAddress(page * PAGE)).unwrap();
        assert!(
            a == b,
            "{protection:?}: page {page} differs ({:?})",
            last as u8
        );
        checked += 1;
    }
    assert!(checked > 0);
    assert!(writes.load(Ordering::Relaxed) > 0);
    assert_eq!(bitmap.log_clear_failures(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// vCPU writes race hints and syncs; the destination matches the source byte for byte
    /// on every page that is not free.
    #[test]
    fn vcpu_writes_racing_hints_and_syncs_lose_nothing(seed in any::<u64>(), rounds in 2u32..6) {
        require_kvm!(Ok(()));
        for protection in MODES {
            race(protection, seed, rounds);
        }
    }
}

/// Hints every page of `free` into the bitmap at the first sync while the guest runs, the
/// way the balloon device does during its hint round.
struct Hinter {
    bitmap: Arc<MigrationBitmap>,
    free: (GuestAddress, u64),
    done: AtomicBool,
}

impl PrecopyNotifier for Hinter {
    fn name(&self) -> &str {
        "hinter"
    }

    fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
        if event == PrecopyEvent::AfterBitmapSync
            && ctx.vm_running()
            && !self.done.swap(true, Ordering::Relaxed)
        {
            self.bitmap.clear_free_range(self.free.0, self.free.1);
        }
        Ok(())
    }
}

/// A guest whose stop runs `on_stop` (to break KVM at the worst moment) and which counts
/// resumes.
struct Vm<'a> {
    on_stop: Option<Box<dyn FnMut() + 'a>>,
    resumed: u32,
}

impl VmControl for Vm<'_> {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        if let Some(f) = self.on_stop.as_mut() {
            f();
        }
        Ok(())
    }

    fn resume_vm(&mut self) {
        self.resumed += 1;
    }
}

const USED: (u64, u64) = (0, 2048);
const FREE: (u64, u64) = (2048, 12288);

/// A guest with 8 MiB used and 48 MiB free, both written by the vCPU before the
/// migration.
fn written_guest(protection: KvmProtection, clear_step: bool) -> Setup {
    let mut s = setup(protection, clear_step);
    let used: Vec<u64> = (USED.0..USED.0 + USED.1).collect();
    let free: Vec<u64> = (FREE.0..FREE.0 + FREE.1).collect();
    s.vcpu.fill_pages(&pages(&used), 0x5a).unwrap();
    s.vcpu.fill_pages(&pages(&free), 0xa5).unwrap();
    s
}

fn migrate(
    s: &Setup,
    log: &mut dyn DirtyLog,
    vm: &mut Vm<'_>,
) -> (Result<MigrationReport, PrecopyError>, Vec<u8>) {
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Arc::new(Hinter {
        bitmap: s.bitmap.clone(),
        free: (GuestAddress(FREE.0 * PAGE), FREE.1 * PAGE),
        done: AtomicBool::new(false),
    }));
    let mut stream = Vec::new();
    let config = PrecopyConfig::default().with_max_iterations(1);
    let result = Precopy::new(&*s.mem, &s.bitmap, &chain)
        .config(config)
        .run(log, vm, &mut stream);
    (result, stream)
}

#[test]
fn precopy_final_stage_on_kvm_with_hints() {
    require_kvm!();
    for (protection, clear_step) in [
        (KvmProtection::Automatic, true),
        (KvmProtection::Manual, true),
        (KvmProtection::Manual, false),
    ] {
        let s = written_guest(protection, clear_step);
        let mut log = &*s.log;
        let mut vm = Vm {
            on_stop: None,
            resumed: 0,
        };
        let (report, stream) = migrate(&s, &mut log, &mut vm);
        let report = report.unwrap();
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        Receiver::new(&dst).unwrap().receive(&stream[..]).unwrap();
        let last = report.iterations.last().unwrap();
        assert!(last.final_stage);
        println!(
            "{protection:?} clear step {clear_step}: sent {} pages ({} zero) in all, final stage {} \
             bytes ({} pages), {} pages hinted",
            report.pages_sent,
            report.zero_pages,
            last.bytes,
            last.pages_sent,
            report.hinted_pages
        );
        // The used pages arrive whatever happens.
        let mut buf = vec![0u8; PAGE as usize];
        for p in USED.0..USED.0 + USED.1 {
            dst.read_slice(&mut buf, GuestAddress(p * PAGE)).unwrap();
            assert!(buf.iter().all(|&b| b == 0x5a), "page {p}");
        }
        assert_eq!(vm.resumed, 0);
        if clear_step {
            // The 48 MiB of hinted pages are never sent.
            assert!(report.pages_sent < USED.1 + 64, "{}", report.pages_sent);
            assert!(last.pages_sent < 64, "{}", last.pages_sent);
        } else {
            // Every hinted page is sent during the downtime.
            assert!(last.pages_sent >= FREE.1, "{}", last.pages_sent);
        }
    }
}

/// A dirty log and clear step that fail with ENOMEM once `armed` is set.
struct Failing<'a> {
    inner: &'a KvmDirtyLog,
    armed: &'a AtomicBool,
}

fn enomem() -> DirtyLogError {
    Box::new(io::Error::from_raw_os_error(libc::ENOMEM))
}

impl DirtyLog for Failing<'_> {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        if self.armed.load(Ordering::Relaxed) {
            return Err(enomem());
        }
        Ok(self.inner.harvest(region)?)
    }
}

struct FailingClear {
    inner: Arc<KvmDirtyLog>,
    armed: Arc<AtomicBool>,
}

impl DirtyLogClear for FailingClear {
    fn clear_dirty_log(&self, r: &RegionInfo, first: u64, pages: u64) -> Result<(), DirtyLogError> {
        if self.armed.load(Ordering::Relaxed) {
            return Err(enomem());
        }
        self.inner.clear_dirty_log(r, first, pages)
    }
}

/// Checks that `result` failed in the final sync and the guest was resumed.
fn failed_after_stop(result: Result<MigrationReport, PrecopyError>, resumed: u32, what: &str) {
    let err = result.expect_err(what);
    println!("{what}: {err}");
    assert!(
        matches!(
            err,
            PrecopyError::Sync(BitmapError::DirtyLog { region: 0, .. })
        ),
        "{what}: {err:?}"
    );
    assert_eq!(resumed, 1, "{what}: the guest must be resumed");
}

#[test]
fn a_removed_slot_fails_the_migration_and_resumes_the_guest() {
    require_kvm!();
    for protection in MODES {
        let mut s = written_guest(protection, true);
        let log = s.log.clone();
        let vm_cell = std::cell::RefCell::new(std::mem::replace(&mut s.vm, KvmVm::new().unwrap()));
        let mut vm = Vm {
            on_stop: Some(Box::new(|| vm_cell.borrow_mut().remove_slot(0).unwrap())),
            resumed: 0,
        };
        let (result, _) = migrate(&s, &mut &*log, &mut vm);
        let resumed = vm.resumed;
        drop(vm);
        let err_text = format!("{:?}", result.as_ref().err());
        failed_after_stop(result, resumed, "slot removed");
        assert!(err_text.contains("GetDirtyLog"), "{err_text}");
    }
}

#[test]
fn a_slot_that_lost_dirty_logging_fails_the_migration() {
    require_kvm!();
    for protection in MODES {
        let s = written_guest(protection, true);
        let mut vm = Vm {
            on_stop: Some(Box::new(|| s.vm.stop_logging(0).unwrap())),
            resumed: 0,
        };
        let (result, _) = migrate(&s, &mut &*s.log, &mut vm);
        let resumed = vm.resumed;
        failed_after_stop(result, resumed, "dirty logging turned off");
    }
}

#[test]
fn enomem_from_the_dirty_log_fails_the_migration() {
    require_kvm!();
    let s = written_guest(KvmProtection::Manual, true);
    let armed = AtomicBool::new(false);
    let mut log = Failing {
        inner: &s.log,
        armed: &armed,
    };
    let mut vm = Vm {
        on_stop: Some(Box::new(|| armed.store(true, Ordering::Relaxed))),
        resumed: 0,
    };
    let (result, _) = migrate(&s, &mut log, &mut vm);
    let resumed = vm.resumed;
    failed_after_stop(result, resumed, "ENOMEM in the final sync");
}

#[test]
fn enomem_from_the_clear_step_fails_the_send_and_keeps_hints_safe() {
    require_kvm!();
    let mut s = setup(KvmProtection::Manual, false);
    let armed = Arc::new(AtomicBool::new(true));
    assert!(s.bitmap.set_log_clear(Arc::new(FailingClear {
        inner: s.log.clone(),
        armed: armed.clone(),
    })));
    s.vcpu.fill_pages(&pages(&[3, 4]), 1).unwrap();
    let mut log = &*s.log;
    s.bitmap.sync(&mut log).unwrap();
    // A hint whose clear fails leaves the page to be sent.
    assert_eq!(s.bitmap.clear_free_range(GuestAddress(4 * PAGE), PAGE), 0);
    assert_eq!(s.bitmap.log_clear_failures(), 1);
    assert_eq!(dirty(&s.bitmap), vec![3, 4]);
    // A send whose clear fails is an error; the page stays dirty.
    let err = s.bitmap.take_page(GuestAddress(3 * PAGE)).unwrap_err();
    assert!(
        matches!(err, BitmapError::ClearDirtyLog { region: 0, .. }),
        "{err:?}"
    );
    assert_eq!(dirty(&s.bitmap), vec![3, 4]);
    // The precopy loop reports it and cleans up.
    let mut vm = Vm {
        on_stop: None,
        resumed: 0,
    };
    let (result, _) = migrate(&s, &mut log, &mut vm);
    let err = result.unwrap_err();
    assert!(
        matches!(err, PrecopyError::Sync(BitmapError::ClearDirtyLog { .. })),
        "{err:?}"
    );
    assert_eq!(vm.resumed, 0, "the guest never stopped");
    // Once KVM works again the same pages go out.
    armed.store(false, Ordering::Relaxed);
    assert!(s.bitmap.take_page(GuestAddress(3 * PAGE)).unwrap());
}

#[test]
fn a_region_without_a_slot_is_an_error() {
    require_kvm!();
    let s = setup(KvmProtection::Manual, true);
    let other = RegionInfo {
        index: 0,
        start: GuestAddress(0x4000_0000),
        len: MEM,
    };
    let err = s.log.harvest(&other).unwrap_err();
    assert!(matches!(err, KvmError::NoSlot(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "no KVM slot covers region 0 at 0x40000000 of 0x4000000 bytes"
    );
    assert!(s.log.clear_dirty_log(&other, 0, 1).is_err());
    assert_eq!(s.log.protection(), KvmProtection::Manual);
    assert_eq!(s.log.slots().count(), 1);
}

#[test]
fn kvm_errors_say_what_failed() {
    use std::error::Error as _;
    use vmm_sys_util::errno;
    let slot = virtio_balloon::migration::KvmSlot {
        slot: 3,
        guest_addr: GuestAddress(0x1000),
        len: 0,
    };
    let cases: Vec<(KvmError, &str, bool)> = vec![
        (
            KvmError::ManualProtectUnsupported,
            "KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            false,
        ),
        (
            KvmError::EnableManualProtect(errno::Error::new(libc::EINVAL)),
            "enabling manual dirty log protection failed: Invalid argument (os error 22)",
            true,
        ),
        (
            KvmError::BadSlot(slot),
            "KVM slot 3 at 0x1000 of 0x0 bytes cannot be tracked",
            false,
        ),
        (
            KvmError::GetDirtyLog {
                slot: 1,
                source: errno::Error::new(libc::ENOENT),
            },
            "KVM_GET_DIRTY_LOG of slot 1 failed: No such file or directory (os error 2)",
            true,
        ),
        (
            KvmError::ClearDirtyLog {
                slot: 2,
                source: errno::Error::new(libc::ENOMEM),
            },
            "KVM_CLEAR_DIRTY_LOG of slot 2 failed: Cannot allocate memory (os error 12)",
            true,
        ),
    ];
    for (err, text, has_source) in cases {
        assert_eq!(err.to_string(), text);
        assert_eq!(err.source().is_some(), has_source, "{text}");
    }
}

#[test]
fn an_empty_slot_is_refused() {
    require_kvm!();
    let vm = KvmVm::new().unwrap();
    let slot = virtio_balloon::migration::KvmSlot {
        slot: 0,
        guest_addr: GuestAddress(0),
        len: 0,
    };
    let err = KvmDirtyLog::new(vm.vm.clone(), [slot], KvmProtection::Automatic).unwrap_err();
    assert!(matches!(err, KvmError::BadSlot(s) if s == slot), "{err}");
}

#[test]
fn a_failed_clear_in_kvm_keeps_the_pages_reported() {
    require_kvm!();
    let mut s = setup(KvmProtection::Manual, true);
    let region = s.bitmap.regions().next().unwrap();
    s.vcpu.fill_pages(&pages(&[3, 4, 70]), 1).unwrap();
    // An owned log is a DirtyLog too.
    let mut owned =
        KvmDirtyLog::new(s.vm.vm.clone(), s.log.slots(), KvmProtection::Manual).unwrap();
    s.bitmap.sync(&mut owned).unwrap();
    let mut log = &*s.log;
    s.bitmap.sync(&mut log).unwrap();
    assert_eq!(s.log.uncleared_pages(&region), 3);
    // The slot goes away under the migration: clearing fails, and nothing is lost.
    s.vm.remove_slot(0).unwrap();
    assert_eq!(s.bitmap.clear_free_range(GuestAddress(4 * PAGE), PAGE), 0);
    assert_eq!(s.bitmap.log_clear_failures(), 1);
    let err = s.bitmap.take_page(GuestAddress(3 * PAGE)).unwrap_err();
    assert!(
        err.to_string()
            .contains("KVM_CLEAR_DIRTY_LOG of slot 0 failed"),
        "{err}"
    );
    assert_eq!(s.log.uncleared_pages(&region), 3);
    assert_eq!(dirty(&s.bitmap), vec![3, 4, 70]);
}
