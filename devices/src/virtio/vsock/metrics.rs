//! Traffic counters of one vsock device, read by the VMM's metrics while the device runs on the
//! event loop thread: relaxed atomics behind an `Arc`, so the hot path takes no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Packets and payload bytes each way. "tx" is guest → host (the guest's tx queue), "rx" is
/// host → guest (its rx queue), as virtio names the queues.
#[derive(Debug, Clone, Default)]
pub struct VsockMetrics(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockCounts {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets from the guest the device refused as malformed (bad header, addressing, length,
    /// or a chain it cannot read).
    pub tx_dropped_malformed: u64,
}

impl VsockMetrics {
    pub(super) fn guest_sent(&self, payload_bytes: usize) {
        self.0.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.0
            .tx_bytes
            .fetch_add(payload_bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn guest_received(&self, payload_bytes: usize) {
        self.0.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.0
            .rx_bytes
            .fetch_add(payload_bytes as u64, Ordering::Relaxed);
    }

    /// Counts a malformed guest packet. Returns whether it is worth a log line: the 1st, 2nd,
    /// 4th, 8th, ... (as virtio-net's drops), so a guest sending garbage cannot flood the log.
    pub(super) fn guest_packet_dropped(&self) -> bool {
        (self.0.tx_dropped.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
    }

    pub fn snapshot(&self) -> VsockCounts {
        VsockCounts {
            tx_packets: self.0.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.0.tx_bytes.load(Ordering::Relaxed),
            rx_packets: self.0.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.0.rx_bytes.load(Ordering::Relaxed),
            tx_dropped_malformed: self.0.tx_dropped.load(Ordering::Relaxed),
        }
    }
}
