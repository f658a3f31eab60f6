//! Zero-copy placement of file contents (kernel segments, initrd) into guest memory: the file's
//! pages are mapped private (copy-on-write) over the guest RAM mapping instead of being copied.
//!
//! Why by hand: linux-loader copies every segment into guest memory, which for Debian's 47 MB
//! vmlinux plus the initrd costs ~12,000 page faults and ~100 ms before the first vCPU entry (on
//! the development hosts). Mapped, the VMM reaches KVM_RUN in a few milliseconds, the guest faults
//! in only the pages it touches, and every microVM on a host shares one page-cache copy of the
//! kernel. The price: the files must not be truncated or rewritten in place while a VM runs (the
//! artefact cache only ever replaces files by rename, which keeps old mappings valid).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("[{start:#x}, {end:#x}) is not inside one guest memory region")]
    OutsideMemory { start: u64, end: u64 },
    #[error("cannot read the file: {0}")]
    Read(std::io::Error),
    #[error("cannot copy into guest memory: {0}")]
    Copy(String),
    #[error("cannot map the file into guest memory: {0}")]
    Map(std::io::Error),
}

/// Places `len` bytes of `file` starting at `file_offset` at guest address `dest`. Whole pages are
/// mapped when the file offset and the guest address share their page offset; the rest is copied.
pub fn place(
    mem: &GuestMemoryMmap,
    file: &mut File,
    file_offset: u64,
    dest: GuestAddress,
    len: u64,
) -> Result<(), MapError> {
    if len == 0 {
        return Ok(());
    }
    let end = dest.0.checked_add(len).ok_or(MapError::OutsideMemory {
        start: dest.0,
        end: u64::MAX,
    })?;
    let region = mem
        .find_region(dest)
        .filter(|r| end <= r.start_addr().0 + r.len())
        .ok_or(MapError::OutsideMemory { start: dest.0, end })?;

    // Map from the first page boundary at or after `dest` to the last one at or before `end`,
    // if the file and guest page offsets agree; copy the unaligned head and tail.
    let head = if dest.0.is_multiple_of(PAGE) {
        0
    } else {
        PAGE - dest.0 % PAGE
    }
    .min(len);
    let mappable = if (dest.0 % PAGE) == (file_offset % PAGE) {
        (len - head) / PAGE * PAGE
    } else {
        0
    };
    copy(mem, file, file_offset, dest, head)?;
    if mappable > 0 {
        let guest_start = dest.0 + head;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(
                guest_start - region.start_addr().0,
            ))
            .map_err(|e| MapError::Copy(e.to_string()))?;
        // SAFETY: [host, host + mappable) lies inside the guest RAM mapping that `mem` owns (checked
        // above against the region's bounds) and that stays mapped until `mem` is dropped, which
        // unmaps this overlay with it. No vCPU runs yet and nothing holds references into these
        // pages, so replacing them with MAP_FIXED cannot invalidate a live borrow. The file
        // offset is page aligned because it has the same page offset as `guest_start`.
        let ret = unsafe {
            libc::mmap(
                host.cast(),
                mappable as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                (file_offset + head) as libc::off_t,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(MapError::Map(std::io::Error::last_os_error()));
        }
    }
    let tail_start = head + mappable;
    copy(
        mem,
        file,
        file_offset + tail_start,
        GuestAddress(dest.0 + tail_start),
        len - tail_start,
    )
}

fn copy(
    mem: &GuestMemoryMmap,
    file: &mut File,
    file_offset: u64,
    dest: GuestAddress,
    len: u64,
) -> Result<(), MapError> {
    if len == 0 {
        return Ok(());
    }
    file.seek(SeekFrom::Start(file_offset))
        .map_err(MapError::Read)?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf).map_err(MapError::Read)?;
    mem.write_slice(&buf, dest)
        .map_err(|e| MapError::Copy(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (File, std::path::PathBuf) {
        // Tests run in parallel: each file needs its own name (two of them have the same size).
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "agentvm-image-map-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        (File::open(&path).unwrap(), path)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn mapped_and_copied_parts_read_back_exactly_and_neighbours_stay_zero() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let data = pattern(5 * 4096 + 123);
        let (mut f, path) = file_with(&data);
        // Same page offset in file and guest: pages are mapped, the tail copied.
        place(&mem, &mut f, 0, GuestAddress(0x20_0000), data.len() as u64).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(back, data);
        let after: u64 = mem
            .read_obj(GuestAddress(0x20_0000 + data.len() as u64))
            .unwrap();
        assert_eq!(after, 0, "bytes past the file's end must stay zero");
        // Different page offsets: everything copied.
        place(&mem, &mut f, 100, GuestAddress(0x40_0010), 3 * 4096).unwrap();
        let mut back = vec![0u8; 3 * 4096];
        mem.read_slice(&mut back, GuestAddress(0x40_0010)).unwrap();
        assert_eq!(back, &data[100..100 + 3 * 4096]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn guest_writes_do_not_reach_the_file() {
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        let data = pattern(2 * 4096);
        let (mut f, path) = file_with(&data);
        place(&mem, &mut f, 0, GuestAddress(0x10_0000), data.len() as u64).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn outside_memory_is_an_error() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let (mut f, path) = file_with(&pattern(8192));
        let err = place(&mem, &mut f, 0, GuestAddress((16 << 20) - 4096), 8192).unwrap_err();
        assert!(matches!(err, MapError::OutsideMemory { .. }), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
