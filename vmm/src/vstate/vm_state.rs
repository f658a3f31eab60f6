//! The VM-wide KVM state for a snapshot: the in-kernel interrupt controllers (PIC master and
//! slave, IOAPIC), the PIT and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("VM state: {what} failed: {source}")]
pub struct VmStateError {
    what: &'static str,
    source: kvm_ioctls::Error,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for KvmVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

fn get_chip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(err(what))?;
    Ok(chip)
}

impl KvmVmState {
    /// Read with every vCPU parked, so no interrupt is in flight between the pieces.
    pub fn save(fd: &VmFd) -> Result<Self, VmStateError> {
        Ok(Self {
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: fd.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: fd.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    /// Written to a VM that has its irqchip and PIT created and no vCPU running yet.
    pub fn restore(&self, fd: &VmFd) -> Result<(), VmStateError> {
        fd.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        // Only the clock value is meaningful to set: KVM_SET_CLOCK rejects flags it reports
        // on reads (TSC_STABLE, REALTIME without a realtime value) on some kernels.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        fd.set_irqchip(&self.pic_master)
            .map_err(err("KVM_SET_IRQCHIP (PIC master)"))?;
        fd.set_irqchip(&self.pic_slave)
            .map_err(err("KVM_SET_IRQCHIP (PIC slave)"))?;
        fd.set_irqchip(&self.ioapic)
            .map_err(err("KVM_SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}
