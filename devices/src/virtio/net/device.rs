//! The virtio-net device model: identity, config space, activation, and moving frames between
//! its two queues and the frame fd.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{error, info, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{ChainError, Direction, GuestBuffers};
use super::frames::FrameFd;
use super::header::{rx_header, NET_HDR_LEN};
use super::metrics::{DropCause, NetMetrics};
use super::used_ring::add_used_all;
use crate::virtio::diagnostics::describe_queue;
use crate::virtio::{
    ActivateError, ActivatedQueue, DeviceEvents, Error, Interrupt, InterruptType, VirtioDevice,
};
use crate::GuestMemoryMmap;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Host → guest frames.
pub const RX_QUEUE: usize = 0;
/// Guest → host frames.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

/// Bytes of an Ethernet header (destination, source, EtherType): the shortest frame carried.
pub const ETH_HLEN: usize = 14;
/// The longest frame carried either way: the largest MTU config space can state, plus the
/// Ethernet header.
pub const MAX_FRAME_LEN: usize = u16::MAX as usize + ETH_HLEN;
/// The smallest MTU Linux accepts from the device (ETH_MIN_MTU); below it the driver ignores
/// VIRTIO_NET_F_MTU.
pub const MIN_MTU: u16 = 68;

const AVAIL_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MTU)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_MRG_RXBUF);

/// Frames moved per queue per event before the event loop serves its other fds.
const BUDGET: usize = QUEUE_SIZE as usize;

/// Errors creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A MAC address must be unicast and not all zeros.
    #[error("MAC address {} is not a unicast address", format_mac(.0))]
    InvalidMac([u8; 6]),
    /// The MTU is below what a guest accepts.
    #[error("MTU {0} is below the minimum of {MIN_MTU}")]
    InvalidMtu(u16),
    /// EventFd creation failed.
    #[error(transparent)]
    Virtio(#[from] Error),
    /// The frame fd could not be made non-blocking.
    #[error("cannot set up the frame fd: {0}")]
    FrameFd(#[source] io::Error),
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    notify: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
    /// A ring or rx buffer turned out unusable; nothing more until the driver resets.
    broken: bool,
}

/// What became of one rx frame.
enum Delivery {
    Delivered,
    /// The guest has not posted enough buffers yet; the frame waits.
    NoBuffers,
    /// The frame is larger than the buffers the guest can ever post for it (one chain without
    /// merged buffers, the whole ring with them).
    TooBig {
        capacity: usize,
    },
}

/// A virtio-net device whose wire is a frame fd (a `SOCK_SEQPACKET` socket or a tap fd): one
/// message per Ethernet frame, no virtio-net header. Share one `Arc<Mutex<Net>>` between the
/// event manager and its transport, as with [`Rng`](crate::virtio::rng::Rng).
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    acked_features: u64,
    pub(super) events: DeviceEvents,
    pub(super) frames: FrameFd,
    /// The epoll interest registered for the frame fd; `None` while not registered.
    pub(super) registered: Option<event_manager::EventSet>,
    active: Option<Active>,
    /// A tx frame (without its header) that the fd would not take yet.
    tx_buf: Vec<u8>,
    tx_pending: Option<usize>,
    /// Room for the virtio-net header, then a frame read from the fd (one byte more than the
    /// largest frame, to notice longer ones).
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` still waiting for rx buffers.
    rx_pending: Option<usize>,
    /// The guest ran out of rx buffers: the fd is not read until it posts more.
    rx_stalled: bool,
    /// The peer closed the frame fd (or it failed for good); it is no longer watched.
    pub(super) peer_gone: bool,
    metrics: NetMetrics,
}

impl Net {
    /// A NIC with address `mac` and link MTU `mtu` whose frames go to and come from `frames`
    /// (made non-blocking here).
    pub fn new(mac: [u8; 6], mtu: u16, frames: OwnedFd) -> Result<Self, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::InvalidMac(mac));
        }
        if mtu < MIN_MTU {
            return Err(NetError::InvalidMtu(mtu));
        }
        Ok(Self {
            mac,
            mtu,
            acked_features: 0,
            events: DeviceEvents::new()?,
            frames: FrameFd::new(frames).map_err(NetError::FrameFd)?,
            registered: None,
            active: None,
            tx_buf: vec![0; MAX_FRAME_LEN],
            tx_pending: None,
            rx_buf: vec![0; NET_HDR_LEN + MAX_FRAME_LEN + 1],
            rx_pending: None,
            rx_stalled: false,
            peer_gone: false,
            metrics: NetMetrics::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The link MTU told to the guest.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device's traffic counters (a handle that stays readable from other threads).
    pub fn metrics(&self) -> NetMetrics {
        self.metrics.clone()
    }

    fn merged_rx_buffers(&self) -> bool {
        self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// The epoll interest the frame fd should have now: readable while frames can go to the
    /// guest, writable while a tx frame waits; `None` once the peer is gone.
    pub(super) fn wanted_interest(&self) -> Option<event_manager::EventSet> {
        use event_manager::EventSet;
        if self.peer_gone {
            return None;
        }
        let mut set = EventSet::empty();
        if self.active.as_ref().is_some_and(|a| !a.broken) {
            if !self.rx_stalled {
                set |= EventSet::IN;
            }
            if self.tx_pending.is_some() {
                set |= EventSet::OUT;
            }
        }
        Some(set)
    }

    /// The guest posted rx buffers: frames may flow again.
    pub(super) fn on_rx_buffers(&mut self) {
        self.rx_stalled = false;
    }

    /// The fd reported hang-up or an error: it is not watched any more. Frames the guest had
    /// no buffers for by then are lost with the link.
    pub(super) fn on_peer_hangup(&mut self) {
        if !self.peer_gone {
            warn!("virtio-net: the frame fd hung up; the guest's link carries nothing from now on");
            self.peer_gone = true;
        }
        self.after_peer_gone();
    }

    /// Nothing will drain the fd any more: a tx frame waiting for it is dropped and the tx
    /// queue is emptied (each frame counted), so the guest's transmit queue never hangs.
    fn after_peer_gone(&mut self) {
        if self.tx_pending.take().is_some() {
            self.metrics.dropped(DropCause::TxBackend);
        }
        self.process_tx();
    }

    fn mark_broken(active: &mut Active, what: &str) {
        warn!("virtio-net: {what}; device needs reset");
        active.broken = true;
        if let Err(e) = active.interrupt.signal_needs_reset() {
            error!("virtio-net: cannot raise interrupt: {e}");
        }
    }

    fn notify_guest(active: &mut Active, queue: usize) {
        match active.queues[queue].needs_notification(&active.mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = active.interrupt.trigger(InterruptType::Vring) {
                    error!("virtio-net: cannot raise interrupt: {e}");
                }
            }
        }
    }

    /// Sends the frames the guest queued on the tx queue, until the fd would block (the
    /// frame that did not fit is kept and the rest stay in the ring until the fd drains).
    pub(super) fn process_tx(&mut self) {
        if self.tx_pending.is_some() {
            return;
        }
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let mut used = 0;
        // Kicks are off while the device drains the ring (each one is a VM exit, and the
        // device is looking anyway) and back on whenever it stops.
        let result = (|| -> Result<bool, virtio_queue::Error> {
            queue.disable_notification(mem)?;
            loop {
                if used >= BUDGET {
                    queue.enable_notification(mem)?;
                    return Ok(true);
                }
                let Some(chain) = queue.iter(mem)?.next() else {
                    // A frame added just before kicks came back on would get no kick: look
                    // again.
                    if queue.enable_notification(mem)? {
                        queue.disable_notification(mem)?;
                        continue;
                    }
                    return Ok(false);
                };
                let head = chain.head_index();
                match read_tx_frame(chain, mem, &mut self.tx_buf) {
                    Ok(len) => match self.frames.send(&self.tx_buf[..len]) {
                        Ok(()) => self.metrics.sent(len),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.tx_pending = Some(len);
                            self.metrics.tx_stalled();
                        }
                        Err(e) => {
                            if self.metrics.dropped(DropCause::TxBackend) {
                                warn!("virtio-net: the frame fd refused a {len}-byte frame: {e}");
                            }
                        }
                    },
                    Err((cause, why)) => {
                        if self.metrics.dropped(cause) {
                            warn!("virtio-net: tx frame dropped: {why}");
                        }
                    }
                }
                // The frame was copied out (or dropped): the buffer goes back to the guest.
                queue.add_used(mem, head, 0)?;
                used += 1;
                if self.tx_pending.is_some() {
                    // Until the fd drains, kicks only wake the loop for nothing; flush_tx
                    // comes back here, which turns them on again when the ring is empty.
                    return Ok(false);
                }
            }
        })();
        match result {
            Ok(more) => {
                if used > 0 {
                    Self::notify_guest(active, TX_QUEUE);
                }
                if more {
                    // Budget spent with buffers left: come back after the other fds had a turn.
                    if let Err(e) = active.notify[TX_QUEUE].write(1) {
                        error!("virtio-net: cannot reschedule tx processing: {e}");
                    }
                }
            }
            Err(e) => Self::mark_broken(active, &format!("tx queue unusable: {e}")),
        }
    }

    /// The fd became writable: sends the frame that waited, then goes on with the tx queue.
    pub(super) fn flush_tx(&mut self) {
        let Some(len) = self.tx_pending else {
            return;
        };
        match self.frames.send(&self.tx_buf[..len]) {
            Ok(()) => self.metrics.sent(len),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                if self.metrics.dropped(DropCause::TxBackend) {
                    warn!("virtio-net: the frame fd refused a {len}-byte frame: {e}");
                }
            }
        }
        self.tx_pending = None;
        self.process_tx();
    }

    /// Moves frames from the fd into rx buffers while the guest has buffers for them. The fd
    /// is only read when a buffer is available, so a guest that stops receiving leaves the
    /// frames queued in the socket (the peer sees backpressure) instead of in the device.
    pub(super) fn process_rx(&mut self) {
        if self.peer_gone {
            return;
        }
        let merged = self.merged_rx_buffers();
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mut delivered = 0;
        let mut failure = None;
        let mut peer_went = false;
        for _ in 0..BUDGET {
            if self.rx_stalled {
                break;
            }
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => {
                    match has_available(&active.queues[RX_QUEUE], &active.mem) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.rx_stalled = true;
                            self.metrics.rx_stalled();
                            break;
                        }
                        Err(e) => {
                            failure = Some(format!("rx queue unusable: {e}"));
                            break;
                        }
                    }
                    match self.frames.recv(&mut self.rx_buf[NET_HDR_LEN..]) {
                        Ok(0) => {
                            info!("virtio-net: the frame fd was closed by its peer");
                            self.peer_gone = true;
                            peer_went = true;
                            break;
                        }
                        Ok(n) if n > MAX_FRAME_LEN => {
                            if self.metrics.dropped(DropCause::RxOversized) {
                                warn!(
                                    "virtio-net: dropped an rx frame longer than \
                                     {MAX_FRAME_LEN} bytes"
                                );
                            }
                            continue;
                        }
                        Ok(n) if n < ETH_HLEN => {
                            if self.metrics.dropped(DropCause::RxRunt) {
                                warn!(
                                    "virtio-net: dropped a {n}-byte rx frame (no Ethernet header)"
                                );
                            }
                            continue;
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            warn!("virtio-net: reading the frame fd failed, giving it up: {e}");
                            self.peer_gone = true;
                            peer_went = true;
                            break;
                        }
                    }
                }
            };
            match deliver(active, merged, &mut self.rx_buf[..NET_HDR_LEN + len]) {
                Ok(Delivery::Delivered) => {
                    self.metrics.received(len);
                    delivered += 1;
                }
                Ok(Delivery::NoBuffers) => {
                    self.rx_pending = Some(len);
                    self.rx_stalled = true;
                    self.metrics.rx_stalled();
                    break;
                }
                Ok(Delivery::TooBig { capacity }) => {
                    if self.metrics.dropped(DropCause::RxOversized) {
                        warn!(
                            "virtio-net: dropped a {len}-byte rx frame: the guest's rx buffers \
                             hold {capacity} bytes with the header"
                        );
                    }
                }
                Err(e) => {
                    self.metrics.dropped(DropCause::RxMalformed);
                    failure = Some(e);
                    break;
                }
            }
        }
        if delivered > 0 {
            Self::notify_guest(active, RX_QUEUE);
        }
        if let Some(e) = failure {
            Self::mark_broken(active, &e);
        }
        if peer_went {
            self.after_peer_gone();
        }
    }

    /// Forgets frames held for a guest that is gone (after a reset or a restore).
    fn forget_frames(&mut self) {
        self.tx_pending = None;
        self.rx_pending = None;
        self.rx_stalled = false;
    }
}

/// Whether the driver has made a buffer available that the device has not taken.
fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
    Ok(queue.avail_idx(mem, Ordering::Acquire)?.0 != queue.next_avail())
}

/// Copies the frame of a tx chain into `buf` (header stripped). Errors say why the chain is
/// dropped and which counter it goes to.
fn read_tx_frame(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, (DropCause, String)> {
    let bufs = GuestBuffers::collect(chain, mem, Direction::Readable, NET_HDR_LEN + MAX_FRAME_LEN)
        .map_err(|e| match e {
            ChainError::TooLong { .. } => (DropCause::TxOversized, e.to_string()),
            _ => (DropCause::TxMalformed, e.to_string()),
        })?;
    if bufs.len() < NET_HDR_LEN + ETH_HLEN {
        return Err((
            DropCause::TxMalformed,
            format!(
                "chain of {} bytes cannot hold the virtio-net header and an Ethernet header",
                bufs.len()
            ),
        ));
    }
    let len = bufs.len() - NET_HDR_LEN;
    bufs.read_at(mem, NET_HDR_LEN, &mut buf[..len])
        .map_err(|e| (DropCause::TxMalformed, e.to_string()))?;
    Ok(len)
}

/// Puts `packet` (room for the header, then the frame) into the next rx chain, or, with merged
/// buffers, as many chains as it takes. Chains are taken only once the whole frame fits, so a
/// frame waiting for buffers leaves the ring as it was. `Err` means the ring or a buffer is
/// unusable.
fn deliver(active: &mut Active, merged: bool, packet: &mut [u8]) -> Result<Delivery, String> {
    let mem = &active.mem;
    let queue = &mut active.queues[RX_QUEUE];
    let need = packet.len();
    let max_chains = if merged { usize::from(queue.size()) } else { 1 };
    let mut chains: Vec<(u16, GuestBuffers)> = Vec::new();
    let mut capacity = 0usize;
    while capacity < need && chains.len() < max_chains {
        let next = queue
            .iter(mem)
            .map_err(|e| format!("rx queue unusable: {e}"))?
            .next();
        let Some(chain) = next else {
            rewind(queue, chains.len());
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head_index();
        let bufs = GuestBuffers::collect(chain, mem, Direction::Writable, usize::MAX)
            .map_err(|e| format!("rx buffer (head {head}) unusable: {e}"))?;
        capacity = capacity.saturating_add(bufs.len());
        chains.push((head, bufs));
    }
    if capacity < need {
        rewind(queue, chains.len());
        return Ok(Delivery::TooBig { capacity });
    }
    // At most the queue size (256) chains were taken.
    let count = u16::try_from(chains.len()).map_err(|_| "too many rx chains".to_string())?;
    packet[..NET_HDR_LEN].copy_from_slice(&rx_header(count));
    let mut used = Vec::with_capacity(chains.len());
    let mut offset = 0;
    for (head, bufs) in &chains {
        let n = bufs.len().min(need - offset);
        bufs.write(mem, &packet[offset..offset + n])
            .map_err(|e| format!("rx buffer (head {head}) unwritable: {e}"))?;
        // n <= need <= NET_HDR_LEN + MAX_FRAME_LEN + 1, far below u32::MAX.
        used.push((*head, n as u32));
        offset += n;
    }
    add_used_all(queue, mem, &used).map_err(|e| format!("rx used ring unusable: {e}"))?;
    Ok(Delivery::Delivered)
}

/// Puts back `count` chains taken from the available ring.
fn rewind(queue: &mut Queue, count: usize) {
    for _ in 0..count {
        queue.go_to_previous_position();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        // struct virtio_net_config up to mtu: u8 mac[6]; le16 status;
        // le16 max_virtqueue_pairs; le16 mtu.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only to a modern driver (only legacy drivers wrote the MAC
        // here, and the transport is modern-only).
        warn!(
            "virtio-net: {}-byte config write at {offset:#x} ignored (read-only)",
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
        // The frame fd's interest is brought in line by the next event it reports (anything
        // readable arrives as one; the device then asks for no events while inactive).
        self.active = None;
        self.acked_features = 0;
        self.forget_frames();
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

    /// Connections the guest had went through the old VMM's egress filter, which is gone; the
    /// new one answers their next segment with a reset, so only device-local state goes here.
    fn after_restore(&mut self) {
        self.forget_frames();
    }

    fn diagnostics(&self) -> String {
        let mut out = format!(
            "net mac {} mtu {} features {:#x} tx_pending {:?} rx_pending {:?} rx_stalled {} \
             peer_gone {}",
            format_mac(&self.mac),
            self.mtu,
            self.acked_features,
            self.tx_pending,
            self.rx_pending,
            self.rx_stalled,
            self.peer_gone
        );
        match &self.active {
            None => out.push_str(" (not activated)"),
            Some(active) => {
                out.push_str(&format!(" broken {}", active.broken));
                for (name, queue) in ["rx", "tx"].iter().zip(&active.queues) {
                    out.push('\n');
                    out.push_str(&describe_queue(name, queue, &active.mem));
                }
            }
        }
        out.push_str(&format!("\n{:?}", self.metrics.snapshot()));
        out
    }
}
