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
}

/// A snapshot identity as people read it (the first 8 bytes in hex, as git abbreviates).
pub fn short_id(id: &[u8; 32]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}
