// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon: a listening vhost-user socket, one frontend at a time, the shim in front of
//! `vhost`'s request handler, the device's timers on the vring event loop and the control
//! socket.
//!
//! Each frontend connection runs through the [`shim`](crate::shim): the daemon connects
//! the shim to `vhost-user-backend` over a socket in a private directory (mode 0700) that
//! exists only while the connection is set up. When the frontend goes away (or sends a
//! message `vhost` or the [`admit`](crate::admit) checks refuse, which ends its connection)
//! everything of that connection goes: its event loop and threads end, the device is reset,
//! its guest memory is unmapped and its descriptors closed (`status` shows no memory until
//! the next table), and the daemon waits for the next frontend. Nothing the daemon holds
//! grows with the number of connections.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use log::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use virtio_balloon::{Balloon, BalloonConfig, DeviceEvent};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{BalloonBackend, ExtraEvent};
use crate::shim::{run_shim, ConfigChannel, ShimCounters};
use crate::Mem;

/// How long the daemon waits after a connection it could not accept or set up.
const RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Why the daemon could not start or stopped.
#[derive(Debug)]
pub enum DaemonError {
    /// The device could not be created.
    Balloon(virtio_balloon::BalloonError),
    /// `vhost-user-backend` refused to start or serve.
    Vhost(vhost_user_backend::Error),
    /// A socket or file operation failed.
    Io(io::Error),
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonError::Balloon(e) => write!(f, "cannot create the balloon: {e}"),
            DaemonError::Vhost(e) => write!(f, "vhost-user: {e}"),
            DaemonError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DaemonError {}

impl From<io::Error> for DaemonError {
    fn from(e: io::Error) -> Self {
        DaemonError::Io(e)
    }
}

/// Whether a frontend is connected, and how many were, for `status`.
#[derive(Debug, Default)]
pub struct FrontendState {
    connected: AtomicBool,
    connections: AtomicU64,
}

impl FrontendState {
    /// The `status` figures: `{"connected": bool, "connections": n}`. `connected` turns
    /// false once everything of the last connection is released.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connected": self.connected.load(Ordering::Acquire),
            "connections": self.connections.load(Ordering::Acquire),
        })
    }
}

/// A running vhost-user balloon: the device and its connection handling.
///
/// A process serving untrusted frontends should also call
/// [`guard::install`](crate::guard::install) (the binary does), so that a memory file the
/// frontend shrinks ends its connection instead of killing the daemon.
pub struct Daemon {
    backend: Arc<BalloonBackend>,
    mem: Mem,
    timers: Vec<(RawFd, ExtraEvent)>,
    channel: Arc<ConfigChannel>,
    shim: Arc<ShimCounters>,
    /// Ends each connection's event loop (one for the daemon's life).
    stop: EventFd,
    frontend: Arc<FrontendState>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("backend", &self.backend)
            .field("frontend", &self.frontend)
            .finish_non_exhaustive()
    }
}

/// One connection's `vhost-user-backend` daemon. Dropping it joins the thread of the
/// connection's event loop, which only the daemon's stop event ends (the backend offers no
/// exit event), so the drop writes the stop event first, on every way out of a connection,
/// errors included.
struct ConnectionDaemon<'a> {
    vu: ManuallyDrop<VhostUserDaemon<Arc<BalloonBackend>>>,
    stop: &'a EventFd,
    /// Whether the stop event is on the event loop (else nothing could end it).
    stoppable: bool,
}

impl std::ops::Deref for ConnectionDaemon<'_> {
    type Target = VhostUserDaemon<Arc<BalloonBackend>>;

    fn deref(&self) -> &Self::Target {
        &self.vu
    }
}

impl std::ops::DerefMut for ConnectionDaemon<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.vu
    }
}

impl Drop for ConnectionDaemon<'_> {
    fn drop(&mut self) {
        if !self.stoppable {
            // Joining a loop nothing can end would hang the daemon: leave it (one thread and
            // an epoll descriptor, after a failure to register an event).
            warn!("vhost-user-balloon: a connection's event loop cannot be stopped; left running");
            return;
        }
        let _ = self.stop.write(1);
        // SAFETY: `vu` is dropped here once, in the wrapper's own drop, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.vu) };
    }
}

/// A directory only this process can enter, removed when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("vhost-user-balloon-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free name for a private directory",
        ))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Daemon {
    /// Creates the device over `mem` (which `SET_MEM_TABLE` fills) with the sink and memory
    /// backend of the caller's choice, and the vring event loop with the device's timers on it.
    pub fn new(
        cfg: BalloonConfig,
        mem: Mem,
        sink: Arc<dyn virtio_balloon::sink::FreePageSink>,
        discard: Arc<dyn virtio_balloon::backend::MemoryBackend>,
    ) -> Result<Self, DaemonError> {
        let balloon =
            Balloon::with_backend(cfg, mem.clone(), sink, discard).map_err(DaemonError::Balloon)?;
        let timers: Vec<_> = balloon
            .event_fds()
            .into_iter()
            .filter_map(|(fd, ev)| match ev {
                DeviceEvent::StatsTimer => Some((fd, ExtraEvent::StatsTimer)),
                DeviceEvent::FlushTimer => Some((fd, ExtraEvent::FlushTimer)),
                // The daemon does not turn the stall watch on (`stall_timeout: None`); queue
                // kicks come from the vhost-user frontend.
                _ => None,
            })
            .collect();
        let channel = Arc::new(ConfigChannel::new());
        let backend = Arc::new(BalloonBackend::new(balloon, channel.clone())?);
        Ok(Daemon {
            backend,
            mem,
            timers,
            channel,
            shim: Arc::new(ShimCounters::new()),
            stop: EventFd::new(EFD_NONBLOCK)?,
            frontend: Arc::new(FrontendState::default()),
        })
    }

    /// Whether a frontend is connected, and how many were.
    pub fn frontend_state(&self) -> &Arc<FrontendState> {
        &self.frontend
    }

    /// What the shim passed and trimmed, over every connection.
    pub fn shim_counters(&self) -> &Arc<ShimCounters> {
        &self.shim
    }

    /// The vhost-user backend (the device, its hint handle and counters).
    pub fn backend(&self) -> &Arc<BalloonBackend> {
        &self.backend
    }

    /// A `vhost-user-backend` daemon for one connection (its handler remembers the owner
    /// and the vrings of one frontend), with the stop event, the device's timers and the
    /// guard's event on its event loop.
    fn connection_daemon(&self) -> Result<ConnectionDaemon<'_>, DaemonError> {
        let vu = VhostUserDaemon::new(
            "vhost-user-balloon".into(),
            self.backend.clone(),
            self.mem.clone(),
        )
        .map_err(DaemonError::Vhost)?;
        let mut conn = ConnectionDaemon {
            vu: ManuallyDrop::new(vu),
            stop: &self.stop,
            stoppable: false,
        };
        let handlers = conn.vu.get_epoll_handlers();
        let handler = handlers
            .first()
            .ok_or_else(|| io::Error::other("vhost-user-backend has no event loop"))?;
        // The stop event first: once it is registered, dropping the connection cannot hang.
        let mut events = vec![(self.stop.as_raw_fd(), ExtraEvent::Stop)];
        events.extend(self.timers.iter().copied());
        if let Some(fd) = crate::guard::fault_event() {
            events.push((fd.as_raw_fd(), ExtraEvent::MemoryFault));
        }
        for (fd, ev) in events {
            handler.register_listener(fd, EventSet::IN, self.backend.extra_event_data(ev))?;
            conn.stoppable = true;
        }
        Ok(conn)
    }

    /// Empties the daemon's own eventfds of what an earlier connection left in them.
    fn drain_events(&self) {
        let _ = self.stop.read();
        crate::guard::consume_fault_event();
    }

    /// Serves one frontend connection until it goes away, then resets the device and
    /// releases everything of the connection.
    pub fn serve_connection(&mut self, frontend: UnixStream) -> Result<(), DaemonError> {
        let n = self.frontend.connections.fetch_add(1, Ordering::AcqRel) + 1;
        self.frontend.connected.store(true, Ordering::Release);
        info!("vhost-user-balloon: frontend {n} connected");
        let result = self.serve(n, frontend);
        self.release();
        self.frontend.connected.store(false, Ordering::Release);
        result
    }

    fn serve(&self, n: u64, frontend: UnixStream) -> Result<(), DaemonError> {
        self.drain_events();
        self.backend.set_frontend(frontend.try_clone().ok());
        let mut vu = self.connection_daemon()?;
        let inner = {
            let dir = PrivateDir::new()?;
            let path = dir.0.join("vhost.sock");
            let mut listener = Listener::new(&path, true)
                .map_err(|e| io::Error::other(format!("inner listener: {e}")))?;
            let inner = UnixStream::connect(&path)?;
            vu.start(&mut listener).map_err(DaemonError::Vhost)?;
            inner
        };
        let (channel, counters) = (self.channel.clone(), self.shim.clone());
        let shim = thread::Builder::new()
            .name("vhost-user-shim".into())
            .spawn(move || run_shim(frontend, inner, channel, counters))?;
        match vu.wait() {
            Ok(()) => info!("vhost-user-balloon: frontend {n} disconnected"),
            Err(e) => warn!("vhost-user-balloon: frontend {n}: connection ended: {e}"),
        }
        match shim.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("vhost-user-balloon: frontend {n}: shim: {e}"),
            Err(_) => warn!("vhost-user-balloon: frontend {n}: shim thread panicked"),
        }
        // Dropping the connection's daemon ends its event loop and joins the loop's thread,
        // so nothing of this connection runs once the device is reset.
        drop(vu);
        Ok(())
    }

    /// Resets the device and lets go of the connection: its backend channel, its
    /// descriptors and its guest memory.
    fn release(&self) {
        self.backend.set_frontend(None);
        self.channel.reset();
        self.backend.disconnect();
        match self.mem.lock() {
            Ok(guard) => guard.replace(GuestMemoryMmap::new()),
            Err(e) => warn!("vhost-user-balloon: cannot release the guest memory: {e}"),
        }
        self.drain_events();
    }

    /// Accepts frontends on `listener` one after the other until `stop` is set (checked
    /// between connections) or, with `once`, after the first one. A connection that fails
    /// is logged and the next one accepted (with `once`, its error is returned).
    pub fn run(
        &mut self,
        listener: &UnixListener,
        stop: &AtomicBool,
        once: bool,
    ) -> Result<(), DaemonError> {
        info!(
            "vhost-user-balloon: listening (fd {})",
            listener.as_raw_fd()
        );
        while !stop.load(Ordering::Acquire) {
            // A connection that cannot be accepted or set up (out of descriptors, say) costs
            // that connection, not the daemon: it goes on with the next one.
            let result = match listener.accept() {
                Ok((frontend, _)) => self.serve_connection(frontend),
                Err(e) => Err(DaemonError::Io(e)),
            };
            if let Err(e) = result {
                if once {
                    return Err(e);
                }
                warn!("vhost-user-balloon: a connection failed: {e}");
                thread::sleep(RETRY_DELAY);
            }
            if once {
                break;
            }
        }
        Ok(())
    }
}

/// An empty guest memory for the daemon to start with (the frontend's memory table replaces
/// it).
pub fn empty_memory() -> Mem {
    GuestMemoryAtomic::new(GuestMemoryMmap::new())
}

/// Binds the vhost-user socket at `path`, replacing a stale socket file left by an earlier
/// run.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path)?
        }
        _ => {}
    }
    UnixListener::bind(path)
}

/// The daemon's controller: the balloon's requests, with the daemon's own figures added to
/// `status` (backend, shim and discard counters, and how much of each guest memory region the
/// host really holds).
pub struct DaemonController {
    inner: crate::control::BalloonController,
    backend: Arc<BalloonBackend>,
    shim: Arc<ShimCounters>,
    discards: Option<Arc<crate::discard::TrackingBackend>>,
    mem: Mem,
    frontend: Arc<FrontendState>,
    copier: Option<crate::copy::Copier>,
}

impl std::fmt::Debug for DaemonController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonController")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl DaemonController {
    /// Adds the daemon's figures to `inner`'s answers. `discards` is the tracking backend
    /// the device discards through, if any.
    pub fn new(
        inner: crate::control::BalloonController,
        daemon: &Daemon,
        discards: Option<Arc<crate::discard::TrackingBackend>>,
    ) -> Self {
        DaemonController {
            inner,
            backend: daemon.backend.clone(),
            shim: daemon.shim.clone(),
            discards,
            mem: daemon.mem.clone(),
            frontend: daemon.frontend.clone(),
            copier: None,
        }
    }

    /// Serves the copy requests (`snapshot`, `migrate`, `guest_stopped`, `copy_status`,
    /// `copy_wait`, `compare`) with `copier`.
    pub fn with_copier(mut self, copier: crate::copy::Copier) -> Self {
        self.copier = Some(copier);
        self
    }
}

/// Each guest memory region: its address, size and the bytes of its backing file the host
/// really holds (allocated blocks; `null` for anonymous memory).
pub fn memory_regions(mem: &Mem) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
    let guard = mem.memory();
    let regions: Vec<serde_json::Value> = guard
        .iter()
        .map(|r| {
            let allocated = r
                .file_offset()
                .and_then(|f| f.file().metadata().ok())
                .map(|m| m.blocks().saturating_mul(512));
            serde_json::json!({
                "gpa": r.start_addr().0,
                "size": r.len(),
                "allocated_bytes": allocated,
            })
        })
        .collect();
    serde_json::Value::Array(regions)
}

impl crate::control::Controller for DaemonController {
    fn handle(&self, req: crate::control::Request) -> Result<serde_json::Value, String> {
        if crate::copy::Copier::handles(&req) {
            return match &self.copier {
                Some(c) => c.handle(req),
                None => Err("copies of guest memory are not served on this control socket".into()),
            };
        }
        let status = matches!(req, crate::control::Request::Status);
        let mut value = self.inner.handle(req)?;
        if status {
            if let Some(obj) = value.as_object_mut() {
                let to = |v: Result<serde_json::Value, serde_json::Error>| {
                    v.unwrap_or(serde_json::Value::Null)
                };
                obj.insert(
                    "backend".into(),
                    to(serde_json::to_value(self.backend.counters())),
                );
                obj.insert(
                    "shim".into(),
                    to(serde_json::to_value(self.shim.snapshot())),
                );
                if let Some(d) = &self.discards {
                    obj.insert("discards".into(), to(serde_json::to_value(d.stats())));
                }
                obj.insert("memory".into(), memory_regions(&self.mem));
                obj.insert("frontend".into(), self.frontend.to_json());
                obj.insert(
                    "notifications".into(),
                    to(serde_json::to_value(self.backend.notifier_stats())),
                );
                obj.insert(
                    "pages_past_end_of_file".into(),
                    serde_json::json!(crate::guard::pages_replaced()),
                );
                if let Some(c) = &self.copier {
                    obj.insert("copy".into(), serde_json::json!(c.state_name()));
                }
            }
        }
        Ok(value)
    }
}
