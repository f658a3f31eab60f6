//! A virtio-mmio transport's state in a snapshot: the driver-visible registers, each queue's
//! configuration and ring positions, and the interrupt status. Restoring it into a fresh
//! transport in front of a fresh device re-activates the device when the driver had (DRIVER_OK),
//! with the queues where the guest left them; the device is then told it was restored.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::{lock_device, MmioTransport};
use super::VirtioDevice;

/// virtio-queue's `QueueState`, which has no serde support, field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    /// Without DEVICE_NEEDS_RESET, which `needs_reset` carries.
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueSnapshot>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
}

impl MmioTransport {
    /// Read with the vCPUs parked (no register writes in flight) and the device's event loop
    /// idle between events: the ring positions are those of the last request served.
    pub fn save_state(&self) -> MmioTransportState {
        self.save_state_with(&*lock_device(&self.device))
    }

    /// [`Self::save_state`] with the device's lock already held by the caller (who keeps the
    /// device quiet while it also saves guest memory).
    pub fn save_state_with(&self, device: &(dyn VirtioDevice + Send)) -> MmioTransportState {
        let live = if device.is_activated() {
            device.queue_states()
        } else {
            Vec::new()
        };
        let queues = if live.len() == self.queues.len() {
            live.into_iter().map(QueueSnapshot::from).collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        MmioTransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
        }
    }

    /// Puts `state` into this fresh transport (and its device). The state is untrusted: a
    /// different device type or queue count, or queue values virtio-queue rejects, is an error.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), String> {
        if state.device_type != self.device_type {
            return Err(format!(
                "virtio-mmio state is for device type {}, this slot holds type {}",
                state.device_type, self.device_type
            ));
        }
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "virtio-mmio state of device type {} has {} queues, the device has {}",
                self.device_type,
                state.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(format!(
                    "device type {} queue {index}: saved maximum size {} differs from the \
                     device's {}",
                    self.device_type,
                    saved.max_size,
                    current.max_size()
                ));
            }
            let queue = Queue::try_from(QueueState::from(saved))
                .map_err(|e| format!("device type {} queue {index}: {e}", self.device_type))?;
            queues.push(queue);
        }
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features & self.device_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.restore(
            state.interrupt_status,
            state.config_generation,
            state.needs_reset,
        );
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            lock_device(&self.device).set_acked_features(self.driver_features);
        }
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !state.needs_reset {
            // `activate` hands the device copies of the queues, ring positions included.
            self.activate();
            let mut device = lock_device(&self.device);
            if !device.is_activated() {
                return Err(format!(
                    "device type {} could not be re-activated from the snapshot (see the log)",
                    self.device_type
                ));
            }
            device.after_restore();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::virtio::mmio::tests::{bring_up, read, transport, write};
    use crate::virtio::test_utils::DummyDevice;
    use virtio_bindings::virtio_mmio::{
        VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_SEL,
        VIRTIO_MMIO_STATUS,
    };

    #[test]
    fn activated_device_comes_back_active_with_its_ring_positions() {
        let (mut t, dev) = transport(DummyDevice::new(&[16, 8]));
        bring_up(&mut t);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        // The device has served requests since activation: its positions moved on.
        dev.lock().unwrap().state.live_queues[0].next_avail = 5;
        dev.lock().unwrap().state.live_queues[0].next_used = 4;
        let state = t.save_state();
        assert_eq!(state.queues[0].next_avail, 5);
        assert_eq!(state.queues[0].next_used, 4);

        let (mut restored, dev2) = transport(DummyDevice::new(&[16, 8]));
        restored.restore_state(&state).unwrap();
        let d = dev2.lock().unwrap();
        assert!(d.active);
        assert_eq!(d.state.restored, 1);
        assert_eq!(d.state.live_queues[0].next_avail, 5);
        assert_eq!(d.state.live_queues[0].next_used, 4);
        assert_eq!(d.state.live_queues[1].size, 8);
        assert!(d.state.acked_features.is_some());
        drop(d);
        assert_eq!(
            read(&mut restored, VIRTIO_MMIO_STATUS),
            read(&mut t, VIRTIO_MMIO_STATUS)
        );
        assert_eq!(
            read(&mut restored, VIRTIO_MMIO_QUEUE_NUM_MAX),
            8,
            "queue_sel kept"
        );
        assert_eq!(restored.save_state(), state);
    }

    #[test]
    fn untouched_device_stays_inactive() {
        let (t, _) = transport(DummyDevice::new(&[16]));
        let state = t.save_state();
        let (mut restored, dev) = transport(DummyDevice::new(&[16]));
        restored.restore_state(&state).unwrap();
        assert!(!dev.lock().unwrap().active);
        assert_eq!(dev.lock().unwrap().state.restored, 0);
        assert_eq!(read(&mut restored, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn mismatched_or_invalid_state_is_refused() {
        let (mut t, _) = transport(DummyDevice::new(&[16, 8]));
        bring_up(&mut t);
        let state = t.save_state();

        let (mut one_queue, _) = transport(DummyDevice::new(&[16]));
        let err = one_queue.restore_state(&state).unwrap_err();
        assert!(err.contains("2 queues"), "{err}");

        let mut bad = state.clone();
        bad.queues[0].size = 3; // not a power of two
        let (mut fresh, _) = transport(DummyDevice::new(&[16, 8]));
        assert!(fresh.restore_state(&bad).is_err());

        let mut other = state.clone();
        other.device_type = 99;
        let (mut fresh, _) = transport(DummyDevice::new(&[16, 8]));
        let err = fresh.restore_state(&other).unwrap_err();
        assert!(err.contains("device type 99"), "{err}");
    }
}
