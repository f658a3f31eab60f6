//! Which guest pages changed since the last snapshot, for a diff snapshot: the union of KVM's
//! dirty log (pages the guest wrote) and vm-memory's per-region bitmap (pages the VMM wrote:
//! virtio used rings, received vsock packets, entropy; KVM never sees those writes). Reading
//! either one also clears it, so the next diff starts from this moment.

use kvm_ioctls::VmFd;
use snapshot::PageRun;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::VmmError;
use crate::memory;
use devices::GuestMemoryMmap;

const PAGE: u64 = 4096;

/// Takes (and clears) both dirty logs: the dirty pages as runs of memory-file pages. Guest RAM
/// must have been registered with dirty logging (slot i = region i), the vCPUs paused and the
/// devices quiet, so nothing is written between this and the copy.
pub(super) fn take_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<PageRun>, VmmError> {
    let layout = memory::layout_of(mem);
    let mut runs: Vec<PageRun> = Vec::new();
    for (slot, (region, placed)) in mem.iter().zip(&layout.regions).enumerate() {
        let kvm = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| {
                VmmError::SnapshotState(format!(
                    "cannot read KVM's dirty log of memory slot {slot}: {e}"
                ))
            })?;
        let vmm = MmapRegion::bitmap(region).get_and_reset();
        let first_page = placed.file_offset / PAGE;
        let pages = region.len() / PAGE;
        let words = kvm.len().max(vmm.len());
        for word in 0..words {
            let mut bits =
                kvm.get(word).copied().unwrap_or(0) | vmm.get(word).copied().unwrap_or(0);
            // Clean words (most of a large guest) cost one test each.
            while bits != 0 {
                let page = word as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if page < pages {
                    push_page(&mut runs, first_page + page);
                }
            }
        }
    }
    Ok(runs)
}

/// Clears both dirty logs (after a full snapshot: the next diff is relative to it).
pub(super) fn reset_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    take_dirty_pages(vm, mem).map(drop)
}

fn push_page(runs: &mut Vec<PageRun>, page: u64) {
    match runs.last_mut() {
        Some(run) if run.first_page + run.pages == page => run.pages += 1,
        _ => runs.push(PageRun {
            first_page: page,
            pages: 1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::Vm;
    use vm_memory::{Bytes, GuestAddress};

    /// A KVM VM, or None (with a message) without /dev/kvm; with CI=true a missing /dev/kvm
    /// fails the test instead.
    fn kvm_vm(test: &str) -> Option<Vm> {
        match Vm::new() {
            Ok(vm) => Some(vm),
            Err(e) => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("{test}: KVM is required when CI=true: {e}");
                }
                eprintln!("skipping {test}: {e}");
                None
            }
        }
    }

    /// Pages the VMM writes (here as a virtio device would, through vm-memory) are in the diff
    /// although KVM's dirty log never sees them; reading the logs clears them.
    #[test]
    fn vmm_writes_are_dirty_pages_and_reading_clears_them() {
        let Some(vm) = kvm_vm("vmm_writes_are_dirty_pages") else {
            return;
        };
        let mem = memory::create_guest_memory(64 << 20).unwrap();
        vm.register_memory(&mem, true).unwrap();
        mem.write_obj(7u64, GuestAddress(5 * PAGE + 8)).unwrap();
        mem.write_slice(&[1u8; 2 * PAGE as usize], GuestAddress(9 * PAGE))
            .unwrap();
        let runs = take_dirty_pages(vm.fd(), &mem).unwrap();
        let got: Vec<_> = runs.iter().map(|r| (r.first_page, r.pages)).collect();
        assert_eq!(got, [(5, 1), (9, 2)]);
        assert!(take_dirty_pages(vm.fd(), &mem).unwrap().is_empty());
    }

    #[test]
    fn without_dirty_logging_the_log_cannot_be_read() {
        let Some(vm) = kvm_vm("without_dirty_logging") else {
            return;
        };
        let mem = memory::create_guest_memory(64 << 20).unwrap();
        vm.register_memory(&mem, false).unwrap();
        let err = take_dirty_pages(vm.fd(), &mem).unwrap_err();
        assert!(
            err.to_string().contains("dirty log of memory slot 0"),
            "{err}"
        );
    }

    #[test]
    fn consecutive_pages_make_one_run() {
        let mut runs = Vec::new();
        for page in [1, 2, 3, 7, 9, 10] {
            push_page(&mut runs, page);
        }
        let got: Vec<_> = runs.iter().map(|r| (r.first_page, r.pages)).collect();
        assert_eq!(got, [(1, 3), (7, 1), (9, 2)]);
    }
}
