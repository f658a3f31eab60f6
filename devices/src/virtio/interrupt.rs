//! How a device gets the driver's attention.
//!
//! virtio-mmio has one interrupt line per device plus an InterruptStatus register saying why it
//! fired. The line is an EventFd the VMM registers with KVM_IRQFD, so raising it never leaves
//! the event-loop thread. The status bits live here (not in the transport) because the device
//! sets them from the event loop while the transport reads and acknowledges them from a vCPU.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Error;

/// The reason for an interrupt, as reported in InterruptStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptType {
    /// The device used buffers in at least one queue.
    Vring,
    /// The device configuration space changed (or the device needs a reset).
    Config,
}

impl InterruptType {
    fn status_bit(self) -> u32 {
        match self {
            InterruptType::Vring => VIRTIO_MMIO_INT_VRING,
            InterruptType::Config => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// The interrupt line, InterruptStatus, ConfigGeneration and the device-side error flag of one
/// virtio-mmio device. Created by the transport, shared with the device while it is active.
#[derive(Debug)]
pub struct Interrupt {
    event: EventFd,
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// Creates an interrupt with a fresh (non-blocking) EventFd and no pending status.
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            event: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        })
    }

    /// Sets the status bit for `kind` and raises the line.
    pub fn trigger(&self, kind: InterruptType) -> Result<(), Error> {
        // The bit must be visible before the guest's handler runs and reads InterruptStatus.
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        self.event.write(1).map_err(Error::Signal)
    }

    /// Announces a config-space change: bumps ConfigGeneration so the driver re-reads, then
    /// raises a config interrupt.
    pub fn signal_config_change(&self) -> Result<(), Error> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.trigger(InterruptType::Config)
    }

    /// Reports that the device hit an error it cannot recover from without a reset (for
    /// example a malformed ring). The transport shows DEVICE_NEEDS_RESET in Status.
    pub fn signal_needs_reset(&self) -> Result<(), Error> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.trigger(InterruptType::Config)
    }

    /// The EventFd to register with KVM_IRQFD.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Current ConfigGeneration value.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: nothing pending, no error. ConfigGeneration keeps counting so a driver can
    /// never see an old generation value paired with new contents.
    /// Puts back the status a snapshot recorded (the line itself is level state in the irqchip,
    /// restored with it).
    pub(crate) fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_status_and_raises_line() {
        let irq = Interrupt::new().unwrap();
        assert!(irq.event().read().is_err(), "line must start low");
        irq.trigger(InterruptType::Vring).unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.event().read().unwrap(), 1);

        irq.trigger(InterruptType::Config).unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);

        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn config_change_bumps_generation() {
        let irq = Interrupt::new().unwrap();
        irq.signal_config_change().unwrap();
        irq.signal_config_change().unwrap();
        assert_eq!(irq.config_generation(), 2);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.event().read().unwrap(), 2);
    }

    #[test]
    fn reset_clears_status_and_error_but_not_generation() {
        let irq = Interrupt::new().unwrap();
        irq.signal_config_change().unwrap();
        irq.signal_needs_reset().unwrap();
        assert!(irq.needs_reset());
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
        assert_eq!(irq.config_generation(), 1);
    }
}
