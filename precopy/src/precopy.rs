// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The reference precopy loop: sends a running guest's memory through any `Write`, using the
//! hints that cleared the [`MigrationBitmap`].
//!
//! The order is QEMU's (`ram_save_setup`, `migration_iteration_run`, `ram_save_complete`):
//!
//! 1. Dirty logging starts: the bitmap is set wholly dirty and the first sync
//!    (`BeforeBitmapSync`, [`MigrationBitmap::sync`], `AfterBitmapSync`) resets the log.
//!    With the VM running, `AfterBitmapSync` starts hint round 1.
//! 2. `Setup`. Optionally the loop waits (with a deadline) until the guest has finished its
//!    hint round, so the first pass does not send pages whose hints are about to arrive.
//! 3. Iterations. Each sends dirty pages in ascending address order (a page of zeros as a
//!    header only) and ends when the pass has no dirty page left or, checked every 100 ms,
//!    when the remaining dirty memory could be sent within the downtime limit at the
//!    measured bandwidth. Then it syncs (stop round, sync, start round) and starts the next
//!    pass, unless what is dirty now fits in the downtime limit (or the iteration limit is
//!    reached).
//! 4. Switchover: [`VmControl::stop_vm`], `Complete`, the final sync's `BeforeBitmapSync`
//!    (the balloon's STOP) and sync, every dirty page sent, the end frame, and only then the
//!    final `AfterBitmapSync` (the VM is stopped, so it moves the balloon to DONE: the guest
//!    keeps its hinted pages isolated until the destination holds everything else).
//!
//! [`Precopy::stopped`] skips step 3 (a stopped snapshot), and [`Precopy::run_to`] writes to
//! any [`PageDestination`] instead of the wire format. Every page sent is reported to the
//! dirty log ([`DirtyLog::page_sent`]), which a log that compares contents needs.
//! 5. `Cleanup`, also when the migration fails or is cancelled (and then a stopped guest is
//!    resumed).
//!
//! The loop has no bulk stage: as in QEMU since 2021, the bitmap starts wholly dirty and the
//! first pass consults it, so pages hinted before the pass reaches them are skipped.

use std::error::Error as StdError;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::destination::PageDestination;
use crate::wire::{FrameWriter, WIRE_PAGE_SIZE};
use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon::migration::{
    DirtyLog, Error as BitmapError, MigrationBitmap, MigrationState, NotifyError, PrecopyEvent,
    PrecopyNotifierChain,
};
use virtio_balloon::FreePageHinting;

/// The error a [`VmControl`] returns.
pub type VmControlError = Box<dyn StdError + Send + Sync>;

/// Stops and restarts the guest for the precopy loop.
pub trait VmControl {
    /// Stops the guest. When it returns, neither the vCPUs nor device emulation write guest
    /// memory until [`resume_vm`](Self::resume_vm).
    ///
    /// # Errors
    ///
    /// Whatever stopping failed with; the migration fails and the guest keeps running.
    fn stop_vm(&mut self) -> Result<(), VmControlError>;

    /// Restarts the guest after a migration that failed or was cancelled after
    /// [`stop_vm`](Self::stop_vm) succeeded, and after a
    /// [`Snapshot`](crate::snapshot::Snapshot) is complete.
    fn resume_vm(&mut self);
}

/// How often the loop looks at the clock, the rate limit and the cancel flag, in pages.
const CHECK_EVERY: u32 = 64;
/// The length of a sending slice after which convergence is checked (QEMU: 100 ms), and of
/// a rate-limiting window.
const SLICE: Duration = Duration::from_millis(100);

/// Knobs of the precopy loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrecopyConfig {
    /// The longest the guest may stay stopped for the final stage, at the measured bandwidth
    /// (QEMU's `downtime-limit`, default 300 ms).
    pub downtime_limit: Duration,
    /// The most bytes per second the loop sends while the guest runs (QEMU's
    /// `max-bandwidth`). `None`: as fast as the writer takes them. The final stage is not
    /// limited.
    pub max_bandwidth: Option<u64>,
    /// Switch over after this many iterations even if the remaining memory does not fit in
    /// the downtime limit (a guest that dirties memory faster than it can be sent would
    /// otherwise never converge). At least 1.
    pub max_iterations: u32,
    /// Postcopy may follow: passed to the notifiers, which keep hinting off (a page skipped
    /// here could later be requested by the destination).
    pub postcopy: bool,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            max_iterations: 30,
            postcopy: false,
        }
    }
}

impl PrecopyConfig {
    // One `with_<field>` per field: the struct is `#[non_exhaustive]`, so code outside the
    // crate builds a configuration from `PrecopyConfig::default()` with these.

    /// Sets [`downtime_limit`](Self::downtime_limit).
    #[must_use]
    pub const fn with_downtime_limit(mut self, downtime_limit: Duration) -> Self {
        self.downtime_limit = downtime_limit;
        self
    }

    /// Sets [`max_bandwidth`](Self::max_bandwidth).
    #[must_use]
    pub const fn with_max_bandwidth(mut self, max_bandwidth: Option<u64>) -> Self {
        self.max_bandwidth = max_bandwidth;
        self
    }

    /// Sets [`max_iterations`](Self::max_iterations).
    #[must_use]
    pub const fn with_max_iterations(mut self, max_iterations: u32) -> Self {
        self.max_iterations = max_iterations;
        self
    }

    /// Sets [`postcopy`](Self::postcopy).
    #[must_use]
    pub const fn with_postcopy(mut self, postcopy: bool) -> Self {
        self.postcopy = postcopy;
        self
    }
}

/// Cancels a running [`Precopy`] from another thread. Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the migration to stop; it fails with [`PrecopyError::Cancelled`] at its next
    /// check (at most 64 pages later).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What one iteration (one pass between two syncs) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IterationStats {
    /// 1 for the first pass; the final stage has the next number.
    pub iteration: u32,
    /// Whether this is the stop-and-copy stage (the guest was stopped).
    pub final_stage: bool,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as zero pages (a header only).
    pub zero_pages: u64,
    /// Pages the loop did not send because a hint took them off the bitmap during this
    /// iteration.
    pub hinted_pages: u64,
    /// Bytes written to the stream during the iteration (frame headers included).
    pub bytes: u64,
    /// Wall time of the iteration, its closing sync included.
    pub duration: Duration,
    /// Dirty pages right after the sync that closed the iteration (what the next one sends);
    /// 0 for the final stage.
    pub dirty_after_sync: u64,
}

/// The result of a migration.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Every iteration, the final stage last.
    pub iterations: Vec<IterationStats>,
    /// From the start of the loop to the end frame.
    pub total_time: Duration,
    /// From [`VmControl::stop_vm`] returning to the end frame being flushed.
    pub downtime: Duration,
    /// How long the loop waited for the guest's first hint round.
    pub hint_wait: Duration,
    /// Whether the guest completed its hint round before the deadline (`None`: the loop was
    /// not asked to wait).
    pub hint_round_completed: Option<bool>,
    /// Pages sent with contents, in all iterations.
    pub pages_sent: u64,
    /// Zero pages sent, in all iterations.
    pub zero_pages: u64,
    /// Pages hints took off the bitmap, in all iterations.
    pub hinted_pages: u64,
    /// Bytes written to the stream.
    pub bytes: u64,
    /// The bandwidth the loop measured while the guest ran, in bytes per second.
    pub bandwidth: f64,
    /// Notifier failures the loop logged and went on after (a `Setup` failure fails the
    /// migration instead).
    pub notifier_errors: u32,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrecopyError {
    /// Writing the stream failed.
    #[error("writing the migration stream failed: {0}")]
    Io(#[from] io::Error),
    /// A bitmap sync failed.
    #[error("dirty bitmap sync failed: {0}")]
    Sync(#[source] BitmapError),
    /// A notifier failed the `Setup` event.
    #[error("migration setup failed: {0}")]
    Setup(#[source] NotifyError),
    /// Reading a dirty page from guest memory failed.
    #[error("reading guest memory at {:#x} failed", .addr.0)]
    Memory {
        /// The page.
        addr: GuestAddress,
    },
    /// [`VmControl::stop_vm`] failed.
    #[error("stopping the guest failed: {0}")]
    StopVm(#[source] VmControlError),
    /// The [`CancelToken`] was cancelled.
    #[error("migration cancelled")]
    Cancelled,
}

/// The bandwidth the loop measured, and the rate limit.
#[derive(Debug)]
struct Throughput {
    /// Bytes written while the guest ran.
    bytes: u64,
    /// Time spent sending them (rate-limit sleeps included).
    time: Duration,
    limit: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
}

impl Throughput {
    fn new(limit: Option<u64>) -> Self {
        Throughput {
            bytes: 0,
            time: Duration::ZERO,
            limit,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// Bytes per second: measured, capped by the limit; 0 before anything was measured.
    fn bandwidth(&self) -> f64 {
        let secs = self.time.as_secs_f64();
        let measured = if secs > 0.0 {
            self.bytes as f64 / secs
        } else {
            0.0
        };
        match self.limit {
            Some(l) => measured.min(l as f64),
            None => measured,
        }
    }

    /// The dirty bytes that can be sent within `downtime`.
    fn threshold(&self, downtime: Duration) -> u64 {
        (self.bandwidth() * downtime.as_secs_f64()) as u64
    }

    /// Accounts `bytes` just written and sleeps if the window's share of the limit is used
    /// up.
    fn written(&mut self, bytes: u64) {
        self.window_bytes += bytes;
        let Some(limit) = self.limit else { return };
        let allowed = (limit as f64 * SLICE.as_secs_f64()) as u64;
        if self.window_bytes >= allowed.max(1) {
            let end = self.window_start + SLICE;
            let now = Instant::now();
            if end > now {
                std::thread::sleep(end - now);
            }
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }
}

/// Where the loop stands while sending.
struct Sender<'a, M, D: ?Sized> {
    mem: &'a M,
    bitmap: &'a MigrationBitmap,
    out: &'a mut D,
    buf: Box<[u8; WIRE_PAGE_SIZE]>,
    cancel: Option<&'a CancelToken>,
}

impl<M: GuestMemoryBackend, D: PageDestination + ?Sized> Sender<'_, M, D> {
    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(CancelToken::is_cancelled)
    }

    /// Reads and writes one page, and tells the log which bytes were sent.
    fn send_page<L: DirtyLog + ?Sized>(
        &mut self,
        log: &mut L,
        addr: GuestAddress,
        it: &mut IterationStats,
    ) -> Result<(), PrecopyError> {
        self.mem
            .read_slice(&mut self.buf[..], addr)
            .map_err(|_| PrecopyError::Memory { addr })?;
        log.page_sent(addr, &self.buf[..]);
        if is_zero(&self.buf) {
            self.out.zero_page(addr)?;
            it.zero_pages += 1;
        } else {
            self.out.page(addr, &self.buf)?;
            it.pages_sent += 1;
        }
        Ok(())
    }

    /// Sends dirty pages from `cursor` on. With a deadline, returns `Ok(false)` once it has
    /// passed; returns `Ok(true)` when no dirty page is left after the cursor (the pass
    /// ended).
    fn send<L: DirtyLog + ?Sized>(
        &mut self,
        log: &mut L,
        cursor: &mut GuestAddress,
        deadline: Option<Instant>,
        it: &mut IterationStats,
        mut throughput: Option<&mut Throughput>,
    ) -> Result<bool, PrecopyError> {
        let bitmap = self.bitmap;
        let mut n = 0u32;
        let mut last_bytes = self.out.bytes();
        for addr in bitmap.iter_dirty_from(*cursor) {
            match addr.0.checked_add(PAGE_SIZE) {
                Some(next) => *cursor = GuestAddress(next),
                None => *cursor = GuestAddress(u64::MAX),
            }
            if bitmap.take_page(addr).map_err(PrecopyError::Sync)? {
                self.send_page(log, addr, it)?;
            }
            n += 1;
            if n % CHECK_EVERY == 0 {
                if self.cancelled() {
                    return Err(PrecopyError::Cancelled);
                }
                if let Some(t) = throughput.as_deref_mut() {
                    let bytes = self.out.bytes();
                    t.written(bytes - last_bytes);
                    last_bytes = bytes;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            if cursor.0 == u64::MAX {
                break;
            }
        }
        if let Some(t) = throughput {
            t.written(self.out.bytes() - last_bytes);
        }
        Ok(true)
    }
}

/// Whether a page holds only zeros.
fn is_zero(page: &[u8; WIRE_PAGE_SIZE]) -> bool {
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The per-iteration callback of [`Precopy::on_iteration`].
type ProgressFn<'a> = Box<dyn FnMut(&IterationStats) + 'a>;

/// The reference precopy loop. Build it over the guest memory, the bitmap the hints clear,
/// and the notifier chain, then [`run`](Self::run) it.
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::{GuestMemoryDirtyLog, MigrationBitmap, PrecopyNotifierChain};
/// use virtio_balloon_precopy::{Precopy, Receiver, VmControl, VmControlError};
/// use vm_memory::bitmap::AtomicBitmap;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// struct Paused;
/// impl VmControl for Paused {
///     fn stop_vm(&mut self) -> Result<(), VmControlError> {
///         Ok(())
///     }
///     fn resume_vm(&mut self) {}
/// }
///
/// let ranges = [(GuestAddress(0), 1 << 20)];
/// let src = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).unwrap();
/// src.write_obj(0x1234_5678u32, GuestAddress(0x3000)).unwrap();
/// let bitmap = MigrationBitmap::new(&src).unwrap();
/// let chain = PrecopyNotifierChain::new();
///
/// let mut stream = Vec::new();
/// let report = Precopy::new(&src, &bitmap, &chain)
///     .run(&mut GuestMemoryDirtyLog::new(&src), &mut Paused, &mut stream)
///     .unwrap();
/// assert_eq!(report.pages_sent, 1);
/// assert_eq!(report.zero_pages, 255);
///
/// let dst = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
/// Receiver::new(&dst).unwrap().receive(&stream[..]).unwrap();
/// assert_eq!(dst.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0x1234_5678);
/// ```
pub struct Precopy<'a, M> {
    mem: &'a M,
    bitmap: &'a MigrationBitmap,
    chain: &'a PrecopyNotifierChain,
    config: PrecopyConfig,
    wait_for_hints: Option<(FreePageHinting, Duration)>,
    cancel: Option<CancelToken>,
    progress: Option<ProgressFn<'a>>,
    /// Whether pages are sent while the guest runs (false: [`Precopy::stopped`]).
    running_passes: bool,
}

impl<M> fmt::Debug for Precopy<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Precopy")
            .field("config", &self.config)
            .field("wait_for_hints", &self.wait_for_hints.as_ref().map(|w| w.1))
            .field("cancel", &self.cancel)
            .field("running_passes", &self.running_passes)
            .finish()
    }
}

impl<'a, M: GuestMemoryBackend> Precopy<'a, M> {
    /// A loop sending `mem`, the pages `bitmap` marks, notifying `chain`, with the default
    /// [`PrecopyConfig`].
    pub fn new(mem: &'a M, bitmap: &'a MigrationBitmap, chain: &'a PrecopyNotifierChain) -> Self {
        Precopy {
            mem,
            bitmap,
            chain,
            config: PrecopyConfig::default(),
            wait_for_hints: None,
            cancel: None,
            progress: None,
            running_passes: true,
        }
    }

    /// Uses `config`.
    pub fn config(mut self, config: PrecopyConfig) -> Self {
        self.config = config;
        self
    }

    /// Before the first pass, waits up to `deadline` for the guest to complete the hint round
    /// that the first sync started ([`FreePageHinting::wait_round_complete`]).
    pub fn wait_for_hint_round(mut self, hints: FreePageHinting, deadline: Duration) -> Self {
        self.wait_for_hints = Some((hints, deadline));
        self
    }

    /// Sends nothing while the guest runs: dirty logging starts (and with it a hint round,
    /// which [`wait_for_hint_round`](Self::wait_for_hint_round) waits for), then the guest is
    /// stopped and every page still dirty is written in one final stage. This is the copy of
    /// a stopped snapshot: the guest's downtime is the whole copy, and the hints of the one
    /// round decide what it leaves out.
    pub fn stopped(mut self) -> Self {
        self.running_passes = false;
        self
    }

    /// Lets `token` cancel the migration.
    pub fn cancel_token(mut self, token: CancelToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Calls `f` after each iteration (the final stage included), for progress output.
    pub fn on_iteration(mut self, f: impl FnMut(&IterationStats) + 'a) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Migrates: writes the stream to `out`, syncing from `log` and stopping the guest with
    /// `vm` for the final stage. `Cleanup` is notified however it ends; on failure after
    /// the guest was stopped, the guest is resumed.
    ///
    /// # Errors
    ///
    /// [`PrecopyError`]: the stream, a sync, the `Setup` notification, reading guest memory,
    /// stopping the guest, or cancellation.
    pub fn run<L, V, W>(
        self,
        log: &mut L,
        vm: &mut V,
        out: W,
    ) -> Result<MigrationReport, PrecopyError>
    where
        L: DirtyLog + ?Sized,
        V: VmControl + ?Sized,
        W: Write,
    {
        self.run_to(log, vm, &mut FrameWriter::new(out))
    }

    /// Like [`run`](Self::run), but writes the pages to any [`PageDestination`]: a
    /// [`FrameWriter`] is what `run` uses, a
    /// [`SnapshotWriter`](crate::snapshot::SnapshotWriter) writes a sparse snapshot file.
    ///
    /// # Errors
    ///
    /// As for [`run`](Self::run).
    pub fn run_to<L, V, D>(
        mut self,
        log: &mut L,
        vm: &mut V,
        dest: &mut D,
    ) -> Result<MigrationReport, PrecopyError>
    where
        L: DirtyLog + ?Sized,
        V: VmControl + ?Sized,
        D: PageDestination + ?Sized,
    {
        let mut stopped = false;
        let mut report = MigrationReport::default();
        let result = self.migrate(log, vm, dest, &mut stopped, &mut report);
        let state = MigrationState {
            vm_running: !stopped,
            postcopy: self.config.postcopy,
        };
        if self.chain.notify(PrecopyEvent::Cleanup, state).is_err() {
            report.notifier_errors += 1;
        }
        match result {
            Ok(()) => Ok(report),
            Err(e) => {
                if stopped {
                    vm.resume_vm();
                }
                Err(e)
            }
        }
    }

    /// BeforeBitmapSync, sync, AfterBitmapSync. Returns the bitmap's hinted page count
    /// between the sync and AfterBitmapSync: the hints of the round the sync opens arrive
    /// after that point, and the next sync's BeforeBitmapSync stops them.
    fn sync<L: DirtyLog + ?Sized>(
        &self,
        log: &mut L,
        state: MigrationState,
        report: &mut MigrationReport,
    ) -> Result<u64, PrecopyError> {
        let hinted = self.sync_open(log, state, report)?;
        self.sync_close(state, report);
        Ok(hinted)
    }

    /// BeforeBitmapSync and the sync; returns the hinted page count after it.
    fn sync_open<L: DirtyLog + ?Sized>(
        &self,
        log: &mut L,
        state: MigrationState,
        report: &mut MigrationReport,
    ) -> Result<u64, PrecopyError> {
        if self
            .chain
            .notify(PrecopyEvent::BeforeBitmapSync, state)
            .is_err()
        {
            report.notifier_errors += 1;
        }
        self.bitmap.sync(log).map_err(PrecopyError::Sync)?;
        Ok(self.bitmap.hinted_pages())
    }

    /// AfterBitmapSync.
    fn sync_close(&self, state: MigrationState, report: &mut MigrationReport) {
        if self
            .chain
            .notify(PrecopyEvent::AfterBitmapSync, state)
            .is_err()
        {
            report.notifier_errors += 1;
        }
    }

    fn emit(&mut self, it: IterationStats, report: &mut MigrationReport) {
        report.pages_sent += it.pages_sent;
        report.zero_pages += it.zero_pages;
        report.hinted_pages += it.hinted_pages;
        if let Some(f) = self.progress.as_mut() {
            f(&it);
        }
        report.iterations.push(it);
    }

    fn migrate<L, V, D>(
        &mut self,
        log: &mut L,
        vm: &mut V,
        out: &mut D,
        stopped: &mut bool,
        report: &mut MigrationReport,
    ) -> Result<(), PrecopyError>
    where
        L: DirtyLog + ?Sized,
        V: VmControl + ?Sized,
        D: PageDestination + ?Sized,
    {
        let start = Instant::now();
        let mut state = MigrationState {
            vm_running: true,
            postcopy: self.config.postcopy,
        };
        // The sender borrows its own token: `self` stays free for the progress callback.
        let cancel = self.cancel.clone();
        let mut tx = Sender {
            mem: self.mem,
            bitmap: self.bitmap,
            out,
            buf: Box::new([0u8; WIRE_PAGE_SIZE]),
            cancel: cancel.as_ref(),
        };
        tx.out.start()?;

        // Dirty logging starts: everything is to be sent, and the first sync empties the log.
        self.bitmap.mark_all_dirty();
        let mut hinted_mark = self.sync(log, state, report)?;
        self.chain
            .notify(PrecopyEvent::Setup, state)
            .map_err(PrecopyError::Setup)?;

        if let Some((hints, deadline)) = &self.wait_for_hints {
            let t = Instant::now();
            report.hint_round_completed = Some(hints.wait_round_complete(*deadline));
            report.hint_wait = t.elapsed();
        }

        let mut throughput = Throughput::new(self.config.max_bandwidth);
        let mut iteration = 0u32;
        while self.running_passes {
            iteration += 1;
            let it_start = Instant::now();
            let bytes_before = tx.out.bytes();
            let mut it = IterationStats {
                iteration,
                ..IterationStats::default()
            };
            let mut cursor = GuestAddress(0);
            throughput.window_start = Instant::now();
            throughput.window_bytes = 0;
            loop {
                if tx.cancelled() {
                    return Err(PrecopyError::Cancelled);
                }
                let slice_start = Instant::now();
                let slice_bytes = tx.out.bytes();
                let pass_ended = tx.send(
                    log,
                    &mut cursor,
                    Some(slice_start + SLICE),
                    &mut it,
                    Some(&mut throughput),
                )?;
                throughput.bytes += tx.out.bytes() - slice_bytes;
                throughput.time += slice_start.elapsed();
                let remaining = self.bitmap.dirty_pages() * PAGE_SIZE;
                if pass_ended || remaining <= throughput.threshold(self.config.downtime_limit) {
                    break;
                }
            }
            tx.out.end_iteration(iteration)?;
            let mark = self.sync(log, state, report)?;
            it.hinted_pages = mark - hinted_mark;
            hinted_mark = mark;
            it.bytes = tx.out.bytes() - bytes_before;
            it.duration = it_start.elapsed();
            it.dirty_after_sync = self.bitmap.dirty_pages();
            self.emit(it, report);
            let remaining = self.bitmap.dirty_pages() * PAGE_SIZE;
            if remaining <= throughput.threshold(self.config.downtime_limit)
                || iteration >= self.config.max_iterations
            {
                break;
            }
        }
        report.bandwidth = throughput.bandwidth();

        // Switchover.
        vm.stop_vm().map_err(PrecopyError::StopVm)?;
        *stopped = true;
        let down_start = Instant::now();
        state.vm_running = false;
        if self.chain.notify(PrecopyEvent::Complete, state).is_err() {
            report.notifier_errors += 1;
        }
        let bytes_before = tx.out.bytes();
        let mark = self.sync_open(log, state, report)?;
        let mut it = IterationStats {
            iteration: iteration + 1,
            final_stage: true,
            ..IterationStats::default()
        };
        let mut cursor = GuestAddress(0);
        tx.send(log, &mut cursor, None, &mut it, None)?;
        tx.out.end_iteration(iteration + 1)?;
        tx.out.end()?;
        // Only now may the guest reuse the pages it hinted (DONE): every page the copy
        // leaves out is free until the destination holds everything else.
        self.sync_close(state, report);
        report.downtime = down_start.elapsed();
        // Hints that came after the last running sync's mark and before the final stop.
        it.hinted_pages = mark - hinted_mark;
        it.bytes = tx.out.bytes() - bytes_before;
        it.duration = report.downtime;
        self.emit(it, report);
        report.bytes = tx.out.bytes();
        report.total_time = start.elapsed();
        Ok(())
    }
}
