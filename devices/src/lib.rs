//! Devices of the agentvm microVM: legacy PC devices and virtio devices on virtio-mmio.

pub mod legacy;
pub mod virtio;

/// Guest memory as every device sees it; change the backing type here only.
/// The same type as `arch::GuestMemoryMmap`: VMM writes to guest memory are tracked per page so a
/// diff snapshot includes them (KVM's dirty log sees only the guest's writes).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
