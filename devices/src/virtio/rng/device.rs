//! The virtio-entropy device model.

use std::sync::Arc;

use tracing::{error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{EntropySource, GetRandom, RequestHandler};
use crate::virtio::{
    ActivateError, ActivatedQueue, DeviceEvents, Error, Interrupt, InterruptType, VirtioDevice,
};
use crate::GuestMemoryMmap;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// What an activated device works with.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    notify: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
    /// The ring turned out unusable; nothing more is served until the driver resets.
    broken: bool,
}

/// A virtio-entropy device. Share one `Arc<Mutex<Rng>>` between the event manager (as
/// `dyn MutEventSubscriber + Send`) and its [`MmioTransport`](crate::virtio::MmioTransport) (as
/// `dyn VirtioDevice + Send`).
#[derive(Debug)]
pub struct Rng {
    acked_features: u64,
    handler: RequestHandler,
    pub(super) events: DeviceEvents,
    active: Option<Active>,
}

impl Rng {
    /// A device serving bytes from getrandom(2).
    pub fn new() -> Result<Self, Error> {
        Self::with_source(Box::new(GetRandom))
    }

    /// A device serving bytes from `source`.
    pub fn with_source(source: Box<dyn EntropySource>) -> Result<Self, Error> {
        Ok(Self {
            acked_features: 0,
            handler: RequestHandler::new(source),
            events: DeviceEvents::new()?,
            active: None,
        })
    }

    /// Features the driver accepted (0 until FEATURES_OK, and again after a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Serves whatever the driver has queued; called when the queue's EventFd fires.
    pub(super) fn process_requests(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        match self.handler.process_queue(&active.mem, &mut active.queue) {
            Ok(outcome) => {
                if outcome.notify {
                    if let Err(e) = active.interrupt.trigger(InterruptType::Vring) {
                        error!("virtio-rng: cannot raise interrupt: {e}");
                    }
                }
                // Come back after the event loop has served others; the driver will not kick
                // for requests it already queued.
                if outcome.more {
                    if let Err(e) = active.notify.write(1) {
                        error!("virtio-rng: cannot reschedule queue processing: {e}");
                    }
                }
            }
            Err(e) => {
                warn!("virtio-rng: request queue unusable, device needs reset: {e}");
                active.broken = true;
                if let Err(e) = active.interrupt.signal_needs_reset() {
                    error!("virtio-rng: cannot raise interrupt: {e}");
                }
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
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

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {
        // virtio-entropy has no configuration space.
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-rng: {}-byte config write at {offset:#x} ignored (no config space)",
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
        let got = queues.len();
        let Ok([ActivatedQueue { queue, notify }]) = <[ActivatedQueue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.events
            .activate(vec![notify.clone()])
            .map_err(ActivateError::Signal)?;
        self.active = Some(Active {
            mem,
            queue,
            notify,
            interrupt,
            broken: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .map(|active| active.queue.state())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::guest_memory;
    use virtio_queue::QueueT;

    fn queue() -> ActivatedQueue {
        ActivatedQueue {
            queue: Queue::new(QUEUE_SIZE).unwrap(),
            notify: Arc::new(EventFd::new(0).unwrap()),
        }
    }

    fn interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new().unwrap())
    }

    #[test]
    fn identity() {
        let rng = Rng::new().unwrap();
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), &[256]);
        assert_eq!(rng.avail_features(), 1 << 32);
        let mut config = [0x5au8; 4];
        rng.read_config(0, &mut config);
        assert_eq!(config, [0x5a; 4], "no config space: bytes are left alone");
    }

    #[test]
    fn acked_features_are_masked_and_forgotten_on_reset() {
        let mut rng = Rng::new().unwrap();
        rng.set_acked_features(u64::MAX);
        assert_eq!(rng.acked_features(), 1 << 32);
        rng.reset();
        assert_eq!(rng.acked_features(), 0);
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let mut rng = Rng::new().unwrap();
        let none = rng.activate(guest_memory(), vec![], interrupt());
        assert!(matches!(
            none,
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
        let two = rng.activate(guest_memory(), vec![queue(), queue()], interrupt());
        assert!(matches!(
            two,
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 2
            })
        ));
        assert!(!rng.is_activated());
    }

    #[test]
    fn activation_happens_once_per_reset() {
        let mut rng = Rng::new().unwrap();
        rng.activate(guest_memory(), vec![queue()], interrupt())
            .unwrap();
        assert!(rng.is_activated());
        let again = rng.activate(guest_memory(), vec![queue()], interrupt());
        assert!(matches!(again, Err(ActivateError::AlreadyActive)));
        rng.reset();
        assert!(!rng.is_activated());
        rng.activate(guest_memory(), vec![queue()], interrupt())
            .unwrap();
        assert!(rng.is_activated());
    }
}
