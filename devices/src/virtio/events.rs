//! Event-loop glue shared by virtio devices.
//!
//! A device is added to the VMM's `EventManager` at start-up, long before the driver configures
//! its queues. So in `init` it watches only an activation EventFd; `VirtioDevice::activate` (on
//! a vCPU thread) stores the queue EventFds here and signals that fd; the event loop then adds
//! the queue fds to its own epoll set. Epoll data carries a token: the queue index for queue
//! fds, [`ACTIVATE_TOKEN`] for the activation fd; devices pick other tokens for their own fds
//! (taps, sockets).
//!
//! The queue EventFds belong to the transport and live as long as it does, so once watched they
//! stay watched across resets; a kick that arrives while the device is inactive is drained and
//! dropped (level-triggered epoll would otherwise report it forever).

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Error;

/// Epoll data token of the activation EventFd.
pub const ACTIVATE_TOKEN: u32 = u32::MAX;

/// Activation EventFd plus the queue EventFds a device watches.
#[derive(Debug)]
pub struct DeviceEvents {
    activate: EventFd,
    pending: Option<Vec<Arc<EventFd>>>,
    /// Indexed by queue; `None` where watching failed.
    watched: Vec<Option<Arc<EventFd>>>,
}

impl DeviceEvents {
    /// Creates the activation EventFd.
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            activate: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            pending: None,
            watched: Vec::new(),
        })
    }

    /// From `MutEventSubscriber::init`: start watching the activation EventFd.
    pub fn init(&self, ops: &mut EventOps) {
        let events = Events::with_data(&self.activate, ACTIVATE_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("virtio: cannot watch the activation eventfd: {e}");
        }
    }

    /// From `VirtioDevice::activate`: remember the queue EventFds (in queue order) and wake the
    /// event loop so it starts watching them.
    pub fn activate(&mut self, queue_events: Vec<Arc<EventFd>>) -> Result<(), std::io::Error> {
        self.pending = Some(queue_events);
        self.activate.write(1)
    }

    /// From `MutEventSubscriber::process` for [`ACTIVATE_TOKEN`]: watch the queue EventFds
    /// handed over by the last activation (token = queue index).
    pub fn handle_activate(&mut self, ops: &mut EventOps) {
        // Non-blocking read: EAGAIN only means a second activation raced this one and its
        // count was already consumed, which is harmless.
        let _ = self.activate.read();
        let Some(pending) = self.pending.take() else {
            return;
        };
        if self.watched.len() < pending.len() {
            self.watched.resize(pending.len(), None);
        }
        for (index, evt) in pending.into_iter().enumerate() {
            if let Some(old) = &self.watched[index] {
                if Arc::ptr_eq(old, &evt) {
                    continue;
                }
                if let Err(e) = ops.remove(Events::empty(old.as_ref())) {
                    tracing::warn!("virtio: cannot stop watching queue {index}: {e}");
                }
                self.watched[index] = None;
            }
            let Ok(token) = u32::try_from(index) else {
                tracing::error!("virtio: queue index {index} does not fit an event token");
                continue;
            };
            match ops.add(Events::with_data(evt.as_ref(), token, EventSet::IN)) {
                Ok(()) => self.watched[index] = Some(evt),
                Err(e) => tracing::error!("virtio: cannot watch queue {index}: {e}"),
            }
        }
    }

    /// From `MutEventSubscriber::process` for a queue token: consumes the pending notification.
    /// Returns `false` if `token` is not a watched queue.
    pub fn drain_queue(&self, token: u32) -> bool {
        match self.watched.get(token as usize) {
            Some(Some(evt)) => {
                // EAGAIN means someone else already consumed the count; nothing to do.
                let _ = evt.read();
                true
            }
            _ => false,
        }
    }
}
