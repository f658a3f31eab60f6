//! A hostile guest driver for the virtio device targets: it lays out split virtqueues in guest
//! memory with virtio-queue's `MockSplitQueue` (as the devices' unit tests do), then lets the
//! fuzzer write whatever it likes there: raw descriptors with any address, length, flags and next
//! index, chains, avail ring entries and indices, and arbitrary bytes anywhere in guest RAM
//! (including over the rings themselves and indirect tables).

use std::sync::Arc;

use arbitrary::Arbitrary;
use event_manager::{EventManager, MutEventSubscriber};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::virtio::{ActivatedQueue, Interrupt};
use devices::GuestMemoryMmap;

/// Guest RAM: two regions with a hole between them, so buffers can straddle the hole or run off
/// the end of RAM.
pub const RAM: [(u64, usize); 2] = [(0, 0x4_0000), (0x8_0000, 0x4_0000)];
/// Where the queues' rings start (each queue gets its own 16 KiB slot in the first region).
const RINGS_BASE: u64 = 0x1000;
const RING_SLOT: u64 = 0x4000;

pub type Manager = EventManager<Arc<std::sync::Mutex<dyn MutEventSubscriber + Send>>>;

/// A guest physical address: usually inside RAM (so the device gets past the address checks and
/// reaches the parsing behind them), sometimes anything at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Ram(u32),
    Raw(u64),
}

impl Addr {
    pub fn resolve(self) -> u64 {
        match self {
            Addr::Ram(offset) => {
                let total: u64 = RAM.iter().map(|&(_, size)| size as u64).sum();
                let mut offset = u64::from(offset) % total;
                for &(start, size) in &RAM {
                    if offset < size as u64 {
                        return start + offset;
                    }
                    offset -= size as u64;
                }
                unreachable!("offset was reduced modulo the total RAM size")
            }
            Addr::Raw(address) => address,
        }
    }
}

/// A descriptor length: usually small, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u16),
    Raw(u32),
}

impl Len {
    pub fn resolve(self) -> u32 {
        match self {
            Len::Small(len) => u32::from(len),
            Len::Raw(len) => len,
        }
    }
}

/// A descriptor table index: usually inside the table, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Index {
    InTable(u16),
    Raw(u16),
}

/// One buffer of a chain the guest links itself.
#[derive(Arbitrary, Debug, Clone)]
pub struct Buffer {
    pub addr: Addr,
    pub len: Len,
    /// VRING_DESC_F_WRITE / F_INDIRECT and garbage bits; F_NEXT is set by the chain.
    pub flags: u16,
}

/// What a guest can do to one of its queues.
#[derive(Arbitrary, Debug, Clone)]
pub enum QueueOp {
    /// Stores a raw descriptor (any flags, any next index) at a table slot.
    Descriptor {
        slot: u16,
        addr: Addr,
        len: Len,
        flags: u16,
        next: Index,
    },
    /// Links `buffers` at consecutive slots from `first` and makes the chain available.
    Chain { first: u16, buffers: Vec<Buffer> },
    /// Puts `head` in the next avail ring entry and bumps the avail index.
    Publish { head: Index },
    /// Sets the avail index to anything (running ahead of the ring, or backwards).
    AvailIdx(u16),
}

/// The guest side of a device's queues, in guest memory the device was activated with.
pub struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
    sizes: Vec<u16>,
    pub notify: Vec<Arc<EventFd>>,
    pub interrupt: Arc<Interrupt>,
}

pub fn guest_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = RAM
        .iter()
        .map(|&(start, size)| (GuestAddress(start), size))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("fixed guest RAM layout must map")
}

/// A queue size the driver may choose: a power of two up to `max`.
pub fn queue_size(choice: u8, max: u16) -> u16 {
    let size = 1u16 << (choice % 16);
    size.min(max)
}

impl<'m> Driver<'m> {
    /// Lays out one queue per entry of `sizes`; `activated_queues` hands them to the device.
    pub fn new(mem: &'m GuestMemoryMmap, sizes: &[u16]) -> Self {
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                MockSplitQueue::create(mem, GuestAddress(RINGS_BASE + i as u64 * RING_SLOT), size)
            })
            .collect();
        let notify = sizes
            .iter()
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")))
            .collect();
        Self {
            mem,
            queues,
            sizes: sizes.to_vec(),
            notify,
            interrupt: Arc::new(Interrupt::new().expect("interrupt eventfd")),
        }
    }

    pub fn activated_queues(&self) -> Vec<ActivatedQueue> {
        self.queues
            .iter()
            .zip(&self.notify)
            .map(|(vq, notify)| ActivatedQueue {
                queue: vq.create_queue::<Queue>().expect("mock queue is valid"),
                notify: notify.clone(),
            })
            .collect()
    }

    fn size(&self, queue: usize) -> u16 {
        self.sizes[queue]
    }

    fn index(&self, queue: usize, index: Index) -> u16 {
        match index {
            Index::InTable(i) => i % self.size(queue),
            Index::Raw(i) => i,
        }
    }

    /// Applies `op` to queue `queue % queue count`.
    pub fn apply(&self, queue: u8, op: &QueueOp) {
        let queue = usize::from(queue) % self.queues.len();
        let size = self.size(queue);
        let vq = &self.queues[queue];
        match op {
            QueueOp::Descriptor {
                slot,
                addr,
                len,
                flags,
                next,
            } => {
                let desc = Descriptor::new(
                    addr.resolve(),
                    len.resolve(),
                    *flags,
                    self.index(queue, *next),
                );
                let _ = vq
                    .desc_table()
                    .store(slot % size, RawDescriptor::from(desc));
            }
            QueueOp::Chain { first, buffers } => {
                if buffers.is_empty() {
                    return;
                }
                let first = first % size;
                let count = buffers.len().min(usize::from(size)) as u16;
                for (i, buffer) in buffers.iter().take(usize::from(count)).enumerate() {
                    let slot = (first + i as u16) % size;
                    let last = i + 1 == usize::from(count);
                    let (flags, next) = if last {
                        (buffer.flags & !(VRING_DESC_F_NEXT as u16), 0)
                    } else {
                        (buffer.flags | VRING_DESC_F_NEXT as u16, (slot + 1) % size)
                    };
                    let desc =
                        Descriptor::new(buffer.addr.resolve(), buffer.len.resolve(), flags, next);
                    let _ = vq.desc_table().store(slot, RawDescriptor::from(desc));
                }
                self.publish(queue, first);
            }
            QueueOp::Publish { head } => self.publish(queue, self.index(queue, *head)),
            QueueOp::AvailIdx(idx) => vq.avail().idx().store(*idx),
        }
    }

    fn publish(&self, queue: usize, head: u16) {
        let vq = &self.queues[queue];
        let idx = vq.avail().idx().load();
        let slot = usize::from(idx % self.size(queue));
        if let Ok(entry) = vq.avail().ring().ref_at(slot) {
            entry.store(head);
        }
        vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Writes `bytes` at `addr` (anything may be there: headers, rings, indirect tables); the
    /// part outside RAM is dropped, as a guest cannot write there.
    pub fn write(&self, addr: Addr, bytes: &[u8]) {
        let _ = self.mem.write(bytes, GuestAddress(addr.resolve()));
    }

    /// Makes a chain of one device-readable buffer holding `bytes` at `addr`, at slot `first`.
    pub fn readable_chain(&self, queue: u8, first: u16, addr: Addr, bytes: &[u8]) {
        self.write(addr, bytes);
        self.apply(
            queue,
            &QueueOp::Chain {
                first,
                buffers: vec![Buffer {
                    addr,
                    len: Len::Raw(bytes.len() as u32),
                    flags: 0,
                }],
            },
        );
    }

    /// The guest's queue notification (what its MMIO write to QueueNotify does via ioeventfd).
    pub fn kick(&self, queue: u8) {
        let queue = usize::from(queue) % self.notify.len();
        let _ = self.notify[queue].write(1);
    }
}

/// Runs the event loop with zero timeouts until nothing is pending. The guest cannot act while
/// it runs, so the device has finite work: still busy after 256 rounds means it spins (a guest
/// could pin a host core), which is a finding.
pub fn run_until_idle(manager: &mut Manager) {
    for _ in 0..256 {
        if manager.run_with_timeout(0).expect("epoll_wait") == 0 {
            return;
        }
    }
    panic!("the device's events are still pending after 256 rounds: it spins");
}
