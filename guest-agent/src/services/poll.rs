//! `poll(2)` on a few descriptors: how the services wait on their own fds and on the request's
//! close notification at once, without threads or busy loops. std has no poll; the `libc` call is
//! small enough that a crate (mio, polling) would add more than it saves.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Waits until one of `fds` is readable (or hung up / in error, which a read then reports), or
/// until `timeout` passes. Returns which are ready; all `false` on timeout.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `polled` is a valid array of `polled.len()` pollfd structs that poll may
        // update, and every fd in it is borrowed for the duration of the call.
        let n = unsafe {
            libc::poll(
                polled.as_mut_ptr(),
                polled.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(polled.iter().map(|p| p.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_the_readable_descriptor_and_times_out_otherwise() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (_c, d) = UnixStream::pair().unwrap();
        let ready = wait_readable(&[b.as_fd(), d.as_fd()], Duration::ZERO).unwrap();
        assert_eq!(ready, [false, false]);
        a.write_all(b"x").unwrap();
        let ready = wait_readable(&[b.as_fd(), d.as_fd()], Duration::from_secs(10)).unwrap();
        assert_eq!(ready, [true, false]);
        drop(_c);
        let ready = wait_readable(&[d.as_fd()], Duration::from_secs(10)).unwrap();
        assert_eq!(ready, [true], "a hang-up counts as readable");
    }
}
