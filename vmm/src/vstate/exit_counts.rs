//! Counts of vCPU exits by reason, for the API's metrics. Every vCPU of a VM adds to one shared
//! set of relaxed atomic counters: a few nanoseconds per exit, no lock on the exit path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The reasons counted, in the order [`ExitCounts::snapshot`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    /// KVM_RUN interrupted by a signal (a kick) or KVM_EXIT_INTR.
    Interrupted,
    /// Any exit that ends the vCPU (shutdown, halt, internal error, ...).
    Fatal,
}

impl ExitReason {
    pub const ALL: [ExitReason; 6] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Interrupted,
        ExitReason::Fatal,
    ];

    /// The Prometheus label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Interrupted => "interrupted",
            ExitReason::Fatal => "fatal",
        }
    }
}

#[derive(Clone, Default)]
pub struct ExitCounts {
    counts: Arc<[AtomicU64; 6]>,
}

impl ExitCounts {
    pub fn add(&self, reason: ExitReason) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason with its count so far.
    pub fn snapshot(&self) -> Vec<(ExitReason, u64)> {
        ExitReason::ALL
            .iter()
            .map(|&r| (r, self.counts[r as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_shared_between_clones() {
        let counts = ExitCounts::default();
        let vcpu = counts.clone();
        vcpu.add(ExitReason::IoOut);
        vcpu.add(ExitReason::IoOut);
        vcpu.add(ExitReason::Fatal);
        let snapshot = counts.snapshot();
        assert_eq!(snapshot.len(), ExitReason::ALL.len());
        assert!(snapshot.contains(&(ExitReason::IoOut, 2)));
        assert!(snapshot.contains(&(ExitReason::Fatal, 1)));
        assert!(snapshot.contains(&(ExitReason::MmioRead, 0)));
    }
}
