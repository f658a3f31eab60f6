//! The agent's AF_VSOCK listener: where the host's connections (through the VMM's vsock Unix
//! socket and `CONNECT <port>`) arrive.
//!
//! std has no AF_VSOCK sockets and the crates that add them (`vsock`, `tokio-vsock`) bring `nix`
//! or an async runtime for four system calls, so they are made here. Accepted connections are
//! handed out as `UnixStream`s: the server only reads, writes and shuts them down, which are the
//! same calls for every stream socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A listening AF_VSOCK stream socket bound to a port for any local CID.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

fn sockaddr(port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value of it.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr
}

impl VsockListener {
    /// Binds and listens on `port`. Fails with ENODEV/EAFNOSUPPORT when the guest has no vsock
    /// transport (the modules were not loaded, or the VM has no virtio-vsock device).
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr(port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen() takes no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, port })
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for the next connection (retrying on EINTR).
    pub fn accept(&self) -> io::Result<UnixStream> {
        loop {
            // SAFETY: null address pointers ask accept4 not to report the peer address.
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                return Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) }));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_names_the_port_for_any_cid() {
        let addr = sockaddr(1024);
        assert_eq!(addr.svm_family, libc::AF_VSOCK as libc::sa_family_t);
        assert_eq!(addr.svm_port, 1024);
        assert_eq!(addr.svm_cid, libc::VMADDR_CID_ANY);
    }
}
