pub mod virtio;

/// Guest memory as every device sees it; change the backing type here only.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
