//! Bringing up the loopback interface, which no one else does in a guest whose init is the agent:
//! servers listening on 127.0.0.1 (and the agent's port forwarding to them) need it.
//!
//! Two ioctls on a throwaway socket; a netlink crate would be far more code for one flag.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const LOOPBACK: &[u8] = b"lo";

/// Sets IFF_UP (and IFF_RUNNING) on `lo`; does nothing if it is already up.
pub fn bring_up_loopback() -> io::Result<()> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(LOOPBACK) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into the ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the flags member of the union was just written by SIOCGIFFLAGS.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    let wanted = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    if flags & wanted == wanted {
        return Ok(());
    }
    request.ifr_ifru.ifru_flags = flags | wanted;
    // SAFETY: SIOCSIFFLAGS reads the name and flags from the ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_already_up_loopback_is_left_alone() {
        // The test host's lo is up, so this must succeed without changing anything (and without
        // needing CAP_NET_ADMIN, which only the set call would).
        bring_up_loopback().unwrap();
    }
}
