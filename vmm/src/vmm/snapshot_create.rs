//! Writing a snapshot of a paused VM: each vCPU's state (read by its own parked thread), the VM's
//! KVM state, every device's state, guest memory to the memory file, then the state file (last,
//! so a state file on disk always has its complete memory file beside it).

use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

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
    ) -> Result<(), VmmError> {
        let total = self.vcpu_threads.len();
        if !self.gate.is_paused() || self.gate.parked() != total {
            return Err(VmmError::SnapshotState(
                "the microVM must be paused first (PATCH /vm {\"state\": \"Paused\"})".into(),
            ));
        }
        let (Some(vm), Some(mem)) = (self.vm.as_ref(), self.mem.as_ref()) else {
            return Err(VmmError::SnapshotState("the microVM is gone".into()));
        };
        let vcpus = self.save_vcpus(vm.msrs_to_save())?;
        let vm_state = KvmVmState::save(vm.fd())?;
        let layout = memory::layout_of(mem);
        let (devices, written) = self.devices.save_state_quiesced(|| {
            snapshot::write_memory_file(mem_file_path, &layout, |region, offset, buf| {
                mem.read_slice(buf, GuestAddress(region.guest_addr + offset))
                    .map_err(std::io::Error::other)
            })
        });
        written?;
        let state = MicrovmState {
            vcpu_count: self.machine.vcpus,
            mem_mib: self.machine.mem_mib,
            memory: layout,
            vsock: self.machine.vsock.clone(),
            vm: vm_state,
            vcpus,
            devices,
        };
        snapshot::write_state_file(snapshot_path, &state)?;
        Ok(())
    }

    /// Asks every parked vCPU thread for its state (the vCPU fd belongs to its thread).
    fn save_vcpus(&self, msr_indices: Arc<[u32]>) -> Result<Vec<VcpuState>, VmmError> {
        let mut replies = Vec::with_capacity(self.vcpu_requests.len());
        for (index, requests) in self.vcpu_requests.iter().enumerate() {
            let (reply, answer) = channel();
            requests
                .send(VcpuRequest::SaveState {
                    msr_indices: msr_indices.clone(),
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
