//! What a snapshot's state file holds: the machine (so the restore builds the same VM: vCPU
//! count, memory size and layout, devices), the KVM state of the VM and each vCPU, and each
//! device's state. Encoded and checked by the `snapshot` crate; a change to any of these types
//! needs a new `snapshot::FORMAT_VERSION`.

use serde::{Deserialize, Serialize};
use snapshot::{MemoryKind, MemoryLayout};

use crate::config::VsockConfig;
use crate::device_manager::DeviceStates;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::KvmVmState;

#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    pub vcpu_count: u8,
    pub mem_mib: u64,
    pub memory: MemoryLayout,
    /// All of guest RAM, or a diff against another snapshot.
    pub memory_kind: MemoryKind,
    /// Set by `agentvm snapshot merge`: the checksum of the diff snapshot this full snapshot was
    /// merged from. It stands in for that diff as the base of later diffs (a VM that took the
    /// diff goes on taking diffs against it), see [`MicrovmState::identity`].
    pub merged_from: Option<[u8; 32]>,
    /// The vsock device as configured; the restored VM listens on the same Unix socket path
    /// unless the load gives a `vsock_override`.
    pub vsock: Option<VsockConfig>,
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

impl MicrovmState {
    /// Which snapshot this is, as a diff names its base: the state file's checksum, or for a
    /// merged snapshot the checksum of the diff it was merged from.
    pub fn identity(&self, checksum: [u8; 32]) -> [u8; 32] {
        self.merged_from.unwrap_or(checksum)
    }

    /// The parts of the state file that must agree with each other (the file passed its
    /// checksum, but a writer bug or a hand-made file could still disagree with itself). Public
    /// so the fuzz target for state files runs the same checks a restore does.
    pub fn check_consistent(&self) -> Result<(), String> {
        if self.vcpus.len() != usize::from(self.vcpu_count) {
            return Err(format!(
                "the state file has {} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.vcpu_count
            ));
        }
        if let Some((i, vcpu)) = (0u8..).zip(&self.vcpus).find(|(i, vcpu)| vcpu.index != *i) {
            return Err(format!("vCPU state {i} is for vCPU {}", vcpu.index));
        }
        if self.memory.total_size() != self.mem_mib << 20 {
            return Err(format!(
                "the memory layout holds {} bytes, the machine has {} MiB",
                self.memory.total_size(),
                self.mem_mib
            ));
        }
        Ok(())
    }
}

/// A snapshot identity as people read it (the first 8 bytes in hex, as git abbreviates).
pub fn short_id(id: &[u8; 32]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}
