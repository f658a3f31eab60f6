//! The userfaultfd ABI (linux/userfaultfd.h) for what a missing-mode restore needs: create,
//! API handshake, register, copy, zero page, wake, and reading fault messages.
//!
//! Written by hand: the `userfaultfd` crate's `userfaultfd-sys` generates its bindings with
//! bindgen at build time, which needs libclang on every machine that builds agentvm (this
//! project's build and CI machines have none), and `libc` has no userfaultfd definitions. The
//! structures below are the kernel's stable UAPI (unchanged since Linux 4.3).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

// _IOWR/_IOR(0xaa, nr, struct): direction << 30 | size << 16 | 0xaa << 8 | nr.
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
pub const UFFDIO_WAKE: u64 = 0x8010_aa02;
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
pub const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// `/dev/userfaultfd`'s USERFAULTFD_IOC_NEW = _IO(0xaa, 0).
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One `struct uffd_msg` (32 bytes); for a page fault, `arg[1]` is the faulting address.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct UffdMsg {
    pub event: u8,
    _reserved: [u8; 7],
    pub arg: [u64; 3],
}

impl UffdMsg {
    pub fn fault_address(&self) -> u64 {
        self.arg[1]
    }
}

/// An open userfaultfd (non-blocking, close-on-exec) past the API handshake.
pub struct Uffd {
    fd: OwnedFd,
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Uffd {
    /// The userfaultfd(2) syscall, or `/dev/userfaultfd` where the syscall is refused (it needs
    /// CAP_SYS_PTRACE for kernel-mode faults when vm.unprivileged_userfaultfd is 0; the device
    /// node is governed by its file permissions instead).
    pub fn new() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd takes only flags; the result is checked and owned below.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = match check(ret) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                let dev = File::open("/dev/userfaultfd").map_err(|open| {
                    io::Error::new(
                        open.kind(),
                        format!("userfaultfd: {e}; /dev/userfaultfd: {open}"),
                    )
                })?;
                // SAFETY: USERFAULTFD_IOC_NEW on the device takes the flags by value and
                // returns a new descriptor, checked and owned below.
                check(unsafe {
                    libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) as libc::c_long
                })?
            }
            Err(e) => return Err(e),
        };
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let uffd = Self { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request used here takes a pointer to the #[repr(C)] struct of its UAPI
        // definition, which `arg` is; the kernel reads and writes only within it.
        check(unsafe {
            libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) as libc::c_long
        })
        .map(drop)
    }

    /// Registers `[start, start + len)` (page-aligned, mapped anonymous) in missing mode: a
    /// first touch of any page blocks the toucher until the page is copied or zeroed.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut register)
    }

    /// Copies `len` bytes from `src` (page-aligned, readable) to `dst` and wakes the waiters.
    pub fn copy(&self, dst: u64, src: *const u8, len: u64) -> io::Result<()> {
        let mut copy = UffdioCopy {
            dst,
            src: src as u64,
            len,
            ..Default::default()
        };
        self.ioctl(UFFDIO_COPY, &mut copy)
    }

    /// Maps the zero page at `[start, start + len)` and wakes the waiters.
    pub fn zero(&self, start: u64, len: u64) -> io::Result<()> {
        let mut zero = UffdioZeropage {
            range: UffdioRange { start, len },
            ..Default::default()
        };
        self.ioctl(UFFDIO_ZEROPAGE, &mut zero)
    }

    /// Wakes the threads waiting on a range someone else already filled.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, &mut range)
    }

    /// Reads the pending messages into `msgs`; `Ok(0)` when there are none.
    pub fn read_messages(&self, msgs: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(msgs);
        // SAFETY: reads at most `bytes` into the `msgs` buffer, which is that long and made of
        // plain integers (any bit pattern is valid).
        let ret = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), bytes) };
        match check(ret as libc::c_long) {
            Ok(n) => Ok(n as usize / std::mem::size_of::<UffdMsg>()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    pub fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// A userfaultfd received from a VMM (past its API handshake there).
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Another descriptor for the same userfaultfd (the one sent to an external handler).
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_match_the_kernel_headers() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        // The size field of each ioctl number is its struct's size.
        assert_eq!((UFFDIO_API >> 16) & 0x3fff, 24);
        assert_eq!((UFFDIO_REGISTER >> 16) & 0x3fff, 32);
        assert_eq!((UFFDIO_COPY >> 16) & 0x3fff, 40);
        assert_eq!((UFFDIO_ZEROPAGE >> 16) & 0x3fff, 32);
        assert_eq!((UFFDIO_WAKE >> 16) & 0x3fff, 16);
    }
}
