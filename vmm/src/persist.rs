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
        // Checked: `mem_mib << 20` would drop the high bits of a huge mem_mib and could then
        // match a small layout.
        let machine_bytes = self.mem_mib.checked_mul(1 << 20);
        if machine_bytes != Some(self.memory.total_size()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::MemoryRegion;

    fn vcpu(index: u8) -> VcpuState {
        VcpuState {
            index,
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            vcpu_events: Default::default(),
            tsc_khz: None,
        }
    }

    fn state(mem_mib: u64, memory: MemoryLayout) -> MicrovmState {
        MicrovmState {
            vcpu_count: 1,
            mem_mib,
            memory,
            memory_kind: MemoryKind::Full,
            merged_from: None,
            vsock: None,
            vm: KvmVmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![vcpu(0)],
            devices: DeviceStates {
                serial: devices::legacy::SerialSnapshot {
                    baud_divisor_low: 0,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 0,
                    line_control: 0,
                    line_status: 0,
                    modem_control: 0,
                    modem_status: 0,
                    scratch: 0,
                    in_buffer: Vec::new(),
                },
                virtio: Vec::new(),
                net: None,
            },
        }
    }

    #[test]
    fn a_consistent_state_passes() {
        let memory = MemoryLayout::packed([(0, 1 << 20), (1 << 32, 1 << 20)]);
        assert_eq!(state(2, memory).check_consistent(), Ok(()));
    }

    /// Found by the `snapshot_state_file` fuzz target (crash-aee36e43...): the region sizes add
    /// up past u64::MAX, which panicked in `MemoryLayout::total_size` with overflow checks on.
    #[test]
    fn a_layout_whose_sizes_overflow_is_refused_not_a_panic() {
        let region = |guest_addr, size, file_offset| MemoryRegion {
            guest_addr,
            size,
            file_offset,
        };
        let memory = MemoryLayout {
            regions: vec![
                region(
                    18375230965560653623,
                    3978709506094217215,
                    17221766074895302655,
                ),
                region(u64::MAX, 18446497783091298303, 3834029163820351487),
                region(
                    3834029160431353855,
                    11961280463370158079,
                    18389664023676190719,
                ),
                region(u64::MAX, 18403115452319399935, 144115188075803935),
                region(0, 0, 0),
            ],
        };
        let err = state(18446531867965390848, memory)
            .check_consistent()
            .unwrap_err();
        assert!(err.contains("the memory layout holds"), "{err}");
        // Sizes whose wrapped sum is exactly the machine's 1 MiB: without overflow checks a
        // plain sum let this through.
        let wraps = MemoryLayout {
            regions: vec![
                region(0, 1 << 63, 0),
                region(1 << 63, 1 << 63, 1 << 63),
                region(0, 1 << 20, 0),
            ],
        };
        let err = state(1, wraps).check_consistent().unwrap_err();
        assert!(err.contains(&format!("holds {} bytes", u64::MAX)), "{err}");
    }

    /// `mem_mib << 20` drops high bits: 2^44 + 1 MiB would have matched a 1 MiB layout.
    #[test]
    fn a_machine_size_beyond_u64_bytes_is_refused() {
        let memory = MemoryLayout::packed([(0, 1 << 20)]);
        let err = state((1 << 44) + 1, memory).check_consistent().unwrap_err();
        assert!(err.contains("17592186044417 MiB"), "{err}");
    }
}
