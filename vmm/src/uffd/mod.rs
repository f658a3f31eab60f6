//! Restoring guest memory through userfaultfd (`PUT /snapshot/load` with backend_type "Uffd"):
//! guest RAM is anonymous memory registered in missing mode; a handler thread fills each page on
//! its first touch from the memory file. With a working set recorded by an earlier restore
//! (`<mem file>.ws`), those pages are copied in one batched pass before the vCPUs run, the rest
//! stay lazy. A restore with no working set records one: the pages faulted, in order, until the
//! first `/sandbox/exec` result (or the VM's end), written then by the VMM thread.
//!
//! Teardown order matters: the handler keeps serving until every vCPU thread has been joined
//! (a vCPU blocked on a fault only gets out when its page arrives), then stops. If the handler
//! fails, it reports the error on the VM's event channel (the VM ends with that error) and closes
//! the userfaultfd, which releases every blocked faulter, so no vCPU waits forever.

mod counts;
mod external;
mod external_handler;
mod handler;
mod mappings;
mod prefetch;
mod sys;

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use snapshot::{MemoryLayout, WorkingSet};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use counts::{UffdCounts, UffdMetrics, UffdTotals};
pub use external::ExternalSetup;
pub use external_handler::{serve_vm, HandlerOptions, VmServed};
pub use mappings::GuestRegionUffdMapping;

use crate::exit::VmmEvent;
use crate::seccomp::{ThreadKind, ThreadSeccomp};
use handler::FaultServer;
use sys::Uffd;

const PAGE_SIZE: u64 = 4096;

/// One page, aligned as UFFDIO_COPY needs its source.
#[repr(C, align(4096))]
#[derive(Clone)]
struct Page([u8; PAGE_SIZE as usize]);

impl Default for Page {
    fn default() -> Self {
        Page([0; PAGE_SIZE as usize])
    }
}

/// One guest RAM region: where it is mapped, where it is in the guest (unknown to an external
/// handler: Firecracker's mappings do not say) and in the memory file.
#[derive(Debug, Clone, Copy)]
struct GuestRange {
    host_addr: u64,
    guest_addr: Option<u64>,
    len: u64,
    file_offset: u64,
}

impl GuestRange {
    /// The page at `host_page` (inside this range), named for error messages.
    fn describe(&self, host_page: u64) -> String {
        let delta = host_page - self.host_addr;
        match self.guest_addr {
            Some(guest) => format!("guest page {:#x}", guest + delta),
            None => format!("the page at host address {host_page:#x}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd: {0}")]
    Create(std::io::Error),
    #[error("userfaultfd: cannot register guest memory at {guest_addr:#x}: {source}")]
    Register {
        guest_addr: u64,
        source: std::io::Error,
    },
    #[error("{0}")]
    Prefetch(String),
    #[error("cannot start the userfaultfd handler thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot create the handler's stop eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("uffd handler socket {}: cannot connect: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uffd handler socket {}: cannot send the memory mappings and the userfaultfd: {source}", path.display())]
    Send {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the uffd handler at {} closed its connection before the VM ran (see its log)", .0.display())]
    HandlerClosed(PathBuf),
}

/// Where a restore's working set goes (when it has none yet) and the memory file it belongs to.
struct Recording {
    path: PathBuf,
    identity: (u64, u64),
}

/// What [`UffdBackend::start`] is given.
pub struct UffdSetup<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub layout: &'a MemoryLayout,
    pub mem_file: File,
    pub mem_file_path: PathBuf,
    /// The working set to prefetch, if a valid one for this memory file exists.
    pub working_set: Option<WorkingSet>,
    pub events: Sender<VmmEvent>,
    pub seccomp: ThreadSeccomp,
}

/// The running handler of one VM's memory: the in-process handler thread, or, with an external
/// handler, the thread watching its connection. Dropping it stops the thread (see
/// [`Self::finish`]).
pub struct UffdBackend {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// None with an external handler.
    counts: Option<UffdMetrics>,
    recording: Option<Recording>,
    /// The external handler's connection (with its socket path), to check it is still open.
    peer: Option<(UnixStream, PathBuf)>,
}

/// The regions of `mem`, with where each is in the guest and in the memory file.
fn guest_ranges(mem: &GuestMemoryMmap, layout: &MemoryLayout) -> Vec<GuestRange> {
    mem.iter()
        .zip(&layout.regions)
        .map(|(region, saved)| GuestRange {
            host_addr: region.as_ptr() as u64,
            guest_addr: Some(saved.guest_addr),
            len: region.len(),
            file_offset: saved.file_offset,
        })
        .collect()
}

/// A new userfaultfd with every range registered in missing mode.
fn register(ranges: &[GuestRange]) -> Result<Uffd, UffdError> {
    let uffd = Uffd::new().map_err(UffdError::Create)?;
    for r in ranges {
        uffd.register_missing(r.host_addr, r.len)
            .map_err(|source| UffdError::Register {
                guest_addr: r.guest_addr.unwrap_or(r.host_addr),
                source,
            })?;
    }
    Ok(uffd)
}

impl UffdBackend {
    /// Registers every region of `mem` (freshly mapped anonymous, untouched), prefetches the
    /// working set, and starts the handler thread; guest memory may be touched from then on.
    pub fn start(setup: UffdSetup<'_>) -> Result<Self, UffdError> {
        let ranges = guest_ranges(setup.mem, setup.layout);
        let uffd = register(&ranges)?;
        let counts = UffdMetrics::default();
        let identity = snapshot::memory_file_identity(&setup.mem_file_path, &setup.mem_file)
            .map_err(|e| UffdError::Prefetch(e.to_string()))?;
        let recording = match &setup.working_set {
            Some(set) => {
                let copied =
                    prefetch::prefetch(&uffd, &setup.mem_file, &ranges, &set.pages, &counts)
                        .map_err(UffdError::Prefetch)?;
                tracing::info!(
                    pages = copied,
                    seconds = counts.totals().prefetch_seconds,
                    "uffd restore: working set prefetched"
                );
                None
            }
            None => {
                counts.start_recording();
                Some(Recording {
                    path: snapshot::working_set_path(&setup.mem_file_path),
                    identity,
                })
            }
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(UffdError::EventFd)?;
        let thread_stop = stop.try_clone().map_err(UffdError::EventFd)?;
        let thread_counts = counts.clone();
        let events = setup.events;
        let file = setup.mem_file;
        let seccomp = setup.seccomp;
        let thread = std::thread::Builder::new()
            .name("uffd_handler".into())
            .spawn(move || {
                let served = seccomp
                    .enter(ThreadKind::UffdHandler)
                    .map_err(|e| format!("uffd handler thread: {e}"))
                    .and_then(|()| {
                        FaultServer {
                            uffd: &uffd,
                            stop: &thread_stop,
                            file: &file,
                            ranges: &ranges,
                            counts: &thread_counts,
                            peer: None,
                        }
                        .run()
                    });
                if let Err(e) = served {
                    tracing::error!("{e}");
                    let _ = events.send(VmmEvent::MemoryBackendFailed(e));
                }
                // Dropping `uffd` here closes it, which releases any vCPU still waiting on a
                // fault (the VM is being torn down on the error just sent).
            })
            .map_err(UffdError::Spawn)?;
        Ok(Self {
            stop,
            thread: Some(thread),
            counts: Some(counts),
            recording,
            peer: None,
        })
    }

    /// The fault counters; None when an external handler serves the faults (it counts them).
    pub fn metrics(&self) -> Option<UffdMetrics> {
        self.counts.clone()
    }

    /// Stops the handler (only once no vCPU can fault any more) and writes the working set if
    /// this restore recorded one. Idempotent.
    pub fn finish(&mut self) {
        if !self.stop_thread() {
            return;
        }
        let Some(counts) = &self.counts else {
            return;
        };
        let totals = counts.totals();
        tracing::info!(
            faults = totals.faults,
            zero_pages = totals.zero_pages,
            prefetched = totals.prefetched,
            faults_per_second = if totals.serve_seconds > 0.0 {
                (totals.faults as f64 / totals.serve_seconds) as u64
            } else {
                0
            },
            "uffd restore: guest memory served"
        );
        self.write_recording();
    }

    /// Ends the working-set recording and writes the set now, while the handler goes on serving
    /// faults (the first exec result is in). Nothing to do for a restore that prefetched, or
    /// once written.
    pub fn save_working_set(&mut self) {
        if let Some(counts) = &self.counts {
            counts.end_recording();
        }
        self.write_recording();
    }

    /// Stops and joins the handler thread; false if it had already been stopped.
    fn stop_thread(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return false;
        };
        if let Some(counts) = &self.counts {
            counts.end_recording();
        }
        let _ = self.stop.write(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::error!("the uffd handler thread did not stop within 5 s; leaving it detached");
        }
        true
    }

    fn write_recording(&mut self) {
        let (Some(recording), Some(counts)) = (self.recording.take(), &self.counts) else {
            return;
        };
        let pages = counts.take_recorded();
        if pages.is_empty() {
            return;
        }
        let set = WorkingSet {
            mem_file_len: recording.identity.0,
            mem_file_mtime_ns: recording.identity.1,
            pages,
        };
        match snapshot::write_working_set(&recording.path, &set) {
            Ok(()) => tracing::info!(
                pages = set.pages.len(),
                path = %recording.path.display(),
                "uffd restore: working set recorded"
            ),
            Err(e) => tracing::warn!("uffd restore: cannot write the working set: {e}"),
        }
    }
}

/// A backend dropped without [`UffdBackend::finish`] (a restore that failed before the VM ran)
/// stops its thread and records nothing.
impl Drop for UffdBackend {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(test)]
mod tests;
