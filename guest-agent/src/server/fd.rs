//! The few raw syscalls the server needs beyond std: pipes, poll, non-blocking mode and signalling
//! process groups. std has no poll or process-group kill, and `std::io::pipe` gives no
//! non-blocking mode; pulling in a crate for four thin wrappers would cost more than it saves.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we borrow; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits until one of `fds` is ready for its `events` (`POLLIN`/`POLLOUT`; hang-ups and errors
/// count as ready, and the next read or write reports them). Returns which are ready; all false on
/// timeout. `None` waits without a limit.
pub(crate) fn poll_ready(
    fds: &[(BorrowedFd<'_>, libc::c_short)],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, events)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: *events,
            revents: 0,
        })
        .collect();
    let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: the pointer and length describe the pollfd vector, alive for the call.
        let n = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
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
    Ok(pollfds.iter().map(|p| p.revents != 0).collect())
}

/// A one-shot, pollable event: [`fd`](Self::fd) becomes readable (end of file) once
/// [`fire`](Self::fire) closes the pipe's only write end.
pub(crate) struct Trigger {
    read_end: OwnedFd,
    write_end: Mutex<Option<OwnedFd>>,
}

impl Trigger {
    pub(crate) fn new() -> io::Result<Self> {
        let (read_end, write_end) = pipe()?;
        Ok(Self {
            read_end,
            write_end: Mutex::new(Some(write_end)),
        })
    }

    pub(crate) fn fire(&self) {
        self.write_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.read_end.as_fd()
    }
}

/// Sends `signal` to the process group `pgid` (every process is started as its group's leader).
pub(crate) fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pgid <= 1 {
        // kill(0)/kill(-1) would hit the agent itself or every process.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process group {pgid}"),
        ));
    }
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(-pgid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
