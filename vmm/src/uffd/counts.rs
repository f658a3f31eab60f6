//! What a userfaultfd-backed VM's memory did, for `GET /metrics` and the restore log: faults
//! served lazily, pages prefetched from the working set, time spent on each; plus the working
//! set being recorded (the pages faulted in, in order, until recording ends).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct UffdCounts {
    faults: AtomicU64,
    zero_pages: AtomicU64,
    prefetched: AtomicU64,
    serve_ns: AtomicU64,
    prefetch_ns: AtomicU64,
    recording: AtomicBool,
    recorded: Mutex<Vec<u64>>,
}

/// Shared between the fault handler thread, the VMM and the API.
pub type UffdMetrics = Arc<UffdCounts>;

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UffdTotals {
    /// Page faults served by the handler thread (copied or zeroed on demand).
    pub faults: u64,
    /// Of those, pages that were holes in the memory file (mapped as the zero page).
    pub zero_pages: u64,
    /// Pages copied in eagerly from the working set before the vCPUs ran.
    pub prefetched: u64,
    /// Time the handler spent serving faults (read + copy), so faults / this = service rate.
    pub serve_seconds: f64,
    pub prefetch_seconds: f64,
}

impl UffdCounts {
    pub fn totals(&self) -> UffdTotals {
        UffdTotals {
            faults: self.faults.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            serve_seconds: self.serve_ns.load(Ordering::Relaxed) as f64 / 1e9,
            prefetch_seconds: self.prefetch_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    pub(super) fn served(&self, zero: bool) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        if zero {
            self.zero_pages.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn serve_time(&self, ns: u64) {
        self.serve_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(super) fn prefetched(&self, pages: u64, ns: u64) {
        self.prefetched.fetch_add(pages, Ordering::Relaxed);
        self.prefetch_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(super) fn start_recording(&self) {
        self.recording.store(true, Ordering::Release);
    }

    /// Ends the working-set recording (the first exec result is in, or the VM stopped); pages
    /// faulted from now on are not part of the set.
    pub fn end_recording(&self) {
        self.recording.store(false, Ordering::Release);
    }

    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    pub(super) fn record(&self, page: u64) {
        if self.is_recording() {
            self.recorded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(page);
        }
    }

    pub(super) fn take_recorded(&self) -> Vec<u64> {
        std::mem::take(&mut *self.recorded.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
