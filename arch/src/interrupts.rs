//! LAPIC local interrupt pins as PC firmware leaves them: LINT0 in ExtINT mode (the 8259 PIC's
//! output, carrying the PIT timer before the IOAPIC is set up) and LINT1 in NMI mode.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use crate::{kvm_err, Result};

/// Offset of the LVT LINT0 register in the LAPIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the LAPIC register page.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode NMI (LVT bits 10:8).
pub const APIC_MODE_NMI: u32 = 0b100;
/// Delivery mode ExtINT (LVT bits 10:8).
pub const APIC_MODE_EXTINT: u32 = 0b111;

const DELIVERY_MODE_MASK: u32 = 0x700;

/// Reads the 32-bit LAPIC register at `offset`.
pub fn get_klapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

/// Writes the 32-bit LAPIC register at `offset`.
pub fn set_klapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as std::os::raw::c_char;
    }
}

/// `lvt` with its delivery mode replaced by `mode`.
pub fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !DELIVERY_MODE_MASK) | ((mode << 8) & DELIVERY_MODE_MASK)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in `lapic`. Mask bits and everything else are kept: KVM
/// resets the BSP's LINT0 unmasked and the APs' masked, as firmware leaves them.
pub fn configure_lint(lapic: &mut kvm_lapic_state) {
    let lint0 = get_klapic_reg(lapic, APIC_LVT0);
    set_klapic_reg(
        lapic,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = get_klapic_reg(lapic, APIC_LVT1);
    set_klapic_reg(lapic, APIC_LVT1, with_delivery_mode(lint1, APIC_MODE_NMI));
}

/// Applies [`configure_lint`] to the vCPU's in-kernel LAPIC (requires KVM_CREATE_IRQCHIP).
pub fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    configure_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trip() {
        let mut l = kvm_lapic_state::default();
        set_klapic_reg(&mut l, 0x20, 0xdead_beef);
        assert_eq!(get_klapic_reg(&l, 0x20), 0xdead_beef);
        // Little-endian in the register page.
        assert_eq!(l.regs[0x20] as u8, 0xef);
        assert_eq!(l.regs[0x23] as u8, 0xde);
        assert_eq!(get_klapic_reg(&l, 0x24), 0);
    }

    #[test]
    fn delivery_modes_replaced_mask_kept() {
        let mut l = kvm_lapic_state::default();
        // LINT0 masked fixed mode with vector 0x30, LINT1 unmasked SMI mode.
        set_klapic_reg(&mut l, APIC_LVT0, 0x0001_0030);
        set_klapic_reg(&mut l, APIC_LVT1, 0x0000_0200);
        configure_lint(&mut l);
        assert_eq!(get_klapic_reg(&l, APIC_LVT0), 0x0001_0730);
        assert_eq!(get_klapic_reg(&l, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn delivery_mode_bits() {
        assert_eq!(with_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
        assert_eq!(with_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }
}
