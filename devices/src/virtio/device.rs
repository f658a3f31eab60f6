//! The contract between a virtio device model and its transport.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::Interrupt;
use crate::GuestMemoryMmap;

/// A virtqueue handed to a device when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivatedQueue {
    /// The queue as the driver configured it (size, ring addresses, event-idx negotiated).
    pub queue: Queue,
    /// Signalled whenever the driver notifies this queue (ioeventfd or a QueueNotify write that
    /// reached userspace). The transport owns the fd; it stays the same across resets, so a
    /// device can keep watching it.
    pub notify: Arc<EventFd>,
}

/// Why a device refused to activate. The transport answers with DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed a different number of queues than the device declared.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device declared.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// Activation without a reset in between.
    #[error("the device is already active")]
    AlreadyActive,
    /// The device could not wake its event loop.
    #[error("failed to signal the activation event: {0}")]
    Signal(#[source] std::io::Error),
}

/// A virtio device model behind a transport.
///
/// All methods are called with the device's mutex held, from the vCPU thread that took the
/// MMIO exit; queue processing happens elsewhere (the device's event-loop side), so `activate`
/// should only hand the queues over and wake that side, never process requests itself.
pub trait VirtioDevice {
    /// Virtio device ID (virtio 1.2 section 5), e.g. 4 for entropy.
    fn device_type(&self) -> u32;

    /// Maximum size of each queue, one entry per queue. Each must be a power of two no larger
    /// than 32768. The driver must set up every one of them before DRIVER_OK.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers. Must include `1 << VIRTIO_F_VERSION_1`.
    fn avail_features(&self) -> u64;

    /// The features the driver accepted (always a subset of [`Self::avail_features`]), told
    /// once when the driver sets FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);

    /// Reads device config space at `offset` (relative to the start of config space). Bytes
    /// outside the device's config space must be left as they are (the transport zeroes `data`
    /// first).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device config space at `offset`. Devices ignore writes to read-only fields.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the driver's queues (in declaration order). `interrupt` stays
    /// valid until [`Self::reset`].
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActivatedQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;

    /// Returns the device to its pre-activation state: drop the queues, the memory and the
    /// interrupt handle, forget acked features.
    fn reset(&mut self);

    /// Whether `activate` succeeded since the last reset.
    fn is_activated(&self) -> bool;

    /// The live state of the device's queues (ring positions included) while activated, for a
    /// snapshot; empty when not activated (the transport's registers are the whole story then).
    fn queue_states(&self) -> Vec<QueueState>;

    /// Called once the device was re-activated from a snapshot: whatever it held outside guest
    /// memory (host connections, in-flight work) is gone, and the guest must be told so.
    fn after_restore(&mut self) {}

    /// The device's live state in a few lines (queue positions, pending work, connections),
    /// for diagnosing a guest that stalled; empty when there is nothing beyond the transport's
    /// registers to tell.
    fn diagnostics(&self) -> String {
        String::new()
    }
}

/// Copies the bytes of a device's config space `config` at `offset` into `data`, leaving bytes
/// past its end as they are: what every [`VirtioDevice::read_config`] with a fixed config
/// structure does (a driver may read any width at any offset).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        if let Some(v) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
        {
            *b = *v;
        }
    }
}
