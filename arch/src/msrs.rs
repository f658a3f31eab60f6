//! Model-specific registers set before the first instruction.
//!
//! The syscall MSRs are zeroed so nothing stale from a previous boot of the vCPU survives, the
//! TSC starts at 0, fast string operations are enabled as firmware does, and the MTRRs are
//! switched on with write-back as the default type: with MTRRs disabled all memory is uncacheable
//! to a guest that honours them, and Linux would run its boot uncached.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::{kvm_err, Error, Result};

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// STAR: SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR: 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR: compatibility-mode SYSCALL entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SFMASK: RFLAGS bits cleared by SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE: the value SWAPGS exchanges with GS.base.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-string operations (REP MOVS/STOS) enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back, used as the MTRR default type.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The boot MSRs and their values, in the order they are written.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes [`boot_msr_entries`]; an error if KVM does not accept every one of them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|source| Error::FamStruct {
        what: "MSR",
        source,
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    // KVM stops at the first MSR it refuses and returns how many it wrote before it.
    if written != entries.len() {
        return Err(Error::MsrsIncomplete {
            written,
            expected: entries.len(),
            rejected: entries.get(written).map_or(0, |e| e.index),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(index: u32) -> Option<u64> {
        boot_msr_entries()
            .into_iter()
            .find(|e| e.index == index)
            .map(|e| e.data)
    }

    #[test]
    fn boot_msr_values() {
        assert_eq!(value_of(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(value_of(MSR_IA32_MISC_ENABLE), Some(1));
        for zeroed in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(value_of(zeroed), Some(0), "MSR {zeroed:#x}");
        }
    }

    #[test]
    fn no_duplicate_msrs() {
        let mut idx: Vec<u32> = boot_msr_entries().iter().map(|e| e.index).collect();
        let n = idx.len();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), n);
        assert_eq!(n, 11);
    }
}
