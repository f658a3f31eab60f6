//! Helpers shared by the virtio unit tests.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::rng::EntropySource;
use super::{ActivateError, ActivatedQueue, Interrupt, VirtioDevice};
use crate::GuestMemoryMmap;

pub const MEM_SIZE: usize = 4 << 20;
/// Descriptor flags: device-readable.
pub const RO: u16 = 0;
/// Descriptor flags: device-writable.
pub const WO: u16 = VRING_DESC_F_WRITE as u16;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Makes the chain `descs` (address, length, flags) available, its descriptors stored at table
/// indices `first..first + descs.len()`.
pub fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[(u64, u32, u16)]) {
    let last = descs.len() - 1;
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let (flags, next) = if i == last {
                (flags, 0)
            } else {
                (flags | VRING_DESC_F_NEXT as u16, first + i as u16 + 1)
            };
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

/// The used ring's entries as (head index, length), in order.
pub fn read_used(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let idx = vq.used().idx().load();
    (0..idx)
        .map(|i| {
            let elem = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
            (elem.id(), elem.len())
        })
        .collect()
}

/// Produces 0, 1, 2, ... (wrapping), so tests can tell which bytes landed where.
#[derive(Debug, Default)]
pub struct CountingSource {
    next: u8,
}

impl EntropySource for CountingSource {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        for b in buf {
            *b = self.next;
            self.next = self.next.wrapping_add(1);
        }
        Ok(())
    }
}

/// Always fails.
#[derive(Debug)]
pub struct FailingSource;

impl EntropySource for FailingSource {
    fn fill(&mut self, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other("no entropy today"))
    }
}

/// What the transport told a [`DummyDevice`].
#[derive(Debug, Default)]
pub struct DummyState {
    pub acked_features: Option<u64>,
    /// Queue registers (size, desc, avail, used, event idx) of the last activation.
    pub activated_queues: Vec<(u16, u64, u64, u64, bool)>,
    pub activations: usize,
    pub resets: usize,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    pub notify_events: Vec<Arc<EventFd>>,
    pub interrupt: Option<Arc<Interrupt>>,
    /// Queue states as activated (what `queue_states` reports while active).
    pub live_queues: Vec<virtio_queue::QueueState>,
    pub restored: usize,
}

/// A device that records what the transport does to it.
#[derive(Debug)]
pub struct DummyDevice {
    pub queue_sizes: Vec<u16>,
    pub features: u64,
    pub config: Vec<u8>,
    pub fail_activation: bool,
    pub active: bool,
    pub state: DummyState,
}

pub const DUMMY_DEVICE_TYPE: u32 = 0x2a;
/// Offered on top of VERSION_1: a low-word bit and another high-word bit.
pub const DUMMY_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 5) | (1 << 40);

impl DummyDevice {
    pub fn new(queue_sizes: &[u16]) -> Self {
        Self {
            queue_sizes: queue_sizes.to_vec(),
            features: DUMMY_FEATURES,
            config: (0u8..16).map(|i| 0xc0 + i).collect(),
            fail_activation: false,
            active: false,
            state: DummyState::default(),
        }
    }
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        DUMMY_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.state.acked_features = Some(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.state.config_writes.push((offset, data.to_vec()));
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<ActivatedQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::QueueCount {
                expected: 0,
                got: queues.len(),
            });
        }
        self.state.activations += 1;
        self.state.activated_queues = queues
            .iter()
            .map(|q| {
                let queue: &Queue = &q.queue;
                (
                    queue.size(),
                    queue.desc_table(),
                    queue.avail_ring(),
                    queue.used_ring(),
                    queue.event_idx_enabled(),
                )
            })
            .collect();
        self.state.live_queues = queues.iter().map(|q| q.queue.state()).collect();
        self.state.notify_events = queues.into_iter().map(|q| q.notify).collect();
        self.state.interrupt = Some(interrupt);
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.state.resets += 1;
        self.state.acked_features = None;
        self.state.interrupt = None;
        self.active = false;
    }

    fn is_activated(&self) -> bool {
        self.active
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        if self.active {
            self.state.live_queues.clone()
        } else {
            Vec::new()
        }
    }

    fn after_restore(&mut self) {
        self.state.restored += 1;
    }
}
