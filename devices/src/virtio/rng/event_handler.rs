//! The virtio-entropy device's event-loop side.

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::warn;

use super::device::Rng;
use crate::virtio::ACTIVATE_TOKEN;

/// Epoll token of the request queue's notify EventFd (its queue index).
const REQUEST_QUEUE_TOKEN: u32 = 0;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_TOKEN => self.events.handle_activate(ops),
            REQUEST_QUEUE_TOKEN => {
                if self.events.drain_queue(REQUEST_QUEUE_TOKEN) {
                    self.process_requests();
                }
            }
            token => warn!("virtio-rng: event for unknown token {token}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    use virtio_bindings::virtio_mmio::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_device::bus::MmioAddress;
    use vm_device::MutDeviceMmio;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::rng::MAX_REQUEST_BYTES;
    use crate::virtio::test_utils::{add_chain, guest_memory, read_used, CountingSource, WO};
    use crate::virtio::{MmioTransport, VirtioDevice};
    use crate::GuestMemoryMmap;

    type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    const STATUS_RUNNING: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;

    /// The VMM's view: a device shared by the event manager and its transport.
    struct Vm {
        mem: GuestMemoryMmap,
        manager: Manager,
        transport: MmioTransport,
    }

    impl Vm {
        fn new() -> (Self, Arc<Mutex<Rng>>) {
            let mem = guest_memory();
            let rng = Arc::new(Mutex::new(
                Rng::with_source(Box::new(CountingSource::default())).unwrap(),
            ));
            let mut manager = Manager::new().unwrap();
            manager.add_subscriber(rng.clone());
            let transport = MmioTransport::new(mem.clone(), rng.clone()).unwrap();
            (
                Self {
                    mem,
                    manager,
                    transport,
                },
                rng,
            )
        }

        fn read(&mut self, reg: u32) -> u32 {
            let mut data = [0u8; 4];
            self.transport
                .mmio_read(MmioAddress(0), u64::from(reg), &mut data);
            u32::from_le_bytes(data)
        }

        fn write(&mut self, reg: u32, value: u32) {
            self.transport
                .mmio_write(MmioAddress(0), u64::from(reg), &value.to_le_bytes());
        }

        /// What Linux's virtio_mmio + virtio-rng drivers do at probe time.
        fn driver_probe(&mut self, vq: &MockSplitQueue<GuestMemoryMmap>, size: u16) {
            self.write(VIRTIO_MMIO_STATUS, 0);
            for bit in [VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER] {
                let status = self.read(VIRTIO_MMIO_STATUS);
                self.write(VIRTIO_MMIO_STATUS, status | bit);
            }
            self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
            let high = self.read(VIRTIO_MMIO_DEVICE_FEATURES);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES, high);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES, 0);
            let status = self.read(VIRTIO_MMIO_STATUS);
            self.write(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
            assert_ne!(
                self.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
                0
            );

            self.write(VIRTIO_MMIO_QUEUE_SEL, 0);
            assert_eq!(self.read(VIRTIO_MMIO_QUEUE_READY), 0);
            assert_eq!(self.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
            self.write(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
            let regs = [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr().0),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr().0),
                (VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr().0),
            ];
            for (low, addr) in regs {
                self.write(low, addr as u32);
                self.write(low + 4, (addr >> 32) as u32);
            }
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
            let status = self.read(VIRTIO_MMIO_STATUS);
            self.write(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
        }

        /// Dispatches events until none is pending. Every wait has a zero timeout, so this
        /// never blocks; a device that keeps an fd permanently readable fails the bound.
        fn run_pending(&mut self) {
            for _ in 0..16 {
                if self.manager.run_with_timeout(0).unwrap() == 0 {
                    return;
                }
            }
            panic!("events still pending after 16 rounds: something is spinning");
        }

        /// Drains the interrupt line; returns how many times it was raised.
        fn take_interrupts(&self) -> u64 {
            self.transport.interrupt_event().read().unwrap_or(0)
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }
    }

    #[test]
    fn serves_a_request_end_to_end_through_the_transport() {
        let (mut vm, rng) = Vm::new();
        let mem = vm.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        vm.driver_probe(&vq, 16);
        assert_eq!(vm.read(VIRTIO_MMIO_STATUS), STATUS_RUNNING);
        assert!(rng.lock().unwrap().is_activated());

        add_chain(&vq, 0, &[(0x10_000, 48, WO), (0x11_000, 16, WO)]);
        // A kick that reaches userspace (no ioeventfd registered in this test).
        vm.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        vm.run_pending();

        assert_eq!(read_used(&vq), vec![(0, 64)]);
        let expected: Vec<u8> = (0u8..64).collect();
        assert_eq!(vm.bytes(0x10_000, 48), expected[..48]);
        assert_eq!(vm.bytes(0x11_000, 16), expected[48..]);
        assert_eq!(vm.take_interrupts(), 1);
        assert_eq!(vm.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        vm.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(vm.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // A second request, kicked through the eventfd as KVM's ioeventfd would.
        add_chain(&vq, 2, &[(0x12_000, 8, WO)]);
        vm.transport.queue_notify_events()[0].1.write(1).unwrap();
        vm.run_pending();
        assert_eq!(read_used(&vq), vec![(0, 64), (2, 8)]);
        assert_eq!(vm.bytes(0x12_000, 8), (64u8..72).collect::<Vec<_>>());
        assert_eq!(vm.take_interrupts(), 1);
    }

    #[test]
    fn without_a_kick_nothing_is_served() {
        let (mut vm, _) = Vm::new();
        let mem = vm.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        vm.driver_probe(&vq, 16);
        add_chain(&vq, 0, &[(0x10_000, 8, WO)]);
        vm.run_pending();
        assert!(read_used(&vq).is_empty());
        assert_eq!(vm.take_interrupts(), 0);
    }

    #[test]
    fn large_backlogs_are_served_across_event_loop_rounds() {
        let (mut vm, _) = Vm::new();
        let mem = vm.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 32);
        vm.driver_probe(&vq, 32);
        for i in 0..20u16 {
            let addr = 0x100_000 + u64::from(i) * 0x10_000;
            add_chain(&vq, i, &[(addr, MAX_REQUEST_BYTES, WO)]);
        }
        vm.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        vm.run_pending();

        let used = read_used(&vq);
        assert_eq!(used.len(), 20);
        assert!(used.iter().all(|&(_, len)| len == MAX_REQUEST_BYTES));
        // One interrupt per pass: the first pass stopped at its 1 MiB budget.
        assert_eq!(vm.take_interrupts(), 2);
    }

    #[test]
    fn kicks_after_reset_are_dropped_and_reactivation_works() {
        let (mut vm, rng) = Vm::new();
        let mem = vm.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        vm.driver_probe(&vq, 16);
        vm.run_pending();

        vm.write(VIRTIO_MMIO_STATUS, 0);
        assert!(!rng.lock().unwrap().is_activated());
        add_chain(&vq, 0, &[(0x10_000, 8, WO)]);
        vm.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        // The stale kick must be consumed, not left to spin the event loop.
        vm.run_pending();
        assert!(read_used(&vq).is_empty());
        assert_eq!(vm.take_interrupts(), 0);

        // The driver comes back with a fresh ring elsewhere.
        let vq2 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        vm.driver_probe(&vq2, 16);
        assert_eq!(vm.read(VIRTIO_MMIO_STATUS), STATUS_RUNNING);
        add_chain(&vq2, 0, &[(0x20_000, 4, WO)]);
        vm.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        vm.run_pending();
        assert_eq!(read_used(&vq2), vec![(0, 4)]);
        assert_eq!(vm.take_interrupts(), 1);
    }

    #[test]
    fn a_corrupt_ring_makes_the_device_ask_for_reset() {
        let (mut vm, _) = Vm::new();
        let mem = vm.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        vm.driver_probe(&vq, 16);
        vm.run_pending();

        // The driver claims 17 new entries in a 16-entry ring.
        vq.avail().idx().store(17);
        vm.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        vm.run_pending();

        assert_eq!(
            vm.read(VIRTIO_MMIO_STATUS),
            STATUS_RUNNING | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(
            vm.read(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(vm.take_interrupts(), 1);
        // Further kicks are ignored rather than re-reported.
        vm.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        vm.run_pending();
        assert_eq!(vm.take_interrupts(), 0);
        // A reset clears the condition.
        vm.write(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(vm.read(VIRTIO_MMIO_STATUS), 0);
    }
}
