//! An isolate's guest RAM: one memfd-backed mapping at guest address 0.
//!
//! Written by hand rather than with vm-memory's regions because the pool resets an isolate in
//! place: [`GuestRam::discard`] drops the private (written) pages of the copy-on-write mapping
//! with MADV_DONTNEED, so they show the template again while every page that was only read stays
//! mapped (in the host and in KVM: re-faulting them costs more than the whole job), and the KVM
//! memory slot stays valid. vm-memory's region types do not model that.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

/// Guest RAM of one isolate.
pub struct GuestRam {
    ptr: *mut u8,
    size: usize,
    /// The file the mapping shows: the isolate's own (while it boots) or its template's.
    file: Arc<File>,
    /// Pages the host wrote since the last [`GuestRam::discard`] (KVM's dirty log sees only the
    /// guest's writes). A set, so that a one-off isolate answering a million host calls through
    /// the same mailbox pages does not grow it.
    host_dirty: BTreeSet<usize>,
}

/// Guest page size, the unit of discards.
pub const PAGE: usize = 4096;

// SAFETY: the mapping is plain memory owned by this struct; access goes through &self/&mut self
// and the guest, which only runs while the owning thread is in KVM_RUN on it.
unsafe impl Send for GuestRam {}

#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("cannot create the isolate's memory file: {0}")]
    Memfd(io::Error),
    #[error("cannot size the isolate's memory to {size} bytes: {source}")]
    Resize { size: usize, source: io::Error },
    #[error("cannot map the isolate's memory ({size} bytes): {source}")]
    Map { size: usize, source: io::Error },
    #[error("cannot drop the pages at {addr:#x}+{len:#x}: {source}")]
    Discard {
        addr: u64,
        len: usize,
        source: io::Error,
    },
    #[error("guest range {addr:#x}+{len:#x} is outside the isolate's {size:#x} bytes of RAM")]
    OutOfRange { addr: u64, len: usize, size: usize },
}

impl GuestRam {
    /// Fresh zeroed RAM in its own memfd, mapped shared (so the file holds what the guest writes:
    /// after boot it can become a template).
    pub fn new(size: usize) -> Result<GuestRam, RamError> {
        // SAFETY: memfd_create with a NUL-terminated name and valid flags; the fd is checked and
        // owned by the File below.
        let fd = unsafe { libc::memfd_create(c"agentvm-isolate".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(RamError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: fd is fresh and owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .map_err(|source| RamError::Resize { size, source })?;
        let file = Arc::new(file);
        let ptr = map(std::ptr::null_mut(), size, &file, libc::MAP_SHARED)?;
        Ok(GuestRam {
            ptr,
            size,
            file,
            host_dirty: BTreeSet::new(),
        })
    }

    /// RAM showing `template`'s contents copy-on-write: the guest's writes stay private.
    pub fn from_template(template: &Arc<File>, size: usize) -> Result<GuestRam, RamError> {
        let ptr = map(std::ptr::null_mut(), size, template, libc::MAP_PRIVATE)?;
        Ok(GuestRam {
            ptr,
            size,
            file: template.clone(),
            host_dirty: BTreeSet::new(),
        })
    }

    /// Drops the private copies of the pages in `guest_pages` (page numbers) and of every page
    /// the host wrote: they show the file (the template) again.
    pub fn discard(&mut self, guest_pages: impl Iterator<Item = usize>) -> Result<(), RamError> {
        let mut pages = std::mem::take(&mut self.host_dirty);
        pages.extend(guest_pages);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut current: Option<(usize, usize)> = None;
        for page in pages {
            current = match current {
                Some((start, n)) if start + n == page => Some((start, n + 1)),
                Some(run) => {
                    runs.push((run.0 * PAGE, run.1 * PAGE));
                    Some((page, 1))
                }
                None => Some((page, 1)),
            };
        }
        if let Some((start, n)) = current {
            runs.push((start * PAGE, n * PAGE));
        }
        for (start, len) in runs {
            let len = len.min(self.size.saturating_sub(start));
            if len == 0 {
                continue;
            }
            // SAFETY: [start, start+len) is inside this mapping (clamped above); MADV_DONTNEED on
            // a private file mapping only drops its private copies, which is the point.
            let rc = unsafe { libc::madvise(self.ptr.add(start).cast(), len, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(RamError::Discard {
                    addr: start as u64,
                    len,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// The memfd behind the mapping (the template, once this RAM has booted an isolate).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn range(&self, addr: u64, len: usize) -> Result<usize, RamError> {
        let out = || RamError::OutOfRange {
            addr,
            len,
            size: self.size,
        };
        let start = usize::try_from(addr).map_err(|_| out())?;
        match start.checked_add(len) {
            Some(end) if end <= self.size => Ok(start),
            _ => Err(out()),
        }
    }

    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), RamError> {
        let start = self.range(addr, bytes.len())?;
        if !bytes.is_empty() {
            self.host_dirty
                .extend(start / PAGE..=(start + bytes.len() - 1) / PAGE);
        }
        // SAFETY: [start, start+len) is inside the mapping (checked above); the guest is not
        // running while the host holds &mut self.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(start), bytes.len()) };
        Ok(())
    }

    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), RamError> {
        let start = self.range(addr, out.len())?;
        // SAFETY: inside the mapping (checked above); the guest is stopped while the host reads.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64, RamError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A copy of `[addr, addr+len)`.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, RamError> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }
}

fn map(at: *mut u8, size: usize, file: &File, flags: i32) -> Result<*mut u8, RamError> {
    // SAFETY: mmap of a file we own with a valid length; with MAP_FIXED, `at` is the start of a
    // mapping of exactly `size` bytes that this module created and still owns, so nothing else
    // is replaced.
    let p = unsafe {
        libc::mmap(
            at.cast(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(RamError::Map {
            size,
            source: io::Error::last_os_error(),
        });
    }
    Ok(p.cast())
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this address and size and is not used
        // after this (the VM using it is dropped before its RAM: see Isolate's field order).
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_copies_are_private_and_discard_drops_their_writes() {
        let mut boot = GuestRam::new(1 << 20).unwrap();
        boot.write(0x100, b"template").unwrap();
        let template = boot.file().clone();
        let mut a = GuestRam::from_template(&template, 1 << 20).unwrap();
        let b = GuestRam::from_template(&template, 1 << 20).unwrap();
        a.write(0x100, b"private!").unwrap();
        assert_eq!(a.read_vec(0x100, 8).unwrap(), b"private!");
        assert_eq!(b.read_vec(0x100, 8).unwrap(), b"template");
        a.write(0x3000, b"x").unwrap();
        // A page "the guest wrote" (discarded by page number) and one it did not.
        // SAFETY: inside the 1 MiB mapping; nothing else uses it.
        unsafe { *a.ptr.add(5 * PAGE) = 7 };
        unsafe { *a.ptr.add(9 * PAGE) = 9 };
        a.discard([5usize].into_iter()).unwrap();
        assert_eq!(a.read_vec(5 * PAGE as u64, 1).unwrap(), [0]);
        assert_eq!(
            a.read_vec(9 * PAGE as u64, 1).unwrap(),
            [9],
            "page 9 was not discarded"
        );
        a.discard(std::iter::empty()).unwrap();
        assert_eq!(a.read_vec(0x100, 8).unwrap(), b"template");
        assert_eq!(a.read_vec(0x3000, 1).unwrap(), [0]);
    }

    #[test]
    fn out_of_range_accesses_are_errors() {
        let mut ram = GuestRam::new(4096).unwrap();
        assert!(ram.write(4090, &[0u8; 8]).is_err());
        assert!(ram.read_u64(u64::MAX - 3).is_err());
        assert!(ram.write(4088, &[0u8; 8]).is_ok());
    }
}
