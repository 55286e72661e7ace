// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Copies of the frontend's memory, asked for on the control socket: a sparse snapshot file
//! or a precopy migration stream, each with or without free page hints, and a page by page
//! comparison of the copy with the memory it came from.
//!
//! * [`CopySink`] is the balloon's hint sink: it forwards every hint to the daemon's
//!   [`HintCounter`] and, while a copy runs, to that copy's [`CopyHints`], which clears the
//!   copy's [`MigrationBitmap`] and records which pages the guest called free.
//! * [`Copier`] runs one copy at a time on a thread of its own. The copy holds the memory
//!   map it started with for its whole run, finds the guest's writes by content
//!   ([`ContentDirtyLog`]: vhost-user gives the daemon no dirty log) and, for the final
//!   stage, asks the caller to stop the guest: the job's state becomes `waiting_for_stop`
//!   until the `guest_stopped` request comes (or its timeout passes and the copy fails).
//!   The daemon never resumes the guest itself: the status's `resume` tells the caller
//!   to (a finished snapshot, any failure).
//! * `compare` reads the copy back (a snapshot with [`SnapshotFile`], a stream applied by a
//!   [`Receiver`] to fresh anonymous memory) and compares it with the shared memory page by
//!   page. A differing page is allowed only where the last copy's hints said the page was
//!   free and its dirty log never saw it written after that hint.
//!
//! For proving that comparison, a copy can be started with a deliberate [`Fault`]:
//! `shift_hints` (every hint clears the bitmap one page above the range the guest named, so
//! pages the guest still uses are left out) or `forget_later_writes` (pages written after
//! their hint are dropped from the dirty log's harvests, so pages the guest took back are
//! left out).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter};
use std::os::unix::fs::FileTypeExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon::migration::{
    ContentDirtyLog, DirtyBitmap, DirtyLog, DirtyLogError, HarvestedLog, MigrationBitmap,
    NotifierError, PrecopyContext, PrecopyEvent, PrecopyNotifier, PrecopyNotifierChain, RegionInfo,
};
use virtio_balloon::sink::{FreePageElement, FreePageSink};
use virtio_balloon::FreePageHinting;
use virtio_balloon_precopy::snapshot::{Snapshot, SnapshotFile, SnapshotMode};
use virtio_balloon_precopy::wire::FrameWriter;
use virtio_balloon_precopy::{
    MigrationReport, Precopy, PrecopyConfig, Receiver, VmControl, VmControlError,
};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::capture::HintCounter;
use crate::control::{CopyMode, Fault, Request, MAX_WAIT_MS};
use crate::device::lock;
use crate::Mem;

/// How long a copy waits for `guest_stopped` unless told otherwise (60 s).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a copy with hints waits for the guest's hint round unless told otherwise (10 s).
pub const DEFAULT_HINT_WAIT: Duration = Duration::from_secs(10);

/// The most differing page addresses a `compare` answer lists.
pub const MAX_LISTED_PAGES: usize = 16;

/// Bytes of one page.
const PAGE: usize = PAGE_SIZE as usize;

/// A set of 4 KiB guest pages over fixed regions, safe to change from several threads.
#[derive(Debug)]
struct PageSet {
    /// `(start, length, one bit per page)`, sorted by start, not overlapping.
    regions: Vec<(u64, u64, DirtyBitmap)>,
}

impl PageSet {
    /// An empty set over `ranges` (`(start, length)`; regions too large for this host's
    /// `usize` get no bits).
    fn new(ranges: &[(GuestAddress, u64)]) -> Self {
        let mut regions: Vec<(u64, u64, DirtyBitmap)> = ranges
            .iter()
            .map(|&(start, len)| {
                let pages = usize::try_from(len / PAGE_SIZE).unwrap_or(0);
                (start.0, len, DirtyBitmap::new(pages))
            })
            .collect();
        regions.sort_by_key(|r| r.0);
        PageSet { regions }
    }

    /// The region bitmap and bit of the page holding `addr`.
    fn locate(&self, addr: u64) -> Option<(&DirtyBitmap, usize)> {
        let i = self
            .regions
            .partition_point(|r| r.0 <= addr)
            .checked_sub(1)?;
        let (start, _, bits) = &self.regions[i];
        let bit = usize::try_from((addr - start) / PAGE_SIZE).ok()?;
        (bit < bits.len()).then_some((bits, bit))
    }

    /// Adds every whole page of `[gpa, gpa + len)` inside the regions. Returns how many
    /// pages were not in the set before.
    fn insert_range(&self, gpa: u64, len: u64) -> u64 {
        let end = gpa.saturating_add(len);
        let mut added = 0u64;
        for (start, rlen, bits) in &self.regions {
            let rend = start.saturating_add(*rlen);
            let lo = gpa.max(*start);
            let hi = end.min(rend);
            if lo >= hi {
                continue;
            }
            let first = (lo - start).div_ceil(PAGE_SIZE);
            let last = (hi - start) / PAGE_SIZE;
            if last <= first {
                continue;
            }
            let (Ok(first), Ok(n)) = (usize::try_from(first), usize::try_from(last - first)) else {
                continue;
            };
            added = added.saturating_add(bits.set_range(first, n) as u64);
        }
        added
    }

    /// Adds the page at `addr`; whether it was not in the set before.
    fn insert(&self, addr: u64) -> bool {
        self.locate(addr).is_some_and(|(bits, bit)| !bits.set(bit))
    }

    /// Removes the page at `addr`; whether it was in the set.
    fn remove(&self, addr: u64) -> bool {
        self.locate(addr)
            .is_some_and(|(bits, bit)| bits.test_and_clear(bit))
    }

    /// Whether the page at `addr` is in the set.
    fn contains(&self, addr: u64) -> bool {
        self.locate(addr).is_some_and(|(bits, bit)| bits.test(bit))
    }

    /// Pages in the set.
    fn count(&self) -> u64 {
        self.regions.iter().map(|r| r.2.count() as u64).sum()
    }

    /// `(start, length)` of each region.
    fn ranges(&self) -> Vec<(GuestAddress, u64)> {
        self.regions
            .iter()
            .map(|r| (GuestAddress(r.0), r.1))
            .collect()
    }
}

/// The hints of one copy: the bitmap they clear, and which pages the guest called free.
///
/// A page is *hinted clean* from the hint that named it until a harvest of the copy's dirty
/// log reports it written ([`HintAwareLog`]); then it counts as *hinted later written*.
pub struct CopyHints {
    bitmap: Arc<MigrationBitmap>,
    fault: Option<Fault>,
    hinted: PageSet,
    later_written: PageSet,
    hints: AtomicU64,
    hinted_bytes: AtomicU64,
}

impl fmt::Debug for CopyHints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyHints")
            .field("fault", &self.fault)
            .field("hints", &self.hints)
            .finish_non_exhaustive()
    }
}

impl CopyHints {
    /// The hints of a copy of memory with the regions `ranges` (`(start, length)`), which
    /// clear `bitmap`, with the fault `fault` if any.
    pub fn new(
        ranges: &[(GuestAddress, u64)],
        bitmap: Arc<MigrationBitmap>,
        fault: Option<Fault>,
    ) -> Self {
        CopyHints {
            bitmap,
            fault,
            hinted: PageSet::new(ranges),
            later_written: PageSet::new(ranges),
            hints: AtomicU64::new(0),
            hinted_bytes: AtomicU64::new(0),
        }
    }

    /// The guest hinted `[gpa, gpa + len)` as free: clears it from the bitmap (shifted up by
    /// a page under [`Fault::ShiftHints`]) and records the range as the guest named it.
    pub fn hint(&self, gpa: GuestAddress, len: u64) {
        self.hints.fetch_add(1, Ordering::Relaxed);
        self.hinted_bytes.fetch_add(len, Ordering::Relaxed);
        self.hinted.insert_range(gpa.0, len);
        match self.fault {
            None | Some(Fault::ForgetLaterWrites) => {
                self.bitmap.clear_free_range(gpa, len);
            }
            Some(Fault::ShiftHints) => {
                if let Some(shifted) = gpa.0.checked_add(PAGE_SIZE) {
                    self.bitmap.clear_free_range(GuestAddress(shifted), len);
                }
            }
        }
    }

    /// A harvest of `region` reported `log`: every hinted clean page in it was written after
    /// its hint.
    fn harvested(&self, region: &RegionInfo, log: &HarvestedLog) {
        let region_end = region.start.0.saturating_add(region.len);
        if log.page_size == 0 {
            // Cannot be placed: count the whole region as written.
            let mut addr = region.start.0;
            while addr < region_end {
                self.written(addr);
                addr = addr.saturating_add(PAGE_SIZE);
            }
            return;
        }
        for (w, &word) in log.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let Some(bit) = (w as u64).checked_mul(64).and_then(|x| x.checked_add(b)) else {
                    return;
                };
                let Some(first) = bit
                    .checked_mul(log.page_size)
                    .and_then(|off| region.start.0.checked_add(off))
                else {
                    return;
                };
                let last = first.saturating_add(log.page_size).min(region_end);
                let mut addr = first - first % PAGE_SIZE;
                while addr < last {
                    self.written(addr);
                    addr = addr.saturating_add(PAGE_SIZE);
                }
            }
        }
    }

    /// Under [`Fault::ForgetLaterWrites`]: drops from `log` (in 4 KiB pages) every page
    /// written after a hint of this copy.
    fn forget_later_writes(&self, region: &RegionInfo, log: &mut HarvestedLog) {
        if log.page_size != PAGE_SIZE {
            return;
        }
        for (w, word) in log.words.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let addr = (w as u64)
                    .checked_mul(64)
                    .and_then(|x| x.checked_add(b))
                    .and_then(|bit| bit.checked_mul(PAGE_SIZE))
                    .and_then(|off| region.start.0.checked_add(off));
                if addr.is_some_and(|a| self.later_written.contains(a)) {
                    *word &= !(1u64 << b);
                }
            }
        }
    }

    /// The page at `addr` was found written.
    fn written(&self, addr: u64) {
        if self.hinted.remove(addr) {
            self.later_written.insert(addr);
        }
    }

    /// Hints received.
    pub fn hints(&self) -> u64 {
        self.hints.load(Ordering::Relaxed)
    }

    /// Bytes the hints named.
    pub fn hinted_bytes(&self) -> u64 {
        self.hinted_bytes.load(Ordering::Relaxed)
    }

    /// Pages hinted and not seen written since.
    pub fn hinted_clean_pages(&self) -> u64 {
        self.hinted.count()
    }

    /// Whether the page at `addr` was hinted and not seen written since.
    pub fn is_hinted_clean(&self, addr: GuestAddress) -> bool {
        self.hinted.contains(addr.0)
    }

    /// Pages a harvest found written after a hint of this copy had named them.
    pub fn hinted_later_written(&self) -> u64 {
        self.later_written.count()
    }

    /// The regions, `(start, length)`.
    pub fn ranges(&self) -> Vec<(GuestAddress, u64)> {
        self.hinted.ranges()
    }
}

/// A dirty log that tells a copy's [`CopyHints`] which hinted pages its harvests report
/// written.
#[derive(Debug)]
pub struct HintAwareLog<L> {
    inner: L,
    hints: Arc<CopyHints>,
}

impl<L> HintAwareLog<L> {
    /// `inner`, reporting to `hints`.
    pub fn new(inner: L, hints: Arc<CopyHints>) -> Self {
        HintAwareLog { inner, hints }
    }

    /// The wrapped log.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L: DirtyLog> DirtyLog for HintAwareLog<L> {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        let mut log = self.inner.take_dirty_log(region)?;
        self.hints.harvested(region, &log);
        if self.hints.fault == Some(Fault::ForgetLaterWrites) {
            self.hints.forget_later_writes(region, &mut log);
        }
        Ok(log)
    }

    fn page_sent(&mut self, addr: GuestAddress, data: &[u8]) {
        self.inner.page_sent(addr, data);
    }
}

/// The daemon's hint sink: every hint goes to the [`HintCounter`] and, while a copy runs, to
/// that copy's [`CopyHints`].
#[derive(Debug)]
pub struct CopySink {
    counter: Arc<HintCounter>,
    copy: Mutex<Option<Arc<CopyHints>>>,
}

impl CopySink {
    /// A sink forwarding to `counter`, with no copy attached.
    pub fn new(counter: Arc<HintCounter>) -> Self {
        CopySink {
            counter,
            copy: Mutex::new(None),
        }
    }

    /// Sends the hints from now on to `hints` as well.
    pub fn attach(&self, hints: Arc<CopyHints>) {
        *lock(&self.copy) = Some(hints);
    }

    /// Stops sending hints to a copy. Once it returns no hint reaches the detached copy.
    pub fn detach(&self) {
        *lock(&self.copy) = None;
    }

    /// The counter.
    pub fn counter(&self) -> &Arc<HintCounter> {
        &self.counter
    }
}

impl FreePageSink for CopySink {
    fn free_page_hint(&self, cmd_id: u32, gpa: GuestAddress, len: u64) {
        self.counter.free_page_hint(cmd_id, gpa, len);
        // Applied under the lock, so `detach` waits for a hint in flight.
        if let Some(copy) = lock(&self.copy).as_ref() {
            copy.hint(gpa, len);
        }
    }

    fn records_elements(&self) -> bool {
        self.counter.records_elements()
    }

    fn free_page_element(&self, element: &FreePageElement) {
        self.counter.free_page_element(element);
    }
}

/// The balloon's hinting as a precopy notifier that starts at most a given number of hint
/// rounds; `None`: as many as the copy's syncs ask for.
struct RoundLimit {
    hinting: FreePageHinting,
    limit: Option<u32>,
    started: AtomicU32,
}

impl PrecopyNotifier for RoundLimit {
    fn name(&self) -> &str {
        PrecopyNotifier::name(&self.hinting)
    }

    fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
        if matches!(event, PrecopyEvent::AfterBitmapSync) && ctx.vm_running() {
            let started = self.started.load(Ordering::Relaxed);
            if self.limit.is_some_and(|l| started >= l) {
                // The round was stopped before the sync; no new one.
                return Ok(());
            }
            self.started
                .store(started.saturating_add(1), Ordering::Relaxed);
        }
        self.hinting.notify(event, ctx)
    }
}

/// What kind of copy, with its own settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyKind {
    Snapshot { mode: CopyMode },
    Migrate { max_iterations: u32 },
}

/// A checked copy request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CopyJob {
    kind: CopyKind,
    path: PathBuf,
    hints: bool,
    overwrite: bool,
    hint_wait: Duration,
    hint_rounds: Option<u32>,
    stop_timeout: Duration,
    fault: Option<Fault>,
}

/// A duration in milliseconds from a client, at most [`MAX_WAIT_MS`] and not zero.
fn millis(name: &str, ms: u64) -> Result<Duration, String> {
    if ms == 0 || ms > MAX_WAIT_MS {
        return Err(format!("{name} must be between 1 and {MAX_WAIT_MS}"));
    }
    Ok(Duration::from_millis(ms))
}

impl CopyJob {
    /// Checks a `snapshot` or `migrate` request; `None` for any other request.
    fn from_request(req: &Request) -> Option<Result<CopyJob, String>> {
        let job = match req {
            Request::Snapshot {
                path,
                hints,
                mode,
                overwrite,
                hint_wait_ms,
                hint_rounds,
                stop_timeout_ms,
                fault,
            } => CopyJob::check(
                CopyKind::Snapshot {
                    mode: mode.unwrap_or(CopyMode::Stopped),
                },
                path,
                *hints,
                *overwrite,
                *hint_wait_ms,
                *hint_rounds,
                *stop_timeout_ms,
                *fault,
            ),
            Request::Migrate {
                path,
                hints,
                max_iterations,
                overwrite,
                hint_wait_ms,
                hint_rounds,
                stop_timeout_ms,
                fault,
            } => match max_iterations {
                Some(0) => Err("max_iterations must be at least 1".into()),
                _ => CopyJob::check(
                    CopyKind::Migrate {
                        max_iterations: max_iterations
                            .unwrap_or(PrecopyConfig::default().max_iterations),
                    },
                    path,
                    *hints,
                    *overwrite,
                    *hint_wait_ms,
                    *hint_rounds,
                    *stop_timeout_ms,
                    *fault,
                ),
            },
            _ => return None,
        };
        Some(job)
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        kind: CopyKind,
        path: &Path,
        hints: bool,
        overwrite: bool,
        hint_wait_ms: Option<u64>,
        hint_rounds: Option<u32>,
        stop_timeout_ms: Option<u64>,
        fault: Option<Fault>,
    ) -> Result<CopyJob, String> {
        if path.as_os_str().is_empty() || !path.is_absolute() {
            return Err(format!(
                "path must be an absolute path, not {:?}",
                path.display().to_string()
            ));
        }
        if !hints {
            let extra = [
                (hint_wait_ms.is_some(), "hint_wait_ms"),
                (hint_rounds.is_some(), "hint_rounds"),
                (fault.is_some(), "fault"),
            ];
            if let Some((_, name)) = extra.iter().find(|(given, _)| *given) {
                return Err(format!("{name} needs \"hints\":true"));
            }
        }
        if hint_rounds == Some(0) {
            return Err("hint_rounds must be at least 1".into());
        }
        let hint_wait = match hint_wait_ms {
            Some(ms) => millis("hint_wait_ms", ms)?,
            None => DEFAULT_HINT_WAIT,
        };
        let stop_timeout = match stop_timeout_ms {
            Some(ms) => millis("stop_timeout_ms", ms)?,
            None => DEFAULT_STOP_TIMEOUT,
        };
        Ok(CopyJob {
            kind,
            path: path.to_path_buf(),
            hints,
            overwrite,
            hint_wait,
            hint_rounds,
            stop_timeout,
            fault,
        })
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            CopyKind::Snapshot { .. } => "snapshot",
            CopyKind::Migrate { .. } => "migrate",
        }
    }

    /// The request's settings, for the status.
    fn describe(&self) -> Value {
        let mut v = json!({
            "kind": self.kind_name(),
            "path": self.path.display().to_string(),
            "hints": self.hints,
            "fault": self.fault.map(Fault::name),
            "hint_rounds": self.hint_rounds,
        });
        match self.kind {
            CopyKind::Snapshot { mode } => {
                v["mode"] = json!(match mode {
                    CopyMode::Stopped => "stopped",
                    CopyMode::Live => "live",
                });
            }
            CopyKind::Migrate { max_iterations } => v["max_iterations"] = json!(max_iterations),
        }
        v
    }
}

/// Where a copy stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    Running,
    WaitingForStop,
    Done,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Running => "running",
            Phase::WaitingForStop => "waiting_for_stop",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    fn busy(self) -> bool {
        matches!(self, Phase::Running | Phase::WaitingForStop)
    }
}

#[derive(Default)]
struct JobState {
    phase: Phase,
    /// The current or last copy's settings.
    job: Option<Value>,
    started: Option<Instant>,
    /// `guest_stopped` came for the current stop.
    stopped: bool,
    /// The caller should resume the guest.
    resume: bool,
    result: Option<Value>,
    error: Option<String>,
    /// The last copy's hints, for `compare`.
    last: Option<Arc<CopyHints>>,
    /// A `compare` is reading memory.
    comparing: bool,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<JobState>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        lock(&self.state)
    }
}

/// The copy's [`VmControl`]: the caller stops and resumes the guest, told through the
/// job's state.
struct JobVm {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl VmControl for JobVm {
    fn stop_vm(&mut self) -> Result<(), VmControlError> {
        let shared = &self.shared;
        let mut st = shared.lock();
        st.phase = Phase::WaitingForStop;
        st.stopped = false;
        shared.cond.notify_all();
        let deadline = Instant::now().checked_add(self.timeout);
        while !st.stopped {
            let left = deadline
                .and_then(|d| d.checked_duration_since(Instant::now()))
                .unwrap_or(Duration::ZERO);
            if left.is_zero() {
                st.phase = Phase::Running;
                shared.cond.notify_all();
                return Err(format!(
                    "the guest was not reported stopped (guest_stopped) within {} ms",
                    self.timeout.as_millis()
                )
                .into());
            }
            st = shared
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.phase = Phase::Running;
        Ok(())
    }

    fn resume_vm(&mut self) {
        self.shared.lock().resume = true;
        self.shared.cond.notify_all();
    }
}

/// Milliseconds, for answers.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs the copies and comparisons of the control socket.
pub struct Copier {
    mem: Mem,
    hinting: FreePageHinting,
    sink: Arc<CopySink>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Copier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Copier")
            .field("state", &self.shared.lock().phase)
            .finish_non_exhaustive()
    }
}

impl Copier {
    /// Copies `mem`, starting hint rounds through `hinting`; `sink` must be the sink the
    /// balloon was created with.
    pub fn new(mem: Mem, hinting: FreePageHinting, sink: Arc<CopySink>) -> Self {
        Copier {
            mem,
            hinting,
            sink,
            shared: Arc::new(Shared {
                state: Mutex::new(JobState::default()),
                cond: Condvar::new(),
            }),
        }
    }

    /// Whether `req` is one of the copy requests [`handle`](Self::handle) answers.
    pub fn handles(req: &Request) -> bool {
        matches!(
            req,
            Request::Snapshot { .. }
                | Request::Migrate { .. }
                | Request::GuestStopped
                | Request::CopyStatus
                | Request::CopyWait { .. }
                | Request::Compare { .. }
        )
    }

    /// Answers a copy request (an error for any other request).
    pub fn handle(&self, req: Request) -> Result<Value, String> {
        if let Some(job) = CopyJob::from_request(&req) {
            return self.start(job?);
        }
        match req {
            Request::GuestStopped => self.guest_stopped(),
            Request::CopyStatus => Ok(self.status()),
            Request::CopyWait { timeout_ms } => {
                if timeout_ms > MAX_WAIT_MS {
                    return Err(format!("timeout_ms above {MAX_WAIT_MS}"));
                }
                Ok(self.wait(Duration::from_millis(timeout_ms)))
            }
            Request::Compare { snapshot, stream } => self.compare(snapshot, stream),
            _ => Err("not a copy request".into()),
        }
    }

    /// The copy's state, for `status`.
    pub fn state_name(&self) -> &'static str {
        self.shared.lock().phase.name()
    }

    fn start(&self, job: CopyJob) -> Result<Value, String> {
        let mut st = self.shared.lock();
        if st.phase.busy() {
            return Err("a copy is already running (one at a time)".into());
        }
        if st.comparing {
            return Err("a compare is running".into());
        }
        if self.mem.memory().num_regions() == 0 {
            return Err("no guest memory: no frontend has sent its memory table".into());
        }
        if job.hints && !self.hinting.negotiated() {
            return Err(
                "hints asked for, but the driver did not negotiate free page hinting".into(),
            );
        }
        if let Some(t) = st.thread.take() {
            // The previous copy has ended (its phase says so): this returns at once.
            let _ = t.join();
        }
        let describe = job.describe();
        let ctx = JobContext {
            mem: self.mem.clone(),
            hinting: self.hinting.clone(),
            sink: self.sink.clone(),
            shared: self.shared.clone(),
        };
        let spawned = thread::Builder::new()
            .name("copy".into())
            .spawn(move || ctx.run(job));
        let handle = spawned.map_err(|e| format!("cannot start the copy thread: {e}"))?;
        *st = JobState {
            phase: Phase::Running,
            job: Some(describe.clone()),
            started: Some(Instant::now()),
            thread: Some(handle),
            ..JobState::default()
        };
        self.shared.cond.notify_all();
        let mut v = describe;
        v["state"] = json!(Phase::Running.name());
        Ok(v)
    }

    fn guest_stopped(&self) -> Result<Value, String> {
        let mut st = self.shared.lock();
        if st.phase != Phase::WaitingForStop {
            return Err(format!(
                "no copy is waiting for the guest to stop (state {})",
                st.phase.name()
            ));
        }
        st.stopped = true;
        st.phase = Phase::Running;
        self.shared.cond.notify_all();
        Ok(json!({ "state": st.phase.name() }))
    }

    fn status_of(st: &JobState) -> Value {
        let mut m = Map::new();
        m.insert("state".into(), json!(st.phase.name()));
        if let Some(Value::Object(job)) = &st.job {
            for (k, v) in job {
                m.insert(k.clone(), v.clone());
            }
        }
        m.insert("resume".into(), json!(st.resume));
        if let Some(t) = st.started {
            if st.phase.busy() {
                m.insert("elapsed_ms".into(), json!(ms(t.elapsed())));
            }
        }
        if let Some(Value::Object(result)) = &st.result {
            for (k, v) in result {
                m.insert(k.clone(), v.clone());
            }
        }
        if let Some(e) = &st.error {
            m.insert("error".into(), json!(e));
        }
        Value::Object(m)
    }

    fn status(&self) -> Value {
        Self::status_of(&self.shared.lock())
    }

    /// Waits until the copy is done, failed or waiting for the guest to stop, or `timeout`.
    fn wait(&self, timeout: Duration) -> Value {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.shared.lock();
        while st.phase == Phase::Running {
            let left = deadline
                .and_then(|d| d.checked_duration_since(Instant::now()))
                .unwrap_or(Duration::ZERO);
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Self::status_of(&st)
    }

    fn compare(&self, snapshot: Option<PathBuf>, stream: Option<PathBuf>) -> Result<Value, String> {
        let source = match (snapshot, stream) {
            (Some(p), None) => Source::Snapshot(p),
            (None, Some(p)) => Source::Stream(p),
            _ => return Err("compare needs exactly one of \"snapshot\" or \"stream\"".into()),
        };
        let hints = {
            let mut st = self.shared.lock();
            if st.phase.busy() {
                return Err("a copy is running: compare after it ends".into());
            }
            if st.comparing {
                return Err("a compare is already running".into());
            }
            st.comparing = true;
            st.last.clone()
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            compare(&self.mem, hints.as_deref(), &source)
        }))
        .unwrap_or_else(|_| Err("the compare panicked".into()));
        self.shared.lock().comparing = false;
        result
    }
}

/// What a copy thread needs.
struct JobContext {
    mem: Mem,
    hinting: FreePageHinting,
    sink: Arc<CopySink>,
    shared: Arc<Shared>,
}

impl JobContext {
    fn run(self, job: CopyJob) {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.copy(&job)))
            .unwrap_or_else(|_| Err("the copy thread panicked".into()));
        self.sink.detach();
        let mut st = self.shared.lock();
        match outcome {
            Ok(v) => {
                log::info!("copy: {} to {} done", job.kind_name(), job.path.display());
                st.phase = Phase::Done;
                st.result = Some(v);
            }
            Err(e) => {
                log::warn!(
                    "copy: {} to {} failed: {e}",
                    job.kind_name(),
                    job.path.display()
                );
                st.phase = Phase::Failed;
                st.error = Some(e);
                // Whatever happened, the caller may have stopped the guest.
                st.resume = true;
            }
        }
        self.shared.cond.notify_all();
    }

    fn copy(&self, job: &CopyJob) -> Result<Value, String> {
        // The memory map this copy reads, for its whole run (a new memory table from the
        // frontend does not unmap it).
        let guard = self.mem.memory();
        let mem: &GuestMemoryMmap<()> = &guard;
        let ranges: Vec<(GuestAddress, u64)> =
            mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        let bitmap = Arc::new(
            MigrationBitmap::new(mem).map_err(|e| format!("cannot track guest memory: {e}"))?,
        );
        let hints = Arc::new(CopyHints::new(&ranges, bitmap.clone(), job.fault));
        let mut chain = PrecopyNotifierChain::new();
        let limit = Arc::new(RoundLimit {
            hinting: self.hinting.clone(),
            limit: job.hint_rounds,
            started: AtomicU32::new(0),
        });
        if job.hints {
            chain.add(limit.clone());
            self.sink.attach(hints.clone());
        }
        self.shared.lock().last = Some(hints.clone());
        let mut log = HintAwareLog::new(ContentDirtyLog::new(mem), hints.clone());
        let mut vm = JobVm {
            shared: self.shared.clone(),
            timeout: job.stop_timeout,
        };
        let mut v = match job.kind {
            CopyKind::Snapshot { mode } => {
                let mut s = Snapshot::new(mem, &bitmap, &chain)
                    .mode(match mode {
                        CopyMode::Stopped => SnapshotMode::Stopped,
                        CopyMode::Live => SnapshotMode::Live,
                    })
                    .overwrite(job.overwrite);
                if job.hints {
                    s = s.wait_for_hint_round(self.hinting.clone(), job.hint_wait);
                }
                let report = s
                    .write(&mut log, &mut vm, &job.path)
                    .map_err(|e| e.to_string())?;
                let mut v = report_json(&report.copy);
                v["file_len"] = json!(report.file.file_len);
                v["allocated_bytes"] = json!(report.file.allocated_bytes);
                v["data_pages"] = json!(report.file.data_pages);
                v
            }
            CopyKind::Migrate { max_iterations } => {
                let file = open_stream(&job.path, job.overwrite)?;
                let mut dest = FrameWriter::new(BufWriter::with_capacity(1 << 20, file));
                let mut p = Precopy::new(mem, &bitmap, &chain)
                    .config(PrecopyConfig::default().with_max_iterations(max_iterations));
                if job.hints {
                    p = p.wait_for_hint_round(self.hinting.clone(), job.hint_wait);
                }
                let report = p
                    .run_to(&mut log, &mut vm, &mut dest)
                    .map_err(|e| e.to_string())?;
                let bytes = dest.bytes();
                // Flushes the buffer: a write error fails the copy.
                dest.into_inner()
                    .into_inner()
                    .map_err(|e| format!("writing {}: {}", job.path.display(), e.error()))?;
                let mut v = report_json(&report);
                v["bytes"] = json!(bytes);
                v
            }
        };
        v["hinted_later_written"] = json!(hints.hinted_later_written());
        v["hints_received"] = json!(hints.hints());
        v["hinted_bytes"] = json!(hints.hinted_bytes());
        v["hinted_clean_pages"] = json!(hints.hinted_clean_pages());
        v["hint_rounds_started"] = json!(if job.hints {
            limit.started.load(Ordering::Relaxed)
        } else {
            0
        });
        v["hashed_pages"] = json!(log.inner().pages_hashed());
        v["hash_bytes_read"] = json!(log.inner().bytes_read());
        Ok(v)
    }
}

/// Opens the stream file: a new file, an existing regular file only with `overwrite`, or
/// an existing device (`/dev/null`); not a pipe or a socket.
fn open_stream(path: &Path, overwrite: bool) -> Result<File, String> {
    let err = |e: io::Error| format!("cannot open {}: {e}", path.display());
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::metadata(path).map_err(err)?;
            let kind = meta.file_type();
            if kind.is_fifo() || kind.is_socket() {
                // Opening a pipe without a reader would block the copy for good.
                return Err(format!(
                    "{} is a pipe or a socket: give a file or a device",
                    path.display()
                ));
            }
            if meta.is_file() && !overwrite {
                return Err(format!(
                    "{} exists (pass \"overwrite\":true to replace it)",
                    path.display()
                ));
            }
            OpenOptions::new()
                .write(true)
                .truncate(meta.is_file())
                .open(path)
                .map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// The figures of a copy.
fn report_json(r: &MigrationReport) -> Value {
    json!({
        "bytes": r.bytes,
        "pages_sent": r.pages_sent,
        "zero_pages": r.zero_pages,
        "hinted_pages": r.hinted_pages,
        "iterations": r.iterations.len(),
        "total_ms": ms(r.total_time),
        "downtime_ms": ms(r.downtime),
        "hint_wait_ms": ms(r.hint_wait),
        "hint_round_completed": r.hint_round_completed,
        "bandwidth_bytes_per_s": r.bandwidth,
        "notifier_errors": r.notifier_errors,
    })
}

/// Where `compare` reads the copy.
enum Source {
    Snapshot(PathBuf),
    Stream(PathBuf),
}

/// The counts of a comparison.
#[derive(Default)]
struct Differences {
    pages: u64,
    differing: u64,
    hinted_clean: u64,
    other: u64,
    zero_in_copy: u64,
    first: Vec<String>,
    first_other: Vec<String>,
}

impl Differences {
    fn page(&mut self, addr: GuestAddress, copy: &[u8; PAGE], hinted_clean: bool) {
        self.differing += 1;
        if copy.iter().all(|&b| b == 0) {
            self.zero_in_copy += 1;
        }
        let name = format!("{:#x}", addr.0);
        if self.first.len() < MAX_LISTED_PAGES {
            self.first.push(name.clone());
        }
        if hinted_clean {
            self.hinted_clean += 1;
        } else {
            self.other += 1;
            if self.first_other.len() < MAX_LISTED_PAGES {
                self.first_other.push(name);
            }
        }
    }
}

/// Compares the copy at `source` with `mem`, page by page.
fn compare(mem: &Mem, hints: Option<&CopyHints>, source: &Source) -> Result<Value, String> {
    let guard = mem.memory();
    let mem: &GuestMemoryMmap<()> = &guard;
    let ranges: Vec<(GuestAddress, u64)> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
    if ranges.is_empty() {
        return Err("no guest memory: no frontend has sent its memory table".into());
    }
    if let Some(h) = hints {
        if h.ranges() != ranges {
            return Err(
                "the guest memory's regions changed since the last copy: nothing to compare".into(),
            );
        }
    }
    let mut diff = Differences::default();
    let mut extra = Map::new();
    match source {
        Source::Snapshot(path) => {
            let file = SnapshotFile::open(path).map_err(|e| e.to_string())?;
            compare_pages(mem, hints, &mut diff, |addr, buf| {
                match file.read_page(addr, buf) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "the snapshot does not hold the page at {:#x}",
                        addr.0
                    )),
                    Err(e) => Err(e.to_string()),
                }
            })?;
            extra.insert("source".into(), json!("snapshot"));
        }
        Source::Stream(path) => {
            let usize_ranges = ranges
                .iter()
                .map(|&(a, l)| usize::try_from(l).map(|l| (a, l)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "a region is too large for this host".to_string())?;
            let dst = GuestMemoryMmap::<()>::from_ranges(&usize_ranges)
                .map_err(|e| format!("cannot map memory for the stream: {e}"))?;
            let file =
                File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let stats = Receiver::new(&dst)
                .map_err(|e| format!("cannot track the stream's memory: {e}"))?
                .receive(BufReader::with_capacity(1 << 20, file))
                .map_err(|e| format!("cannot apply {}: {e}", path.display()))?;
            compare_pages(mem, hints, &mut diff, |addr, buf| {
                dst.read_slice(&mut buf[..], addr)
                    .map_err(|e| format!("reading the stream's memory at {:#x}: {e}", addr.0))
            })?;
            extra.insert("source".into(), json!("stream"));
            extra.insert(
                "stream".into(),
                json!({
                    "pages": stats.pages,
                    "zero_pages": stats.zero_pages,
                    "iterations": stats.iterations,
                    "bytes": stats.bytes,
                }),
            );
        }
    }
    let mut v = json!({
        "pages_compared": diff.pages,
        "pages_differing": diff.differing,
        "differing_hinted_clean": diff.hinted_clean,
        "differing_other": diff.other,
        "differing_zero_in_copy": diff.zero_in_copy,
        "first_differing": diff.first,
        "first_differing_other": diff.first_other,
        "hinted_clean_pages": hints.map_or(0, CopyHints::hinted_clean_pages),
        "hinted_later_written": hints.map_or(0, CopyHints::hinted_later_written),
    });
    if let Some(obj) = v.as_object_mut() {
        obj.extend(extra);
    }
    Ok(v)
}

/// Compares every whole page of `mem` with what `copy` reads for it.
fn compare_pages(
    mem: &GuestMemoryMmap<()>,
    hints: Option<&CopyHints>,
    diff: &mut Differences,
    mut copy: impl FnMut(GuestAddress, &mut [u8; PAGE]) -> Result<(), String>,
) -> Result<(), String> {
    let mut ours = Box::new([0u8; PAGE]);
    let mut theirs = Box::new([0u8; PAGE]);
    for region in mem.iter() {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE_SIZE;
        for i in 0..pages {
            let Some(addr) = i
                .checked_mul(PAGE_SIZE)
                .and_then(|off| start.checked_add(off))
                .map(GuestAddress)
            else {
                break;
            };
            mem.read_slice(&mut ours[..], addr)
                .map_err(|e| format!("reading guest memory at {:#x}: {e}", addr.0))?;
            copy(addr, &mut theirs)?;
            diff.pages += 1;
            if ours[..] != theirs[..] {
                let clean = hints.is_some_and(|h| h.is_hinted_clean(addr));
                diff.page(addr, &theirs, clean);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{parse_request, response};
    use virtio_balloon::{Balloon, BalloonConfig};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
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
}
