//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).
//!
//! One `MmioTransport` is one 4 KiB MMIO window in front of one device. Everything a guest
//! writes here is untrusted: accesses of the wrong size or alignment, unknown registers and
//! writes that the current device status does not allow are logged and ignored; configuration
//! the device cannot work with (bad queue sizes, misaligned or unmapped rings) puts the device
//! into DEVICE_NEEDS_RESET instead of activating it.

use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, info, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::log_throttle::{guest_warn, LogThrottle};
use super::{ActivatedQueue, Error, Interrupt, InterruptType, VirtioDevice};
use crate::GuestMemoryMmap;

/// Size of one device's MMIO window (the `4K` in the kernel command line).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Offset of the QueueNotify register: register each queue's notify EventFd as an ioeventfd at
/// `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch (4-byte access).
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// VendorID we report. Linux does not interpret it.
pub const VENDOR_ID: u32 = 0;

/// "virt" read as a little-endian u32.
const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Config space is accessed with at most 8-byte (two 4-byte, on Linux) accesses.
const MAX_CONFIG_ACCESS: usize = 8;
/// Shared memory length/base for a region that does not exist (virtio 1.2 4.2.2.1).
const NO_SHM_REGION: u32 = u32::MAX;

/// The kernel command-line argument that declares a device at `base` with interrupt `gsi`.
pub fn kernel_cmdline_device(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device=4K@0x{base:x}:{gsi}")
}

/// virtio-mmio register file and driver-status state machine for one device.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    pub(super) device: Arc<Mutex<dyn VirtioDevice + Send>>,
    // Constant for the device's lifetime; cached so identity and feature reads do not lock it.
    pub(super) device_type: u32,
    pub(super) device_features: u64,
    /// The queue registers as the driver wrote them; copies go to the device on activation.
    pub(super) queues: Vec<Queue>,
    queue_events: Vec<Arc<EventFd>>,
    pub(super) interrupt: Arc<Interrupt>,
    /// Status bits the driver set (DEVICE_NEEDS_RESET may be added by the transport).
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    /// Register accesses and writes the transport ignored (logged throttled).
    guest_faults: LogThrottle,
    /// Times the driver's configuration put the device into DEVICE_NEEDS_RESET.
    needs_reset_faults: LogThrottle,
}

pub(super) fn lock_device(
    device: &Mutex<dyn VirtioDevice + Send>,
) -> MutexGuard<'_, dyn VirtioDevice + Send + 'static> {
    // A poisoned lock means a device method panicked earlier; its state is whatever it was,
    // and refusing to talk to it would only turn one failure into a stuck vCPU.
    device.lock().unwrap_or_else(|poisoned| {
        warn!("virtio-mmio: device mutex was poisoned; continuing");
        poisoned.into_inner()
    })
}

impl MmioTransport {
    /// Builds the transport for `device`, creating one notify EventFd per queue and the
    /// interrupt EventFd. `mem` is used to validate queue addresses and is handed to the device
    /// on activation.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice + Send>>,
    ) -> Result<Self, Error> {
        let (device_type, device_features, max_sizes) = {
            let dev = lock_device(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if device_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::MissingVersion1);
        }
        if max_sizes.is_empty() {
            return Err(Error::NoQueues);
        }
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| Error::InvalidQueueMaxSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::EventFd)?;
        Ok(Self {
            mem,
            device,
            device_type,
            device_features,
            queues,
            queue_events,
            interrupt: Arc::new(Interrupt::new()?),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            guest_faults: LogThrottle::default(),
            needs_reset_faults: LogThrottle::default(),
        })
    }

    /// One EventFd per queue, with its index. The VMM registers each with KVM_IOEVENTFD at
    /// `base + QUEUE_NOTIFY_OFFSET`, datamatch = index (u32), so guest kicks skip userspace.
    pub fn queue_notify_events(&self) -> Vec<(u32, &EventFd)> {
        (0u32..)
            .zip(self.queue_events.iter())
            .map(|(index, evt)| (index, evt.as_ref()))
            .collect()
    }

    /// The interrupt line. The VMM registers it with KVM_IRQFD on the device's GSI.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event()
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice + Send>> {
        &self.device
    }

    /// Registers and interrupt state, then the device's own [`VirtioDevice::diagnostics`], one
    /// item per line. The device lock is only tried for `wait`.
    pub fn diagnostics(&self, wait: std::time::Duration) -> String {
        let mut out = format!(
            "status {:#x} interrupt_status {:#x} needs_reset {} queues {} guest_faults {} \
             needs_reset_faults {}",
            self.status(),
            self.interrupt.status(),
            self.interrupt.needs_reset(),
            self.queues.len(),
            self.guest_faults.count(),
            self.needs_reset_faults.count()
        );
        match super::diagnostics::try_lock_for(&*self.device, wait) {
            Some(device) => {
                for line in device.diagnostics().lines() {
                    out.push_str("\n  ");
                    out.push_str(line);
                }
            }
            None => out.push_str(&format!("\n  device lock held for more than {wait:?}")),
        }
        out
    }

    /// The Status register as the driver would read it.
    pub fn status(&self) -> u32 {
        let mut status = self.status;
        if self.interrupt.needs_reset() {
            status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        status
    }

    /// Whether all of `set` and none of `clear` are in the status.
    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.status() & (set | clear) == set
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_register(&self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => NO_SHM_REGION,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {reg:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, reg: u32, value: u32) {
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(reg, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            // No shared memory regions exist, so there is nothing to select.
            VIRTIO_MMIO_SHM_SEL => {}
            _ => guest_warn!(
                self.guest_faults,
                "virtio-mmio: write {value:#x} to read-only or unknown register {reg:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.status_is(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET,
        ) {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                self.status()
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                if value != 0 {
                    guest_warn!(self.guest_faults, "virtio-mmio: driver accepted {value:#x} in feature word {sel}, which offers none");
                }
                return;
            }
        };
        let offered = (self.device_features >> shift) as u32;
        if value & !offered != 0 {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: driver accepted features {:#x} (word {}) the device does not offer",
                value & !offered,
                self.driver_features_sel
            );
        }
        let accepted = u64::from(value & offered) << shift;
        self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | accepted;
    }

    fn write_queue_register(&mut self, reg: u32, value: u32) {
        let may_configure = self.status_is(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET,
        );
        let queue_sel = self.queue_sel;
        let Some(queue) = self.queues.get_mut(queue_sel as usize) else {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: write to register {reg:#x} of nonexistent queue {queue_sel}"
            );
            return;
        };
        if !may_configure {
            // Linux disables queues (QueueReady = 0) after resetting the device when it unbinds;
            // that is harmless in any state before DRIVER_OK.
            let harmless = reg == VIRTIO_MMIO_QUEUE_READY
                && value == 0
                && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
            if harmless {
                queue.set_ready(false);
            } else {
                guest_warn!(
                    self.guest_faults,
                    "virtio-mmio: queue register {reg:#x} write in status {:#x} ignored",
                    self.status
                );
            }
            return;
        }

        let set_low = |addr: u64| (addr & !0xffff_ffff) | u64::from(value);
        let set_high = |addr: u64| (addr & 0xffff_ffff) | (u64::from(value) << 32);
        let result = match reg {
            VIRTIO_MMIO_QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| queue.try_set_size(size)),
            VIRTIO_MMIO_QUEUE_READY => match value {
                0 | 1 => {
                    queue.set_ready(value == 1);
                    Ok(())
                }
                _ => {
                    guest_warn!(
                        self.guest_faults,
                        "virtio-mmio: QueueReady write of {value} ignored"
                    );
                    Ok(())
                }
            },
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                queue.try_set_desc_table_address(GuestAddress(set_low(queue.desc_table())))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(GuestAddress(set_high(queue.desc_table())))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                queue.try_set_avail_ring_address(GuestAddress(set_low(queue.avail_ring())))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                queue.try_set_avail_ring_address(GuestAddress(set_high(queue.avail_ring())))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                queue.try_set_used_ring_address(GuestAddress(set_low(queue.used_ring())))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                queue.try_set_used_ring_address(GuestAddress(set_high(queue.used_ring())))
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.enter_needs_reset(&format!(
                "queue {queue_sel}: register {reg:#x} value {value:#x}: {e}"
            ));
        }
    }

    fn notify_queue(&self, value: u32) {
        match self.queue_events.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => guest_warn!(
                self.guest_faults,
                "virtio-mmio: notification for nonexistent queue {value}"
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            info!(
                "virtio-mmio: driver marked device type {} FAILED",
                self.device_type
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if self.status() & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) != 0 {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: status write {value:#x} ignored until reset (status {:#x})",
                self.status()
            );
            return;
        }
        let current = self.status;
        if value & current != current {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: status write {value:#x} clears bits of {current:#x} without reset"
            );
            return;
        }
        let added = value & !current;
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
        const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
        const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
        match (current, added) {
            (_, 0) => {}
            (0, ACK) => self.status = ACK,
            (ACK, DRIVER) => self.status = ACK | DRIVER,
            (c, FEATURES_OK) if c == ACK | DRIVER => self.accept_features(),
            (c, DRIVER_OK) if c == ACK | DRIVER | FEATURES_OK => self.activate(),
            _ => guest_warn!(
                self.guest_faults,
                "virtio-mmio: invalid status transition {current:#x} -> {value:#x}"
            ),
        }
    }

    fn accept_features(&mut self) {
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            // Leaving FEATURES_OK clear is how the device refuses (virtio 1.2 3.1.1).
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused"
            );
            return;
        }
        lock_device(&self.device).set_acked_features(self.driver_features);
        self.status |= VIRTIO_CONFIG_S_FEATURES_OK;
    }

    pub(super) fn activate(&mut self) {
        self.status |= VIRTIO_CONFIG_S_DRIVER_OK;
        if let Some(index) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
            self.enter_needs_reset(&format!(
                "queue {index} is not ready or not within guest memory at DRIVER_OK"
            ));
            return;
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut activated = Vec::with_capacity(self.queues.len());
        for (queue, notify) in self.queues.iter().zip(&self.queue_events) {
            match Queue::try_from(queue.state()) {
                Ok(mut copy) => {
                    copy.set_event_idx(event_idx);
                    activated.push(ActivatedQueue {
                        queue: copy,
                        notify: notify.clone(),
                    });
                }
                Err(e) => {
                    self.enter_needs_reset(&format!("queue state rejected: {e}"));
                    return;
                }
            }
        }
        let result =
            lock_device(&self.device).activate(self.mem.clone(), activated, self.interrupt.clone());
        if let Err(e) = result {
            self.enter_needs_reset(&format!("activation failed: {e}"));
        }
    }

    /// The device cannot continue with what the driver configured.
    fn enter_needs_reset(&mut self, why: &str) {
        guest_warn!(
            self.needs_reset_faults,
            "virtio-mmio: device type {} needs reset: {why}",
            self.device_type
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        // Once DRIVER_OK is set the driver only looks at Status when told to (virtio 1.2 2.1.2).
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger(InterruptType::Config) {
                warn!("virtio-mmio: cannot raise config interrupt: {e}");
            }
        }
    }

    fn reset(&mut self) {
        lock_device(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if data.len() > MAX_CONFIG_ACCESS {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: {}-byte config read ignored",
                data.len()
            );
            return;
        }
        lock_device(&self.device).read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if data.len() > MAX_CONFIG_ACCESS {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: {}-byte config write ignored",
                data.len()
            );
            return;
        }
        if !self.status_is(
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET,
        ) {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: config write in status {:#x} ignored",
                self.status()
            );
            return;
        }
        lock_device(&self.device).write_config(offset, data);
    }
}

/// The register a control-area access targets, if it is a 4-byte aligned access (the only kind
/// the spec allows below the config space).
fn register_of(offset: u64, len: usize) -> Option<u32> {
    if len == 4 && offset.is_multiple_of(4) {
        u32::try_from(offset).ok()
    } else {
        None
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            self.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match register_of(offset, data.len()) {
            Some(reg) => data.copy_from_slice(&self.read_register(reg).to_le_bytes()),
            None => guest_warn!(
                self.guest_faults,
                "virtio-mmio: {}-byte read at {offset:#x} is not a register access",
                data.len()
            ),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let (Some(reg), Ok(bytes)) = (register_of(offset, data.len()), <[u8; 4]>::try_from(data))
        else {
            guest_warn!(
                self.guest_faults,
                "virtio-mmio: {}-byte write at {offset:#x} is not a register access",
                data.len()
            );
            return;
        };
        self.write_register(reg, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::virtio::test_utils::{
        guest_memory, DummyDevice, DUMMY_DEVICE_TYPE, DUMMY_FEATURES, MEM_SIZE,
    };

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
    const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    /// Ring layout used for queue `i`: 16 descriptors fit in 0x100 bytes.
    pub(crate) fn rings(i: u64) -> (u64, u64, u64) {
        let base = 0x10_000 + i * 0x1000;
        (base, base + 0x400, base + 0x800)
    }

    pub(crate) fn transport(dev: DummyDevice) -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(guest_memory(), dev.clone()).unwrap();
        (t, dev)
    }

    pub(crate) fn read(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut data = [0xffu8; 4];
        t.mmio_read(MmioAddress(0), u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    pub(crate) fn write(t: &mut MmioTransport, offset: u32, value: u32) {
        t.mmio_write(MmioAddress(0), u64::from(offset), &value.to_le_bytes());
    }

    fn add_status(t: &mut MmioTransport, bits: u32) {
        let status = read(t, VIRTIO_MMIO_STATUS);
        write(t, VIRTIO_MMIO_STATUS, status | bits);
    }

    fn write_features(t: &mut MmioTransport, features: u64) {
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK: the Linux probe order.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, VIRTIO_MMIO_STATUS, 0);
        add_status(t, ACK);
        add_status(t, DRIVER);
        write_features(t, features);
        add_status(t, FEATURES_OK);
    }

    fn setup_queue(
        t: &mut MmioTransport,
        index: u32,
        size: u32,
        (desc, avail, used): (u64, u64, u64),
    ) {
        write(t, VIRTIO_MMIO_QUEUE_SEL, index);
        write(t, VIRTIO_MMIO_QUEUE_NUM, size);
        write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        write(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        write(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        write(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        write(t, VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        write(t, VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// A driver bringing up all queues of a two-queue device, up to DRIVER_OK.
    pub(crate) fn bring_up(t: &mut MmioTransport) {
        negotiate(t, VERSION_1);
        setup_queue(t, 0, 16, rings(0));
        setup_queue(t, 1, 8, rings(1));
        add_status(t, DRIVER_OK);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport(DummyDevice::new(&[16]));
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_MAGIC_VALUE).to_le_bytes(),
            *b"virt"
        );
        assert_eq!(read(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_ID), DUMMY_DEVICE_TYPE);
        assert_eq!(read(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(read(&mut t, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
        assert_eq!(read(&mut t, VIRTIO_MMIO_SHM_BASE_LOW), u32::MAX);
        assert_eq!(read(&mut t, VIRTIO_MMIO_SHM_BASE_HIGH), u32::MAX);
    }

    #[test]
    fn device_features_are_read_in_two_halves() {
        let (mut t, _) = transport(DummyDevice::new(&[16]));
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            DUMMY_FEATURES as u32
        );
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            (DUMMY_FEATURES >> 32) as u32
        );
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn driver_features_are_negotiated_over_both_halves() {
        let (mut t, dev) = transport(DummyDevice::new(&[16]));
        // Accept everything offered plus bits that were not offered in both words.
        negotiate(&mut t, DUMMY_FEATURES | (1 << 3) | (1 << 50));
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER | FEATURES_OK);
        assert_eq!(
            dev.lock().unwrap().state.acked_features,
            Some(DUMMY_FEATURES)
        );
    }

    #[test]
    fn driver_features_of_one_half_leave_the_other() {
        let (mut t, dev) = transport(DummyDevice::new(&[16]));
        add_status(&mut t, ACK);
        add_status(&mut t, DRIVER);
        write_features(&mut t, DUMMY_FEATURES);
        // Rewrite only the low word, dropping bit 5.
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        // A third word does not exist; writing it changes nothing.
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        add_status(&mut t, FEATURES_OK);
        // VERSION_1 (bit 32) and bit 40 survive; FEATURES_OK therefore accepted.
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS) & FEATURES_OK, FEATURES_OK);
        assert_eq!(
            dev.lock().unwrap().state.acked_features,
            Some(VERSION_1 | (1 << 40))
        );
    }

    #[test]
    fn features_are_only_accepted_between_driver_and_features_ok() {
        let (mut t, dev) = transport(DummyDevice::new(&[16]));
        // Before DRIVER: ignored.
        add_status(&mut t, ACK);
        write_features(&mut t, DUMMY_FEATURES);
        add_status(&mut t, DRIVER);
        add_status(&mut t, FEATURES_OK);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_STATUS) & FEATURES_OK,
            0,
            "no VERSION_1 was accepted, so FEATURES_OK must be refused"
        );

        negotiate(&mut t, VERSION_1);
        // After FEATURES_OK: ignored.
        write_features(&mut t, DUMMY_FEATURES);
        assert_eq!(dev.lock().unwrap().state.acked_features, Some(VERSION_1));
        setup_queue(&mut t, 0, 16, rings(0));
        add_status(&mut t, DRIVER_OK);
        assert!(dev.lock().unwrap().active);
        assert!(
            !dev.lock().unwrap().state.activated_queues[0].4,
            "EVENT_IDX not negotiated"
        );
    }

    #[test]
    fn features_ok_requires_version_1() {
        let (mut t, dev) = transport(DummyDevice::new(&[16]));
        negotiate(&mut t, DUMMY_FEATURES & !VERSION_1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
        assert_eq!(dev.lock().unwrap().state.acked_features, None);
    }

    #[test]
    fn status_steps_must_come_in_order() {
        let (mut t, _) = transport(DummyDevice::new(&[16]));
        write(&mut t, VIRTIO_MMIO_STATUS, DRIVER);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        write(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0, "two steps at once");
        write(&mut t, VIRTIO_MMIO_STATUS, ACK);
        write(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER_OK);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK);
        write(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
        // Clearing a bit without a reset is not a thing.
        write(&mut t, VIRTIO_MMIO_STATUS, DRIVER);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
        // The driver may not set DEVICE_NEEDS_RESET itself.
        write(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER | NEEDS_RESET);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
        // Rewriting the current value is harmless.
        write(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
    }

    #[test]
    fn failed_sticks_until_reset() {
        let (mut t, dev) = transport(DummyDevice::new(&[16]));
        add_status(&mut t, ACK);
        add_status(&mut t, FAILED);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | FAILED);
        add_status(&mut t, DRIVER);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | FAILED);
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(dev.lock().unwrap().state.resets, 1);
    }

    #[test]
    fn queue_registers() {
        let (mut t, _) = transport(DummyDevice::new(&[16, 8]));
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        // Linux probes queues until QueueNumMax reads 0.
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);

        negotiate(&mut t, VERSION_1);
        setup_queue(&mut t, 1, 4, (0x1_2345_6780, 0x2_0000_0002, 0x3_0000_0004));
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        let q = &t.queues[1];
        assert_eq!(q.size(), 4);
        assert_eq!(q.desc_table(), 0x1_2345_6780);
        assert_eq!(q.avail_ring(), 0x2_0000_0002);
        assert_eq!(q.used_ring(), 0x3_0000_0004);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(t.queues[0].size(), 16, "untouched queue keeps its maximum");
    }

    #[test]
    fn queue_registers_are_read_only_outside_configuration() {
        let (mut t, _) = transport(DummyDevice::new(&[16, 8]));
        add_status(&mut t, ACK);
        add_status(&mut t, DRIVER);
        setup_queue(&mut t, 0, 4, rings(0));
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_QUEUE_READY),
            0,
            "before FEATURES_OK"
        );
        assert_eq!(t.queues[0].size(), 16);
        assert_eq!(t.queues[0].desc_table(), 0);

        bring_up(&mut t);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
        setup_queue(&mut t, 0, 4, (0x40_000, 0x40_400, 0x40_800));
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 1, "after DRIVER_OK");
        assert_eq!(t.queues[0].size(), 16);
        assert_eq!(t.queues[0].desc_table(), rings(0).0);
    }

    #[test]
    fn activation_hands_the_configured_queues_to_the_device() {
        let (mut t, dev) = transport(DummyDevice::new(&[16, 8]));
        negotiate(&mut t, VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX));
        setup_queue(&mut t, 0, 16, rings(0));
        setup_queue(&mut t, 1, 4, rings(1));
        assert!(!dev.lock().unwrap().active, "not before DRIVER_OK");
        add_status(&mut t, DRIVER_OK);

        assert_eq!(
            read(&mut t, VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
        let d = dev.lock().unwrap();
        assert_eq!(d.state.activations, 1);
        let (d0, a0, u0) = rings(0);
        let (d1, a1, u1) = rings(1);
        // EVENT_IDX was not offered, so it was masked out and stays off.
        assert_eq!(
            d.state.activated_queues,
            vec![(16, d0, a0, u0, false), (4, d1, a1, u1, false)]
        );
        // The device got the transport's own notify fds and interrupt.
        let fds: Vec<_> = t
            .queue_notify_events()
            .iter()
            .map(|(_, e)| e.as_raw_fd())
            .collect();
        let dev_fds: Vec<_> = d
            .state
            .notify_events
            .iter()
            .map(|e| e.as_raw_fd())
            .collect();
        assert_eq!(fds, dev_fds);
        assert!(Arc::ptr_eq(
            d.state.interrupt.as_ref().unwrap(),
            &t.interrupt
        ));
    }

    #[test]
    fn event_idx_reaches_the_queues_when_negotiated() {
        let mut dummy = DummyDevice::new(&[16]);
        dummy.features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        let (mut t, dev) = transport(dummy);
        negotiate(&mut t, VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX));
        setup_queue(&mut t, 0, 16, rings(0));
        add_status(&mut t, DRIVER_OK);
        assert!(dev.lock().unwrap().state.activated_queues[0].4);
    }

    #[test]
    fn activation_needs_every_queue_ready() {
        let (mut t, dev) = transport(DummyDevice::new(&[16, 8]));
        negotiate(&mut t, VERSION_1);
        setup_queue(&mut t, 0, 16, rings(0));
        add_status(&mut t, DRIVER_OK);

        assert!(!dev.lock().unwrap().active);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
        );
        // The driver learns about it through a config interrupt.
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(t.interrupt_event().read().unwrap(), 1);
    }

    #[test]
    fn activation_needs_rings_inside_guest_memory() {
        let end = MEM_SIZE as u64;
        for bad in [
            (end, 0x20_400, 0x20_800),
            (0x20_000, end - 2, 0x20_800),
            (0x20_000, 0x20_400, end - 8),
            (0x20_000, 0x20_400, 0xffff_ffff_ffff_f000),
        ] {
            let (mut t, dev) = transport(DummyDevice::new(&[16]));
            negotiate(&mut t, VERSION_1);
            setup_queue(&mut t, 0, 16, bad);
            add_status(&mut t, DRIVER_OK);
            assert!(!dev.lock().unwrap().active, "rings {bad:x?}");
            assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, NEEDS_RESET);
        }
    }

    #[test]
    fn failed_device_activation_needs_reset() {
        let mut dummy = DummyDevice::new(&[16]);
        dummy.fail_activation = true;
        let (mut t, _) = transport(dummy);
        negotiate(&mut t, VERSION_1);
        setup_queue(&mut t, 0, 16, rings(0));
        add_status(&mut t, DRIVER_OK);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, NEEDS_RESET);
    }

    #[test]
    fn invalid_queue_values_need_reset() {
        let cases: [(u32, u32); 6] = [
            (VIRTIO_MMIO_QUEUE_NUM, 12),           // not a power of two
            (VIRTIO_MMIO_QUEUE_NUM, 32),           // above QueueNumMax
            (VIRTIO_MMIO_QUEUE_NUM, 0x1_0000),     // does not even fit u16
            (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008),  // descriptors need 16-byte alignment
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1001), // available ring 2-byte
            (VIRTIO_MMIO_QUEUE_USED_LOW, 0x1002),  // used ring 4-byte
        ];
        for (reg, value) in cases {
            let (mut t, dev) = transport(DummyDevice::new(&[16]));
            negotiate(&mut t, VERSION_1);
            write(&mut t, reg, value);
            assert_eq!(
                read(&mut t, VIRTIO_MMIO_STATUS),
                ACK | DRIVER | FEATURES_OK | NEEDS_RESET,
                "register {reg:#x} value {value:#x}"
            );
            // Before DRIVER_OK there is no interrupt; the driver reads Status itself.
            assert_eq!(read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
            // Nothing more is accepted until a reset, which clears the condition.
            setup_queue(&mut t, 0, 16, rings(0));
            add_status(&mut t, DRIVER_OK);
            assert!(!dev.lock().unwrap().active);
            assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS) & DRIVER_OK, 0);
            negotiate(&mut t, VERSION_1);
            setup_queue(&mut t, 0, 16, rings(0));
            add_status(&mut t, DRIVER_OK);
            assert!(dev.lock().unwrap().active);
        }
    }

    #[test]
    fn reset_returns_everything_to_initial_state() {
        let (mut t, dev) = transport(DummyDevice::new(&[16, 8]));
        bring_up(&mut t);
        assert!(dev.lock().unwrap().active);
        t.interrupt.trigger(InterruptType::Vring).unwrap();
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        let resets_before = dev.lock().unwrap().state.resets;

        write(&mut t, VIRTIO_MMIO_STATUS, 0);

        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        {
            let d = dev.lock().unwrap();
            assert!(!d.active);
            assert_eq!(d.state.resets, resets_before + 1);
            assert!(d.state.interrupt.is_none());
        }
        for q in &t.queues {
            assert!(!q.ready());
            assert_eq!(q.size(), q.max_size());
            assert_eq!((q.desc_table(), q.avail_ring(), q.used_ring()), (0, 0, 0));
        }
        assert_eq!(t.driver_features, 0);
        assert_eq!(t.queue_sel, 0);

        // And the device can be brought up again, with the same notify fds.
        bring_up(&mut t);
        let d = dev.lock().unwrap();
        assert!(d.active);
        assert_eq!(d.state.activations, 2);
    }

    #[test]
    fn device_reported_error_shows_in_status_until_reset() {
        let (mut t, dev) = transport(DummyDevice::new(&[16, 8]));
        bring_up(&mut t);
        let irq = dev.lock().unwrap().state.interrupt.clone().unwrap();
        irq.signal_needs_reset().unwrap();
        let status = read(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
        write(&mut t, VIRTIO_MMIO_STATUS, status);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), status);
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn queue_notify_signals_that_queues_eventfd() {
        let (mut t, _) = transport(DummyDevice::new(&[16, 8]));
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        let events = t.queue_notify_events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].0, 0);
        assert_eq!(events[1].0, 1);
        assert!(events[0].1.read().is_err(), "queue 0 was not notified");
        assert_eq!(events[1].1.read().unwrap(), 2);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _) = transport(DummyDevice::new(&[16]));
        t.interrupt.trigger(InterruptType::Vring).unwrap();
        t.interrupt.trigger(InterruptType::Config).unwrap();
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(t.interrupt_event().read().unwrap(), 2);
        write(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        // InterruptStatus is read-only.
        write(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS, 0);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn config_generation_follows_config_changes() {
        let (mut t, _) = transport(DummyDevice::new(&[16]));
        assert_eq!(read(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        t.interrupt.signal_config_change().unwrap();
        assert_eq!(read(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    }

    #[test]
    fn config_space_passes_through_at_any_width() {
        let (mut t, dev) = transport(DummyDevice::new(&[16]));
        let mut one = [0u8; 1];
        t.mmio_read(MmioAddress(0), 0x103, &mut one);
        assert_eq!(one, [0xc3]);
        let mut eight = [0u8; 8];
        t.mmio_read(MmioAddress(0), 0x104, &mut eight);
        assert_eq!(eight, [0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb]);
        // Past the device's config space: zeros.
        let mut four = [0xffu8; 4];
        t.mmio_read(MmioAddress(0), 0x10e, &mut four);
        assert_eq!(four, [0xce, 0xcf, 0, 0]);

        // Config writes need DRIVER.
        t.mmio_write(MmioAddress(0), 0x102, &[1, 2]);
        add_status(&mut t, ACK);
        add_status(&mut t, DRIVER);
        t.mmio_write(MmioAddress(0), 0x102, &[3, 4]);
        assert_eq!(
            dev.lock().unwrap().state.config_writes,
            vec![(2, vec![3, 4])]
        );
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (mut t, dev) = transport(DummyDevice::new(&[16]));
        // Reads that are not 4-byte aligned 4-byte accesses return zeros.
        for (offset, len) in [(0u64, 1usize), (0, 2), (0, 8), (2, 4), (0x71, 4), (0xff, 1)] {
            let mut data = vec![0xaa; len];
            t.mmio_read(MmioAddress(0), offset, &mut data);
            assert_eq!(data, vec![0; len], "read at {offset:#x}, {len} bytes");
        }
        // Writes of that kind change nothing.
        t.mmio_write(MmioAddress(0), 0x70, &[1]);
        t.mmio_write(MmioAddress(0), 0x70, &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.mmio_write(MmioAddress(0), 0x72, &[1, 0, 0, 0]);
        t.mmio_write(MmioAddress(0), 0x70, &[]);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        // Unknown and write-only registers read as zero; unknown and read-only ones ignore writes.
        assert_eq!(read(&mut t, 0xc0), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
        write(&mut t, VIRTIO_MMIO_MAGIC_VALUE, 0);
        write(&mut t, VIRTIO_MMIO_DEVICE_ID, 0);
        write(&mut t, 0xc4, 0xdead);
        assert_eq!(read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_ID), DUMMY_DEVICE_TYPE);
        // Oversized and empty config accesses, offsets at the end of the address space.
        let mut big = [0xaau8; 16];
        t.mmio_read(MmioAddress(0), 0x100, &mut big);
        assert_eq!(big, [0; 16]);
        t.mmio_read(MmioAddress(0), 0x100, &mut []);
        t.mmio_read(MmioAddress(0), u64::MAX, &mut [0u8; 4]);
        t.mmio_write(MmioAddress(0), u64::MAX, &[0u8; 4]);
        // Queue registers of a queue that does not exist.
        negotiate(&mut t, VERSION_1);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, u32::MAX);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER | FEATURES_OK);
        assert!(dev.lock().unwrap().state.config_writes.is_empty());
    }

    /// A guest writing garbage everywhere must never bring the VMM down, and the identity
    /// registers must keep their values.
    #[test]
    fn random_register_traffic_never_panics() {
        let (mut t, _) = transport(DummyDevice::new(&[16, 8]));
        // xorshift64: deterministic, so a failure reproduces.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let r = next();
            let offset = match r % 4 {
                0 => next() % 0x200,
                1 => (next() % 0x40) * 4,
                2 => u64::from(VIRTIO_MMIO_STATUS),
                _ => next() % 0x1000,
            };
            let len = [1usize, 2, 4, 4, 4, 8][(next() % 6) as usize];
            let value = match next() % 3 {
                0 => next() % 16,
                1 => next() % 256,
                _ => next(),
            };
            if next() % 2 == 0 {
                t.mmio_write(MmioAddress(0), offset, &value.to_le_bytes()[..len]);
            } else {
                let mut data = vec![0u8; len];
                t.mmio_read(MmioAddress(0), offset, &mut data);
            }
        }
        assert_eq!(read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(read(&mut t, VIRTIO_MMIO_VERSION), 2);
        // After all that, an orderly bring-up still works.
        bring_up(&mut t);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
    }

    #[test]
    fn poisoned_device_lock_does_not_stop_the_transport() {
        let (mut t, dev) = transport(DummyDevice::new(&[16, 8]));
        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(dev.is_poisoned());
        bring_up(&mut t);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS) & DRIVER_OK, DRIVER_OK);
    }

    #[test]
    fn construction_rejects_unusable_devices() {
        let mut no_v1 = DummyDevice::new(&[16]);
        no_v1.features &= !VERSION_1;
        let make = |d: DummyDevice| MmioTransport::new(guest_memory(), Arc::new(Mutex::new(d)));
        assert!(matches!(make(no_v1), Err(Error::MissingVersion1)));
        assert!(matches!(make(DummyDevice::new(&[])), Err(Error::NoQueues)));
        assert!(matches!(
            make(DummyDevice::new(&[16, 12])),
            Err(Error::InvalidQueueMaxSize { index: 1, size: 12 })
        ));
        assert!(matches!(
            make(DummyDevice::new(&[0])),
            Err(Error::InvalidQueueMaxSize { index: 0, size: 0 })
        ));
    }

    #[test]
    fn transport_can_live_on_a_shared_bus() {
        fn assert_send<T: Send>() {}
        assert_send::<MmioTransport>();
    }

    #[test]
    fn kernel_cmdline_fragment() {
        assert_eq!(
            kernel_cmdline_device(0xd000_1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
