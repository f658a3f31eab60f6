//! virtio-net (device ID 1) whose wire is a frame fd: the VMM's egress filter (a
//! `SOCK_SEQPACKET` socketpair, the filter holds the other end) or a tap device. There is no
//! vhost-net here; the device moves every frame itself.
//!
//! - device.rs: the device model (MAC/MTU/link config space, two queues, activation, moving
//!   frames, backpressure).
//! - event_handler.rs: its event-loop side (queue kicks, the frame fd with changing interest).
//! - chain.rs: a descriptor chain's buffers, checked against guest memory.
//! - header.rs: the virtio-net header.
//! - used_ring.rs: publishing a merged frame's used buffers at once.
//! - frames.rs: the frame fd.
//! - metrics.rs: frame, byte and drop counters.
//! - persist.rs: the device's part of a snapshot.
//!
//! The frame fd contract: one message is one Ethernet frame (no virtio-net header), at least
//! [`ETH_HLEN`] and at most [`MAX_FRAME_LEN`] bytes; messages are never empty (a zero-length
//! read means the peer closed). The device never blocks on it and never drops silently: when
//! the fd is full it stops taking tx buffers until the fd is writable again; when the guest has
//! no rx buffers it stops reading the fd until the guest posts some. Drops (malformed chains,
//! frames too large for the guest's buffers) are counted in [`NetMetrics`].
//! Features: VERSION_1, MAC, MTU, STATUS (link always up), MRG_RXBUF; no offloads, so the guest
//! computes every checksum and never sends segments larger than its MTU.
//!
//! Wiring, as for [`rng`](super::rng):
//! ```text
//! let (dev_end, filter_end) = frame_channel()?;
//! let net = Arc::new(Mutex::new(Net::new(GUEST_MAC, LINK_MTU, dev_end)?));
//! event_manager.add_subscriber(net.clone());
//! device_manager.add_virtio_mmio(vm, mem, &mut io, net, "virtio-net")?;
//! egress::spawn(config, filter_end);
//! ```
//! Snapshots: keep [`Net::save_state`] beside the transport's `MmioTransportState`; on load,
//! build the device with [`Net::restore`] over a fresh `frame_channel()` end, then restore the
//! transport, which re-activates it (the guest's TCP connections then meet a new filter that
//! does not know them, and are reset).
//! A tap fd must be opened with IFF_TAP | IFF_NO_PI and without IFF_VNET_HDR (plain frames).
//! Writing to a peer that closed raises SIGPIPE, which Rust programs ignore from the start.

mod chain;
mod device;
mod event_handler;
mod frames;
mod header;
mod metrics;
mod persist;
mod used_ring;

pub use device::{
    format_mac, Net, NetError, ETH_HLEN, MAX_FRAME_LEN, MIN_MTU, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
pub use frames::frame_channel;
pub use metrics::{DropCause, NetCounts, NetMetrics};
pub use persist::NetState;

/// Bytes of the virtio-net header in front of every frame on both queues.
pub const NET_HDR_LEN: usize = header::NET_HDR_LEN;

#[cfg(test)]
mod tests;
