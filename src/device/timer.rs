// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A non-blocking timerfd for the event loop (statistics polling, the discard flush).
//!
//! `vmm-sys-util`'s `TimerFd` reads blockingly, which would stall the event loop on a
//! spurious wakeup; this one is created with `TFD_NONBLOCK`.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

/// A monotonic, non-blocking timerfd.
#[derive(Debug)]
pub(crate) struct Timer {
    file: File,
    armed: bool,
}

impl Timer {
    pub(crate) fn new() -> io::Result<Self> {
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
    pub(crate) fn arm(&mut self, first: Duration, interval: Option<Duration>) -> io::Result<()> {
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

    pub(crate) fn disarm(&mut self) -> io::Result<()> {
        self.arm(Duration::ZERO, None)
    }

    /// Whether the timer was armed by [`arm`](Self::arm) and has not been disarmed or
    /// consumed as a one-shot.
    pub(crate) fn armed(&self) -> bool {
        self.armed
    }

    /// Consumes expirations; returns how many (0 on a spurious wakeup).
    pub(crate) fn consume(&mut self, periodic: bool) -> u64 {
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
}
