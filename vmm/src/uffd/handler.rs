//! The fault-serving loop, shared by the in-process handler thread and the external handler
//! (`agentvm snapshot uffd-handler`): waits on the userfaultfd and serves each missing page from
//! the memory file (UFFDIO_COPY), or as the zero page where the file has a hole or zeroes
//! (UFFDIO_ZEROPAGE), until told to stop or, for the external handler, until the VMM's
//! connection ends.
//!
//! The file is read with pread rather than mapped: a memory file truncated under a mapping would
//! SIGBUS the handler (in the external handler, every VM it serves); a read fails for that one
//! page, which is reported.

use std::fs::File;
use std::io;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::counts::UffdCounts;
use super::sys::{Uffd, UffdMsg, UFFD_EVENT_PAGEFAULT};
use super::{GuestRange, Page, PAGE_SIZE};

/// Poll timeout: the stop eventfd wakes the thread at once; this only bounds a lost wake-up.
const POLL_MS: i32 = 1000;
/// UFFDIO_COPY answers EAGAIN while the mapping is changing; retried this many times.
const EAGAIN_RETRIES: u32 = 100;

pub(super) struct FaultServer<'a> {
    pub uffd: &'a Uffd,
    pub stop: &'a EventFd,
    pub file: &'a File,
    pub ranges: &'a [GuestRange],
    pub counts: &'a UffdCounts,
    /// The external handler's connection from the VMM: its end (the VM is gone) ends serving.
    pub peer: Option<&'a UnixStream>,
}

/// Why serving ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The stop eventfd fired.
    Stopped,
    /// The VMM closed its connection (the VM ended, or its VMM exited).
    PeerClosed,
}

impl FaultServer<'_> {
    /// Serves faults until the stop eventfd fires or the peer hangs up (Ok) or one cannot be
    /// served (Err, naming the page and why).
    pub fn run(&self) -> Result<ServeEnd, String> {
        let mut msgs = [UffdMsg::default(); 16];
        let mut page = Box::new(Page::default());
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    // poll ignores negative descriptors: no peer, no entry.
                    fd: self.peer.map_or(-1, AsRawFd::as_raw_fd),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: poll reads and writes only the three pollfd entries of `fds`.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll on the userfaultfd: {e}"));
            }
            if fds[1].revents != 0 {
                return Ok(ServeEnd::Stopped);
            }
            if fds[2].revents != 0 && peer_closed(self.peer)? {
                return Ok(ServeEnd::PeerClosed);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err("the userfaultfd reported an error".into());
            }
            let n = self
                .uffd
                .read_messages(&mut msgs)
                .map_err(|e| format!("reading the userfaultfd: {e}"))?;
            for msg in &msgs[..n] {
                if msg.event != UFFD_EVENT_PAGEFAULT {
                    // No other events were asked for (features = 0 at UFFDIO_API).
                    return Err(format!("unexpected userfaultfd event {:#x}", msg.event));
                }
                self.serve(msg.fault_address(), &mut page)?;
            }
        }
    }

    fn serve(&self, address: u64, page: &mut Page) -> Result<(), String> {
        let started = Instant::now();
        let host_page = address & !(PAGE_SIZE - 1);
        let range = self
            .ranges
            .iter()
            .find(|r| (r.host_addr..r.host_addr + r.len).contains(&host_page))
            .ok_or_else(|| format!("page fault at {address:#x}, outside guest memory"))?;
        let offset = range.file_offset + (host_page - range.host_addr);
        let guest = range.describe(host_page);
        self.file.read_exact_at(&mut page.0, offset).map_err(|e| {
            format!("reading {guest} from the memory file (offset {offset:#x}): {e}")
        })?;
        let zero = page.0.iter().all(|&b| b == 0);
        // Counted before the fill wakes the faulter, so whoever touched the page sees the count.
        self.counts.record(offset / PAGE_SIZE);
        self.counts.served(zero);
        let mut tries = 0;
        loop {
            let result = if zero {
                self.uffd.zero(host_page, PAGE_SIZE)
            } else {
                self.uffd.copy(host_page, page.0.as_ptr(), PAGE_SIZE)
            };
            match result {
                Ok(()) => break,
                // Already filled (two vCPUs faulted on it at once): only the waiters need waking.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.uffd
                        .wake(host_page, PAGE_SIZE)
                        .map_err(|e| format!("waking {guest}: {e}"))?;
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < EAGAIN_RETRIES => {
                    tries += 1;
                }
                Err(e) => return Err(format!("filling {guest}: {e}")),
            }
        }
        self.counts.serve_time(started.elapsed().as_nanos() as u64);
        Ok(())
    }
}

/// Whether the peer's readiness means it has gone: a hang-up, or end of file on read. The VMM
/// sends nothing after the mappings, so any bytes are read and dropped.
pub(super) fn peer_closed(peer: Option<&UnixStream>) -> Result<bool, String> {
    let Some(mut peer) = peer else {
        return Ok(false);
    };
    let mut buf = [0u8; 256];
    match peer.read(&mut buf) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            Ok(false)
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(true),
        Err(e) => Err(format!("reading the uffd socket: {e}")),
    }
}
