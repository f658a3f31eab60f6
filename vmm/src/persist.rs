//! What a snapshot's state file holds: the machine (so the restore builds the same VM: vCPU
//! count, memory size and layout, devices), the KVM state of the VM and each vCPU, and each
//! device's state. Encoded and checked by the `snapshot` crate; a change to any of these types
//! needs a new `snapshot::FORMAT_VERSION`.

use serde::{Deserialize, Serialize};
use snapshot::MemoryLayout;

use crate::config::VsockConfig;
use crate::device_manager::DeviceStates;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::KvmVmState;

#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    pub vcpu_count: u8,
    pub mem_mib: u64,
    pub memory: MemoryLayout,
    /// The vsock device as configured; the restored VM listens on the same Unix socket path.
    pub vsock: Option<VsockConfig>,
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}
