// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Interrupts to the frontend, written by a thread of their own.
//!
//! The device raises interrupts while its lock is held (from the vring worker, the control
//! socket or a copy of guest memory). The descriptors they go to belong to the frontend: a
//! call descriptor (eventfd, pipe or socket) it may leave full, or switch back to blocking
//! behind the daemon's back, and a backend channel it may never read. So [`VhostUserInterrupt`] only records
//! which queue has used buffers (or that the configuration changed) and wakes the
//! [`Notifier`]'s thread, which writes with no lock held:
//!
//! * a used-buffer notification is one non-blocking 8-byte write to the queue's call
//!   descriptor (`O_NONBLOCK` is set again if the frontend cleared it). A full or broken
//!   descriptor costs that notification, counted and logged at most once a second, and
//!   nothing else: the driver sees the used buffers at its next interrupt or look;
//! * a configuration change is `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel
//!   the [`shim`](crate::shim) keeps, waiting at most a second for room.
//!
//! Notifications raised together are written together (one write per queue however many
//! buffers it used since the last one). When the frontend goes away,
//! [`detach`](Notifier::detach) drops its descriptors; a write that a frontend managed to
//! block (by clearing `O_NONBLOCK` between the check and the write) is interrupted with a
//! signal, so the thread serves the next frontend.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;
use virtio_balloon::transport::InterruptDelivery;

use crate::shim::ConfigChannel;

/// The signal that interrupts a blocked write (ignored by default, so a stray one is
/// harmless).
const WAKE_SIGNAL: libc::c_int = libc::SIGURG;
/// The shortest time between two log lines about dropped notifications.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// What the notifier thread did, since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NotifierStats {
    /// Used-buffer notifications written to a call descriptor.
    pub calls_written: u64,
    /// Used-buffer notifications dropped (the call descriptor was full or broken).
    pub calls_dropped: u64,
    /// Configuration changes sent on the backend channel.
    pub config_sent: u64,
    /// Configuration changes that could not be sent.
    pub config_failed: u64,
}

#[derive(Default)]
struct State {
    /// One bit per queue with used buffers to signal.
    pending: u64,
    config: bool,
    /// The call descriptor of each queue of the frontend now attached.
    calls: Vec<Option<Arc<OwnedFd>>>,
    /// Moves on each attach and detach; an interrupt of an earlier one is ignored.
    generation: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    channel: Arc<ConfigChannel>,
    in_write: AtomicBool,
    calls_written: AtomicU64,
    calls_dropped: AtomicU64,
    config_sent: AtomicU64,
    config_failed: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every field is valid on its own: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread that writes the device's interrupts to the frontend. One for the daemon's
/// life; dropping it stops the thread.
pub struct Notifier {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn install_wake_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    extern "C" fn wake(_: libc::c_int) {}
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero sigaction is a valid value of this plain C struct.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // No SA_RESTART: a blocked write returns EINTR.
        act.sa_flags = 0;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: `act` is initialised and outlives the call; the handler does nothing.
        if unsafe { libc::sigaction(WAKE_SIGNAL, &act, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(())
    });
    r.map_err(io::Error::from_raw_os_error)
}

impl Notifier {
    /// Starts the thread; configuration changes go through `channel`. Installs (once per
    /// process) a handler for `SIGURG` that does nothing, with which a write the frontend
    /// blocked is interrupted.
    pub fn new(channel: Arc<ConfigChannel>) -> io::Result<Self> {
        install_wake_handler()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            channel,
            in_write: AtomicBool::new(false),
            calls_written: AtomicU64::new(0),
            calls_dropped: AtomicU64::new(0),
            config_sent: AtomicU64::new(0),
            config_failed: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("vhost-user-notify".into())
            .spawn(move || run(&s))?;
        Ok(Notifier {
            shared,
            thread: Some(thread),
        })
    }

    /// Sends the interrupts of a newly activated device to `calls` (each queue's call
    /// descriptor, if it has one) and the backend channel.
    pub fn attach(&self, calls: Vec<Option<OwnedFd>>) -> VhostUserInterrupt {
        let mut st = self.shared.lock();
        st.generation = st.generation.wrapping_add(1);
        st.calls = calls.into_iter().map(|c| c.map(Arc::new)).collect();
        st.pending = 0;
        st.config = false;
        VhostUserInterrupt {
            shared: self.shared.clone(),
            generation: st.generation,
        }
    }

    /// Forgets the frontend's descriptors (it reset the device or left); pending
    /// notifications are dropped, and a write it blocked is interrupted.
    pub fn detach(&self) {
        {
            let mut st = self.shared.lock();
            st.generation = st.generation.wrapping_add(1);
            st.calls.clear();
            st.pending = 0;
            st.config = false;
        }
        self.unblock();
    }

    /// Interrupts a write in progress until the thread is out of it.
    fn unblock(&self) {
        let Some(t) = &self.thread else { return };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.in_write.load(Ordering::Acquire) && Instant::now() < deadline {
            // SAFETY: the thread is alive (joined only in drop, after this); the signal has a
            // handler that does nothing, so it only interrupts a blocking call.
            unsafe { libc::pthread_kill(t.as_pthread_t(), WAKE_SIGNAL) };
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// What the thread did so far.
    pub fn stats(&self) -> NotifierStats {
        let s = &self.shared;
        NotifierStats {
            calls_written: s.calls_written.load(Ordering::Relaxed),
            calls_dropped: s.calls_dropped.load(Ordering::Relaxed),
            config_sent: s.config_sent.load(Ordering::Relaxed),
            config_failed: s.config_failed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        self.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread: waits for notifications and writes them with no lock held.
fn run(s: &Shared) {
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    // The descriptors to write this time, in a buffer kept across wake-ups.
    let mut calls: Vec<Arc<OwnedFd>> = Vec::new();
    loop {
        let config = {
            let mut st = s.lock();
            while st.pending == 0 && !st.config && !st.stop {
                st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.stop {
                return;
            }
            let pending = std::mem::take(&mut st.pending);
            calls.extend(
                st.calls
                    .iter()
                    .take(64)
                    .enumerate()
                    .filter(|&(q, _)| pending & (1u64 << q) != 0)
                    .filter_map(|(_, c)| c.clone()),
            );
            std::mem::take(&mut st.config)
        };
        for call in calls.drain(..) {
            s.in_write.store(true, Ordering::Release);
            let r = write_call(&call);
            s.in_write.store(false, Ordering::Release);
            match r {
                Ok(()) => {
                    s.calls_written.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    s.calls_dropped.fetch_add(1, Ordering::Relaxed);
                    unlogged += 1;
                    if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        warn!(
                            "vhost-user-balloon: {unlogged} used-buffer notification(s) \
                             dropped: the frontend's call descriptor: {e}"
                        );
                        last_log = Some(Instant::now());
                        unlogged = 0;
                    }
                }
            }
        }
        if config {
            match s.channel.send_config_change() {
                Ok(true) => {
                    s.config_sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {
                    s.config_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "vhost-user-balloon: configuration change not sent: the frontend set \
                         up no backend channel"
                    );
                }
                Err(e) => {
                    s.config_failed.fetch_add(1, Ordering::Relaxed);
                    warn!("vhost-user-balloon: configuration change not sent: {e}");
                }
            }
        }
    }
}

/// One non-blocking 8-byte write of 1 (what an eventfd counts and a pipe reader drains).
fn write_call(fd: &OwnedFd) -> io::Result<()> {
    crate::admit::set_nonblocking(fd.as_fd())?;
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is 8 readable bytes for the duration of the call; `fd` is open while
    // borrowed.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    match n {
        8 => Ok(()),
        // EINTR is the daemon interrupting a write the frontend blocked: given up, too.
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write ({n} of 8 bytes)"),
        )),
    }
}

/// Interrupt delivery over vhost-user for one activation of the device: records what to
/// signal and wakes the [`Notifier`]. It never blocks on the frontend.
pub struct VhostUserInterrupt {
    shared: Arc<Shared>,
    generation: u64,
}

impl fmt::Debug for VhostUserInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhostUserInterrupt")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl VhostUserInterrupt {
    fn raise(&self, what: impl FnOnce(&mut State)) {
        let mut st = self.shared.lock();
        if st.generation != self.generation {
            // The frontend this was for is gone.
            return;
        }
        what(&mut st);
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl InterruptDelivery for VhostUserInterrupt {
    fn used_buffer(&self, queue: usize) -> io::Result<()> {
        if queue < 64 {
            self.raise(|st| {
                if st.calls.get(queue).is_some_and(Option::is_some) {
                    st.pending |= 1u64 << queue;
                }
            });
        }
        Ok(())
    }

    fn config_changed(&self) -> io::Result<()> {
        if !self.shared.channel.is_set() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the frontend set up no backend channel for configuration changes",
            ));
        }
        self.raise(|st| st.config = true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn readable(fd: &OwnedFd) -> usize {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is writable; the pipe's read end is set non-blocking below.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).unwrap_or(0)
    }

    #[test]
    fn used_buffers_reach_the_call_descriptor() {
        let n = Notifier::new(Arc::new(ConfigChannel::new())).unwrap();
        let (r, w) = pipe();
        crate::admit::set_nonblocking(r.as_fd()).unwrap();
        let irq = n.attach(vec![None, Some(w)]);
        irq.used_buffer(1).unwrap();
        wait_for("a write", || n.stats().calls_written == 1);
        assert_eq!(readable(&r), 8);
        // A queue without a call descriptor, or out of range, signals nothing.
        irq.used_buffer(0).unwrap();
        irq.used_buffer(99).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(n.stats().calls_written, 1);
    }

    #[test]
    fn a_full_call_descriptor_drops_the_notification_without_blocking() {
        let n = Notifier::new(Arc::new(ConfigChannel::new())).unwrap();
        let (r, w) = pipe();
        crate::admit::set_nonblocking(w.as_fd()).unwrap();
        let chunk = [0u8; 4096];
        // SAFETY: writes from a readable local buffer until the pipe is full.
        while unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
        // The frontend switches it back to blocking: the notifier sets O_NONBLOCK again.
        // SAFETY: F_SETFL on an open descriptor touches no memory.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, 0) };
        let irq = n.attach(vec![Some(w)]);
        for _ in 0..3 {
            irq.used_buffer(0).unwrap();
            thread::sleep(Duration::from_millis(5));
        }
        wait_for("a drop", || n.stats().calls_dropped >= 1);
        assert_eq!(n.stats().calls_written, 0);
        // The thread is free: a new frontend's notifications get through.
        n.detach();
        let (r2, w2) = pipe();
        let irq2 = n.attach(vec![Some(w2)]);
        irq2.used_buffer(0).unwrap();
        wait_for("a write to the next frontend", || {
            n.stats().calls_written == 1
        });
        // An interrupt of the detached frontend is ignored.
        let dropped = n.stats().calls_dropped;
        irq.used_buffer(0).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(n.stats().calls_dropped, dropped);
        drop((r, r2));
    }

    #[test]
    fn a_write_blocked_by_the_frontend_is_interrupted_at_detach() {
        let n = Notifier::new(Arc::new(ConfigChannel::new())).unwrap();
        let (_r, w) = pipe();
        let chunk = [0u8; 4096];
        crate::admit::set_nonblocking(w.as_fd()).unwrap();
        // SAFETY: writes from a readable local buffer until the pipe is full.
        while unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
        // The race the check cannot close: the frontend makes it blocking again just
        // before the write, which then blocks (here on a thread standing in for the
        // notifier's, interrupted the way `unblock` does it).
        // SAFETY: F_SETFL on an open descriptor touches no memory.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, 0) };
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let t = thread::spawn(move || {
            let one = 1u64.to_ne_bytes();
            // SAFETY: `one` is readable; this blocks on the full pipe until interrupted.
            let r = unsafe { libc::write(w.as_raw_fd(), one.as_ptr().cast(), 8) };
            d.store(true, Ordering::Release);
            r
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the write was not interrupted");
            // SAFETY: `t` is alive until joined; the signal's handler does nothing.
            unsafe { libc::pthread_kill(t.as_pthread_t(), WAKE_SIGNAL) };
            thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(t.join().unwrap(), -1, "the blocked write was interrupted");
        drop(n);
    }
}
