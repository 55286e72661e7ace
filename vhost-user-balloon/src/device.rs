// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vhost-user backend: the crate's [`Balloon`] behind `vhost-user-backend`.
//!
//! vhost-user has no DRIVER_OK register, so the device is activated from the vrings the
//! frontend set up: as soon as every queue of the negotiated layout is ready (checked on each
//! event and configuration access), their state and the frontend's kick eventfds are handed
//! to [`Balloon::activate_with`]. From then on the device serves its queues on the kicks the
//! vhost-user-backend event loop reads, re-arms those same kick eventfds after a partial
//! batch, and sends its interrupts through the [`Notifier`]: used buffers to the queue's
//! call descriptor, configuration changes as `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the
//! backend channel the [`shim`](crate::shim) keeps, written by a thread of their own with
//! no lock held.
//!
//! The event loop of each connection ends on the daemon's stop event
//! ([`ExtraEvent::Stop`]): `vhost-user-backend` 0.24 never closes the exit event it asks
//! [`VhostUserBackend::exit_event`] for (it registers the consumer's raw descriptor and
//! forgets it), so the backend offers none and ends the loop itself, by returning an error
//! from `handle_event` on its own event, which `vhost-user-backend` takes as the end of the
//! loop. A fault in guest memory the frontend shrank ([`ExtraEvent::MemoryFault`], from the
//! [`guard`](crate::guard)) ends the frontend's connection.

use std::fmt;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};

use virtio_balloon::transport::{QueueHandover, VirtioDevice};
use virtio_balloon::{Balloon, DeviceEvent, FreePageHinting};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::EventFd;

use crate::notify::{Notifier, NotifierStats};
use crate::shim::ConfigChannel;
use crate::Mem;

/// The largest configuration access answered (the balloon's space is 16 bytes).
const MAX_CONFIG_ACCESS: u32 = 256;

pub use crate::vring::Vring;

/// The events the backend registers besides the vrings' kicks, as offsets past the queue
/// count (`vhost-user-backend` reserves the data values up to the queue count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraEvent {
    /// The device's statistics polling timer.
    StatsTimer = 1,
    /// The device's discard flush timer.
    FlushTimer = 2,
    /// The daemon ends the connection's event loop.
    Stop = 3,
    /// The SIGBUS guard replaced a page of guest memory the frontend shrank.
    MemoryFault = 4,
}

/// Duplicates a file descriptor the vring owns into one the device owns.
fn dup_fd<T: AsRawFd>(fd: &T) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: `fd` is an open descriptor owned by the vring for the duration of this call;
    // F_DUPFD_CLOEXEC creates a new descriptor and touches no memory.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created by fcntl and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

fn dup_eventfd(fd: &EventConsumer) -> io::Result<EventFd> {
    let owned = dup_fd(fd)?;
    // SAFETY: `owned` is a fresh descriptor (from dup_fd) whose ownership moves into the
    // EventFd; it refers to the frontend's kick eventfd.
    Ok(unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(owned)) })
}

/// Counters of the backend's own work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackendCounters {
    /// Times the device was activated from the frontend's vrings.
    pub activations: u64,
    /// Activations refused (a vring the device cannot use).
    pub activation_errors: u64,
    /// Feature acknowledgements (Linux acknowledges twice).
    pub feature_acks: u64,
    /// Feature acknowledgements the device refused.
    pub feature_errors: u64,
    /// Device resets (frontend reset, stopped vrings, disconnect).
    pub resets: u64,
}

struct BackendState {
    vrings: Option<Vec<Vring>>,
    counters: BackendCounters,
}

/// The balloon as a `vhost-user-backend` backend.
pub struct BalloonBackend {
    balloon: Arc<Mutex<Balloon<Mem>>>,
    hint: FreePageHinting,
    notifier: Notifier,
    /// The frontend's connection, to end it from the device's side.
    frontend: Mutex<Option<UnixStream>>,
    num_queues: usize,
    max_queue_size: usize,
    state: Mutex<BackendState>,
}

impl fmt::Debug for BalloonBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalloonBackend")
            .field("num_queues", &self.num_queues)
            .field("max_queue_size", &self.max_queue_size)
            .finish_non_exhaustive()
    }
}

/// Locks a mutex, going on with its data after a panic elsewhere (every field stays valid
/// on its own).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BalloonBackend {
    /// Serves `balloon`, configuration changes going through `channel`. The balloon's queue
    /// sizes are the largest the frontend may choose. Starts the thread that writes the
    /// device's interrupts.
    pub fn new(balloon: Balloon<Mem>, channel: Arc<ConfigChannel>) -> io::Result<Self> {
        let cfg = *balloon.config();
        let max_queue_size = usize::from(
            cfg.queue_size
                .max(cfg.free_page_queue_size)
                .max(cfg.reporting_queue_size),
        );
        Ok(BalloonBackend {
            num_queues: balloon.queue_layout().len(),
            hint: balloon.hint_control(),
            balloon: Arc::new(Mutex::new(balloon)),
            notifier: Notifier::new(channel)?,
            frontend: Mutex::new(None),
            max_queue_size,
            state: Mutex::new(BackendState {
                vrings: None,
                counters: BackendCounters::default(),
            }),
        })
    }

    /// What the interrupt thread did so far.
    pub fn notifier_stats(&self) -> NotifierStats {
        self.notifier.stats()
    }

    /// The frontend now served (a clone of its connection), so the device can end it.
    pub fn set_frontend(&self, frontend: Option<UnixStream>) {
        *lock(&self.frontend) = frontend;
    }

    /// Ends the frontend's connection (the daemon then resets the device and waits for the
    /// next one).
    pub fn end_connection(&self) {
        if let Some(f) = lock(&self.frontend).as_ref() {
            let _ = f.shutdown(Shutdown::Both);
        }
    }

    /// The device, for the control socket.
    pub fn balloon(&self) -> &Arc<Mutex<Balloon<Mem>>> {
        &self.balloon
    }

    /// The hint handle, for the control socket and a VMM's migration.
    pub fn hint_control(&self) -> FreePageHinting {
        self.hint.clone()
    }

    /// The backend's counters.
    pub fn counters(&self) -> BackendCounters {
        lock(&self.state).counters
    }

    /// The event data of an extra event.
    pub fn extra_event_data(&self, event: ExtraEvent) -> u64 {
        self.num_queues as u64 + event as u64
    }

    /// Whether vring `index` is set up far enough to be served.
    fn vring_ready(vring: &Vring) -> bool {
        let state = vring.get_ref();
        state.get_queue().ready() && state.get_kick().is_some() && state.is_enabled()
    }

    /// Activates the device if it is not active yet and every queue the driver negotiated
    /// is ready. Returns whether the device is active.
    fn try_activate(&self, balloon: &mut Balloon<Mem>, vrings: &[Vring]) -> bool {
        if balloon.is_activated() {
            return true;
        }
        if !balloon.has_feature(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) {
            return false;
        }
        let queues = balloon.num_queues();
        let mut handovers = Vec::with_capacity(queues);
        let mut calls = Vec::with_capacity(queues);
        for index in 0..queues {
            let needed = balloon.queue_negotiated(index);
            let Some(vring) = vrings.get(index) else {
                return false;
            };
            if needed && !Self::vring_ready(vring) {
                return false;
            }
            let state = vring.get_ref();
            let mut queue_state = state.get_queue().state();
            queue_state.ready = needed && queue_state.ready;
            let kick = match state.get_kick() {
                Some(k) if needed => match dup_eventfd(k) {
                    Ok(evt) => Some(evt),
                    Err(e) => {
                        warn!("vhost-user-balloon: cannot take vring {index}'s kick: {e}");
                        return false;
                    }
                },
                _ => None,
            };
            let call = match state.get_call() {
                Some(c) => match dup_fd(c) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        warn!("vhost-user-balloon: cannot take vring {index}'s call: {e}");
                        None
                    }
                },
                None => None,
            };
            calls.push(call);
            handovers.push(QueueHandover {
                state: queue_state,
                kick,
            });
        }
        balloon.set_interrupt_delivery(Arc::new(self.notifier.attach(calls)));
        let result = balloon.activate_with(handovers);
        let mut st = lock(&self.state);
        match result {
            Ok(()) => {
                st.counters.activations += 1;
                info!(
                    "vhost-user-balloon: device active, features {:#x}",
                    balloon.driver_features()
                );
                true
            }
            Err(e) => {
                st.counters.activation_errors += 1;
                warn!("vhost-user-balloon: cannot activate: {e}");
                false
            }
        }
    }

    /// Activates the device from the vrings seen last, if it can be.
    pub fn activate_if_ready(&self) -> bool {
        let vrings = lock(&self.state).vrings.clone();
        let mut balloon = lock(&self.balloon);
        match vrings {
            Some(v) => self.try_activate(&mut balloon, &v),
            None => balloon.is_activated(),
        }
    }

    /// Resets the device: the frontend reset it, stopped a vring or went away. The vring
    /// positions the device reached are written back first, so `GET_VRING_BASE` tells the
    /// frontend where the device stopped.
    pub fn reset(&self) {
        let vrings = lock(&self.state).vrings.clone();
        let mut balloon = lock(&self.balloon);
        if !balloon.is_activated() {
            return;
        }
        for (index, vring) in vrings.iter().flatten().enumerate() {
            if let Some(q) = balloon.live_queue_state(index) {
                vring.set_queue_next_avail(q.next_avail);
            }
        }
        balloon.reset();
        balloon.interrupt().reset_delivery();
        drop(balloon);
        self.notifier.detach();
        lock(&self.state).counters.resets += 1;
    }

    /// The guard replaced guest memory the frontend shrank: ends its connection.
    fn memory_fault(&self) {
        crate::guard::consume_fault_event();
        warn!(
            "vhost-user-balloon: the frontend's guest memory was accessed past the end of its \
             file ({} page(s) replaced by zeros since the daemon started): ending the connection",
            crate::guard::pages_replaced()
        );
        self.end_connection();
    }

    /// Forgets the frontend's vrings (it disconnected) and resets the device.
    pub fn disconnect(&self) {
        self.reset();
        lock(&self.state).vrings = None;
    }
}

impl VhostUserBackend for BalloonBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        lock(&self.balloon).device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        let features = features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let result = lock(&self.balloon).ack_features(features);
        let mut st = lock(&self.state);
        st.counters.feature_acks += 1;
        match result {
            Ok(()) => info!("vhost-user-balloon: driver acknowledged features {features:#x}"),
            Err(e) => {
                st.counters.feature_errors += 1;
                warn!("vhost-user-balloon: features {features:#x} refused: {e}");
            }
        }
        drop(st);
        // The vrings may all be ready already (kicked before the features came): the
        // device then looks at every queue once it is active.
        self.activate_if_ready();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No REPLY_ACK: a configuration change sent while the frontend waits for our reply
        // to its GET_CONFIG would otherwise deadlock both sides.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The device takes VIRTIO_F_RING_EVENT_IDX from the negotiated features.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.activate_if_ready();
        let mut data = vec![0u8; size.min(MAX_CONFIG_ACCESS) as usize];
        lock(&self.balloon).read_config(u64::from(offset), &mut data);
        data
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.activate_if_ready();
        lock(&self.balloon).write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // The device reaches memory through the same GuestMemoryAtomic the daemon updates.
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        info!("vhost-user-balloon: frontend stops vring {queue_index}");
        self.reset();
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // vhost-user-backend 0.24 leaks the consumer of every exit event (one descriptor per
        // connection); the loop ends on the daemon's stop event instead (see the module docs).
        None
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let index = usize::from(device_event);
        if index == self.num_queues + ExtraEvent::Stop as usize {
            // vhost-user-backend ends the event loop on an error: the one way to end it
            // without an exit event.
            return Err(io::Error::other("the connection is over"));
        }
        if index == self.num_queues + ExtraEvent::MemoryFault as usize {
            self.memory_fault();
            return Ok(());
        }
        {
            let mut st = lock(&self.state);
            if st.vrings.as_ref().map(Vec::len) != Some(vrings.len()) {
                st.vrings = Some(vrings.to_vec());
            }
        }
        let mut balloon = lock(&self.balloon);
        let active = self.try_activate(&mut balloon, vrings);
        if index < self.num_queues {
            if active {
                balloon.process_queue(index);
            }
        } else if index == self.num_queues + ExtraEvent::StatsTimer as usize {
            balloon.handle_event(DeviceEvent::StatsTimer);
        } else if index == self.num_queues + ExtraEvent::FlushTimer as usize {
            balloon.handle_event(DeviceEvent::FlushTimer);
        }
        // Never an error: vhost-user-backend ends its event loop on one.
        Ok(())
    }
}
