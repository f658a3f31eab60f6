//! The virtio-vsock device model: identity, config space, activation, and moving packets
//! between its queues and the Unix socket backend.

use std::path::Path;
use std::sync::Arc;

use tracing::{error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::VsockMetrics;
use super::packet::{read_tx_packet, Buffers, Header, HDR_LEN, MAX_PAYLOAD};
use super::unix_backend::{BackendError, UnixBackend};
use crate::virtio::diagnostics::describe_queue;
use crate::virtio::{
    ActivateError, ActivatedQueue, DeviceEvents, Error, Interrupt, InterruptType, VirtioDevice,
};
use crate::GuestMemoryMmap;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// Guest → device packets.
pub const TX_QUEUE: usize = 1;
/// Device → guest events (transport reset); this device never sends any.
pub const EVENT_QUEUE: usize = 2;

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const TRANSPORT_RESET_EVENT: u32 = 0;
const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved, u32::MAX means "any", and the upper 32 bits must be zero
    /// (virtio 1.2 section 5.10.4).
    #[error("guest CID {0} is reserved (must be 3..=0xfffffffe)")]
    ReservedCid(u64),
    /// EventFd creation failed.
    #[error(transparent)]
    Virtio(#[from] Error),
    /// The host socket could not be set up.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    notify: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
    /// A ring or buffer turned out unusable; nothing more until the driver resets.
    broken: bool,
}

/// A virtio-vsock device with a Unix socket backend (Firecracker-style hybrid vsock). Share one
/// `Arc<Mutex<Vsock>>` between the event manager and its transport, as with
/// [`Rng`](crate::virtio::rng::Rng).
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    pub(super) events: DeviceEvents,
    /// Wakes the event loop after a reset so it closes the host sockets.
    pub(super) wake: EventFd,
    pub(super) backend: UnixBackend,
    active: Option<Active>,
    /// A transport reset event waits for an event queue buffer.
    transport_reset_pending: bool,
    /// Payload of the tx packet being handled.
    payload: Vec<u8>,
    /// Payload read from a host socket for the rx packet being built.
    rx_buf: Vec<u8>,
    metrics: VsockMetrics,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host connections on
    /// `uds_path` (which must not exist).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid <= 2 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        Ok(Self {
            guest_cid,
            acked_features: 0,
            events: DeviceEvents::new()?,
            wake: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            backend: UnixBackend::new(uds_path, guest_cid)?,
            active: None,
            transport_reset_pending: false,
            payload: Vec::with_capacity(MAX_PAYLOAD),
            rx_buf: vec![0; MAX_PAYLOAD],
            metrics: VsockMetrics::default(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Changes how long the guest has to accept a host-initiated connection (default
    /// [`REQUEST_TIMEOUT`](super::REQUEST_TIMEOUT)), checked every `tick`.
    pub fn set_request_timeout(&mut self, timeout: std::time::Duration, tick: std::time::Duration) {
        self.backend.set_request_timeout(timeout, tick);
    }

    /// The device's traffic counters (a handle that stays readable from other threads).
    pub fn metrics(&self) -> VsockMetrics {
        self.metrics.clone()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.backend.connection_count()
    }

    fn mark_broken(active: &mut Active, what: &str) {
        warn!("virtio-vsock: {what}; device needs reset");
        active.broken = true;
        if let Err(e) = active.interrupt.signal_needs_reset() {
            error!("virtio-vsock: cannot raise interrupt: {e}");
        }
    }

    /// Drops every connection (their host sockets close) and tells the driver with
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, so guest sockets fail instead of waiting for peers
    /// that are gone; meant for after a snapshot restore. If the driver has no event buffer
    /// yet the event goes out when it adds one.
    pub fn transport_reset(&mut self) {
        self.backend.reset();
        if let Err(e) = self.wake.write(1) {
            error!("virtio-vsock: cannot wake the event loop: {e}");
        }
        self.transport_reset_pending = true;
        self.send_pending_event();
    }

    /// Delivers a pending transport reset event, if there is one and a buffer for it.
    pub(super) fn send_pending_event(&mut self) {
        if !self.transport_reset_pending {
            return;
        }
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[EVENT_QUEUE];
        let result = (|| -> Result<bool, String> {
            let Some(chain) = queue.iter(mem).map_err(|e| e.to_string())?.next() else {
                return Ok(false);
            };
            let head = chain.head_index();
            let bufs = Buffers(chain.writable().map(|d| (d.addr(), d.len())).collect());
            // struct virtio_vsock_event { le32 id; }, id 0 = TRANSPORT_RESET.
            let event = TRANSPORT_RESET_EVENT.to_le_bytes();
            let written = bufs.write_at(mem, 0, &event).map_err(|e| e.to_string())?;
            queue
                .add_used(mem, head, written as u32)
                .map_err(|e| e.to_string())?;
            Ok(written == event.len())
        })();
        match result {
            Ok(false) => {}
            Ok(true) => {
                self.transport_reset_pending = false;
                Self::notify_guest(active, EVENT_QUEUE);
            }
            Err(e) => Self::mark_broken(active, &format!("event queue unusable: {e}")),
        }
    }

    /// Handles the packets the guest queued on the tx queue.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let budget = usize::from(queue.size());
        let mut used = 0;
        let result = (|| -> Result<bool, virtio_queue::Error> {
            loop {
                if used >= budget {
                    return Ok(true);
                }
                let Some(chain) = queue.iter(mem)?.next() else {
                    return Ok(false);
                };
                let head = chain.head_index();
                let bufs = Buffers(chain.readable().map(|d| (d.addr(), d.len())).collect());
                match read_tx_packet(mem, &bufs, self.guest_cid, &mut self.payload) {
                    Ok((hdr, op)) => {
                        self.metrics.guest_sent(self.payload.len());
                        self.backend.on_guest_packet(&hdr, op, &self.payload)
                    }
                    Err((hdr, e)) => {
                        if self.metrics.guest_packet_dropped() {
                            let n = self.metrics.snapshot().tx_dropped_malformed;
                            warn!(
                                "virtio-vsock: bad packet from the guest: {e} (dropped packet \
                                 #{n}; only the 1st, 2nd, 4th, 8th, ... are logged)"
                            );
                        }
                        if let Some(hdr) = hdr {
                            self.backend.on_bad_packet(&hdr);
                        }
                    }
                }
                queue.add_used(mem, head, 0)?;
                used += 1;
            }
        })();
        match result {
            Ok(more) => {
                if used > 0 {
                    Self::notify_guest(active, TX_QUEUE);
                }
                if more {
                    if let Err(e) = active.notify[TX_QUEUE].write(1) {
                        error!("virtio-vsock: cannot reschedule tx processing: {e}");
                    }
                }
            }
            Err(e) => Self::mark_broken(active, &format!("tx queue unusable: {e}")),
        }
    }

    fn notify_guest(active: &mut Active, queue: usize) {
        match active.queues[queue].needs_notification(&active.mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = active.interrupt.trigger(InterruptType::Vring) {
                    error!("virtio-vsock: cannot raise interrupt: {e}");
                }
            }
        }
    }

    /// Fills rx buffers with what the backend has for the guest. Stops when the guest has no
    /// buffers left; its next rx kick resumes.
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = 0;
        let result = (|| -> Result<(), String> {
            while self.backend.has_rx_work() {
                let Some(chain) = queue.iter(mem).map_err(|e| e.to_string())?.next() else {
                    return Ok(());
                };
                let head = chain.head_index();
                let bufs = Buffers(chain.writable().map(|d| (d.addr(), d.len())).collect());
                let capacity = bufs.capacity();
                if capacity < HDR_LEN {
                    warn!("virtio-vsock: rx buffer of {capacity} bytes cannot hold a header");
                    queue.add_used(mem, head, 0).map_err(|e| e.to_string())?;
                    used += 1;
                    continue;
                }
                let room = (capacity - HDR_LEN).min(MAX_PAYLOAD);
                let Some(hdr) = self.backend.next_rx_packet(&mut self.rx_buf[..room]) else {
                    queue.go_to_previous_position();
                    return Ok(());
                };
                let len = hdr.len as usize;
                let write = |bufs: &Buffers, h: &Header, data: &[u8]| {
                    bufs.write_at(mem, 0, &h.to_bytes())?;
                    bufs.write_at(mem, HDR_LEN, data)
                };
                if let Err(e) = write(&bufs, &hdr, &self.rx_buf[..len]) {
                    return Err(format!("rx buffer outside guest memory: {e}"));
                }
                queue
                    .add_used(mem, head, (HDR_LEN + len) as u32)
                    .map_err(|e| e.to_string())?;
                self.metrics.guest_received(len);
                used += 1;
            }
            Ok(())
        })();
        if used > 0 {
            Self::notify_guest(active, RX_QUEUE);
        }
        if let Err(e) = result {
            Self::mark_broken(active, &e);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space is `le64 guest_cid`.
        let config = self.guest_cid.to_le_bytes();
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-vsock: {}-byte config write at {offset:#x} ignored (read-only)",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActivatedQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        let notify: Vec<Arc<EventFd>> = queues.iter().map(|q| q.notify.clone()).collect();
        self.events
            .activate(notify.clone())
            .map_err(ActivateError::Signal)?;
        self.active = Some(Active {
            mem,
            queues: queues.into_iter().map(|q| q.queue).collect(),
            notify,
            interrupt,
            broken: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.transport_reset_pending = false;
        self.acked_features = 0;
        self.backend.reset();
        if let Err(e) = self.wake.write(1) {
            error!("virtio-vsock: cannot wake the event loop after reset: {e}");
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|active| active.queues.iter().map(|q| q.state()))
            .collect()
    }

    /// The host ends of the guest's connections belonged to the VMM that took the snapshot: the
    /// guest is told its connections are gone (transport reset) rather than left waiting.
    fn after_restore(&mut self) {
        self.transport_reset();
    }

    fn diagnostics(&self) -> String {
        let mut out = format!(
            "vsock cid {} transport_reset_pending {}",
            self.guest_cid, self.transport_reset_pending
        );
        match &self.active {
            None => out.push_str(" (not activated)"),
            Some(active) => {
                out.push_str(&format!(" broken {}", active.broken));
                for (name, queue) in ["rx", "tx", "event"].iter().zip(&active.queues) {
                    out.push('\n');
                    out.push_str(&describe_queue(name, queue, &active.mem));
                }
            }
        }
        out.push('\n');
        out.push_str(&self.backend.diagnostics());
        out
    }
}
