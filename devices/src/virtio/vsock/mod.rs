//! virtio-vsock (device ID 19) with a Unix socket backend, like Firecracker's hybrid vsock: the
//! VMM moves the bytes (there is no /dev/vhost-vsock on our hosts).
//!
//! - device.rs: the device model (CID config space, three queues, activation, queue work).
//! - event_handler.rs: its event-loop side.
//! - packet.rs: the packet header and gathering/scattering packets over descriptor chains.
//! - connection.rs: one stream's state machine and credit flow control.
//! - unix_backend.rs: host Unix sockets (`CONNECT <port>` handshake, `<uds_path>_<port>`).
//! - metrics.rs: packet and byte counters, read by the VMM's metrics.
//!
//! Wiring, as for [`rng`](super::rng) (the device is both the transport's `VirtioDevice` and an
//! event-loop subscriber; it registers its own listening socket, timer and host sockets):
//! ```text
//! let vsock = Arc::new(Mutex::new(Vsock::new(guest_cid, &uds_path)?));
//! event_manager.add_subscriber(vsock.clone());
//! device_manager.add_virtio_mmio(vm, mem, &mut io, vsock, "virtio-vsock")?;
//! ```
//! Host side: connect to `uds_path`, write `CONNECT <guest port>\n`, read `OK <host port>\n`,
//! then the socket is the stream (EOF without `OK` means the guest refused or did not answer
//! within [`REQUEST_TIMEOUT`]). To accept guest connections to port P, listen on
//! `<uds_path>_P` beforehand. Limits: [`MAX_CONNECTIONS`] streams, [`CONN_BUF_SIZE`] bytes of
//! guest data held per stream, [`MAX_PAYLOAD`] per packet.

mod connection;
mod device;
mod event_handler;
mod metrics;
mod packet;
mod unix_backend;

pub use connection::CONN_BUF_SIZE;
pub use device::{Vsock, VsockError, EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
pub use metrics::{VsockCounts, VsockMetrics};
pub use packet::{Header, Op, PacketError, HDR_LEN, HOST_CID, MAX_PAYLOAD};
pub use unix_backend::{BackendError, MAX_CONNECTIONS, MAX_HANDSHAKES, REQUEST_TIMEOUT};

#[cfg(test)]
mod tests;
