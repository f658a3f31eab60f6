//! Traffic and drop counters of one virtio-net device, read by the VMM's metrics while the
//! device runs on the event-loop thread: relaxed atomics behind an `Arc`, so the hot path takes
//! no lock. "tx" is guest → host (the guest's tx queue), "rx" is host → guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why a frame or a buffer was not carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// A tx chain the device cannot read a frame from: a device-writable descriptor, memory
    /// outside the guest, shorter than the header plus an Ethernet header.
    TxMalformed,
    /// A tx frame longer than the largest frame the device carries.
    TxOversized,
    /// The frame fd refused a tx frame (peer gone, frame too large for the socket).
    TxBackend,
    /// An rx frame larger than the guest's posted buffers can hold (or than the device reads).
    RxOversized,
    /// An rx frame shorter than an Ethernet header.
    RxRunt,
    /// An rx chain the device cannot write into (the device then needs a reset).
    RxMalformed,
}

/// The counters of one device (a cloneable handle).
#[derive(Debug, Clone, Default)]
pub struct NetMetrics(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_malformed: AtomicU64,
    tx_oversized: AtomicU64,
    tx_backend: AtomicU64,
    rx_oversized: AtomicU64,
    rx_runt: AtomicU64,
    rx_malformed: AtomicU64,
    tx_stalls: AtomicU64,
    rx_stalls: AtomicU64,
}

/// The counters at one moment. Bytes are frame bytes (Ethernet header included, virtio-net
/// header not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounts {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_dropped_malformed: u64,
    pub tx_dropped_oversized: u64,
    pub tx_dropped_backend: u64,
    pub rx_dropped_oversized: u64,
    pub rx_dropped_runt: u64,
    pub rx_dropped_malformed: u64,
    /// Times the frame fd was full and the device stopped taking tx buffers until it drained.
    pub tx_stalls: u64,
    /// Times the device stopped reading the fd because the guest had no rx buffer left (or
    /// not enough for the frame it had read).
    pub rx_stalls: u64,
}

impl NetMetrics {
    pub(super) fn sent(&self, bytes: usize) {
        self.0.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.0.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn received(&self, bytes: usize) {
        self.0.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.0.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a drop. Returns whether it is worth a log line: the 1st, 2nd, 4th, 8th, ... of
    /// its kind, so a guest that sends garbage in a loop cannot flood the log.
    pub(super) fn dropped(&self, what: DropCause) -> bool {
        let counter = match what {
            DropCause::TxMalformed => &self.0.tx_malformed,
            DropCause::TxOversized => &self.0.tx_oversized,
            DropCause::TxBackend => &self.0.tx_backend,
            DropCause::RxOversized => &self.0.rx_oversized,
            DropCause::RxRunt => &self.0.rx_runt,
            DropCause::RxMalformed => &self.0.rx_malformed,
        };
        (counter.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
    }

    pub(super) fn tx_stalled(&self) {
        self.0.tx_stalls.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn rx_stalled(&self) {
        self.0.rx_stalls.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> NetCounts {
        let c = &self.0;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCounts {
            tx_frames: load(&c.tx_frames),
            tx_bytes: load(&c.tx_bytes),
            rx_frames: load(&c.rx_frames),
            rx_bytes: load(&c.rx_bytes),
            tx_dropped_malformed: load(&c.tx_malformed),
            tx_dropped_oversized: load(&c.tx_oversized),
            tx_dropped_backend: load(&c.tx_backend),
            rx_dropped_oversized: load(&c.rx_oversized),
            rx_dropped_runt: load(&c.rx_runt),
            rx_dropped_malformed: load(&c.rx_malformed),
            tx_stalls: load(&c.tx_stalls),
            rx_stalls: load(&c.rx_stalls),
        }
    }
}
