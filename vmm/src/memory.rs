//! Guest RAM: one memfd, mapped shared, cut into the regions the x86 layout needs (the 32-bit MMIO
//! hole below 4 GiB stays unbacked). A memfd rather than anonymous memory because a snapshot can
//! then write (or later mmap) guest RAM as a file without copying it through another buffer.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
}

/// Creates guest memory of `mem_bytes`, laid out per `arch::arch_memory_regions`.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = arch::arch_memory_regions(mem_bytes);
    // SAFETY: memfd_create with a valid NUL-terminated name and flags; the returned fd is checked
    // and owned by the File below.
    let fd = unsafe { libc::memfd_create(c"agentvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_bytes)
        .map_err(|source| MemoryError::Resize {
            size: mem_bytes,
            source,
        })?;
    let file = std::sync::Arc::new(file);
    let mut offset = 0u64;
    let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = regions
        .iter()
        .map(|&(addr, len)| {
            let range = (addr, len, Some(FileOffset::from_arc(file.clone(), offset)));
            offset += len as u64;
            range
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_region_and_is_writable() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let size = 4u64 << 30;
        let mem = create_guest_memory(size).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, size);
        assert!(mem.address_in_range(GuestAddress(arch::layout::MMIO_GAP_START - 1)));
        assert!(!mem.address_in_range(GuestAddress(arch::layout::MMIO_GAP_START)));
        assert!(mem.address_in_range(GuestAddress(1 << 32)));
    }
}
