//! Writing a snapshot of a paused VM: each vCPU's state (read by its own parked thread), the VM's
//! KVM state, every device's state, guest memory (all of it, or for a diff only the pages dirtied
//! since the previous snapshot) and the state file. Both are written to temporary files first;
//! the memory file is renamed into place before the state file, so a failure at any step leaves
//! the previous snapshot at these paths whole (never a new memory file beside an old state file).

use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use snapshot::MemoryKind;
use vm_memory::{Bytes, GuestAddress};

use super::dirty_pages::{reset_dirty_pages, take_dirty_pages};
use super::{Vmm, VmmError};
use crate::memory;
use crate::persist::MicrovmState;
use crate::vstate::vcpu::VcpuRequest;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::KvmVmState;

/// A parked vCPU answers at once; this only catches a thread that is gone or stuck.
const VCPU_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

impl Vmm {
    pub(super) fn create_snapshot(
        &mut self,
        snapshot_path: &Path,
        mem_file_path: &Path,
        diff: bool,
    ) -> Result<(), VmmError> {
        let total = self.vcpu_threads.len();
        if !self.gate.is_paused() || self.gate.parked() != total {
            return Err(VmmError::SnapshotState(
                "the microVM must be paused first (PATCH /vm {\"state\": \"Paused\"})".into(),
            ));
        }
        if diff && !self.machine.track_dirty_pages {
            return Err(VmmError::SnapshotState(
                "a diff snapshot needs track_dirty_pages (PUT /machine-config)".into(),
            ));
        }
        let base = match (diff, self.last_snapshot) {
            (true, None) => {
                return Err(VmmError::SnapshotState(
                    "a diff snapshot needs a base: take a Full snapshot first (or the last \
                     snapshot failed)"
                        .into(),
                ))
            }
            (true, Some(base)) => Some(base),
            (false, _) => None,
        };
        // Whatever happens next may consume the dirty log: until this snapshot is complete,
        // there is no base for a diff.
        self.last_snapshot = None;
        let checksum = self.write_snapshot(snapshot_path, mem_file_path, base)?;
        self.last_snapshot = Some(checksum);
        Ok(())
    }

    /// Writes the snapshot (a diff against `base` if given); returns its state file's checksum.
    fn write_snapshot(
        &self,
        snapshot_path: &Path,
        mem_file_path: &Path,
        base: Option<[u8; 32]>,
    ) -> Result<[u8; 32], VmmError> {
        let (Some(vm), Some(mem)) = (self.vm.as_ref(), self.mem.as_ref()) else {
            return Err(VmmError::SnapshotState("the microVM is gone".into()));
        };
        let vcpus = self.save_vcpus(vm.msrs_to_save(), vm.xsave_size())?;
        let vm_state = KvmVmState::save(vm.fd())?;
        let layout = memory::layout_of(mem);
        let track = self.machine.track_dirty_pages;
        // The dirty logs are read (and cleared) in the same quiet moment as the copy, so no
        // write falls between them.
        let (devices, written) = self.devices.save_state_quiesced(|| {
            let (kind, dirty) = match base {
                Some(base) => {
                    let dirty = take_dirty_pages(vm.fd(), mem)?;
                    (
                        MemoryKind::Diff {
                            base,
                            dirty: dirty.clone(),
                        },
                        Some(dirty),
                    )
                }
                None => {
                    if track {
                        reset_dirty_pages(vm.fd(), mem)?;
                    }
                    (MemoryKind::Full, None)
                }
            };
            let file = snapshot::prepare_memory_file(
                mem_file_path,
                &layout,
                dirty.as_deref(),
                |region, offset, buf| {
                    mem.read_slice(buf, GuestAddress(region.guest_addr + offset))
                        .map_err(std::io::Error::other)
                },
            )?;
            Ok::<_, VmmError>((file, kind))
        });
        let (mem_file, memory_kind) = written?;
        let state = MicrovmState {
            vcpu_count: self.machine.vcpus,
            mem_mib: self.machine.mem_mib,
            memory: layout,
            memory_kind,
            merged_from: None,
            vsock: self.machine.vsock.clone(),
            vm: vm_state,
            vcpus,
            devices,
        };
        let (state_file, checksum) = snapshot::prepare_state_file(snapshot_path, &state)?;
        snapshot::commit_snapshot(mem_file, state_file)?;
        Ok(checksum)
    }

    /// Asks every parked vCPU thread for its state (the vCPU fd belongs to its thread).
    fn save_vcpus(
        &self,
        msr_indices: Arc<[u32]>,
        xsave_size: usize,
    ) -> Result<Vec<VcpuState>, VmmError> {
        let mut replies = Vec::with_capacity(self.vcpu_requests.len());
        for (index, requests) in self.vcpu_requests.iter().enumerate() {
            let (reply, answer) = channel();
            requests
                .send(VcpuRequest::SaveState {
                    msr_indices: msr_indices.clone(),
                    xsave_size,
                    reply,
                })
                .map_err(|_| VmmError::SnapshotState(format!("vCPU {index} thread has ended")))?;
            replies.push(answer);
        }
        self.gate.post_request();
        replies
            .into_iter()
            .enumerate()
            .map(|(index, answer)| {
                answer
                    .recv_timeout(VCPU_REPLY_TIMEOUT)
                    .map_err(|_| {
                        VmmError::SnapshotState(format!(
                            "vCPU {index} did not hand over its state within {VCPU_REPLY_TIMEOUT:?}"
                        ))
                    })?
                    .map_err(VmmError::SnapshotState)
            })
            .collect()
    }
}
