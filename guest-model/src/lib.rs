// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest side of virtio-balloon's tests, benchmarks, fuzzers and demo: a Linux-faithful
//! guest driver model and a harness that wires it to the
//! balloon device the way a VMM would.
//!
//! * [`ring`]: the guest side of split virtqueues (Linux `virtio_ring.c`).
//! * [`mmio`]: the virtio-mmio v2 register map and the [`Bus`] trait.
//! * [`driver`]: the balloon driver model (Linux `virtio_balloon.c`, 6.12): free page hinting,
//!   inflate/deflate with a guest page allocator, deflate on OOM, statistics and free page
//!   reporting; step by step or with background interrupt and workqueue threads, plus
//!   low-level access for hostile tests.
//! * [`Harness`]: guest memory + device + event manager thread + driver in one call.
//! * [`trace`]: captured free page hint rounds and what a replay posts from them.
//! * [`host`]: host mappings of every kind behind a guest region, and what the kernel says
//!   they hold.
//! * [`backend`]: a memory backend that records what the device discarded and populated.

pub mod backend;
pub mod bring_up;
pub mod driver;
pub mod guest;
pub mod host;
pub mod kvm;
pub mod log;
pub mod mmio;
pub mod ring;
pub mod trace;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use std::os::fd::AsRawFd;
use virtio_balloon::backend::MemoryBackend;
use virtio_balloon::sink::FreePageSink;
use virtio_balloon::transport::{MmioTransport, VirtioDevice};
use virtio_balloon::{Balloon, BalloonConfig, BalloonEvents, FreePageHinting};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub use driver::{
    default_stat_value, stat, BalloonRequest, Driver, DriverError, DriverOptions, KickMode,
    PageOrder, PostedHint, QueueRole, RoundEnd, RoundReport, Sent, SizeEnd, SizeUpdate, WorkKind,
    WorkOutcome, BALLOON_PFN_BYTES, DEADLINE, HINT_BLOCK_BYTES, LINUX_STATS_ORDER,
    PAGE_REPORTING_CAPACITY, STAT_ENTRY_BYTES, VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_OOM_NR_PAGES, VIRTIO_BALLOON_PFN_SHIFT,
};
pub use guest::*;
pub use mmio::{cmd, config, feature, isr, reg, status, Access, Bus, TracingBus};
pub use ring::{Desc, Part, RingLayout, UsedBuf};

/// Guest memory as the device takes it.
pub type Mem = Arc<GuestMemoryMmap<AtomicBitmap>>;
/// The device under test behind its transport.
pub type Transport = MmioTransport<Balloon<Mem>>;
/// The transport as the VMM shares it between the MMIO path and the event manager.
pub type Dev = Arc<Mutex<Transport>>;

/// The pattern a test guest writes into frame `pfn` (never 0 with the tests' salts).
pub fn pattern(pfn: u64, salt: u64) -> u64 {
    (pfn << 12) ^ salt
}

/// The guest writes its pattern at the start and the end of each frame.
pub fn write_pages<'a>(mem: &Mem, pfns: impl IntoIterator<Item = &'a u64>, salt: u64) {
    use vm_memory::Bytes;
    for &p in pfns {
        let v = pattern(p, salt);
        let frame = p * BALLOON_PFN_BYTES;
        mem.write_obj(v, GuestAddress(frame)).unwrap();
        mem.write_obj(v, GuestAddress(frame + BALLOON_PFN_BYTES - 8))
            .unwrap();
    }
}

/// The first and last 8 bytes of a frame.
pub fn read_page(mem: &Mem, pfn: u64) -> (u64, u64) {
    use vm_memory::Bytes;
    let frame = pfn * BALLOON_PFN_BYTES;
    (
        mem.read_obj(GuestAddress(frame)).unwrap(),
        mem.read_obj(GuestAddress(frame + BALLOON_PFN_BYTES - 8))
            .unwrap(),
    )
}

/// Locks `m`; a test thread that panicked while holding it left nothing half done.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the device, under the mutex the event loop and the MMIO path share.
pub fn dev<T>(h: &Harness, f: impl FnOnce(&mut Balloon<Mem>) -> T) -> T {
    f(lock(&h.dev).device_mut())
}

impl Bus for Dev {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
    }
}

/// 1 MiB.
pub const MIB: u64 = 1 << 20;

/// MMIO accesses the harness remembers for failure messages.
pub const MMIO_TRACE_LEN: usize = 64;

/// Everything [`Harness::new`] needs.
#[derive(Clone, Debug)]
pub struct HarnessConfig {
    /// Guest RAM regions: (start, length).
    pub regions: Vec<(GuestAddress, u64)>,
    /// The device's configuration.
    pub balloon: BalloonConfig,
    /// The driver model's knobs (driver area, free blocks, ...).
    pub driver: DriverOptions,
    /// Probe the device before returning.
    pub probe: bool,
    /// Start the driver's background interrupt and workqueue threads (after the probe).
    pub background: bool,
    /// Pause of the event manager thread after each wake-up that handled at least one event
    /// (zero: none), to make the device lag behind the guest.
    pub device_lag: Duration,
}

impl HarnessConfig {
    /// One RAM region `[0, mem_size)`, FREE_PAGE_HINT on, the driver area at 1 MiB (3 MiB
    /// long) and `nblocks` free 4 MiB blocks starting at 4 MiB. Probed, step mode.
    pub fn simple(mem_size: u64, nblocks: usize) -> Self {
        let balloon = BalloonConfig::default().with_free_page_hint(true);
        let free_blocks = blocks(GuestAddress(4 * MIB), nblocks);
        if let Some(last) = free_blocks.last() {
            assert!(
                last.0 + HINT_BLOCK_BYTES <= mem_size,
                "blocks past the end of RAM"
            );
        }
        HarnessConfig {
            regions: vec![(GuestAddress(0), mem_size)],
            balloon,
            driver: DriverOptions {
                driver_area: (GuestAddress(MIB), 3 * MIB),
                free_blocks,
                ..DriverOptions::default()
            },
            probe: true,
            background: false,
            device_lag: Duration::ZERO,
        }
    }
}

impl HarnessConfig {
    /// One RAM region `[0, mem_size)` and the driver area at 1 MiB (3 MiB long); the
    /// traditional balloon with statistics, DEFLATE_ON_OOM and REPORTING offered, no free page
    /// hinting; a balloon pool of `pool_len` bytes at 4 MiB. Probed, step mode.
    pub fn balloon(mem_size: u64, pool_len: u64) -> Self {
        assert!(4 * MIB + pool_len <= mem_size, "pool past the end of RAM");
        let balloon = BalloonConfig::default()
            .with_stats(true)
            .with_deflate_on_oom(true)
            .with_free_page_hint(false)
            .with_reporting(true);
        HarnessConfig {
            regions: vec![(GuestAddress(0), mem_size)],
            balloon,
            driver: DriverOptions {
                driver_area: (GuestAddress(MIB), 3 * MIB),
                balloon_pool: vec![(GuestAddress(4 * MIB), pool_len)],
                ..DriverOptions::default()
            },
            probe: true,
            background: false,
            device_lag: Duration::ZERO,
        }
    }
}

/// `n` consecutive 4 MiB blocks from `start`.
pub fn blocks(start: GuestAddress, n: usize) -> Vec<GuestAddress> {
    (0..n as u64)
        .map(|i| GuestAddress(start.0 + i * HINT_BLOCK_BYTES))
        .collect()
}

/// Builds guest memory with the given regions (anonymous, lazily populated).
pub fn guest_memory(regions: &[(GuestAddress, u64)]) -> Mem {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(a, l)| (a, usize::try_from(l).expect("region length fits usize")))
        .collect();
    Arc::new(GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).expect("guest memory"))
}

/// Guest memory, the device and its event loop, and the guest driver model.
pub struct Harness {
    /// Guest memory.
    pub mem: Mem,
    /// The device behind its MMIO transport.
    pub dev: Dev,
    /// The migration side of hinting.
    pub hints: FreePageHinting,
    /// The guest.
    pub driver: Driver,
    /// The MMIO path the driver uses, remembering the latest accesses.
    pub bus: Arc<TracingBus<Dev>>,
    em_stop: Arc<AtomicBool>,
    em_errors: Arc<Mutex<Vec<String>>>,
    em_thread: Option<JoinHandle<()>>,
}

impl Harness {
    /// Builds memory, the device (with `sink`), an event manager on its own thread, and the
    /// driver; probes and starts the background threads if the config says so.
    pub fn new(cfg: HarnessConfig, sink: Arc<dyn FreePageSink>) -> Harness {
        let mem = guest_memory(&cfg.regions);
        Self::with_memory(cfg, mem, sink)
    }

    /// [`new`](Self::new) over memory the test built.
    pub fn with_memory(cfg: HarnessConfig, mem: Mem, sink: Arc<dyn FreePageSink>) -> Harness {
        let balloon: Balloon<Mem> =
            Balloon::new(cfg.balloon, mem.clone(), sink).expect("create the balloon");
        Self::with_balloon(cfg, mem, balloon)
    }

    /// [`new`](Self::new) with the memory backend the device discards and repopulates guest
    /// memory with (`Balloon::with_backend`).
    pub fn with_backend(
        cfg: HarnessConfig,
        sink: Arc<dyn FreePageSink>,
        backend: Arc<dyn MemoryBackend>,
    ) -> Harness {
        let mem = guest_memory(&cfg.regions);
        Self::with_memory_and_backend(cfg, mem, sink, backend)
    }

    /// [`with_memory`](Self::with_memory) with the memory backend of the device.
    pub fn with_memory_and_backend(
        cfg: HarnessConfig,
        mem: Mem,
        sink: Arc<dyn FreePageSink>,
        backend: Arc<dyn MemoryBackend>,
    ) -> Harness {
        let balloon: Balloon<Mem> = Balloon::with_backend(cfg.balloon, mem.clone(), sink, backend)
            .expect("create the balloon");
        Self::with_balloon(cfg, mem, balloon)
    }

    fn with_balloon(cfg: HarnessConfig, mem: Mem, balloon: Balloon<Mem>) -> Harness {
        let hints = balloon.hint_control();
        let irq: EventFd = balloon
            .interrupt()
            .eventfd()
            .try_clone()
            .expect("clone the interrupt eventfd");
        let nq = balloon.num_queues();
        let queue_evts: Vec<EventFd> = (0..nq)
            .map(|i| {
                balloon
                    .queue_event(i)
                    .expect("queue eventfd")
                    .try_clone()
                    .expect("clone a queue eventfd")
            })
            .collect();
        let dev: Dev = Arc::new(Mutex::new(MmioTransport::new(balloon)));

        let em_stop = Arc::new(AtomicBool::new(false));
        let em_errors = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let em_thread = {
            let dev = dev.clone();
            let stop = em_stop.clone();
            let errors = em_errors.clone();
            let lag = cfg.device_lag;
            std::thread::Builder::new()
                .name("event-manager".into())
                .spawn(move || {
                    let mut em: EventManager<Dev> = match EventManager::new() {
                        Ok(em) => em,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:?}")));
                            return;
                        }
                    };
                    em.add_subscriber(dev);
                    let _ = ready_tx.send(Ok(()));
                    while !stop.load(Ordering::SeqCst) {
                        match em.run_with_timeout(20) {
                            Ok(handled) => {
                                if handled > 0 && !lag.is_zero() {
                                    std::thread::sleep(lag);
                                }
                            }
                            Err(e) => {
                                errors
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(format!("{e:?}"));
                                return;
                            }
                        }
                    }
                })
                .expect("spawn the event manager thread")
        };
        ready_rx
            .recv()
            .expect("event manager thread")
            .expect("event manager");

        let bus = Arc::new(TracingBus::new(dev.clone(), MMIO_TRACE_LEN));
        let driver = Driver::new(
            bus.clone(),
            mem.clone(),
            irq,
            queue_evts,
            cfg.driver.clone(),
        )
        .expect("create the driver model");
        let h = Harness {
            mem,
            dev,
            hints,
            driver,
            bus,
            em_stop,
            em_errors,
            em_thread: Some(em_thread),
        };
        if cfg.probe {
            h.driver.probe().expect("probe");
        }
        if cfg.background {
            h.driver.start_background();
        }
        h
    }

    /// Errors the event loop returned (it stops at the first).
    pub fn event_loop_errors(&self) -> Vec<String> {
        self.em_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The latest MMIO accesses of the driver, oldest first, one per line.
    pub fn recent_mmio(&self) -> String {
        self.bus
            .recent()
            .iter()
            .map(|a| {
                format!(
                    "{} {:#05x} {}B {:#x}",
                    if a.write { "W" } else { "R" },
                    a.offset,
                    a.width,
                    a.value
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts that neither the event loop nor the driver model saw a problem.
    pub fn assert_clean(&self) {
        assert!(
            self.event_loop_errors().is_empty(),
            "event loop errors: {:?}",
            self.event_loop_errors()
        );
        assert!(
            self.driver.errors().is_empty(),
            "driver model errors: {:?}\nlatest MMIO accesses:\n{}",
            self.driver.errors(),
            self.recent_mmio()
        );
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.driver.stop_background();
        self.em_stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.em_thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `cond` until it holds or [`DEADLINE`] passes; `Err` names `what`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + DEADLINE;
    let mut spins = 0u32;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {DEADLINE:?} waiting for {what}"));
        }
        spins += 1;
        if spins < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// The (gpa, len) pairs of a list of blocks.
pub fn block_set(blocks: &[GuestAddress], len: u64) -> BTreeSet<(u64, u64)> {
    blocks.iter().map(|b| (b.0, len)).collect()
}

/// A small deterministic PRNG (xorshift64*), so randomized tests can print and replay a
/// seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is mapped to a fixed non-zero value).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A value in `[lo, hi]`, both included (`lo` when `hi < lo`).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo.saturating_add(self.below(hi.saturating_sub(lo).saturating_add(1)))
    }

    /// One of `items`, uniformly. Panics if `items` is empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Runs `f` on a thread of scope `s` after `after`, unless the returned sender sends (or is
/// dropped) first; joining the handle gives what `f` returned, or `None` if it did not run.
/// The delay only schedules a disruption: nothing asserts on it.
pub fn after_delay<'s, T: Send + 's>(
    s: &'s std::thread::Scope<'s, '_>,
    after: Duration,
    f: impl FnOnce() -> T + Send + 's,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::ScopedJoinHandle<'s, Option<T>>,
) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let handle = s.spawn(move || match rx.recv_timeout(after) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Some(f()),
        _ => None,
    });
    (tx, handle)
}

/// The device's `events_fd`, waited on with epoll; what `take_events` returned is collected.
/// [`DEADLINE`] is a hang guard only.
pub struct EventWatch {
    /// Kept open: epoll watches it.
    _fd: EventFd,
    epoll: Epoll,
    seen: BalloonEvents,
}

impl EventWatch {
    /// Starts watching the harness device's `events_fd`.
    pub fn new(h: &Harness) -> Self {
        let fd = dev(h, |b| b.events_fd().try_clone()).expect("clone events_fd");
        let epoll = Epoll::new().expect("epoll");
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .expect("watch events_fd");
        EventWatch {
            _fd: fd,
            epoll,
            seen: BalloonEvents::empty(),
        }
    }

    /// Waits until `events_fd` was signalled for every event of `want` (collecting them with
    /// `take_events` only when the fd is readable, so an event added without a signal would
    /// time out).
    pub fn wait(&mut self, h: &Harness, want: BalloonEvents) {
        let deadline = Instant::now() + DEADLINE;
        while !self.seen.contains(want) {
            assert!(
                Instant::now() < deadline,
                "no {want:?} on events_fd in {DEADLINE:?}; seen {:?}",
                self.seen
            );
            let mut ev = [EpollEvent::default()];
            if self.epoll.wait(50, &mut ev).unwrap_or(0) > 0 {
                let e = dev(h, |b| b.take_events());
                self.seen |= e;
            }
        }
    }

    /// The events collected since the last [`clear`](Self::clear).
    pub fn seen(&self) -> BalloonEvents {
        self.seen
    }

    /// Forgets what was collected.
    pub fn clear(&mut self) {
        self.seen = BalloonEvents::empty();
    }
}
