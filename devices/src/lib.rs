//! Devices of the agentvm microVM: legacy PC devices and virtio devices on virtio-mmio.

pub mod legacy;
pub mod virtio;

/// Guest memory as every device sees it; change the backing type here only.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
