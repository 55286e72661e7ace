// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control socket: one JSON object per line, for people and scripts.
//!
//! Each request is a JSON object on one line, tagged by `"cmd"`:
//!
//! | request | answer (besides `"ok":true`) |
//! | --- | --- |
//! | `{"cmd":"set_target","bytes":N}` or `{"cmd":"set_target","pages":N}` | the new target |
//! | `{"cmd":"status"}` | sizes, activation, hinting, features, counters |
//! | `{"cmd":"stats"}` | the latest statistics with their age, or `null` |
//! | `{"cmd":"request_stats"}` | whether the buffer was given back to the driver |
//! | `{"cmd":"stats_interval","secs":N}` | the polling interval (0: off) |
//! | `{"cmd":"start_round"}` | the new round's `cmd_id` |
//! | `{"cmd":"stop_round"}` | the hint status |
//! | `{"cmd":"finish_round"}` | the hint status (DONE: the guest may reuse hinted pages) |
//! | `{"cmd":"wait_round","timeout_ms":N}` | whether the guest completed the round |
//! | `{"cmd":"save_capture"}` (optional `"description"`) | where the last round's capture was written |
//! | `{"cmd":"shutdown"}` | nothing; the daemon stops |
//! | `{"cmd":"snapshot","path":P,...}`, `{"cmd":"migrate","path":P,...}` | the copy started (see [`crate::copy`]) |
//! | `{"cmd":"guest_stopped"}` | the copy waiting for the stop goes on |
//! | `{"cmd":"copy_status"}`, `{"cmd":"copy_wait","timeout_ms":N}` | the copy's state and figures |
//! | `{"cmd":"compare","snapshot":P}` or `"stream":P` | pages differing between the copy and memory |
//!
//! Every answer is one line: `{"ok":true, ...}` or `{"ok":false,"error":"..."}`. A bad
//! request (malformed JSON, unknown command, wrong or missing field, a line longer than
//! [`MAX_LINE`]) gets an error answer and the connection keeps being served.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Map, Value};
use virtio_balloon::defs::stats_tag as tag;
use virtio_balloon::defs::{self, features as f};
use virtio_balloon::transport::VirtioDevice;
use virtio_balloon::{Balloon, FreePageHinting, QueueRole, StatsReport};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

use crate::capture::HintCounter;
use crate::device::lock;
use crate::Mem;

/// The longest request line accepted (64 KiB); a longer one is answered with an error and
/// skipped up to its newline.
pub const MAX_LINE: usize = 64 * 1024;

/// The most connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 16;

/// The longest `wait_round` (one hour).
pub const MAX_WAIT_MS: u64 = 3_600_000;

/// The longest statistics polling interval (one day).
pub const MAX_STATS_INTERVAL_SECS: u64 = 86_400;

/// A connection with no complete request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest answer the [`request`] client reads (1 MiB).
pub const MAX_RESPONSE: usize = 1024 * 1024;

/// How often blocked reads and accepts look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long writing one answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sets the balloon's target size: exactly one of `bytes` (rounded down to 4 KiB pages)
    /// or `pages` (4 KiB pages).
    SetTarget {
        /// The target in bytes.
        #[serde(default)]
        bytes: Option<u64>,
        /// The target in 4 KiB pages.
        #[serde(default)]
        pages: Option<u64>,
    },
    /// The device's state.
    Status,
    /// The latest statistics the driver sent.
    Stats,
    /// Asks the driver for fresh statistics.
    RequestStats,
    /// Polls the driver's statistics every `secs` seconds (0: off).
    StatsInterval {
        /// The interval in seconds.
        secs: u64,
    },
    /// Starts a free page hint round.
    StartRound,
    /// Stops the current round (STOP).
    StopRound,
    /// Ends hinting (DONE): the guest may reuse the hinted pages.
    FinishRound,
    /// Waits until the guest completes the current round, or `timeout_ms` passes.
    WaitRound {
        /// The longest wait in milliseconds (at most [`MAX_WAIT_MS`]).
        timeout_ms: u64,
    },
    /// Writes the capture of the last hint round to the configured capture file, with an
    /// optional description of the guest for its header (one line, at most 200 bytes).
    SaveCapture {
        /// Replaces the description given at start-up.
        #[serde(default)]
        description: Option<String>,
    },
    /// Stops the daemon.
    Shutdown,
    /// Starts a snapshot of guest memory into a sparse file (see [`crate::copy`]).
    Snapshot {
        /// The memory file (absolute); its description goes beside it.
        path: PathBuf,
        /// Whether the copy uses free page hints.
        #[serde(default)]
        hints: bool,
        /// `stopped` (the default) or `live`.
        #[serde(default)]
        mode: Option<CopyMode>,
        /// Replace an existing snapshot.
        #[serde(default)]
        overwrite: bool,
        /// With hints: how long to wait for the guest's hint round (default 10 s).
        #[serde(default)]
        hint_wait_ms: Option<u64>,
        /// With hints: the most hint rounds the copy starts (default: one per sync).
        #[serde(default)]
        hint_rounds: Option<u32>,
        /// How long to wait for `guest_stopped` (default 60 s).
        #[serde(default)]
        stop_timeout_ms: Option<u64>,
        /// A deliberate fault (`shift_hints`), to prove that `compare` finds it.
        #[serde(default)]
        fault: Option<Fault>,
    },
    /// Starts a precopy migration of guest memory into a stream file (see [`crate::copy`]).
    Migrate {
        /// The stream file (absolute); `/dev/null` is allowed.
        path: PathBuf,
        /// Whether the copy uses free page hints.
        #[serde(default)]
        hints: bool,
        /// The most passes while the guest runs (default 30).
        #[serde(default)]
        max_iterations: Option<u32>,
        /// Replace an existing regular file.
        #[serde(default)]
        overwrite: bool,
        /// With hints: how long to wait for the guest's hint round (default 10 s).
        #[serde(default)]
        hint_wait_ms: Option<u64>,
        /// With hints: the most hint rounds the copy starts (default: one per sync).
        #[serde(default)]
        hint_rounds: Option<u32>,
        /// How long to wait for `guest_stopped` (default 60 s).
        #[serde(default)]
        stop_timeout_ms: Option<u64>,
        /// A deliberate fault (`shift_hints`), to prove that `compare` finds it.
        #[serde(default)]
        fault: Option<Fault>,
    },
    /// The caller stopped the guest the copy waits for.
    GuestStopped,
    /// The copy's state and, once it ended, its figures.
    CopyStatus,
    /// Waits until the copy is done, failed or waiting for the guest to stop.
    CopyWait {
        /// The longest wait in milliseconds (at most [`MAX_WAIT_MS`]).
        timeout_ms: u64,
    },
    /// Compares the last copy with guest memory, page by page (the guest must be stopped):
    /// exactly one of `snapshot` or `stream`.
    Compare {
        /// A snapshot's memory file.
        #[serde(default)]
        snapshot: Option<PathBuf>,
        /// A migration stream file.
        #[serde(default)]
        stream: Option<PathBuf>,
    },
}

/// A deliberate fault in a copy, to prove that `compare` finds a wrong copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Each hinted range clears the copy's bitmap one page (4 KiB) higher than the guest
    /// said: the copy leaves out the page after each range, which the guest may be using,
    /// and sends the first page of each range, which it did not need to.
    ShiftHints,
    /// Pages the guest wrote after hinting them are dropped from every harvest of the
    /// copy's dirty log, as if the hint outweighed the later write (the race of a design
    /// that discards hinted pages): the copy leaves out data the guest holds.
    ForgetLaterWrites,
}

/// How a snapshot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// The guest runs its hint round (with hints), then is stopped for the whole copy.
    Stopped,
    /// Precopy passes while the guest runs, then a final stage with the guest stopped.
    Live,
}

impl Fault {
    /// The fault's name in a request.
    pub fn name(self) -> &'static str {
        match self {
            Fault::ShiftHints => "shift_hints",
            Fault::ForgetLaterWrites => "forget_later_writes",
        }
    }
}

/// Answers control requests.
pub trait Controller: Send + Sync {
    /// Handles one request. `Ok` carries the answer's fields (an object's fields are merged
    /// next to `"ok":true`; any other value goes under `"value"`), `Err` the error message.
    fn handle(&self, req: Request) -> Result<Value, String>;
}

/// The answer line for a handler's result.
pub fn response(result: Result<Value, String>) -> Value {
    match result {
        Ok(Value::Object(fields)) => {
            let mut m = Map::with_capacity(fields.len() + 1);
            m.insert("ok".into(), Value::Bool(true));
            for (k, v) in fields {
                if k != "ok" {
                    m.insert(k, v);
                }
            }
            Value::Object(m)
        }
        Ok(Value::Null) => json!({ "ok": true }),
        Ok(v) => json!({ "ok": true, "value": v }),
        Err(e) => error_response(&e),
    }
}

/// An error answer.
pub fn error_response(msg: &str) -> Value {
    json!({ "ok": false, "error": msg })
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// Serves the control socket until `stop` is set: a thread per connection, at most
/// [`MAX_CONNECTIONS`] at once. Looks at `stop` every 100 ms.
pub fn serve(listener: UnixListener, ctl: Arc<dyn Controller>, stop: Arc<AtomicBool>) {
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("control socket: cannot make the listener non-blocking: {e}");
        return;
    }
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(POLL_INTERVAL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                log::warn!("control socket: accept failed: {e}");
                thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!("control socket: cannot set up a connection: {e}");
            continue;
        }
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("control socket: more than {MAX_CONNECTIONS} connections, one refused");
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let _ = write_line(&stream, &error_response("too many control connections"));
            continue;
        }
        let (ctl, stop, count) = (ctl.clone(), stop.clone(), active.clone());
        let spawned = thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if let Err(e) = serve_connection(&stream, &*ctl, &stop) {
                    log::debug!("control socket: connection ended: {e}");
                }
                count.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("control socket: cannot start a connection thread: {e}");
        }
    }
}

fn write_line(mut stream: &UnixStream, v: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Serves one connection until the client closes it, it stays idle too long, or `stop`.
fn serve_connection(
    stream: &UnixStream,
    ctl: &dyn Controller,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut line: Vec<u8> = Vec::new();
    let mut overflow = false;
    let mut last_request = Instant::now();
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let chunk = match reader.fill_buf() {
            Ok([]) => return Ok(()),
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if last_request.elapsed() > IDLE_TIMEOUT {
                    log::info!("control socket: idle connection closed");
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (part, complete) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if !overflow {
            if line.len() + part.len() > MAX_LINE {
                overflow = true;
                line.clear();
            } else {
                line.extend_from_slice(part);
            }
        }
        let used = part.len() + usize::from(complete);
        reader.consume(used);
        if !complete {
            continue;
        }
        last_request = Instant::now();
        let answer = if overflow {
            log::warn!("control socket: request longer than {MAX_LINE} bytes skipped");
            Some(error_response(&format!(
                "request line longer than {MAX_LINE} bytes"
            )))
        } else {
            answer_line(&line, ctl)
        };
        overflow = false;
        line.clear();
        if let Some(a) = answer {
            write_line(stream, &a)?;
        }
    }
}

/// The answer to one line (`None` for a blank line).
fn answer_line(line: &[u8], ctl: &dyn Controller) -> Option<Value> {
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some(match parse_request(line) {
        Ok(req) => {
            log::debug!("control socket: {req:?}");
            let r = ctl.handle(req);
            if let Err(e) = &r {
                log::info!("control socket: request failed: {e}");
            }
            response(r)
        }
        Err(e) => {
            log::info!("control socket: {e}");
            error_response(&e)
        }
    })
}

/// Sends one request to the control socket at `path` and returns the answer. `timeout`
/// bounds connecting, writing and waiting for the answer (give `wait_round` more than its
/// `timeout_ms`).
pub fn request(path: &Path, req: &Value, timeout: Duration) -> io::Result<Value> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(path)?;
    let left = |d: Instant| {
        d.checked_duration_since(Instant::now())
            .filter(|l| !l.is_zero())
            .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
    };
    stream.set_write_timeout(Some(left(deadline)?))?;
    write_line(&stream, req)?;
    let mut reader = BufReader::new(&stream);
    let mut line = Vec::new();
    loop {
        stream.set_read_timeout(Some(left(deadline)?))?;
        let chunk = match reader.fill_buf() {
            Ok([]) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the control socket closed without an answer",
                ))
            }
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (part, complete) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if line.len() + part.len() > MAX_RESPONSE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the answer is too long",
            ));
        }
        line.extend_from_slice(part);
        let used = part.len() + usize::from(complete);
        reader.consume(used);
        if complete {
            return serde_json::from_slice(&line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

/// Where [`BalloonController`] writes captures of hint rounds.
#[derive(Debug, Clone)]
pub struct CaptureTarget {
    /// The capture file.
    pub path: PathBuf,
    /// The guest description in the capture's header.
    pub description: String,
}

type ShutdownHook = Box<dyn Fn() + Send + Sync>;

/// The controller of the daemon: maps each request onto the balloon's API.
///
/// Never holds the balloon's lock while it waits (`wait_round` uses the [`FreePageHinting`]).
pub struct BalloonController {
    balloon: Arc<Mutex<Balloon<Mem>>>,
    hint: FreePageHinting,
    counter: Option<Arc<HintCounter>>,
    capture: Option<(CaptureTarget, Mem)>,
    shutdown: Option<ShutdownHook>,
}

impl std::fmt::Debug for BalloonController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonController")
            .field("hint", &self.hint)
            .field("capture", &self.capture.as_ref().map(|(t, _)| t))
            .finish_non_exhaustive()
    }
}

impl BalloonController {
    /// A controller over `balloon`.
    pub fn new(balloon: Arc<Mutex<Balloon<Mem>>>) -> Self {
        let hint = lock(&balloon).hint_control();
        BalloonController {
            balloon,
            hint,
            counter: None,
            capture: None,
            shutdown: None,
        }
    }

    /// Reports the hint sink's counters in `status` (the sink the balloon was created with).
    pub fn with_hint_counter(mut self, counter: Arc<HintCounter>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Enables `save_capture` (needs [`with_hint_counter`](Self::with_hint_counter) with a
    /// capturing counter). `mem` is the guest memory the balloon uses (for the RAM regions in
    /// the capture's header).
    pub fn with_capture(mut self, target: CaptureTarget, mem: Mem) -> Self {
        self.capture = Some((target, mem));
        self
    }

    /// Enables `shutdown`: `hook` is called to stop the daemon.
    pub fn on_shutdown(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.shutdown = Some(Box::new(hook));
        self
    }

    fn set_target(&self, bytes: Option<u64>, pages: Option<u64>) -> Result<Value, String> {
        let pages = match (bytes, pages) {
            (Some(b), None) => b >> defs::PAGE_SHIFT,
            (None, Some(p)) => p,
            _ => return Err("set_target needs exactly one of \"bytes\" or \"pages\"".into()),
        };
        let pages = u32::try_from(pages).map_err(|_| {
            format!(
                "target too large: at most {} pages ({} bytes)",
                u32::MAX,
                u64::from(u32::MAX) << defs::PAGE_SHIFT
            )
        })?;
        let mut b = lock(&self.balloon);
        b.set_target(pages);
        Ok(json!({
            "num_pages": b.num_pages(),
            "target_bytes": u64::from(b.num_pages()) << defs::PAGE_SHIFT,
        }))
    }

    fn status(&self) -> Result<Value, String> {
        let b = lock(&self.balloon);
        let hint = self.hint.status();
        let driver = b.driver_features();
        let mut v = json!({
            "num_pages": b.num_pages(),
            "actual": b.actual(),
            "target_bytes": u64::from(b.num_pages()) << defs::PAGE_SHIFT,
            "actual_bytes": b.actual_bytes(),
            "activated": b.is_activated(),
            "paused": b.is_paused(),
            "target_reached": b.target_reached(),
            "hint": {
                "state": hint.state.to_string(),
                "cmd_id": hint.cmd_id,
                "round_complete": hint.round_complete,
                "negotiated": hint.negotiated,
            },
            "features": {
                "offered": format!("{:#x}", b.device_features()),
                "negotiated": format!("{driver:#x}"),
                "names": feature_names(driver),
            },
            "stats_interval_secs": b.stats_interval().as_secs(),
            "poison_val": b.poison_val(),
            "metrics": serde_json::to_value(b.metrics()).map_err(|e| e.to_string())?,
        });
        drop(b);
        if let Some(c) = &self.counter {
            v["hint_sink"] = serde_json::to_value(c.snapshot()).map_err(|e| e.to_string())?;
        }
        Ok(v)
    }

    fn stats(&self) -> Result<Value, String> {
        let b = lock(&self.balloon);
        Ok(json!({ "stats": b.latest_stats().map(stats_json) }))
    }

    fn hint_state(&self) -> Value {
        let s = self.hint.status();
        json!({ "state": s.state.to_string(), "cmd_id": s.cmd_id, "round_complete": s.round_complete })
    }

    fn save_capture(&self, description: Option<String>) -> Result<Value, String> {
        let (target, mem) = self
            .capture
            .as_ref()
            .ok_or("no capture file configured (--hint-sink capture --capture PATH)")?;
        if let Some(d) = &description {
            if d.len() > 200 || d.chars().any(char::is_control) {
                return Err("the description must be one line of at most 200 bytes".into());
            }
        }
        let description = description.as_deref().unwrap_or(&target.description);
        let counter = self
            .counter
            .as_ref()
            .ok_or("the hint sink does not capture")?;
        let regions: Vec<(u64, u64)> = mem
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let queue_size = {
            let b = lock(&self.balloon);
            b.queue_layout()
                .index(QueueRole::FreePage)
                .and_then(|i| b.queue(i))
                .map_or(0, |q| q.size())
        };
        let n = counter
            .write_capture(&target.path, &regions, queue_size, description)
            .map_err(|e| format!("cannot write {}: {e}", target.path.display()))?;
        Ok(json!({ "path": target.path.display().to_string(), "elements": n }))
    }
}

/// The names of the balloon feature bits in `bits`.
fn feature_names(bits: u64) -> Vec<&'static str> {
    [
        (f::VIRTIO_BALLOON_F_MUST_TELL_HOST, "must_tell_host"),
        (f::VIRTIO_BALLOON_F_STATS_VQ, "stats_vq"),
        (f::VIRTIO_BALLOON_F_DEFLATE_ON_OOM, "deflate_on_oom"),
        (f::VIRTIO_BALLOON_F_FREE_PAGE_HINT, "free_page_hint"),
        (f::VIRTIO_BALLOON_F_PAGE_POISON, "page_poison"),
        (f::VIRTIO_BALLOON_F_REPORTING, "reporting"),
        (
            virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
            "ring_indirect_desc",
        ),
        (
            virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
            "ring_event_idx",
        ),
        (
            virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
            "version_1",
        ),
    ]
    .into_iter()
    .filter(|(bit, _)| bits & f::bit(*bit) != 0)
    .map(|(_, name)| name)
    .collect()
}

/// The statistics as JSON: the values by name, their age and arrival time.
pub fn stats_json(r: &StatsReport) -> Value {
    let mut values = Map::new();
    for (t, v) in r.stats.iter() {
        let name = tag::name(t).map_or_else(|| format!("tag_{t}"), str::to_string);
        values.insert(name, Value::from(v));
    }
    let age_ms = u64::try_from(r.received.elapsed().as_millis()).unwrap_or(u64::MAX);
    let unix_ms = r
        .received_at
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok());
    json!({
        "age_ms": age_ms,
        "received_unix_ms": unix_ms,
        "entries": r.entries,
        "unknown_tags": r.unknown_tags,
        "values": values,
    })
}

impl Controller for BalloonController {
    fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::SetTarget { bytes, pages } => self.set_target(bytes, pages),
            Request::Status => self.status(),
            Request::Stats => self.stats(),
            Request::RequestStats => {
                let requested = lock(&self.balloon).request_stats();
                Ok(if requested {
                    json!({ "requested": true })
                } else {
                    json!({
                        "requested": false,
                        "reason": "no statistics buffer held (statistics not negotiated, \
                                   device not running, or a request is already out)",
                    })
                })
            }
            Request::StatsInterval { secs } => {
                if secs > MAX_STATS_INTERVAL_SECS {
                    return Err(format!(
                        "stats interval above {MAX_STATS_INTERVAL_SECS} seconds"
                    ));
                }
                lock(&self.balloon)
                    .set_stats_interval(Duration::from_secs(secs))
                    .map_err(|e| format!("cannot set the statistics interval: {e}"))?;
                Ok(json!({ "secs": secs }))
            }
            Request::StartRound => {
                let id = self.hint.start_round();
                Ok(json!({ "cmd_id": id, "negotiated": self.hint.negotiated() }))
            }
            Request::StopRound => {
                self.hint.stop_round();
                Ok(self.hint_state())
            }
            Request::FinishRound => {
                self.hint.done();
                Ok(self.hint_state())
            }
            Request::WaitRound { timeout_ms } => {
                if timeout_ms > MAX_WAIT_MS {
                    return Err(format!("timeout_ms above {MAX_WAIT_MS}"));
                }
                let complete = self
                    .hint
                    .wait_round_complete(Duration::from_millis(timeout_ms));
                let mut v = self.hint_state();
                v["complete"] = Value::Bool(complete);
                Ok(v)
            }
            Request::SaveCapture { description } => self.save_capture(description),
            Request::Shutdown => match &self.shutdown {
                Some(hook) => {
                    hook();
                    Ok(Value::Null)
                }
                None => Err("shutdown is not enabled on this control socket".into()),
            },
            Request::Snapshot { .. }
            | Request::Migrate { .. }
            | Request::GuestStopped
            | Request::CopyStatus
            | Request::CopyWait { .. }
            | Request::Compare { .. } => {
                Err("copies of guest memory are not served on this control socket".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::thread::JoinHandle;
    use std::time::SystemTime;

    use virtio_balloon::sink::RecordingSink;
    use virtio_balloon::{BalloonConfig, HintState};
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::tempdir::TempDir;

    /// Echoes the request back, fails on `status`.
    struct Echo;

    impl Controller for Echo {
        fn handle(&self, req: Request) -> Result<Value, String> {
            match req {
                Request::Status => Err("status failed".into()),
                Request::Stats => Ok(Value::Null),
                Request::RequestStats => Ok(json!(7)),
                r => Ok(json!({ "echo": format!("{r:?}"), "ok": "ignored" })),
            }
        }
    }

    struct Server {
        _dir: TempDir,
        path: PathBuf,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn server(ctl: Arc<dyn Controller>) -> Server {
        let dir = TempDir::new_with_prefix("/tmp/vub-control").unwrap();
        let path = dir.as_path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || serve(listener, ctl, s));
        Server {
            _dir: dir,
            path,
            stop,
            thread: Some(thread),
        }
    }

    const T: Duration = Duration::from_secs(10);

    /// A client sending raw lines on one connection.
    struct Client {
        stream: UnixStream,
        reader: BufReader<UnixStream>,
    }

    impl Client {
        fn new(path: &Path) -> Self {
            let stream = UnixStream::connect(path).unwrap();
            stream.set_read_timeout(Some(T)).unwrap();
            let reader = BufReader::new(stream.try_clone().unwrap());
            Client { stream, reader }
        }

        fn send(&mut self, raw: &[u8]) -> Value {
            self.stream.write_all(raw).unwrap();
            self.read()
        }

        fn read(&mut self) -> Value {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
        }
    }

    fn assert_error(v: &Value, needle: &str) {
        assert_eq!(v["ok"], false, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(br#"{"cmd":"set_target","bytes":4096}"#),
            Ok(Request::SetTarget {
                bytes: Some(4096),
                pages: None
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"wait_round","timeout_ms":5}"#),
            Ok(Request::WaitRound { timeout_ms: 5 })
        );
        assert_eq!(
            parse_request(br#" {"cmd":"finish_round"} "#),
            Ok(Request::FinishRound)
        );
        for (bad, needle) in [
            (&br#"{"cmd":"nope"}"#[..], "unknown variant"),
            (br#"{"bytes":1}"#, "missing field `cmd`"),
            (br#"{"cmd":"stats_interval"}"#, "missing field `secs`"),
            (br#"{"cmd":"stats_interval","secs":"5"}"#, "invalid type"),
            (br#"{"cmd":"stats_interval","secs":-1}"#, "invalid value"),
            (br#"{"cmd":"stats_interval","secs":1.5}"#, "invalid type"),
            (br#"{"cmd":"set_target","byte":1}"#, "unknown field"),
            (br#"[1,2]"#, "bad request"),
            (br#"{"cmd":"status""#, "EOF"),
            (b"\xff\xfe", "bad request"),
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn responses_merge_fields() {
        assert_eq!(
            response(Ok(json!({"a": 1, "ok": false}))),
            json!({"ok": true, "a": 1})
        );
        assert_eq!(response(Ok(Value::Null)), json!({"ok": true}));
        assert_eq!(response(Ok(json!(3))), json!({"ok": true, "value": 3}));
        assert_eq!(
            response(Err("x".into())),
            json!({"ok": false, "error": "x"})
        );
    }

    #[test]
    fn bad_requests_get_errors_and_the_server_keeps_answering() {
        let s = server(Arc::new(Echo));
        let mut c = Client::new(&s.path);
        assert_error(&c.send(b"not json\n"), "bad request");
        assert_error(&c.send(b"{\"cmd\":\"fly\"}\n"), "unknown variant");
        assert_error(
            &c.send(b"{\"cmd\":\"wait_round\",\"timeout_ms\":\"x\"}\n"),
            "invalid type",
        );
        assert_error(&c.send(b"{\"cmd\":\"wait_round\"}\n"), "missing field");
        assert_error(&c.send(b"{\"cmd\":\"status\"}\n"), "status failed");
        // Blank lines are skipped; two requests in one write get two answers.
        let v = c.send(b"\n  \n{\"cmd\":\"start_round\"}\n{\"cmd\":\"stats\"}\n");
        assert_eq!(v, json!({"ok": true, "echo": "StartRound"}));
        assert_eq!(c.read(), json!({"ok": true}));
        assert_eq!(
            c.send(b"{\"cmd\":\"request_stats\"}\n"),
            json!({"ok": true, "value": 7})
        );
        // A request split across writes.
        c.stream.write_all(b"{\"cmd\":\"stop").unwrap();
        thread::sleep(Duration::from_millis(150));
        assert_eq!(
            c.send(b"_round\"}\n"),
            json!({"ok": true, "echo": "StopRound"})
        );
    }

    #[test]
    fn overlong_line_is_refused_and_skipped() {
        let s = server(Arc::new(Echo));
        let mut c = Client::new(&s.path);
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let writer = {
            let mut w = c.stream.try_clone().unwrap();
            thread::spawn(move || w.write_all(&long).unwrap())
        };
        assert_error(&c.read(), "longer than 65536");
        writer.join().unwrap();
        // A line of exactly MAX_LINE bytes is still read (and fails as JSON).
        let mut max = vec![b' '; MAX_LINE - 14];
        max.extend_from_slice(b"{\"cmd\":\"oops\"}\n");
        assert_eq!(max.len(), MAX_LINE + 1);
        assert_error(&c.send(&max), "unknown variant");
        assert_eq!(
            c.send(b"{\"cmd\":\"finish_round\"}\n"),
            json!({"ok": true, "echo": "FinishRound"})
        );
    }

    #[test]
    fn connections_are_capped() {
        let s = server(Arc::new(Echo));
        let mut clients: Vec<Client> = (0..MAX_CONNECTIONS).map(|_| Client::new(&s.path)).collect();
        // Make sure every one of them is being served.
        for c in &mut clients {
            assert_eq!(c.send(b"{\"cmd\":\"stats\"}\n"), json!({"ok": true}));
        }
        let mut extra = Client::new(&s.path);
        assert_error(&extra.read(), "too many");
        let mut b = [0u8; 1];
        assert_eq!(extra.stream.read(&mut b).unwrap(), 0);
        // Closing one makes room again.
        drop(clients.pop());
        let deadline = Instant::now() + T;
        loop {
            let mut c = Client::new(&s.path);
            let v = c.send(b"{\"cmd\":\"stats\"}\n");
            if v["ok"] == true {
                break;
            }
            assert!(Instant::now() < deadline, "no room after a close");
            thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn client_helper_round_trip() {
        let s = server(Arc::new(Echo));
        let v = request(&s.path, &json!({"cmd": "start_round"}), T).unwrap();
        assert_eq!(v, json!({"ok": true, "echo": "StartRound"}));
        let v = request(&s.path, &json!({"cmd": 5}), T).unwrap();
        assert_error(&v, "bad request");
        assert!(request(&s.path.with_file_name("missing.sock"), &json!({}), T).is_err());
    }

    #[test]
    fn serve_stops_on_the_flag() {
        let s = server(Arc::new(Echo));
        let mut c = Client::new(&s.path);
        assert_eq!(c.send(b"{\"cmd\":\"stats\"}\n"), json!({"ok": true}));
        drop(s); // sets the flag and joins serve()
        let mut b = [0u8; 1];
        // The connection thread notices the flag too and closes its end.
        assert_eq!(c.stream.read(&mut b).unwrap(), 0);
    }

    // The real controller over a real balloon.

    fn balloon() -> Arc<Mutex<Balloon<Mem>>> {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        );
        let b = Balloon::new(
            BalloonConfig::default(),
            mem,
            Arc::new(RecordingSink::default()),
        )
        .unwrap();
        Arc::new(Mutex::new(b))
    }

    fn ask(c: &BalloonController, req: &str) -> Value {
        response(c.handle(parse_request(req.as_bytes()).unwrap()))
    }

    #[test]
    fn balloon_controller_status_and_target() {
        let b = balloon();
        let c = BalloonController::new(b.clone());
        let st = ask(&c, r#"{"cmd":"status"}"#);
        assert_eq!(st["ok"], true);
        assert_eq!(st["num_pages"], 0);
        assert_eq!(st["actual"], 0);
        assert_eq!(st["activated"], false);
        assert_eq!(st["hint"]["state"], "stop");
        assert_eq!(st["hint"]["cmd_id"], 0);
        assert_eq!(st["features"]["negotiated"], "0x0");
        assert!(st["metrics"]["hint"]["elements"].is_u64(), "{st}");

        let v = ask(&c, r#"{"cmd":"set_target","pages":256}"#);
        assert_eq!(
            v,
            json!({"ok": true, "num_pages": 256, "target_bytes": 0x10_0000})
        );
        assert_eq!(lock(&b).num_pages(), 256);
        let v = ask(&c, r#"{"cmd":"set_target","bytes":8193}"#);
        assert_eq!(v["num_pages"], 2);
        assert_eq!(ask(&c, r#"{"cmd":"status"}"#)["target_bytes"], 8192);

        assert_error(&ask(&c, r#"{"cmd":"set_target"}"#), "exactly one");
        assert_error(
            &ask(&c, r#"{"cmd":"set_target","bytes":1,"pages":1}"#),
            "exactly one",
        );
        assert_error(
            &ask(&c, r#"{"cmd":"set_target","pages":4294967296}"#),
            "too large",
        );
        assert_error(
            &ask(&c, r#"{"cmd":"set_target","bytes":18446744073709551615}"#),
            "too large",
        );
        assert_eq!(lock(&b).num_pages(), 2, "refused targets change nothing");
    }

    #[test]
    fn balloon_controller_rounds() {
        let b = balloon();
        let c = BalloonController::new(b.clone());
        let v = ask(&c, r#"{"cmd":"start_round"}"#);
        assert_eq!(v["ok"], true);
        let id = v["cmd_id"].as_u64().unwrap();
        assert!(id >= 2);
        assert_eq!(lock(&b).hint_control().status().state, HintState::Requested);
        let st = ask(&c, r#"{"cmd":"status"}"#);
        assert_eq!(st["hint"]["state"], "requested");
        assert_eq!(st["hint"]["cmd_id"], id);

        let t0 = Instant::now();
        let v = ask(&c, r#"{"cmd":"wait_round","timeout_ms":100}"#);
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert_eq!(v["complete"], false);
        assert_eq!(v["state"], "requested");
        assert_error(
            &ask(&c, r#"{"cmd":"wait_round","timeout_ms":3600001}"#),
            "timeout_ms",
        );

        let v = ask(&c, r#"{"cmd":"stop_round"}"#);
        assert_eq!(v["state"], "stop");
        // No round running: the wait returns at once.
        let t0 = Instant::now();
        let v = ask(&c, r#"{"cmd":"wait_round","timeout_ms":5000}"#);
        assert_eq!(v["complete"], false);
        assert!(t0.elapsed() < Duration::from_secs(4));
        let v = ask(&c, r#"{"cmd":"finish_round"}"#);
        assert_eq!(v["state"], "done");
        let v = ask(&c, r#"{"cmd":"start_round"}"#);
        assert!(v["cmd_id"].as_u64().unwrap() > id);
    }

    #[test]
    fn balloon_controller_stats_and_misc() {
        let b = balloon();
        let stopped = Arc::new(AtomicBool::new(false));
        let s2 = stopped.clone();
        let c = BalloonController::new(b.clone());
        assert_eq!(
            ask(&c, r#"{"cmd":"stats"}"#),
            json!({"ok": true, "stats": null})
        );
        let v = ask(&c, r#"{"cmd":"request_stats"}"#);
        assert_eq!(v["requested"], false);
        assert_eq!(ask(&c, r#"{"cmd":"stats_interval","secs":5}"#)["secs"], 5);
        assert_eq!(lock(&b).stats_interval(), Duration::from_secs(5));
        assert_eq!(ask(&c, r#"{"cmd":"stats_interval","secs":0}"#)["ok"], true);
        assert_eq!(lock(&b).stats_interval(), Duration::ZERO);
        assert_error(
            &ask(&c, r#"{"cmd":"stats_interval","secs":86401}"#),
            "stats interval",
        );
        assert_error(&ask(&c, r#"{"cmd":"save_capture"}"#), "no capture");
        assert_error(&ask(&c, r#"{"cmd":"shutdown"}"#), "not enabled");
        let c = c.on_shutdown(move || s2.store(true, Ordering::Release));
        assert_eq!(ask(&c, r#"{"cmd":"shutdown"}"#), json!({"ok": true}));
        assert!(stopped.load(Ordering::Acquire));
    }

    #[test]
    fn balloon_controller_saves_a_capture() {
        use virtio_balloon::sink::{FreePageElement, FreePageSink};
        let dir = TempDir::new_with_prefix("/tmp/vub-control").unwrap();
        let path = dir.as_path().join("capture.txt");
        let mem: Mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        );
        let counter = Arc::new(HintCounter::capturing(16));
        let b = Balloon::new(BalloonConfig::default(), mem.clone(), counter.clone()).unwrap();
        let c = BalloonController::new(Arc::new(Mutex::new(b)))
            .with_hint_counter(counter.clone())
            .with_capture(
                CaptureTarget {
                    path: path.clone(),
                    description: "test".into(),
                },
                mem,
            );
        assert_error(&ask(&c, r#"{"cmd":"save_capture"}"#), "no hint round");
        for (position, flags) in [(0u16, 0u16), (1, 2), (2, 0)] {
            counter.free_page_element(&FreePageElement {
                position,
                head: position,
                addr: 0x10_0000,
                len: if flags == 0 { 4 } else { 0x1000 },
                flags,
            });
            if flags != 0 {
                counter.free_page_hint(2, GuestAddress(0x10_0000), 0x1000);
            }
        }
        let v = ask(&c, r#"{"cmd":"save_capture"}"#);
        assert_eq!(v["elements"], 3, "{v}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(
                "# guest test; free page vq size 1024; avail idx 3\n# cmd_id 2\n\
             # mtree 0000000000000000-0000000000ffffff (prio 0, ram): vhost-user.ram\n"
            ),
            "{text}"
        );
        assert_eq!(
            ask(&c, r#"{"cmd":"status"}"#)["hint_sink"]["round_hints"],
            1
        );
        // A description for this capture only; one line, bounded.
        let v = ask(
            &c,
            r#"{"cmd":"save_capture","description":"UML 6.1, 4 GiB"}"#,
        );
        assert_eq!(v["elements"], 3, "{v}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# guest UML 6.1, 4 GiB; free page vq size"),
            "{text}"
        );
        assert_error(
            &ask(&c, r#"{"cmd":"save_capture","description":"two\nlines"}"#),
            "one line",
        );
        let long = format!(
            r#"{{"cmd":"save_capture","description":"{}"}}"#,
            "x".repeat(201)
        );
        assert_error(&ask(&c, &long), "one line");
    }

    #[test]
    fn balloon_controller_behind_the_socket() {
        let b = balloon();
        let s = server(Arc::new(BalloonController::new(b.clone())));
        let v = request(&s.path, &json!({"cmd": "set_target", "pages": 42}), T).unwrap();
        assert_eq!(v["num_pages"], 42);
        let v = request(&s.path, &json!({"cmd": "status"}), T).unwrap();
        assert_eq!(v["num_pages"], 42);
        assert_eq!(v["ok"], true);
    }

    #[test]
    fn stats_by_name() {
        let mut stats = virtio_balloon::BalloonStats::default();
        // BalloonStats has no public setter: go through serde, as a saved device would.
        let mut raw = serde_json::to_value(stats).unwrap();
        raw["values"][4] = json!(1000);
        raw["values"][5] = json!(4000);
        stats = serde_json::from_value(raw).unwrap();
        let r = StatsReport {
            stats,
            received: Instant::now(),
            received_at: SystemTime::now(),
            entries: 3,
            unknown_tags: 1,
        };
        let v = stats_json(&r);
        assert_eq!(
            v["values"],
            json!({"free_memory": 1000, "total_memory": 4000})
        );
        assert_eq!(v["entries"], 3);
        assert_eq!(v["unknown_tags"], 1);
        assert!(v["age_ms"].as_u64().unwrap() < 10_000);
        assert!(v["received_unix_ms"].as_u64().unwrap() > 0);
    }
}
