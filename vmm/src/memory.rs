//! Guest RAM: one memfd, mapped shared, cut into the regions the x86 layout needs (the 32-bit MMIO
//! hole below 4 GiB stays unbacked). A memfd rather than anonymous memory because a snapshot can
//! then write (or later mmap) guest RAM as a file without copying it through another buffer.
//! A restored VM maps its snapshot's memory file privately instead: pages come from the page
//! cache on first touch and are copied on first write, so the file is never changed and many VMs
//! restored from it share its unchanged pages.

use std::fs::File;
use std::os::fd::FromRawFd;

use devices::GuestMemoryMmap;
use snapshot::MemoryLayout;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    #[error("cannot map the snapshot memory file at guest address {addr:#x}: {reason}")]
    MapFile { addr: u64, reason: String },
    #[error(
        "the snapshot's memory layout {found:?} is not the one this agentvm builds for {mem_mib}          MiB ({expected:?})"
    )]
    Layout {
        mem_mib: u64,
        found: Vec<(u64, u64)>,
        expected: Vec<(u64, u64)>,
    },
}

/// Guest RAM regions as a snapshot records them.
pub fn layout_of(mem: &GuestMemoryMmap) -> MemoryLayout {
    MemoryLayout::packed(mem.iter().map(|r| (r.start_addr().0, r.len())))
}

/// Refuses a snapshot layout other than the one this build gives a guest of `mem_mib`: the
/// restored VM gets the devices and tables of that size.
fn check_layout(layout: &MemoryLayout, mem_mib: u64) -> Result<(), MemoryError> {
    let expected: Vec<(u64, u64)> = arch::arch_memory_regions(mem_mib << 20)
        .iter()
        .map(|&(addr, len)| (addr.0, len as u64))
        .collect();
    let found: Vec<(u64, u64)> = layout
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if found != expected {
        return Err(MemoryError::Layout {
            mem_mib,
            found,
            expected,
        });
    }
    Ok(())
}

/// Maps guest RAM for a userfaultfd restore: anonymous, private and untouched, so every page's
/// first touch is a missing fault for the handler to fill.
pub fn map_anonymous(layout: &MemoryLayout, mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    map_restored(layout, mem_mib, None)
}

/// Maps a snapshot's memory file as guest RAM (MAP_PRIVATE), after [`check_layout`].
pub fn map_memory_file(
    file: File,
    layout: &MemoryLayout,
    mem_mib: u64,
) -> Result<GuestMemoryMmap, MemoryError> {
    map_restored(layout, mem_mib, Some(std::sync::Arc::new(file)))
}

/// Guest RAM laid out as `layout` says, private, backed by `file` at each region's offset or
/// anonymous without one.
fn map_restored(
    layout: &MemoryLayout,
    mem_mib: u64,
    file: Option<std::sync::Arc<File>>,
) -> Result<GuestMemoryMmap, MemoryError> {
    check_layout(layout, mem_mib)?;
    let regions = layout
        .regions
        .iter()
        .map(|r| {
            let map_err = |reason: String| MemoryError::MapFile {
                addr: r.guest_addr,
                reason,
            };
            // A bitmap as long as the region (the builder's default tracks nothing), so the
            // VMM's writes after a restore are in the next diff snapshot.
            let mut builder = MmapRegionBuilder::new_with_bitmap(
                r.size as usize,
                AtomicBitmap::with_len(r.size as usize),
            )
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            builder = match &file {
                Some(file) => builder
                    .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE),
                None => builder
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            };
            let mapping = builder.build().map_err(|e| map_err(e.to_string()))?;
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| map_err("the region wraps the address space".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::MapFile {
        addr: 0,
        reason: e.to_string(),
    })
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
    use vm_memory::Bytes;

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
    fn memory_file_is_mapped_private_and_checked_against_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let layout = MemoryLayout::packed([(0, 32 << 20)]);
        let mut bytes = vec![0u8; 32 << 20];
        bytes[0x2000..0x2004].copy_from_slice(&0xfeed_f00du32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let mem = map_memory_file(File::open(&path).unwrap(), &layout, 32).unwrap();
        assert_eq!(layout_of(&mem), layout);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
            0xfeed_f00d
        );
        mem.write_obj(1u32, GuestAddress(0x2000)).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(
            vm_memory::MmapRegion::bitmap(region).is_addr_set(0x2000),
            "a VMM write to restored memory must be tracked for diff snapshots"
        );
        assert_eq!(
            std::fs::read(&path).unwrap()[0x2000..0x2004],
            0xfeed_f00du32.to_le_bytes(),
            "a guest write must not reach the snapshot's file"
        );
        let err = map_memory_file(File::open(&path).unwrap(), &layout, 64).unwrap_err();
        assert!(err.to_string().contains("not the one"), "{err}");
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
