// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Time for the event loop: a non-blocking timerfd (statistics polling, the discard flush,
//! the stall watch), the [`Clock`] the stall watch reads, and the stall watch itself.
//!
//! `vmm-sys-util`'s `TimerFd` reads blockingly, which would stall the event loop on a
//! spurious wakeup; this one is created with `TFD_NONBLOCK`.
//!
//! The stall watch decides only from its [`Clock`]; its timerfd merely wakes the event loop
//! to look again. A spurious or early wakeup finds the timeout not yet passed and re-arms,
//! so with a [`ManualClock`] the outcome depends on nothing but the clock a test moves.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A monotonic, non-blocking timerfd.
#[derive(Debug)]
pub(super) struct Timer {
    file: File,
    armed: bool,
}

impl Timer {
    pub(super) fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Timer { file, armed: false })
    }

    fn spec(d: Duration) -> libc::timespec {
        libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
        }
    }

    /// Fires after `first`, then every `interval` if given. A zero `first` disarms.
    pub(super) fn arm(&mut self, first: Duration, interval: Option<Duration>) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: Self::spec(interval.unwrap_or(Duration::ZERO)),
            it_value: Self::spec(first),
        };
        // SAFETY: `spec` is a valid itimerspec that outlives the call; the old value is not
        // asked for; the result is checked.
        let ret =
            unsafe { libc::timerfd_settime(self.file.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = !first.is_zero();
        Ok(())
    }

    pub(super) fn disarm(&mut self) -> io::Result<()> {
        self.arm(Duration::ZERO, None)
    }

    /// Whether the timer was armed by [`arm`](Self::arm) and has not been disarmed or
    /// consumed as a one-shot.
    pub(super) fn armed(&self) -> bool {
        self.armed
    }

    /// Consumes expirations; returns how many (0 on a spurious wakeup).
    pub(super) fn consume(&mut self, periodic: bool) -> u64 {
        let mut buf = [0u8; 8];
        let n = match self.file.read(&mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            _ => 0,
        };
        if n > 0 && !periodic {
            self.armed = false;
        }
        n
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Where the device reads the time for its stall watch
/// ([`BalloonConfig::stall_timeout`](super::BalloonConfig::stall_timeout)).
///
/// The default is [`MonotonicClock`]. [`Balloon::set_clock`](super::Balloon::set_clock)
/// replaces it, for example with a [`ManualClock`] in tests, which then pass the timeout
/// without sleeping, or with a VMM's own notion of guest time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The time since an origin of the clock's choosing. It should never go backwards (the
    /// watch treats a step back as no time passing).
    fn now(&self) -> Duration;
}

/// The host's monotonic clock (`Instant`), from when the clock was created.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to ([`advance`](Self::advance)), for deterministic
/// tests of the stall watch. Share it with the device as an `Arc<ManualClock>`.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Mutex<Duration>,
}

impl ManualClock {
    /// A clock at its origin.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (saturating). The device notices at its next look:
    /// [`Balloon::check_stall`](super::Balloon::check_stall), a write of `actual`, or its
    /// stall timer.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.saturating_add(by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the stall watch found at a look ([`StallWatch::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StallCheck {
    /// Nothing runs: the watch is off, the target is reached, or the guest cannot move
    /// (driver not live, device paused).
    Idle,
    /// No stall yet; the timeout passes in this long unless `actual` gets closer.
    Pending(Duration),
    /// The timeout passed without progress. `new` at the first look that saw it.
    Stalled {
        /// This look found the stall.
        new: bool,
    },
}

/// Whether `actual` keeps moving towards `num_pages`.
///
/// An *episode* starts when `actual` and the target differ (a new target, the target left
/// again, a driver that comes up with a target set) and ends when they meet. Within it,
/// *progress* is `actual` coming closer to the target than it has been during the episode:
/// a guest that deflates on OOM and inflates back to where it was does not make progress.
/// Progress restarts the clock and clears a stall; a new target starts a new episode. The
/// clock runs only while the guest can move: the driver is live and the device not paused.
/// The timeout runs in full again after a pause.
#[derive(Debug, Default)]
pub(super) struct StallWatch {
    timeout: Option<Duration>,
    /// The closest distance to the target in this episode (None: no episode).
    closest: Option<u32>,
    /// When the running timeout started (None: the clock does not run).
    since: Option<Duration>,
    stalled: bool,
}

impl StallWatch {
    /// A watch with `timeout` (`None` or zero: off).
    pub(super) fn new(timeout: Option<Duration>) -> Self {
        StallWatch {
            timeout: timeout.filter(|t| !t.is_zero()),
            ..Default::default()
        }
    }

    /// Takes in where `actual` is: `distance` pages from the target, `live` whether the
    /// guest can move.
    pub(super) fn observe(&mut self, now: Duration, live: bool, distance: u32) {
        if distance == 0 {
            self.closest = None;
            self.since = None;
            self.stalled = false;
            return;
        }
        match self.closest {
            Some(best) if distance >= best => {}
            _ => {
                self.closest = Some(distance);
                self.since = None;
                self.stalled = false;
            }
        }
        if !live {
            self.since = None;
        } else if self.since.is_none() {
            self.since = Some(now);
        }
    }

    /// A new target: a new episode.
    pub(super) fn retarget(&mut self, now: Duration, live: bool, distance: u32) {
        self.forget();
        self.observe(now, live, distance);
    }

    /// The driver is gone: nothing to watch.
    pub(super) fn forget(&mut self) {
        self.closest = None;
        self.since = None;
        self.stalled = false;
    }

    /// Another clock took over: a running timeout starts again at its `now`.
    pub(super) fn restart_clock(&mut self, now: Duration) {
        if self.since.is_some() {
            self.since = Some(now);
        }
    }

    /// Looks at the watch at `now`.
    pub(super) fn check(&mut self, now: Duration) -> StallCheck {
        let Some(timeout) = self.timeout else {
            return StallCheck::Idle;
        };
        if self.stalled {
            return StallCheck::Stalled { new: false };
        }
        let Some(since) = self.since else {
            return StallCheck::Idle;
        };
        let elapsed = now.saturating_sub(since);
        match timeout.checked_sub(elapsed) {
            Some(left) if !left.is_zero() => StallCheck::Pending(left),
            _ => {
                self.stalled = true;
                StallCheck::Stalled { new: true }
            }
        }
    }

    /// Whether the target is stalled (reported and not cleared since).
    pub(super) fn stalled(&self) -> bool {
        self.stalled
    }

    /// The closest distance in this episode, for a snapshot.
    pub(super) fn closest(&self) -> Option<u32> {
        self.closest
    }

    /// Takes a saved episode back (before [`observe`](Self::observe) with where the restored
    /// device is). The clock starts again: a saved clock reading means nothing here. A
    /// stall is kept only if this watch is on.
    pub(super) fn restore(&mut self, closest: Option<u32>, stalled: bool) {
        self.closest = closest;
        self.since = None;
        self.stalled = stalled && self.timeout.is_some() && closest.is_some();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_and_disarm() {
        let mut t = Timer::new().unwrap();
        assert_eq!(t.consume(false), 0, "a spurious read does not block");
        t.arm(Duration::from_millis(1), None).unwrap();
        assert!(t.armed());
        let mut n = 0;
        for _ in 0..2000 {
            n = t.consume(false);
            if n > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(n, 1);
        assert!(!t.armed());
        t.arm(Duration::from_secs(3600), Some(Duration::from_secs(3600)))
            .unwrap();
        assert!(t.armed());
        t.disarm().unwrap();
        assert!(!t.armed());
        assert_eq!(t.consume(true), 0);
    }

    const T: Duration = Duration::from_secs(10);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        assert_eq!(c.now(), Duration::ZERO);
        c.advance(secs(3));
        c.advance(secs(4));
        assert_eq!(c.now(), secs(7));
        c.advance(Duration::MAX);
        assert_eq!(c.now(), Duration::MAX);
        let m = MonotonicClock::new();
        let a = m.now();
        assert!(m.now() >= a);
    }

    #[test]
    fn stall_after_the_timeout_without_progress_and_once() {
        let mut w = StallWatch::new(Some(T));
        w.retarget(secs(0), true, 100);
        assert_eq!(w.check(secs(4)), StallCheck::Pending(secs(6)));
        // Progress restarts the clock.
        w.observe(secs(8), true, 60);
        assert_eq!(w.check(secs(17)), StallCheck::Pending(secs(1)));
        assert_eq!(w.check(secs(18)), StallCheck::Stalled { new: true });
        assert!(w.stalled());
        assert_eq!(w.check(secs(30)), StallCheck::Stalled { new: false });
        // Progress clears the stall; reaching the target ends the episode.
        w.observe(secs(31), true, 59);
        assert!(!w.stalled());
        assert_eq!(w.check(secs(31)), StallCheck::Pending(T));
        w.observe(secs(32), true, 0);
        assert_eq!(w.check(secs(100)), StallCheck::Idle);
        assert_eq!(w.closest(), None);
    }

    #[test]
    fn moving_away_and_back_is_not_progress() {
        let mut w = StallWatch::new(Some(T));
        w.retarget(secs(0), true, 100);
        for t in 1..10 {
            // Deflate on OOM, then inflate back to where it was.
            w.observe(secs(t), true, 356);
            w.observe(secs(t), true, 100);
        }
        assert_eq!(w.check(secs(10)), StallCheck::Stalled { new: true });
        assert_eq!(w.closest(), Some(100));
    }

    #[test]
    fn a_new_target_restarts_and_a_left_target_starts_an_episode() {
        let mut w = StallWatch::new(Some(T));
        w.retarget(secs(0), true, 100);
        assert_eq!(w.check(secs(10)), StallCheck::Stalled { new: true });
        // A new target farther away is a new episode: not stalled, clock from now.
        w.retarget(secs(11), true, 500);
        assert!(!w.stalled());
        assert_eq!(w.check(secs(12)), StallCheck::Pending(secs(9)));
        // Reached, then left again (deflate on OOM): a new episode from that distance, in
        // which coming back closer is progress.
        w.observe(secs(13), true, 0);
        w.observe(secs(14), true, 256);
        w.observe(secs(20), true, 128);
        assert_eq!(w.check(secs(29)), StallCheck::Pending(secs(1)));
    }

    #[test]
    fn the_clock_runs_only_while_the_guest_can_move() {
        let mut w = StallWatch::new(Some(T));
        // A target set before the driver is live.
        w.retarget(secs(0), false, 100);
        assert_eq!(w.check(secs(50)), StallCheck::Idle);
        w.observe(secs(50), true, 100);
        assert_eq!(w.check(secs(55)), StallCheck::Pending(secs(5)));
        // Paused, then resumed: the timeout runs in full again.
        w.observe(secs(56), false, 100);
        assert_eq!(w.check(secs(90)), StallCheck::Idle);
        w.observe(secs(90), true, 100);
        assert_eq!(w.check(secs(99)), StallCheck::Pending(secs(1)));
        // A clock that steps back counts as no time.
        assert_eq!(w.check(secs(1)), StallCheck::Pending(T));
        w.restart_clock(secs(1000));
        assert_eq!(w.check(secs(1005)), StallCheck::Pending(secs(5)));
        w.forget();
        assert_eq!(w.check(secs(5000)), StallCheck::Idle);
    }

    #[test]
    fn off_never_stalls_and_restore_keeps_only_a_meaningful_stall() {
        for timeout in [None, Some(Duration::ZERO)] {
            let mut w = StallWatch::new(timeout);
            w.retarget(secs(0), true, 100);
            assert_eq!(w.check(secs(1_000_000)), StallCheck::Idle);
            w.restore(Some(100), true);
            assert!(!w.stalled(), "no stall without a timeout");
        }
        let mut w = StallWatch::new(Some(T));
        w.restore(Some(40), true);
        w.observe(secs(0), true, 40);
        assert!(w.stalled());
        assert_eq!(w.check(secs(0)), StallCheck::Stalled { new: false });
        let mut w = StallWatch::new(Some(T));
        w.restore(Some(40), true);
        w.observe(secs(0), true, 39);
        assert!(!w.stalled(), "progress since the save clears it");
        let mut w = StallWatch::new(Some(T));
        w.restore(None, true);
        assert!(!w.stalled(), "a stall without an episode is dropped");
    }
}
