//! The VMM's side of an external userfaultfd handler (`PUT /snapshot/load` whose Uffd
//! backend_path is a Unix socket), as Firecracker does it: register guest memory, connect to
//! the handler, send it the mappings and the userfaultfd, and serve nothing here. A thread
//! watches the connection for the VM's life: if the handler goes away, the VM ends with that
//! reason (guest memory can no longer be filled), rather than its vCPUs waiting on faults
//! forever. The VMM keeps its own copy of the userfaultfd until then, so a vCPU blocked on a
//! fault is only released (by closing that copy) once the failure has been reported.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::handler::peer_closed;
use super::{guest_ranges, mappings, register, UffdBackend, UffdError};
use crate::exit::VmmEvent;
use crate::seccomp::{ThreadKind, ThreadSeccomp};
use devices::GuestMemoryMmap;
use snapshot::MemoryLayout;

/// Bounds the connect and the send: a live handler accepts at once.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll timeout of the watcher: the stop eventfd wakes it at once; this bounds a lost wake-up.
const POLL_MS: i32 = 1000;

/// What [`UffdBackend::connect`] is given.
pub struct ExternalSetup<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub layout: &'a MemoryLayout,
    pub socket_path: &'a Path,
    pub events: Sender<VmmEvent>,
    pub seccomp: ThreadSeccomp,
}

impl UffdBackend {
    /// Registers every region of `mem` (freshly mapped anonymous, untouched) and hands the
    /// userfaultfd to the handler listening on `socket_path`; guest memory may be touched from
    /// then on (the handler serves it).
    pub fn connect(setup: ExternalSetup<'_>) -> Result<Self, UffdError> {
        let ranges = guest_ranges(setup.mem, setup.layout);
        let uffd = register(&ranges)?;
        let path = setup.socket_path.to_path_buf();
        let stream =
            mappings::connect(&path, HANDLER_TIMEOUT).map_err(|source| UffdError::Connect {
                path: path.clone(),
                source,
            })?;
        mappings::send(
            &stream,
            &ranges,
            &uffd.try_clone().map_err(UffdError::Create)?,
        )
        .map_err(|source| UffdError::Send {
            path: path.clone(),
            source,
        })?;
        tracing::info!(
            socket = %path.display(),
            regions = ranges.len(),
            "uffd restore: guest memory handed to the external handler"
        );
        let checker = stream.try_clone().map_err(|source| UffdError::Send {
            path: path.clone(),
            source,
        })?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(UffdError::EventFd)?;
        let thread_stop = stop.try_clone().map_err(UffdError::EventFd)?;
        let events = setup.events;
        let seccomp = setup.seccomp;
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("uffd_handler".into())
            .spawn(move || {
                let watched = seccomp
                    .enter(ThreadKind::UffdHandler)
                    .map_err(|e| format!("uffd handler connection thread: {e}"))
                    .and_then(|()| watch(&stream, &thread_stop, &thread_path));
                if let Err(e) = watched {
                    tracing::error!("{e}");
                    let _ = events.send(VmmEvent::MemoryBackendFailed(e));
                }
                // Closing the VMM's copy of the userfaultfd now (the handler's is gone or
                // the VM is over) releases any vCPU still waiting on a fault.
                drop(uffd);
                // Dropping `stream` closes the connection: the handler sees the VM's end.
            })
            .map_err(UffdError::Spawn)?;
        Ok(Self {
            stop,
            thread: Some(thread),
            counts: None,
            recording: None,
            peer: Some((checker, path)),
        })
    }

    /// With an external handler: fails if the handler has already closed its connection (it
    /// refused the mappings or exited), so a load that cannot run is refused instead of
    /// starting a VM whose memory nobody serves.
    pub fn check_connected(&self) -> Result<(), UffdError> {
        let Some((stream, path)) = &self.peer else {
            return Ok(());
        };
        let mut fd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll reads and writes only the one pollfd; a zero timeout does not block.
        let ret = unsafe { libc::poll(&mut fd, 1, 0) };
        let gone = ret > 0 && fd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0;
        if gone {
            Err(UffdError::HandlerClosed(path.clone()))
        } else {
            Ok(())
        }
    }
}

/// Waits until told to stop (Ok) or until the handler's end of the connection closes (Err).
fn watch(stream: &UnixStream, stop: &EventFd, path: &Path) -> Result<(), String> {
    let gone = || {
        format!(
            "the external uffd handler at {} closed its connection (it exited, or could not \
             serve a page: see its log): guest memory can no longer be served",
            path.display()
        )
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes only the two pollfd entries of `fds`.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll on the uffd handler connection: {e}"));
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        let revents = fds[0].revents;
        if revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            return Err(gone());
        }
        if revents != 0 && peer_closed(Some(stream))? {
            return Err(gone());
        }
    }
}
