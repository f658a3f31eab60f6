//! One VM served by the external handler (`agentvm snapshot uffd-handler`): receive the
//! mappings and the userfaultfd from the VMM that connected, check them against the memory
//! file, prefetch the working set if one was given, and serve faults with the same loop as the
//! in-process handler until the VMM's connection ends (the VM is over) or the handler stops.
//!
//! The VMM registers guest memory in missing mode only and enables no userfaultfd events
//! (UFFD_EVENT_REMOVE and the like need a VMM that asks for them, as Firecracker's balloon
//! does); a userfaultfd delivering any other event ends serving that VM with an error naming it.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use snapshot::WorkingSet;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{FaultServer, ServeEnd};
use super::sys::Uffd;
use super::{mappings, prefetch, GuestRange, UffdMetrics, UffdTotals};

/// How long a VMM that connected may take to send its mappings.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the handler serves every VM from.
pub struct HandlerOptions<'a> {
    pub mem_file: &'a File,
    /// The working set to copy in before serving faults (checked against the memory file).
    pub working_set: Option<&'a WorkingSet>,
}

/// How serving one VM went.
#[derive(Debug)]
pub struct VmServed {
    pub totals: UffdTotals,
    /// Why serving ended: the VM's end, the handler's stop, or the error that ended it.
    pub end: Result<&'static str, String>,
}

/// Serves the VM whose VMM connected on `stream` until its end or `stop`. Counters are kept
/// even when serving fails part-way.
pub fn serve_vm(stream: UnixStream, options: &HandlerOptions<'_>, stop: &EventFd) -> VmServed {
    let counts = UffdMetrics::default();
    let end = serve(&stream, options, stop, &counts);
    VmServed {
        totals: counts.totals(),
        end: end.map(|end| match end {
            ServeEnd::Stopped => "the handler was stopped",
            ServeEnd::PeerClosed => "the VMM closed its connection",
        }),
    }
}

fn serve(
    stream: &UnixStream,
    options: &HandlerOptions<'_>,
    stop: &EventFd,
    counts: &UffdMetrics,
) -> Result<ServeEnd, String> {
    stream
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .map_err(|e| format!("setting the receive timeout: {e}"))?;
    let received = mappings::receive(stream)?;
    let file_len = options
        .mem_file
        .metadata()
        .map_err(|e| format!("the memory file: {e}"))?
        .len();
    let ranges: Vec<GuestRange> = received
        .mappings
        .iter()
        .map(|m| GuestRange {
            host_addr: m.base_host_virt_addr,
            guest_addr: None,
            len: m.size,
            file_offset: m.offset,
        })
        .collect();
    if let Some(r) = ranges.iter().find(|r| {
        r.file_offset
            .checked_add(r.len)
            .is_none_or(|end| end > file_len)
    }) {
        return Err(format!(
            "the mapping at {:#x} needs memory file bytes {:#x}..{:#x}, the file has {file_len:#x} \
             (is it this snapshot's memory file?)",
            r.host_addr,
            r.file_offset,
            r.file_offset.saturating_add(r.len)
        ));
    }
    let uffd = Uffd::from_owned(received.uffd);
    if let Some(set) = options.working_set {
        prefetch::prefetch(&uffd, options.mem_file, &ranges, &set.pages, counts)?;
    }
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("making the connection non-blocking: {e}"))?;
    FaultServer {
        uffd: &uffd,
        stop,
        file: options.mem_file,
        ranges: &ranges,
        counts,
        peer: Some(stream),
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;
    use crate::uffd::{register, PAGE_SIZE};
    use snapshot::MemoryLayout;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A 1 MiB memory file: page i starts with the u32 i + 1, odd pages are holes.
    fn memory_file(dir: &std::path::Path) -> (File, MemoryLayout) {
        let layout = MemoryLayout::packed([(0, 1 << 20)]);
        let path = dir.join("vm.mem");
        snapshot::write_memory_file(&path, &layout, |_, offset, buf| {
            for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
                let index = offset / PAGE_SIZE + i as u64;
                if index.is_multiple_of(2) {
                    page[..4].copy_from_slice(&(index as u32 + 1).to_le_bytes());
                }
            }
            Ok(())
        })
        .unwrap();
        (File::open(&path).unwrap(), layout)
    }

    #[test]
    fn a_vm_is_served_from_the_file_until_its_vmm_hangs_up() {
        let dir = tempfile::tempdir().unwrap();
        let (file, layout) = memory_file(dir.path());
        let mem = memory::map_anonymous(&layout, 1).unwrap();
        let ranges = super::super::guest_ranges(&mem, &layout);
        let uffd = register(&ranges).expect("userfaultfd (needs root or /dev/userfaultfd)");
        let (vmm, handler) = UnixStream::pair().unwrap();
        mappings::send(&vmm, &ranges, &uffd.try_clone().unwrap()).unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let set = WorkingSet {
            mem_file_len: 1 << 20,
            mem_file_mtime_ns: 0,
            pages: vec![6],
        };
        std::thread::scope(|s| {
            let served = s.spawn(|| {
                serve_vm(
                    handler,
                    &HandlerOptions {
                        mem_file: &file,
                        working_set: Some(&set),
                    },
                    &stop,
                )
            });
            for page in [2u64, 3, 6] {
                let value: u32 = mem.read_obj(GuestAddress(page * PAGE_SIZE)).unwrap();
                let expected = if page.is_multiple_of(2) {
                    page as u32 + 1
                } else {
                    0
                };
                assert_eq!(value, expected, "page {page}");
            }
            drop(vmm);
            let served = served.join().unwrap();
            assert_eq!(served.end, Ok("the VMM closed its connection"));
            assert_eq!(served.totals.prefetched, 1);
            assert_eq!(served.totals.faults, 2, "page 6 was prefetched");
            assert_eq!(served.totals.zero_pages, 1);
        });
    }

    #[test]
    fn mappings_beyond_the_memory_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = memory_file(dir.path());
        let mem = memory::map_anonymous(&MemoryLayout::packed([(0, 2 << 20)]), 2).unwrap();
        let ranges = super::super::guest_ranges(&mem, &MemoryLayout::packed([(0, 2 << 20)]));
        let uffd = register(&ranges).expect("userfaultfd");
        let (vmm, handler) = UnixStream::pair().unwrap();
        mappings::send(&vmm, &ranges, &uffd.try_clone().unwrap()).unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let served = serve_vm(
            handler,
            &HandlerOptions {
                mem_file: &file,
                working_set: None,
            },
            &stop,
        );
        let err = served.end.unwrap_err();
        assert!(err.contains("the file has 0x100000"), "{err}");
    }
}
