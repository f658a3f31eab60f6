//! The KVM VM: irqchip, PIT and guest memory slots.

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Three pages just below the BIOS area that Intel VMX needs for its real-mode TSS; an address in
/// the MMIO gap that guest RAM never uses.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability agentvm needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrList(kvm_ioctls::Error),
    #[error("cannot register guest memory slot {slot} with KVM: {source}")]
    MemorySlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    /// MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST), read now: /dev/kvm ioctls are not in the
    /// filter of the thread that takes snapshots.
    msrs_to_save: std::sync::Arc<[u32]>,
    /// The size of a vCPU's XSAVE area (KVM_CAP_XSAVE2), read now for the same reason.
    xsave_size: usize,
}

impl Vm {
    /// Creates the VM with an in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, so timer and
    /// interrupt delivery never round-trip through userspace.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::SetTss)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        let msrs_to_save = kvm
            .get_msr_index_list()
            .map_err(VmError::MsrList)?
            .as_slice()
            .into();
        let xsave_size = super::xsave::host_xsave_size(&fd);
        Ok(Self {
            kvm,
            fd,
            msrs_to_save,
            xsave_size,
        })
    }

    /// Gives KVM guest RAM, one slot per region in order (slot = region index, which
    /// `dirty_pages` relies on). `track_dirty_pages` turns on KVM's dirty log for diff snapshots.
    pub fn register_memory(
        &self,
        mem: &GuestMemoryMmap,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        let flags = if track_dirty_pages {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's host mapping lives as long as `mem`, which the VMM keeps alive
            // until after every vCPU thread has been joined and the VM fd closed.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn msrs_to_save(&self) -> std::sync::Arc<[u32]> {
        self.msrs_to_save.clone()
    }

    /// How many bytes a vCPU's XSAVE area takes on this host (see [`super::xsave`]).
    pub fn xsave_size(&self) -> usize {
        self.xsave_size
    }
}
