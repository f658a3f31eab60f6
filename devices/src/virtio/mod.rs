//! Virtio devices on the virtio-mmio transport (virtio 1.2, modern interface only).
//!
//! The pieces, and who calls them:
//! - [`VirtioDevice`] (device.rs): what a device model implements. The transport calls it from the
//!   vCPU thread that took the MMIO exit.
//! - [`MmioTransport`] (mmio.rs): the virtio-mmio register file in front of one device. The VMM puts
//!   it on the MMIO bus, registers [`MmioTransport::queue_notify_events`] as ioeventfds and
//!   [`MmioTransport::interrupt_event`] as an irqfd.
//! - [`Interrupt`] (interrupt.rs): the device's way to raise the interrupt line and the
//!   InterruptStatus bits, shared between transport and an activated device.
//! - [`DeviceEvents`] (events.rs): event-loop glue; a device that is also an
//!   `event_manager::MutEventSubscriber` uses it to start watching its queue EventFds once activated.
//! - [`rng`]: virtio-entropy, the first device.
//! - [`vsock`]: virtio-vsock with a Unix socket backend (hybrid vsock).
//! - [`net`]: virtio-net over a frame fd (the egress filter's socketpair or a tap).
//!
//! Wiring one device `i` (what the VMM does):
//! ```text
//! let rng = Arc::new(Mutex::new(Rng::new()?));
//! event_manager.add_subscriber(rng.clone());                   // as dyn MutEventSubscriber + Send
//! let transport = MmioTransport::new(mem.clone(), rng)?;        // as dyn VirtioDevice + Send
//! let base = MMIO_BASE + i * MMIO_WINDOW_SIZE; let gsi = 5 + i;
//! for (queue, evt) in transport.queue_notify_events() {
//!     vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), queue)?;
//! }
//! vm.register_irqfd(transport.interrupt_event(), gsi)?;
//! mmio_bus.register(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)));
//! cmdline.push(kernel_cmdline_device(base, gsi));
//! ```

mod device;
pub mod diagnostics;
mod events;
mod interrupt;
mod log_throttle;
mod mmio;
mod mmio_persist;
pub mod net;
pub mod rng;
pub mod vsock;

pub use device::{read_config_bytes, ActivateError, ActivatedQueue, VirtioDevice};
pub use events::{DeviceEvents, ACTIVATE_TOKEN};
pub use interrupt::{Interrupt, InterruptType};
pub use mmio::{
    kernel_cmdline_device, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET, VENDOR_ID,
};
pub use mmio_persist::{MmioTransportState, QueueSnapshot};

use std::io;

/// Errors building the virtio plumbing (the guest never causes these: guest mistakes are
/// logged and answered through the device status, not returned).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An EventFd could not be created.
    #[error("failed to create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// Writing an EventFd (interrupt or activation) failed.
    #[error("failed to signal an eventfd: {0}")]
    Signal(#[source] io::Error),
    /// The device declared a queue maximum size the virtio spec forbids.
    #[error("queue {index} has invalid maximum size {size} (must be a power of two, 1..=32768)")]
    InvalidQueueMaxSize {
        /// Index of the queue.
        index: usize,
        /// The declared maximum size.
        size: u16,
    },
    /// The device declared no queues at all.
    #[error("the device declares no virtqueues")]
    NoQueues,
    /// The device does not offer VIRTIO_F_VERSION_1, which virtio-mmio version 2 requires.
    #[error("the device does not offer VIRTIO_F_VERSION_1")]
    MissingVersion1,
}

#[cfg(test)]
pub(crate) mod test_utils;
