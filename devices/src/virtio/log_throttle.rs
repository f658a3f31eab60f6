//! Bounded logging of guest misbehaviour. Everything a guest does wrong is worth knowing about,
//! but a hostile guest can repeat the same bad access millions of times a second, and one log
//! line each would let it fill the host's disk through the VMM's log. So each kind is counted
//! and only its 1st, 2nd, 4th, 8th, ... occurrence is logged, with its count.
//!
//! Hand-written: the tracing ecosystem's rate limiters (e.g. `tracing-throttle`) limit by time
//! window per call site, which would hide how many occurrences there were; a counter per kind of
//! fault is a few lines.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences of one kind of guest fault.
#[derive(Debug, Default)]
pub struct LogThrottle(AtomicU64);

impl LogThrottle {
    /// Counts one occurrence; `Some(n)` when this, the n-th, is worth a log line.
    pub fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_power_of_two().then_some(n)
    }

    /// Occurrences so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `warn!` through a [`LogThrottle`]: `guest_warn!(throttle, "format", args...)`.
macro_rules! guest_warn {
    ($throttle:expr, $($arg:tt)+) => {
        if let Some(n) = $throttle.hit() {
            tracing::warn!(
                "{} (guest fault #{n}; only the 1st, 2nd, 4th, 8th, ... are logged)",
                format_args!($($arg)+)
            );
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_powers_of_two_and_counts_everything() {
        let t = LogThrottle::default();
        let logged: Vec<u64> = (0..100).filter_map(|_| t.hit()).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(t.count(), 100);
    }
}
