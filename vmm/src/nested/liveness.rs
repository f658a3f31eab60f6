//! Whether L1 is still running: its init's heartbeat on the console, or progress on the results
//! port.
//!
//! Bytes alone do not tell: a wedged L1 whose kernel still takes timer interrupts on one CPU
//! prints soft-lockup and RCU-stall reports for ever while no process in it runs (seen in CI:
//! CPU 1 stopped waking, CPU 0 spun in the VMM's vCPU thread for 1300 s), so only a line written
//! by a user-space process proves L1 alive.

use std::time::{Duration, Instant};

use super::script::HEARTBEAT_PREFIX;

/// Counts heartbeats in the console's byte stream, which arrives in arbitrary chunks (a heartbeat
/// may be split between two reads, or have a kernel message printed into its middle: then that
/// one is missed, and the next, five seconds later, counts).
#[derive(Default)]
pub(crate) struct HeartbeatCounter {
    /// The end of the previous chunk that could be the start of a heartbeat.
    carry: Vec<u8>,
}

impl HeartbeatCounter {
    pub fn feed(&mut self, chunk: &[u8]) -> usize {
        let needle = HEARTBEAT_PREFIX.as_bytes();
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        let count = window
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count();
        let keep = (needle.len() - 1).min(window.len());
        self.carry = window[window.len() - keep..].to_vec();
        count
    }
}

/// When L1 last showed a sign of life.
pub(crate) struct Liveness {
    heartbeats: HeartbeatCounter,
    last_sign: Instant,
}

impl Liveness {
    pub fn new() -> Self {
        Liveness {
            heartbeats: HeartbeatCounter::default(),
            last_sign: Instant::now(),
        }
    }

    /// New console bytes and new results-port bytes since the last call.
    pub fn observe(&mut self, console: &[u8], results: &[u8]) {
        if self.heartbeats.feed(console) > 0 || !results.is_empty() {
            self.last_sign = Instant::now();
        }
    }

    pub fn silent_for(&self) -> Duration {
        self.last_sign.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_counted_across_chunk_boundaries() {
        let mut c = HeartbeatCounter::default();
        let beat = format!("{HEARTBEAT_PREFIX} 12.5\n");
        let (a, b) = beat.split_at(7);
        assert_eq!(c.feed(a.as_bytes()), 0);
        assert_eq!(c.feed(b.as_bytes()), 1);
        let two = format!("noise\n{beat}[ 1.0] kernel\n{beat}");
        assert_eq!(c.feed(two.as_bytes()), 2);
        assert_eq!(c.feed(b""), 0);
    }

    #[test]
    fn kernel_reports_are_not_heartbeats() {
        let mut c = HeartbeatCounter::default();
        let lockup = "[ 1480.71] watchdog: BUG: soft lockup - CPU#0 stuck for 1278s! [vm:319]\n\
                      [ 1517.47] rcu: INFO: rcu_preempt self-detected stall on CPU\n";
        for _ in 0..100 {
            assert_eq!(c.feed(lockup.as_bytes()), 0);
        }
    }

    #[test]
    fn console_noise_does_not_keep_l1_alive_but_heartbeats_and_results_do() {
        let mut l = Liveness::new();
        l.last_sign -= Duration::from_secs(100);
        l.observe(b"[ 1.0] watchdog: BUG: soft lockup\n", b"");
        assert!(l.silent_for() >= Duration::from_secs(100));
        l.observe(format!("{HEARTBEAT_PREFIX} 3.0\n").as_bytes(), b"");
        assert!(l.silent_for() < Duration::from_secs(100));
        l.last_sign -= Duration::from_secs(100);
        l.observe(b"", b"@@nested:data 0 stdout bytes=3\n");
        assert!(l.silent_for() < Duration::from_secs(100));
    }
}
