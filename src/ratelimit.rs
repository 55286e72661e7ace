// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Rate-limited logging for guest-triggered events.
//!
//! A hostile guest can trigger a bad access millions of times a second. Each kind of event
//! keeps a counter and logs only its 1st, 2nd, 4th, 8th... occurrence, with the count, so the
//! log stays short without a clock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts occurrences of one kind of event and says which ones to log.
#[derive(Debug, Default)]
pub(crate) struct RateLimit(AtomicU64);

impl RateLimit {
    /// A counter at zero.
    pub(crate) const fn new() -> Self {
        RateLimit(AtomicU64::new(0))
    }

    /// Counts one occurrence; returns its number when it should be logged.
    pub(crate) fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        n.is_power_of_two().then_some(n)
    }
}

/// Logs a warning through a [`RateLimit`]: `warn_limited!(LIMIT, "fmt", args...)`.
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(n) = $limit.hit() {
            log::warn!("{} (occurrence {})", format_args!($($arg)+), n);
        }
    };
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_powers_of_two_only() {
        let limit = RateLimit::new();
        let logged: Vec<u64> = (0..100).filter_map(|_| limit.hit()).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16, 32, 64]);
    }

    #[test]
    fn macro_counts_every_call() {
        static LIMIT: RateLimit = RateLimit::new();
        for i in 0..5 {
            warn_limited!(LIMIT, "bad thing {}", i);
        }
        assert_eq!(LIMIT.0.load(Ordering::Relaxed), 5);
    }
}
