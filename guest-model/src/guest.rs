// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A whole guest for precopy migration tests: memory laid out like a booted Linux guest, the
//! balloon device with free page hinting wired to a [`MigrationBitmap`], the driver model in
//! background mode, and a workload thread (the [writer](Guest::start_writer)) that keeps
//! allocating, writing and freeing memory the way a kernel build does.
//!
//! # Layout
//!
//! ```text
//! [0, 1 MiB)                   low memory            allocated, written at boot
//! [1 MiB, 4 MiB)               driver area           allocated, the driver model's rings
//! [4 MiB, 4 MiB + used)        used blocks           allocated, written at boot
//! [4 MiB + used, mem_size)     4 MiB blocks          free in the driver's allocator; the
//!                                                    lowest `dirtied_freed` bytes of them
//!                                                    written at boot (stale contents)
//! ```
//!
//! The writer takes blocks from the free ones and gives them back. Which memory the guest
//! holds as allocated at any moment is [`Guest::allocated`]: the contents of everything else
//! do not matter to the guest, so a migration may skip it (that is what free page hinting
//! is for).
//!
//! # Page contents
//!
//! Every page the model writes gets a deterministic, never-zero pattern computed from
//! `(seed, gpa, generation)` ([`fill_page`]), where the generation counts the model's writes
//! to that page (1 for the boot writes). A destination that holds an older version of a
//! page is therefore caught by [`Guest::stale_pages`].
//!
//! # Stopping
//!
//! [`Guest::vm_control`] is the [`VmControl`] a precopy loop stops the guest with: it parks
//! the writer between page writes, stops the driver's background threads and pauses the
//! device, after which nothing writes guest memory until `resume_vm`.
//!
//! # Who writes the pages
//!
//! The writer writes its pages through a [`PageWriter`]: by default [`MemPageWriter`]
//! (`write_slice` through vm-memory, whose write tracking records them), or one the test
//! gives [`Guest::start_writer_with`], such as a KVM vCPU whose writes only KVM's dirty log
//! sees. Such a writer may need guest RAM of its own (code, buffers):
//! [`Guest::reserve_low_pages`] sets aside the top pages of low memory for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};

use std::io::BufWriter;
use virtio_balloon::migration::MigrationBitmap;
use virtio_balloon::FreePageHinting;

use virtio_balloon::migration::{GuestMemoryDirtyLog, PrecopyNotifierChain};
use virtio_balloon_precopy::{
    CancelToken, MigrationReport, Precopy, PrecopyConfig, PrecopyError, ReceiveStats, Receiver,
    VmControl, VmControlError, WireError,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{
    blocks, guest_memory, Dev, Driver, Harness, HarnessConfig, Mem, Rng, DEADLINE,
    HINT_BLOCK_BYTES, MIB,
};

/// Bytes per guest page the model writes (one `write_slice` each).
pub const PAGE_BYTES: u64 = 4096;

/// Pages per 4 MiB block.
const PAGES_PER_BLOCK: u64 = HINT_BLOCK_BYTES / PAGE_BYTES;

/// Low memory: `[0, 1 MiB)`, allocated and written at boot.
pub const LOW_MEMORY: (GuestAddress, u64) = (GuestAddress(0), MIB);

/// The driver model's area: `[1 MiB, 4 MiB)`, allocated, written only by the driver and the
/// device (rings, command ids).
pub const DRIVER_AREA: (GuestAddress, u64) = (GuestAddress(MIB), 3 * MIB);

/// Where the used blocks start (4 MiB).
pub const USED_START: GuestAddress = GuestAddress(4 * MIB);

/// Pages the writer writes between two pacing checks.
const PACE_CHUNK_PAGES: u64 = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `splitmix64`'s finaliser: spreads nearby inputs (seeds, page indices) over 64 bits.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A fixed page of non-zero words, the background of every page the model writes.
fn filler() -> &'static [u8; 4096] {
    static FILLER: OnceLock<[u8; 4096]> = OnceLock::new();
    FILLER.get_or_init(|| {
        let mut page = [0u8; 4096];
        for (i, w) in page.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(splitmix(i as u64) | 1).to_le_bytes());
        }
        page
    })
}

/// Fills `buf` with the contents of the page at `gpa` after its `generation`-th write by a
/// guest seeded with `seed`: 512 little-endian words, none of them zero. The first word of
/// every 64-byte line depends on (seed, gpa, generation), so two versions of a page differ
/// in every line with overwhelming probability; the other words are a fixed filler (cheap
/// enough to write gigabytes in a debug build).
pub fn fill_page(seed: u64, gpa: GuestAddress, generation: u32, buf: &mut [u8; 4096]) {
    let h =
        splitmix(splitmix(seed) ^ gpa.0) ^ splitmix(u64::from(generation) ^ 0x5851_f42d_4c95_7f2d);
    buf.copy_from_slice(filler());
    for (i, line) in buf.chunks_exact_mut(64).enumerate() {
        let v = h.wrapping_add((i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)) | 1;
        line[..8].copy_from_slice(&v.to_le_bytes());
    }
}

/// The page at `gpa` after its `generation`-th write (see [`fill_page`]).
pub fn page_contents(seed: u64, gpa: GuestAddress, generation: u32) -> Box<[u8; 4096]> {
    let mut buf = Box::new([0u8; 4096]);
    fill_page(seed, gpa, generation, &mut buf);
    buf
}

/// How the workload writer puts its pages into guest memory (see [`Guest::start_writer_with`]).
///
/// The writer calls [`write_pages`](Self::write_pages) with its gate held, like every other
/// step: when a stopped VM has parked the writer, no call is in progress and none starts
/// until the VM resumes. A call must have written every page when it returns.
pub trait PageWriter: Send {
    /// The most pages one call takes (at least 1; the writer never passes more than 64).
    fn max_batch(&self) -> usize {
        1
    }

    /// Writes `contents[i]` to the page at `pages[i]`, in order (a page may appear twice:
    /// the later contents win).
    ///
    /// # Errors
    ///
    /// Why the pages could not be written; the writer thread panics with it.
    fn write_pages(
        &mut self,
        pages: &[GuestAddress],
        contents: &[[u8; 4096]],
    ) -> Result<(), String>;
}

/// The default [`PageWriter`]: one `write_slice` per page through vm-memory, so its write
/// tracking (`GuestMemoryDirtyLog`) records every page.
#[derive(Debug, Clone)]
pub struct MemPageWriter(pub Mem);

impl PageWriter for MemPageWriter {
    fn write_pages(
        &mut self,
        pages: &[GuestAddress],
        contents: &[[u8; 4096]],
    ) -> Result<(), String> {
        for (&gpa, page) in pages.iter().zip(contents) {
            self.0
                .write_slice(&page[..], gpa)
                .map_err(|e| format!("writing the page at {:#x}: {e}", gpa.0))?;
        }
        Ok(())
    }
}

/// Sorts `ranges` and merges overlapping or adjacent ones. Empty ranges are dropped.
pub fn merge_ranges(mut ranges: Vec<(GuestAddress, u64)>) -> Vec<(GuestAddress, u64)> {
    ranges.retain(|&(_, len)| len > 0);
    ranges.sort_by_key(|&(a, _)| a);
    let mut out: Vec<(GuestAddress, u64)> = Vec::with_capacity(ranges.len());
    for (a, len) in ranges {
        if let Some(last) = out.last_mut() {
            let end = last.0 .0 + last.1;
            if a.0 <= end {
                last.1 = last.1.max(a.0 + len - last.0 .0);
                continue;
            }
        }
        out.push((a, len));
    }
    out
}

/// What [`Guest::boot`] builds.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// Guest RAM in bytes, one region from 0: a multiple of 4 MiB, at least 32 MiB.
    pub mem_size: u64,
    /// Bytes the guest really uses, written with non-zero data at boot (rounded up to whole
    /// 4 MiB blocks, from 4 MiB).
    pub used: u64,
    /// Bytes dirtied with non-zero data and then freed at boot: the lowest free blocks,
    /// rounded up to whole blocks and clamped to the free memory. They sit in the
    /// allocator's free set with their contents left behind.
    pub dirtied_freed: u64,
    /// Offer FREE_PAGE_HINT (false: the baseline device, which never hints).
    pub hinting: bool,
    /// The driver's pause per hinted 4 MiB block (zero: as fast as it can).
    pub block_pace: Duration,
    /// The device's event loop sleeps this long after each wake-up that handled events
    /// ([`HarnessConfig::device_lag`]; zero: no lag).
    pub device_lag: Duration,
    /// Seed of the page contents.
    pub seed: u64,
}

impl GuestSpec {
    /// A guest of `mem_size` bytes using `used` bytes, with `dirtied_freed` bytes of stale
    /// free memory; hinting on, no pacing, no device lag, seed 1.
    pub fn new(mem_size: u64, used: u64, dirtied_freed: u64) -> Self {
        GuestSpec {
            mem_size,
            used,
            dirtied_freed,
            hinting: true,
            block_pace: Duration::ZERO,
            device_lag: Duration::ZERO,
            seed: 1,
        }
    }
}

impl Default for GuestSpec {
    /// A 4 GiB guest that uses 48 MiB and has dirtied and freed 3.5 GiB.
    fn default() -> Self {
        GuestSpec::new(4096 * MIB, 48 * MIB, 3584 * MIB)
    }
}

/// What the workload writer does (see [`Guest::start_writer`]).
#[derive(Clone, Debug)]
pub struct WriterSpec {
    /// Bytes per second the writer dirties, counting every page write (zero: as fast as it
    /// can).
    pub rate: u64,
    /// Bytes of blocks it keeps allocated (at least one block): when it needs a new block
    /// beyond that, it frees its oldest block back to the allocator.
    pub working_set: u64,
    /// Percent of its writes that go to random pages of the used blocks instead of its own
    /// blocks ("kernel" data changing). 100: only those (if there are any).
    pub used_share: u32,
    /// Seed of the writer's random choices (the page contents use the guest's seed).
    pub seed: u64,
}

impl WriterSpec {
    /// A writer at `rate` bytes per second keeping `working_set` bytes, 10% of its writes to
    /// used pages, seed 1.
    pub fn new(rate: u64, working_set: u64) -> Self {
        WriterSpec {
            rate,
            working_set,
            used_share: 10,
            seed: 1,
        }
    }
}

/// What the writer did since it was started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Pages written (its own blocks and used pages).
    pub pages_written: u64,
    /// Blocks taken from the driver's allocator.
    pub blocks_allocated: u64,
    /// Of those, blocks obtained after the shrinker handed held hint blocks back (the free
    /// set was empty).
    pub blocks_from_shrinker: u64,
    /// Blocks freed back to the allocator.
    pub blocks_freed: u64,
    /// Times no block could be obtained at all (free set empty, nothing held) and the writer
    /// rewrote its oldest block instead.
    pub blocks_recycled: u64,
}

#[derive(Debug, Default)]
struct StatCounters {
    pages_written: AtomicU64,
    blocks_allocated: AtomicU64,
    blocks_from_shrinker: AtomicU64,
    blocks_freed: AtomicU64,
    blocks_recycled: AtomicU64,
}

impl StatCounters {
    fn snapshot(&self) -> WriterStats {
        WriterStats {
            pages_written: self.pages_written.load(Ordering::SeqCst),
            blocks_allocated: self.blocks_allocated.load(Ordering::SeqCst),
            blocks_from_shrinker: self.blocks_from_shrinker.load(Ordering::SeqCst),
            blocks_freed: self.blocks_freed.load(Ordering::SeqCst),
            blocks_recycled: self.blocks_recycled.load(Ordering::SeqCst),
        }
    }

    fn reset(&self) {
        for c in [
            &self.pages_written,
            &self.blocks_allocated,
            &self.blocks_from_shrinker,
            &self.blocks_freed,
            &self.blocks_recycled,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }
}

#[derive(Debug, Default)]
struct Gate {
    /// The writer thread runs (from `start_writer` until it exits).
    running: bool,
    /// The writer must exit.
    stop: bool,
    /// The writer is waiting in the gate (paused).
    parked: bool,
}

/// What the writer thread shares with the guest and its [`GuestVm`]s.
///
/// The writer does every step (one page write, or one block allocation or free) while
/// holding `gate`, and checks `pause` under it before each step. So once a pauser has set
/// `pause` and then acquired `gate`, the writer does not touch memory or the allocator until
/// `pause` is cleared; the pauser still waits until the writer is `parked`, so that a
/// stopped VM has its writer visibly parked.
#[derive(Debug, Default)]
struct WriterShared {
    gate: Mutex<Gate>,
    cv: Condvar,
    pause: AtomicBool,
    /// The writer's allocated blocks, oldest first.
    blocks: Mutex<VecDeque<u64>>,
    /// The block it allocated last and how many of its pages it has written (in order), while
    /// some are still unwritten. Those hold whatever the free page held: a guest never reads
    /// fresh memory before writing it, and a hint may rightly have dropped it from the
    /// migration, so they are not part of `Guest::allocated`.
    fresh: Mutex<Option<(u64, u64)>>,
    stats: StatCounters,
}

impl WriterShared {
    /// Parks the writer between steps and waits until it is parked (returns at once if it
    /// is not running).
    fn pause(&self) -> Result<(), VmControlError> {
        self.pause.store(true, Ordering::SeqCst);
        // A step in progress holds the gate; every later one sees `pause`.
        let mut g = lock(&self.gate);
        // Wake it from a pacing sleep.
        self.cv.notify_all();
        let deadline = Instant::now() + DEADLINE;
        while g.running && !g.parked && !g.stop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the guest writer did not park within {DEADLINE:?}").into());
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    fn resume(&self) {
        let _g = lock(&self.gate);
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// Per-page write generations of the model (0: never written by it).
#[derive(Debug)]
struct Generations(Box<[AtomicU32]>);

impl Generations {
    fn new(mem_size: u64) -> Self {
        Generations(
            (0..mem_size / PAGE_BYTES)
                .map(|_| AtomicU32::new(0))
                .collect(),
        )
    }

    fn slot(&self, gpa: u64) -> Option<&AtomicU32> {
        self.0.get(usize::try_from(gpa / PAGE_BYTES).ok()?)
    }

    fn get(&self, gpa: u64) -> u32 {
        self.slot(gpa).map_or(0, |g| g.load(Ordering::SeqCst))
    }

    /// Forgets the model's writes to the page at `gpa`: it is no longer checked.
    fn forget(&self, gpa: u64) {
        if let Some(g) = self.slot(gpa) {
            g.store(0, Ordering::SeqCst);
        }
    }

    /// Bumps the generation of the page at `gpa` and returns the new one.
    fn bump(&self, gpa: u64) -> u32 {
        self.slot(gpa)
            .expect("the page lies in guest RAM")
            .fetch_add(1, Ordering::SeqCst)
            + 1
    }
}

/// A booted guest: memory, device, driver in background mode, and optionally the workload
/// writer. Dropping it stops the writer and then the harness.
pub struct Guest {
    /// Memory, device, event loop and driver.
    pub harness: Harness,
    /// The device's free page sink: the migration bitmap hints clear.
    pub bitmap: Arc<MigrationBitmap>,
    spec: GuestSpec,
    used_len: u64,
    dirtied_freed: Vec<GuestAddress>,
    gens: Arc<Generations>,
    writer: Arc<WriterShared>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("spec", &self.spec)
            .field("writer_blocks", &lock(&self.writer.blocks).len())
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}

/// Writes the model's next version of each page in `pages` (parallel for large sets).
fn write_pages(mem: &Mem, gens: &Generations, seed: u64, pages: &[u64]) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = pages.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for part in pages.chunks(chunk) {
            s.spawn(move || {
                let mut buf = Box::new([0u8; 4096]);
                for &gpa in part {
                    let generation = gens.bump(gpa);
                    fill_page(seed, GuestAddress(gpa), generation, &mut buf);
                    mem.write_slice(&buf[..], GuestAddress(gpa))
                        .expect("boot write to guest RAM");
                }
            });
        }
    });
}

fn pages_of(start: u64, len: u64) -> impl Iterator<Item = u64> {
    (start..start + len).step_by(PAGE_BYTES as usize)
}

impl Guest {
    /// Boots a guest as [`GuestSpec`] says (see the [module](self) docs for the layout):
    /// builds the memory, writes low memory, the used blocks and the dirtied-and-freed
    /// blocks, creates the device with [`bitmap`](Self::bitmap) as its free page sink,
    /// probes the driver and starts its background mode.
    ///
    /// # Panics
    ///
    /// If the spec does not fit: `mem_size` not a multiple of 4 MiB or below 32 MiB, or the
    /// used blocks running past the end of RAM.
    pub fn boot(spec: &GuestSpec) -> Guest {
        assert!(
            spec.mem_size % HINT_BLOCK_BYTES == 0 && spec.mem_size >= 32 * MIB,
            "guest memory must be a multiple of 4 MiB and at least 32 MiB, not {:#x}",
            spec.mem_size
        );
        let used_len = spec.used.div_ceil(HINT_BLOCK_BYTES) * HINT_BLOCK_BYTES;
        let free_start = USED_START.0 + used_len;
        assert!(
            free_start <= spec.mem_size,
            "{} MiB used do not fit a {} MiB guest",
            spec.used / MIB,
            spec.mem_size / MIB
        );
        let nfree = ((spec.mem_size - free_start) / HINT_BLOCK_BYTES) as usize;
        let free = blocks(GuestAddress(free_start), nfree);
        let ndirty = (spec.dirtied_freed.div_ceil(HINT_BLOCK_BYTES) as usize).min(nfree);
        let dirtied_freed = free[..ndirty].to_vec();

        let mut cfg = HarnessConfig::simple(spec.mem_size, 0);
        cfg.balloon.free_page_hint = spec.hinting;
        cfg.driver.free_blocks = free;
        cfg.driver.block_pace = spec.block_pace;
        cfg.device_lag = spec.device_lag;
        cfg.probe = true;
        cfg.background = false;

        let mem = guest_memory(&cfg.regions);
        // Backed as QEMU backs guest RAM (and as the demo's destination is).
        use_huge_pages(&mem);
        let bitmap = Arc::new(MigrationBitmap::new(&*mem).expect("migration bitmap"));
        let gens = Arc::new(Generations::new(spec.mem_size));
        let mut pages: Vec<u64> = pages_of(LOW_MEMORY.0 .0, LOW_MEMORY.1)
            .chain(pages_of(USED_START.0, used_len))
            .collect();
        for b in &dirtied_freed {
            pages.extend(pages_of(b.0, HINT_BLOCK_BYTES));
        }
        write_pages(&mem, &gens, spec.seed, &pages);

        let harness = Harness::with_memory(cfg, mem, bitmap.clone());
        harness.driver.start_background();
        Guest {
            harness,
            bitmap,
            spec: spec.clone(),
            used_len,
            dirtied_freed,
            gens,
            writer: Arc::new(WriterShared::default()),
            writer_thread: Mutex::new(None),
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The spec the guest was booted with.
    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }

    /// Guest memory.
    pub fn mem(&self) -> &Mem {
        &self.harness.mem
    }

    /// The driver model.
    pub fn driver(&self) -> &Driver {
        &self.harness.driver
    }

    /// The device behind its transport.
    pub fn dev(&self) -> &Dev {
        &self.harness.dev
    }

    /// The migration side of hinting (start, stop, done).
    pub fn hints(&self) -> FreePageHinting {
        self.harness.hints.clone()
    }

    /// The used blocks: `[4 MiB, 4 MiB + used rounded up to blocks)`.
    pub fn used_range(&self) -> (GuestAddress, u64) {
        (USED_START, self.used_len)
    }

    /// Sets aside the top `pages` pages of low memory (below 1 MiB) for the host's own use,
    /// such as the code and buffers of a vCPU that writes the writer's pages, and returns
    /// the first one. The model forgets its boot writes there, so
    /// [`stale_pages`](Self::stale_pages) skips them; they stay in
    /// [`allocated`](Self::allocated), so [`pages_differing_from`](Self::pages_differing_from)
    /// still compares source and destination there (whoever writes them must do it where
    /// the migration's dirty log sees it). Reserving again moves nothing: the range only
    /// grows downwards.
    ///
    /// # Panics
    ///
    /// If `pages` is more than low memory holds.
    pub fn reserve_low_pages(&self, pages: u64) -> GuestAddress {
        let len = pages * PAGE_BYTES;
        assert!(
            len <= LOW_MEMORY.1,
            "{pages} pages do not fit in low memory"
        );
        let start = LOW_MEMORY.0 .0 + LOW_MEMORY.1 - len;
        for gpa in pages_of(start, len) {
            self.gens.forget(gpa);
        }
        GuestAddress(start)
    }

    /// The blocks written at boot and left free (ascending).
    pub fn dirtied_freed_blocks(&self) -> &[GuestAddress] {
        &self.dirtied_freed
    }

    /// The blocks the writer holds right now, oldest first.
    pub fn writer_blocks(&self) -> Vec<GuestAddress> {
        lock(&self.writer.blocks)
            .iter()
            .map(|&b| GuestAddress(b))
            .collect()
    }

    /// Every range the guest holds as allocated right now: low memory, the driver area, the
    /// used blocks and the writer's blocks; sorted and merged. Free blocks and blocks held
    /// as hints are not allocated: their contents do not matter to the guest.
    ///
    /// A block enters the writer's set before its first write and leaves it after its last
    /// one, so with the VM stopped this is exactly the memory whose contents must survive a
    /// migration. Of the block the writer allocated last, only the pages it has written so far
    /// count: the rest still hold what the free page held, which no guest reads before
    /// writing and which a hint may rightly have kept out of the migration.
    pub fn allocated(&self) -> Vec<(GuestAddress, u64)> {
        let mut ranges = vec![LOW_MEMORY, DRIVER_AREA, (USED_START, self.used_len)];
        let fresh = *lock(&self.writer.fresh);
        ranges.extend(lock(&self.writer.blocks).iter().map(|&b| match fresh {
            Some((block, written)) if block == b => (GuestAddress(b), written * PAGE_BYTES),
            _ => (GuestAddress(b), HINT_BLOCK_BYTES),
        }));
        merge_ranges(ranges)
    }

    /// Total length of [`allocated`](Self::allocated).
    pub fn used_bytes(&self) -> u64 {
        self.allocated().iter().map(|&(_, len)| len).sum()
    }

    /// How many times the model wrote the page containing `gpa` (0: never; the driver
    /// area and untouched free memory stay at 0).
    pub fn page_generation(&self, gpa: GuestAddress) -> u32 {
        self.gens.get(gpa.0 & !(PAGE_BYTES - 1))
    }

    /// The contents the page containing `gpa` must have now, if the model wrote it.
    pub fn expected_page(&self, gpa: GuestAddress) -> Option<Box<[u8; 4096]>> {
        let page = GuestAddress(gpa.0 & !(PAGE_BYTES - 1));
        match self.gens.get(page.0) {
            0 => None,
            g => Some(page_contents(self.spec.seed, page, g)),
        }
    }

    /// The pages of [`allocated`](Self::allocated) that the model wrote and whose contents
    /// in `dest` are not their current contents (or cannot be read), ascending. Call it with
    /// the VM stopped. Pages the model never wrote (the driver area) are not checked.
    pub fn stale_pages<B: Bytes<GuestAddress>>(&self, dest: &B) -> Vec<GuestAddress> {
        let mut stale = Vec::new();
        let mut want = Box::new([0u8; 4096]);
        let mut got = vec![0u8; PAGE_BYTES as usize];
        for (start, len) in self.allocated() {
            for gpa in pages_of(start.0, len) {
                let g = self.gens.get(gpa);
                if g == 0 {
                    continue;
                }
                fill_page(self.spec.seed, GuestAddress(gpa), g, &mut want);
                let ok = dest.read_slice(&mut got, GuestAddress(gpa)).is_ok();
                if !ok || got[..] != want[..] {
                    stale.push(GuestAddress(gpa));
                }
            }
        }
        stale
    }

    /// The pages of [`allocated`](Self::allocated) that differ between this guest's memory
    /// and `dest` (or cannot be read on either side), ascending. Call it with the VM stopped.
    pub fn pages_differing_from<B: Bytes<GuestAddress>>(&self, dest: &B) -> Vec<GuestAddress> {
        let mut differing = Vec::new();
        let mut a = vec![0u8; PAGE_BYTES as usize];
        let mut b = vec![0u8; PAGE_BYTES as usize];
        for (start, len) in self.allocated() {
            for gpa in pages_of(start.0, len).map(GuestAddress) {
                let ok = self.harness.mem.read_slice(&mut a, gpa).is_ok()
                    && dest.read_slice(&mut b, gpa).is_ok();
                if !ok || a != b {
                    differing.push(gpa);
                }
            }
        }
        differing
    }

    /// Starts the workload writer thread, which loops:
    ///
    /// * picks the next page: with `used_share`% probability a random page of the used
    ///   blocks, otherwise the next page of its current block;
    /// * when its current block is full it allocates a new one (`Driver::alloc_block`); if
    ///   the free set is empty (during a hint round the driver holds nearly every free
    ///   block) it takes one back through the shrinker (`Driver::shrink(1)`, then
    ///   `alloc_block`: the shrinker path, writing a block whose hint may still be in
    ///   flight); then, if it holds more than `working_set`, it frees its oldest block
    ///   (`Driver::free_block`). With no block to be had at all it rewrites its oldest;
    /// * writes the page (one 4 KiB `write_slice`, so the dirty log records it) with its
    ///   next generation's contents;
    /// * every 64 pages, sleeps as needed to stay at or below `rate`.
    ///
    /// # Panics
    ///
    /// If a writer is already running.
    pub fn start_writer(&self, w: WriterSpec) {
        self.start_writer_with(w, Box::new(MemPageWriter(self.harness.mem.clone())));
    }

    /// [`start_writer`](Self::start_writer), with the writer's pages written by `out`
    /// instead of `write_slice`. The writer gathers up to `out.max_batch()` pages (never
    /// across a block allocation or free, nor across a pause: a batch is one step under the
    /// gate) and hands them over in one call.
    ///
    /// # Panics
    ///
    /// If a writer is already running. The writer thread panics if `out` fails.
    pub fn start_writer_with(&self, w: WriterSpec, out: Box<dyn PageWriter>) {
        let mut slot = lock(&self.writer_thread);
        assert!(slot.is_none(), "the guest writer is already running");
        self.writer.stats.reset();
        {
            let mut g = lock(&self.writer.gate);
            g.stop = false;
            g.running = true;
        }
        let ctx = WriterCtx {
            driver: self.harness.driver.clone(),
            shared: self.writer.clone(),
            gens: self.gens.clone(),
            content_seed: self.spec.seed,
            used_start: USED_START.0,
            used_pages: self.used_len / PAGE_BYTES,
            spec: w,
        };
        *slot = Some(
            std::thread::Builder::new()
                .name("guest-writer".into())
                .spawn(move || ctx.run(out))
                .expect("spawn the guest writer thread"),
        );
    }

    /// What the writer did since it was (last) started, read while it runs.
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats.snapshot()
    }

    /// Whether the writer is parked by a stopped VM (false if it is not running).
    pub fn writer_parked(&self) -> bool {
        lock(&self.writer.gate).parked
    }

    /// Stops the writer thread and returns what it did. Its blocks stay allocated (they are
    /// still in [`allocated`](Self::allocated)); a new writer takes them over. Works while
    /// the VM is stopped too.
    ///
    /// # Panics
    ///
    /// If no writer runs, or the writer thread panicked.
    pub fn stop_writer(&self) -> WriterStats {
        let handle = lock(&self.writer_thread)
            .take()
            .expect("stop_writer: no guest writer is running");
        {
            let mut g = lock(&self.writer.gate);
            g.stop = true;
            self.writer.cv.notify_all();
        }
        handle.join().expect("the guest writer thread panicked");
        self.writer.stats.snapshot()
    }

    /// The [`VmControl`] a precopy loop stops and resumes this guest with; see
    /// [`GuestVm`].
    pub fn vm_control(&self) -> GuestVm {
        GuestVm {
            dev: self.harness.dev.clone(),
            driver: self.harness.driver.clone(),
            writer: self.writer.clone(),
            stopped: self.stopped.clone(),
        }
    }

    /// Whether a [`GuestVm`] stopped the guest (and did not resume it).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// What [`Guest::migrate`] returns: the precopy loop's result, the destination's, and the
/// destination memory.
pub type MigrationOutcome = (
    Result<MigrationReport, PrecopyError>,
    Result<ReceiveStats, WireError>,
    Arc<GuestMemoryMmap<()>>,
);

/// How many earlier generations of a stale page [`Guest::describe_page`] tries, to name what
/// a destination holds.
pub const GENERATIONS_TRIED: u32 = 256;

impl Guest {
    /// Where page `gpa` lies in the model's layout (low memory, driver area, used block,
    /// writer block), for failure messages.
    pub fn region_of(&self, gpa: u64) -> String {
        let (used_start, used_len) = self.used_range();
        if gpa < LOW_MEMORY.1 {
            return "low memory".into();
        }
        if gpa >= DRIVER_AREA.0 .0 && gpa < DRIVER_AREA.0 .0 + DRIVER_AREA.1 {
            return "driver area".into();
        }
        if gpa >= used_start.0 && gpa < used_start.0 + used_len {
            return "used block".into();
        }
        let block = gpa & !(HINT_BLOCK_BYTES - 1);
        let writer = self.writer_blocks();
        if let Some(i) = writer.iter().position(|b| b.0 == block) {
            let dirtied = self.dirtied_freed_blocks().iter().any(|b| b.0 == block);
            return format!(
                "writer block {block:#x} (#{i} of {}, oldest first{})",
                writer.len(),
                if dirtied {
                    ", dirtied+freed at boot"
                } else {
                    ""
                }
            );
        }
        format!("block {block:#x} (not the writer's)")
    }

    /// What a migration destination `dst` holds at page `gpa`, in the model's terms: the
    /// page's region and generation, whether the source is current, and whether the
    /// destination holds the source's page, zeros, or an older generation (up to
    /// [`GENERATIONS_TRIED`] back).
    pub fn describe_page<B: Bytes<GuestAddress>>(&self, dst: &B, gpa: u64) -> String {
        let src = self.mem();
        let mut s = vec![0u8; PAGE_BYTES as usize];
        let mut d = vec![0u8; PAGE_BYTES as usize];
        let src_ok = src.read_slice(&mut s, GuestAddress(gpa)).is_ok();
        let dst_ok = dst.read_slice(&mut d, GuestAddress(gpa)).is_ok();
        let generation = self.page_generation(GuestAddress(gpa));
        let mut text = format!(
            "page {gpa:#x} [{}], model generation {generation}",
            self.region_of(gpa)
        );
        if !src_ok || !dst_ok {
            text.push_str(&format!(
                ", unreadable (source {src_ok}, destination {dst_ok})"
            ));
            return text;
        }
        let expected = self.expected_page(GuestAddress(gpa));
        let src_current = expected.as_ref().map(|e| e[..] == s[..]);
        text.push_str(match src_current {
            Some(true) => ", source current",
            Some(false) => ", SOURCE NOT CURRENT",
            None => "",
        });
        text.push_str(if s == d {
            ", destination = source"
        } else {
            ", destination differs from source"
        });
        if d.iter().all(|&b| b == 0) {
            text.push_str(", destination holds zeros (never sent)");
        } else if generation > 0 && expected.as_ref().is_some_and(|e| e[..] != d[..]) {
            let seed = self.spec().seed;
            let older = (generation.saturating_sub(GENERATIONS_TRIED)..generation)
                .rev()
                .find(|&g| g > 0 && page_contents(seed, GuestAddress(gpa), g)[..] == d[..]);
            match older {
                Some(g) => text.push_str(&format!(", destination holds generation {g} (stale)")),
                None => text.push_str(", destination holds something else"),
            }
        }
        text
    }

    /// Migrates the guest to a fresh destination ([`Destination::spawn`], named after
    /// `seed`) over loopback TCP through the reference precopy loop, with `config`, the
    /// migration stopping the guest through `vm`, optionally waiting up to `wait` for a hint
    /// round and cancellable through `cancel`. Returns the loop's result, the destination's
    /// and the destination memory.
    pub fn migrate(
        &self,
        config: PrecopyConfig,
        vm: &mut dyn VmControl,
        wait: Option<Duration>,
        cancel: Option<CancelToken>,
        seed: u64,
    ) -> MigrationOutcome {
        let (destination, stream) = Destination::spawn(
            self.spec().mem_size,
            false,
            format!("destination-{seed}"),
            1 << 18,
        );
        let src = self.mem().clone();
        let mut chain = PrecopyNotifierChain::new();
        chain.add(Arc::new(self.hints()));
        let mut precopy = Precopy::new(&*src, &self.bitmap, &chain).config(config);
        if let Some(deadline) = wait {
            precopy = precopy.wait_for_hint_round(self.hints(), deadline);
        }
        if let Some(token) = cancel {
            precopy = precopy.cancel_token(token);
        }
        let result = precopy.run(
            &mut GuestMemoryDirtyLog::new(&src),
            vm,
            BufWriter::with_capacity(1 << 18, stream),
        );
        let (received, dst) = destination.join();
        (result, received, dst)
    }

    /// Compares the stopped guest with a migration destination: every allocated page byte
    /// for byte, and the model's current contents. `Err` holds the number of bad pages and
    /// a message naming the first `show` of them ([`describe_page`](Self::describe_page)),
    /// prefixed by `what` and the migration's `report`.
    pub fn check_destination<B: Bytes<GuestAddress>>(
        &self,
        dst: &B,
        what: &str,
        report: &MigrationReport,
        show: usize,
    ) -> Result<(), (u64, String)> {
        let differing: Vec<u64> = self.pages_differing_from(dst).iter().map(|g| g.0).collect();
        let stale: Vec<u64> = self.stale_pages(dst).iter().map(|g| g.0).collect();
        let mut bad = differing.clone();
        bad.extend(&stale);
        bad.sort_unstable();
        bad.dedup();
        if bad.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "{what}: {} pages differ from the source, {} are not the model's current \
             contents ({} bad pages of {} allocated); report: {} iterations, {} pages sent, {} \
             zero, {} hinted, round completed {:?}",
            differing.len(),
            stale.len(),
            bad.len(),
            self.used_bytes() / PAGE_BYTES,
            report.iterations.len(),
            report.pages_sent,
            report.zero_pages,
            report.hinted_pages,
            report.hint_round_completed
        );
        for &gpa in bad.iter().take(show) {
            msg.push_str("\n      ");
            msg.push_str(&self.describe_page(dst, gpa));
        }
        Err((bad.len() as u64, msg))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let handle = lock(&self.writer_thread).take();
        if let Some(handle) = handle {
            lock(&self.writer.gate).stop = true;
            self.writer.cv.notify_all();
            let _ = handle.join();
        }
    }
}

/// Stops and restarts a [`Guest`]: the writer, the driver's background threads and the
/// device. Cheap to clone (it shares the guest's parts); use it only while the guest lives.
///
/// `stop_vm` parks the writer between two page writes (waiting for a write in progress),
/// stops the driver's background threads (a hint round in progress ends and sends STOP)
/// and pauses the device (it stops processing queues). When it returns, nothing writes
/// guest memory. `resume_vm` resumes the device, restarts the driver's background threads
/// and unparks the writer.
#[derive(Clone)]
pub struct GuestVm {
    dev: Dev,
    driver: Driver,
    writer: Arc<WriterShared>,
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for GuestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestVm")
            .field("stopped", &self.stopped.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl VmControl for GuestVm {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        if let Err(e) = self.writer.pause() {
            // The guest keeps running.
            self.writer.resume();
            return Err(e);
        }
        self.driver.stop_background();
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .pause();
        self.stopped.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn resume_vm(&mut self) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .resume();
        self.driver.start_background();
        self.stopped.store(false, Ordering::SeqCst);
        self.writer.resume();
    }
}

/// The writer thread's state.
struct WriterCtx {
    driver: Driver,
    shared: Arc<WriterShared>,
    gens: Arc<Generations>,
    content_seed: u64,
    used_start: u64,
    used_pages: u64,
    spec: WriterSpec,
}

/// Marks the writer as gone when its thread exits, even by a panic, so that a pause does
/// not wait for it.
struct Running<'a>(&'a WriterShared);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.0.gate);
        g.running = false;
        g.parked = false;
        self.0.cv.notify_all();
    }
}

/// The pages the writer has chosen (and bumped the generation of) but not yet written.
/// Only ever non-empty while the writer holds its gate.
struct Batch {
    out: Box<dyn PageWriter>,
    max: usize,
    pages: Vec<GuestAddress>,
    contents: Vec<[u8; 4096]>,
    /// Pages written so far.
    written: u64,
}

impl Batch {
    fn new(out: Box<dyn PageWriter>) -> Self {
        let max = out.max_batch().clamp(1, PACE_CHUNK_PAGES as usize);
        Batch {
            out,
            max,
            pages: Vec::with_capacity(max),
            contents: vec![[0u8; 4096]; max],
            written: 0,
        }
    }

    /// Adds the page at `gpa` with its next generation's contents.
    fn push(&mut self, gens: &Generations, seed: u64, gpa: u64) {
        let generation = gens.bump(gpa);
        let i = self.pages.len();
        fill_page(seed, GuestAddress(gpa), generation, &mut self.contents[i]);
        self.pages.push(GuestAddress(gpa));
    }

    /// Writes the pages gathered, then counts them and moves the fresh block's mark.
    fn flush(&mut self, shared: &WriterShared) {
        if self.pages.is_empty() {
            return;
        }
        let n = self.pages.len();
        if let Err(e) = self.out.write_pages(&self.pages, &self.contents[..n]) {
            panic!("the guest writer could not write its pages: {e}");
        }
        self.written += n as u64;
        shared
            .stats
            .pages_written
            .fetch_add(n as u64, Ordering::SeqCst);
        let mut fresh = lock(&shared.fresh);
        for gpa in self.pages.drain(..) {
            if let Some((block, written)) = *fresh {
                if gpa.0 == block + written * PAGE_BYTES {
                    *fresh = (written + 1 < PAGES_PER_BLOCK).then_some((block, written + 1));
                }
            }
        }
    }
}

impl WriterCtx {
    fn run(self, out: Box<dyn PageWriter>) {
        let _running = Running(&self.shared);
        let mut batch = Batch::new(out);
        let mut rng = Rng::new(self.spec.seed);
        let max_blocks = (self.spec.working_set / HINT_BLOCK_BYTES).max(1) as usize;
        let own_writes = self.spec.used_share < 100 || self.used_pages == 0;
        let chunk_time = if self.spec.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((PACE_CHUNK_PAGES * PAGE_BYTES) as f64 / self.spec.rate as f64)
        };
        // The current block and the index of its next page.
        let mut cur: Option<(u64, u64)> = None;
        let mut chunk_start = Instant::now();
        let mut in_chunk = 0u64;
        loop {
            let mut g = lock(&self.shared.gate);
            if self.shared.pause.load(Ordering::SeqCst) && !g.stop {
                g.parked = true;
                self.shared.cv.notify_all();
                while self.shared.pause.load(Ordering::SeqCst) && !g.stop {
                    g = self.shared.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                g.parked = false;
                chunk_start = Instant::now();
                in_chunk = 0;
            }
            if g.stop {
                return;
            }
            // One step: up to a batch of pages, all written before the gate is released,
            // and none past the next pacing check.
            let want = batch.max.min((PACE_CHUNK_PAGES - in_chunk) as usize);
            let before = batch.written;
            let mut starved = false;
            while batch.pages.len() < want {
                let to_used = self.used_pages > 0
                    && (!own_writes || rng.below(100) < u64::from(self.spec.used_share));
                let gpa = if to_used {
                    Some(self.used_start + rng.below(self.used_pages) * PAGE_BYTES)
                } else {
                    self.next_own_page(&mut cur, max_blocks, &mut batch)
                };
                let Some(gpa) = gpa else {
                    starved = true;
                    break;
                };
                batch.push(&self.gens, self.content_seed, gpa);
            }
            batch.flush(&self.shared);
            // With those written before a block allocation.
            let written = batch.written - before;
            if written == 0 && starved {
                // No block anywhere: wait for one to be freed (or for stop).
                let _ = self
                    .shared
                    .cv
                    .wait_timeout(g, Duration::from_millis(1))
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
            drop(g);

            in_chunk += written;
            if in_chunk >= PACE_CHUNK_PAGES {
                if !chunk_time.is_zero() {
                    self.sleep_until(chunk_start + chunk_time);
                }
                chunk_start = Instant::now();
                in_chunk = 0;
            }
        }
    }

    /// Sleeps until `deadline` or until the writer is told to stop or pause.
    fn sleep_until(&self, deadline: Instant) {
        let mut g = lock(&self.shared.gate);
        while !g.stop && !self.shared.pause.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The next page of the current block, allocating a new block when it is full. Called
    /// with the gate held. Before it allocates (and perhaps frees the oldest block) it writes
    /// the pages `batch` gathered: no page is written after its block was freed, and the
    /// fresh block's mark moves in write order.
    fn next_own_page(
        &self,
        cur: &mut Option<(u64, u64)>,
        max_blocks: usize,
        batch: &mut Batch,
    ) -> Option<u64> {
        if let Some((block, next)) = cur {
            if *next < PAGES_PER_BLOCK {
                let gpa = *block + *next * PAGE_BYTES;
                *next += 1;
                return Some(gpa);
            }
        }
        batch.flush(&self.shared);
        let block = self.obtain_block(max_blocks)?;
        *cur = Some((block, 1));
        Some(block)
    }

    /// A new block for the writer, in its set before it is returned; frees the oldest one
    /// beyond the working set. Called with the gate held.
    fn obtain_block(&self, max_blocks: usize) -> Option<u64> {
        let stats = &self.shared.stats;
        let mut from_shrinker = false;
        let mut got = self.driver.alloc_block();
        // The shrinker path: the driver holds the free memory as hints. Another thread (the
        // hint work) may grab the block the shrinker freed, so try a few times.
        for _ in 0..4 {
            if got.is_some() || self.driver.shrink(1) == 0 {
                break;
            }
            from_shrinker = true;
            got = self.driver.alloc_block();
        }
        let mut blocks = lock(&self.shared.blocks);
        // The previous block is wholly written; a new one starts unwritten.
        *lock(&self.shared.fresh) = got.map(|b| (b.0, 0));
        let Some(block) = got else {
            // Nothing to be had: rewrite the oldest block, which stays allocated.
            let old = blocks.pop_front()?;
            blocks.push_back(old);
            stats.blocks_recycled.fetch_add(1, Ordering::SeqCst);
            return Some(old);
        };
        blocks.push_back(block.0);
        stats.blocks_allocated.fetch_add(1, Ordering::SeqCst);
        if from_shrinker {
            stats.blocks_from_shrinker.fetch_add(1, Ordering::SeqCst);
        }
        while blocks.len() > max_blocks {
            // Its last write is done: the current block is the newest.
            let Some(old) = blocks.pop_front() else { break };
            self.driver.free_block(GuestAddress(old));
            stats.blocks_freed.fetch_add(1, Ordering::SeqCst);
        }
        Some(block.0)
    }
}

/// Asks the kernel for transparent huge pages on guest memory, as QEMU does for its RAM
/// (`MADV_HUGEPAGE`): faults on a fresh destination then cost far less.
pub fn use_huge_pages<B: Bitmap>(mem: &GuestMemoryMmap<B>) {
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the range is one mapping that `mem` owns and keeps alive; MADV_HUGEPAGE
        // only changes how the kernel backs it, never its contents.
        unsafe {
            libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
        }
    }
}

/// A migration destination behind a loopback TCP socket: fresh (zeroed) memory and a thread
/// that applies the stream to it with [`Receiver`].
pub struct Destination {
    /// The destination's guest memory.
    pub mem: Arc<GuestMemoryMmap<()>>,
    thread: JoinHandle<Result<ReceiveStats, WireError>>,
}

impl Destination {
    /// Maps `mem_size` bytes from address 0 (with huge pages if asked), listens on
    /// loopback, and returns the destination with the source's end of the connection
    /// (`TCP_NODELAY` set). `name` names the receiving thread; `buf` is its read buffer.
    pub fn spawn(mem_size: u64, huge_pages: bool, name: String, buf: usize) -> (Self, TcpStream) {
        let size = usize::try_from(mem_size).expect("destination size fits usize");
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
                .expect("destination memory"),
        );
        if huge_pages {
            use_huge_pages(&mem);
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
        let addr = listener.local_addr().expect("listening address");
        let thread = {
            let mem = mem.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let (stream, _) = listener.accept().expect("accept the source");
                    let mut rx = Receiver::new(&*mem).expect("destination bitmap");
                    rx.receive(BufReader::with_capacity(buf, stream))
                })
                .expect("spawn the destination")
        };
        let stream = TcpStream::connect(addr).expect("connect to the destination");
        let _ = stream.set_nodelay(true);
        (Destination { mem, thread }, stream)
    }

    /// Waits for the stream to end (or fail) and returns what the receiver said, with the
    /// destination's memory.
    ///
    /// # Panics
    ///
    /// If the receiving thread panicked.
    pub fn join(self) -> (Result<ReceiveStats, WireError>, Arc<GuestMemoryMmap<()>>) {
        let received = self.thread.join().expect("the destination thread panicked");
        (received, self.mem)
    }
}
