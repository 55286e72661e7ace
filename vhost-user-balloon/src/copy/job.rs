// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The copy job: one copy at a time on a thread of its own, its requests, its state, and
//! the guest stop it waits for.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter};
use std::os::unix::fs::FileTypeExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use virtio_balloon::migration::{ContentDirtyLog, MigrationBitmap, PrecopyNotifierChain};
use virtio_balloon::FreePageHinting;
use virtio_balloon_precopy::snapshot::{Snapshot, SnapshotMode};
use virtio_balloon_precopy::wire::FrameWriter;
use virtio_balloon_precopy::{MigrationReport, Precopy, PrecopyConfig, VmControl, VmControlError};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::compare::*;
use super::hints::*;

/// How long a copy waits for `guest_stopped` unless told otherwise (60 s).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a copy with hints waits for the guest's hint round unless told otherwise (10 s).
pub const DEFAULT_HINT_WAIT: Duration = Duration::from_secs(10);
use crate::control::{CopyMode, Fault, Request, MAX_WAIT_MS};
use crate::device::lock;
use crate::Mem;

/// What kind of copy, with its own settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CopyKind {
    Snapshot { mode: CopyMode },
    Migrate { max_iterations: u32 },
}

/// A checked copy request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CopyJob {
    pub(super) kind: CopyKind,
    pub(super) path: PathBuf,
    pub(super) hints: bool,
    pub(super) overwrite: bool,
    pub(super) hint_wait: Duration,
    pub(super) hint_rounds: Option<u32>,
    pub(super) stop_timeout: Duration,
    pub(super) fault: Option<Fault>,
}

/// A duration in milliseconds from a client, at most [`MAX_WAIT_MS`] and not zero.
pub(super) fn millis(name: &str, ms: u64) -> Result<Duration, String> {
    if ms == 0 || ms > MAX_WAIT_MS {
        return Err(format!("{name} must be between 1 and {MAX_WAIT_MS}"));
    }
    Ok(Duration::from_millis(ms))
}

impl CopyJob {
    /// Checks a `snapshot` or `migrate` request; `None` for any other request.
    pub(super) fn from_request(req: &Request) -> Option<Result<CopyJob, String>> {
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
    pub(super) fn check(
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

    pub(super) fn kind_name(&self) -> &'static str {
        match self.kind {
            CopyKind::Snapshot { .. } => "snapshot",
            CopyKind::Migrate { .. } => "migrate",
        }
    }

    /// The request's settings, for the status.
    pub(super) fn describe(&self) -> Value {
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
pub(super) enum Phase {
    #[default]
    Idle,
    Running,
    WaitingForStop,
    Done,
    Failed,
}

impl Phase {
    pub(super) fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Running => "running",
            Phase::WaitingForStop => "waiting_for_stop",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    pub(super) fn busy(self) -> bool {
        matches!(self, Phase::Running | Phase::WaitingForStop)
    }
}

#[derive(Default)]
pub(super) struct JobState {
    pub(super) phase: Phase,
    /// The current or last copy's settings.
    pub(super) job: Option<Value>,
    pub(super) started: Option<Instant>,
    /// `guest_stopped` came for the current stop.
    pub(super) stopped: bool,
    /// The caller should resume the guest.
    pub(super) resume: bool,
    pub(super) result: Option<Value>,
    pub(super) error: Option<String>,
    /// The last copy's hints, for `compare`.
    pub(super) last: Option<Arc<CopyHints>>,
    /// A `compare` is reading memory.
    pub(super) comparing: bool,
    pub(super) thread: Option<JoinHandle<()>>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<JobState>,
    pub(super) cond: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, JobState> {
        lock(&self.state)
    }
}

/// The copy's [`VmControl`]: the caller stops and resumes the guest, told through the
/// job's state.
pub(super) struct JobVm {
    pub(super) shared: Arc<Shared>,
    pub(super) timeout: Duration,
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
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs the copies and comparisons of the control socket.
pub struct Copier {
    pub(super) mem: Mem,
    pub(super) hinting: FreePageHinting,
    pub(super) sink: Arc<CopySink>,
    pub(super) shared: Arc<Shared>,
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

    pub(super) fn start(&self, job: CopyJob) -> Result<Value, String> {
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

    pub(super) fn guest_stopped(&self) -> Result<Value, String> {
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

    pub(super) fn status_of(st: &JobState) -> Value {
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

    pub(super) fn status(&self) -> Value {
        Self::status_of(&self.shared.lock())
    }

    /// Waits until the copy is done, failed or waiting for the guest to stop, or `timeout`.
    pub(super) fn wait(&self, timeout: Duration) -> Value {
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

    pub(super) fn compare(
        &self,
        snapshot: Option<PathBuf>,
        stream: Option<PathBuf>,
    ) -> Result<Value, String> {
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
pub(super) struct JobContext {
    pub(super) mem: Mem,
    pub(super) hinting: FreePageHinting,
    pub(super) sink: Arc<CopySink>,
    pub(super) shared: Arc<Shared>,
}

impl JobContext {
    pub(super) fn run(self, job: CopyJob) {
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

    pub(super) fn copy(&self, job: &CopyJob) -> Result<Value, String> {
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
pub(super) fn open_stream(path: &Path, overwrite: bool) -> Result<File, String> {
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
pub(super) fn report_json(r: &MigrationReport) -> Value {
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
