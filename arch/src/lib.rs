//! x86_64 boot-time setup for agentvm guests: the guest physical layout, the vCPU state for the
//! Linux 64-bit boot protocol (long mode, identity-mapped page tables, boot MSRs, CPUID, LAPIC
//! LINT pins) and the tables a Linux guest reads at boot (zero page with e820 map, MP table, ACPI
//! tables).
//!
//! The VMM creates the VM (with the in-kernel irqchip), the vCPUs and guest memory from
//! [`layout::arch_memory_regions`], loads the kernel and command line, then calls
//! [`boot_params::write_boot_params`], [`mptable::setup_mptable`], [`acpi::setup_acpi`] followed
//! by [`boot_params::set_acpi_rsdp`], and [`configure_vcpu`] for every vCPU.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;

#[cfg(test)]
mod test_bytes;
#[cfg(test)]
mod test_kvm;

use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::GuestAddress;

/// Guest RAM as the whole VMM sees it. Every write the VMM makes through vm-memory marks its page
/// in the region's bitmap: KVM's dirty log only sees the guest's own writes, and a diff snapshot
/// must also carry what the VMM wrote (virtio used rings, received packets, boot structures).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub use acpi::{setup_acpi, AcpiMmioDevice};
pub use boot_params::{initrd_load_addr, initrd_load_addr_above, set_acpi_rsdp, write_boot_params};
pub use layout::arch_memory_regions;
pub use mptable::setup_mptable;

/// Everything that can go wrong while preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a boot structure into guest memory failed (address not backed by guest RAM).
    #[error("cannot write the {what} to guest memory at {addr:#x}: {source}")]
    GuestMemoryWrite {
        /// Which structure was being written.
        what: &'static str,
        /// Guest physical address of the write.
        addr: u64,
        /// The underlying vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM vCPU ioctl failed.
    #[error("KVM ioctl {op} failed: {source}")]
    Kvm {
        /// The ioctl, e.g. `KVM_SET_SREGS`.
        op: &'static str,
        /// The errno returned by the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS stopped before the end of the list: KVM rejected the MSR at `written`.
    #[error(
        "KVM_SET_MSRS wrote {written} of {expected} boot MSRs (first rejected: {rejected:#x})"
    )]
    MsrsIncomplete {
        /// Number of MSRs KVM accepted.
        written: usize,
        /// Number of MSRs in the list.
        expected: usize,
        /// Index of the first MSR KVM did not accept.
        rejected: u32,
    },
    /// A KVM flexible-array structure (CPUID or MSR list) could not be built.
    #[error("cannot build the KVM {what} list: {source}")]
    FamStruct {
        /// Which list.
        what: &'static str,
        /// The vmm-sys-util error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// The vCPU count is outside what the MP table and xAPIC ids can describe.
    #[error("invalid vCPU count {0}: must be between 1 and 254")]
    InvalidCpuCount(u32),
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU index {index} out of range for {count} vCPUs")]
    InvalidCpuIndex {
        /// The vCPU index given.
        index: u8,
        /// The vCPU count given.
        count: u8,
    },
    /// The MP table for this many vCPUs does not fit between MPTABLE_START and 0xa0000.
    #[error("MP table for {cpu_count} vCPUs needs {size} bytes, only {available} fit in the EBDA")]
    MpTableTooLarge {
        /// vCPU count requested.
        cpu_count: u8,
        /// Bytes the table needs (floating pointer included).
        size: usize,
        /// Bytes available.
        available: usize,
    },
    /// The command line is longer than CMDLINE_MAX_SIZE.
    #[error("command line of {size} bytes exceeds the maximum of {max} (NUL included)")]
    CmdlineTooLarge {
        /// Size given.
        size: usize,
        /// Maximum size.
        max: usize,
    },
    /// A range the kernel will read (command line, initrd) is not inside guest RAM.
    #[error("the {what} at {addr:#x} ({size} bytes) is not inside guest memory")]
    OutsideGuestMemory {
        /// What the range holds.
        what: &'static str,
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        size: usize,
    },
    /// The guest has no RAM region starting at address 0.
    #[error("guest memory has no region at address 0")]
    NoLowMemory,
    /// A RAM region overlaps the 32-bit MMIO gap.
    #[error("guest RAM region [{start:#x}, {end:#x}) overlaps the MMIO gap")]
    RamInMmioGap {
        /// Start of the region.
        start: u64,
        /// Exclusive end of the region.
        end: u64,
    },
    /// The guest memory map needs more e820 entries than the zero page holds.
    #[error("guest memory map needs {0} e820 entries, the zero page holds 128")]
    TooManyE820Entries(usize),
    /// linux-loader refused to write the zero page.
    #[error("cannot write the zero page: {0}")]
    BootParamsWrite(#[source] linux_loader::configurator::Error),
    /// An initrd of zero bytes was given.
    #[error("the initrd is empty")]
    EmptyInitrd,
    /// A virtio-mmio window given to the DSDT is empty or does not end at or below 4 GiB (the
    /// DSDT describes it with a 32-bit Memory32Fixed descriptor).
    #[error("virtio-mmio device {index}: window at {base:#x} of {size:#x} bytes must be non-empty and end at or below 4 GiB")]
    AcpiMmioRange {
        /// Slot of the device.
        index: usize,
        /// Base address given.
        base: u64,
        /// Size given.
        size: u64,
    },
    /// A virtio-mmio device's GSI is not a pin of the IOAPIC.
    #[error("virtio-mmio device {index}: GSI {gsi} is beyond the IOAPIC's last pin {max}")]
    AcpiGsi {
        /// Slot of the device.
        index: usize,
        /// GSI given.
        gsi: u32,
        /// Last IOAPIC pin.
        max: u32,
    },
    /// More virtio-mmio devices than the DSDT has names for.
    #[error("{count} virtio-mmio devices given to the DSDT, at most {max} are supported")]
    AcpiTooManyDevices {
        /// Devices given.
        count: usize,
        /// Maximum.
        max: usize,
    },
    /// The ACPI tables do not fit between ACPI_START and ACPI_END.
    #[error("ACPI tables need {size} bytes, only {available} fit below 1 MiB")]
    AcpiTablesTooLarge {
        /// Bytes the tables need.
        size: u64,
        /// Bytes available.
        available: u64,
    },
    /// No page-aligned place below the MMIO gap can hold the initrd.
    #[error("initrd of {size} bytes does not fit in guest RAM between {floor:#x} and {end:#x}")]
    InitrdTooLarge {
        /// Initrd size.
        size: usize,
        /// Lowest address allowed.
        floor: u64,
        /// Exclusive end of the usable low RAM.
        end: u64,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// Puts a vCPU in the state the Linux 64-bit boot protocol expects at `entry`: CPUID, boot MSRs,
/// general registers (RSI = `boot_params_addr`), long mode with identity-mapped page tables, FPU,
/// and LAPIC LINT0/LINT1 delivery modes.
///
/// Only the BSP (index 0) runs from `entry`; the guest starts the APs with INIT/SIPI, which
/// resets their registers. Configuring them identically is harmless and keeps their CPUID and
/// MSRs right. Every call rewrites the same GDT, IDT and page tables. The VM must have the
/// in-kernel irqchip before the vCPU was created (for the LAPIC).
pub fn configure_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    cpu_index: u8,
    cpu_count: u8,
    entry: GuestAddress,
    boot_params_addr: GuestAddress,
) -> Result<()> {
    cpuid::setup_cpuid(kvm, vcpu, cpu_index, cpu_count)?;
    msrs::setup_msrs(vcpu)?;
    regs::setup_regs(vcpu, entry, boot_params_addr)?;
    regs::setup_sregs(mem, vcpu)?;
    regs::setup_fpu(vcpu)?;
    interrupts::set_lint(vcpu)?;
    Ok(())
}
