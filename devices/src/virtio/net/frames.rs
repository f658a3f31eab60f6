//! The device's end of the frame channel: a `SOCK_SEQPACKET` socket (the egress filter holds
//! the other end) or a tap fd. Both keep message boundaries, so one write is one frame and one
//! read is one frame; std's `File` read/write is all that is needed for either.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;

/// Send buffer asked for on each end of a [`frame_channel`]: a few of the largest frames in
/// flight each way (the kernel caps it at net.core.wmem_max).
const CHANNEL_SNDBUF: usize = 4 * super::MAX_FRAME_LEN;

/// A connected pair of non-blocking, close-on-exec `SOCK_SEQPACKET` sockets to carry frames:
/// `(device end, filter end)`. Give the first to [`Net::new`](super::Net::new), the second to
/// whatever plays the wire (the egress filter).
pub fn frame_channel() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into the two-element array it is given.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by socketpair and nothing else owns them.
    let ends = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for end in [&ends.0, &ends.1] {
        set_sndbuf(end.as_raw_fd(), CHANNEL_SNDBUF)?;
    }
    Ok(ends)
}

/// A non-blocking frame fd.
#[derive(Debug)]
pub(super) struct FrameFd(File);

impl FrameFd {
    /// Takes `fd` over and makes it non-blocking (the event loop must never wait on it). A
    /// socket must keep message boundaries (a stream socket would run frames together).
    pub(super) fn new(fd: OwnedFd) -> io::Result<Self> {
        let file = File::from(fd);
        if file.metadata()?.file_type().is_socket() {
            let kind = socket_type(file.as_raw_fd())?;
            if kind != libc::SOCK_SEQPACKET && kind != libc::SOCK_DGRAM {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the frame fd is a socket of type {kind}, not SOCK_SEQPACKET or \
                         SOCK_DGRAM: it would not keep one frame per message"
                    ),
                ));
            }
        }
        set_nonblocking(file.as_raw_fd())?;
        Ok(Self(file))
    }

    /// Sends one frame. `WouldBlock` means the peer is not keeping up: nothing was sent.
    pub(super) fn send(&self, frame: &[u8]) -> io::Result<()> {
        let sent = (&self.0).write(frame)?;
        if sent != frame.len() {
            // Message-oriented fds send all or nothing; a short write means the fd is not one.
            return Err(io::Error::other(format!(
                "short write of a frame ({sent} of {} bytes): the frame fd does not keep \
                 message boundaries",
                frame.len()
            )));
        }
        Ok(())
    }

    /// Receives one frame into `buf`; a frame longer than `buf` is cut to its length (callers
    /// pass one byte more than the largest frame they accept, to notice). `Ok(0)` is the end:
    /// the peer closed (frames are never empty).
    pub(super) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.0).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }
}

impl AsRawFd for FrameFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own reads its status flags and touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer argument on a descriptor we own; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn socket_type(fd: RawFd) -> io::Result<libc::c_int> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_TYPE writes one c_int into `kind` and its size into `len`, both live locals.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(kind)
}

/// Asks for a send buffer of `bytes` (the kernel doubles it and caps it at net.core.wmem_max).
pub(super) fn set_sndbuf(fd: RawFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: SO_SNDBUF reads one c_int from the pointer, a live local, for the call only.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
