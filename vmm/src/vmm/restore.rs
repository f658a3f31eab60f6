//! Building a VM from a snapshot: the same machine as the one saved (vCPU count, memory layout,
//! devices in the same slots), guest RAM mapped privately from the memory file, then the saved
//! device, VM and vCPU state written over the fresh one instead of loading a kernel. Everything
//! is checked before any vCPU runs: a bad snapshot leaves nothing running.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::channel;

use super::{create_vcpu, start, BootTimings, Built, Vmm, VmmError};
use crate::config::{VmConfig, VsockConfig};
use crate::device_manager::DeviceManager;
use crate::memory;
use crate::persist::MicrovmState;
use crate::process_stats::monotonic_ns;
use crate::seccomp::SeccompLevel;
use crate::vstate::vm::Vm;
use snapshot::MemoryKind;

/// What `PUT /snapshot/load` asks for.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    /// Run the vCPUs at once; otherwise the VM starts paused.
    pub resume: bool,
    pub seccomp: SeccompLevel,
    /// KVM dirty logging on guest RAM, so the restored VM can take diff snapshots (relative to
    /// this snapshot).
    pub track_dirty_pages: bool,
    /// Another vsock Unix socket path and optionally CID than the snapshot's, so several VMs
    /// restored from one snapshot do not collide.
    pub vsock_override: Option<(PathBuf, Option<u64>)>,
}

pub fn restore(request: &RestoreConfig, console: Box<dyn Write + Send>) -> Result<Vmm, VmmError> {
    let build_start_ns = monotonic_ns();
    let (state, checksum): (MicrovmState, _) =
        snapshot::read_state_file_with_checksum(&request.snapshot_path)?;
    check_consistent(&state)?;
    if let MemoryKind::Diff { .. } = state.memory_kind {
        return Err(VmmError::SnapshotState(format!(
            "{} is a diff snapshot: its memory file holds only the pages changed since its base; \
             merge it onto the base first (agentvm snapshot merge)",
            request.snapshot_path.display()
        )));
    }
    let vsock = match (&request.vsock_override, &state.vsock) {
        (None, vsock) => vsock.clone(),
        (Some((uds_path, guest_cid)), Some(saved)) => Some(VsockConfig {
            guest_cid: guest_cid.unwrap_or(saved.guest_cid),
            uds_path: uds_path.clone(),
        }),
        (Some(_), None) => {
            return Err(VmmError::SnapshotState(
                "vsock_override: the snapshot's VM has no vsock device".into(),
            ))
        }
    };
    let config = VmConfig {
        vcpus: state.vcpu_count,
        mem_mib: state.mem_mib,
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        skip_linux_host_check: true,
        record_rss_before_guest: false,
        vsock,
        seccomp: request.seccomp,
        track_dirty_pages: request.track_dirty_pages,
        seccomp_test_violation: None,
    };
    config.validate_machine()?;
    let mem_file = snapshot::open_memory_file(&request.mem_file_path, &state.memory)?;
    crate::host::check_kvm_access()?;

    let vm = Vm::new()?;
    let mem = memory::map_memory_file(mem_file, &state.memory, state.mem_mib)?;
    vm.register_memory(&mem, config.track_dirty_pages)?;
    let kvm_ready_ns = monotonic_ns();

    let (events_tx, events_rx) = channel();
    let devices = DeviceManager::new(
        vm.fd(),
        &mem,
        console,
        events_tx.clone(),
        config.vsock.as_ref(),
        Some(&state.devices),
    )?;
    let vcpu_fds = state
        .vcpus
        .iter()
        .map(|vcpu| create_vcpu(&vm, vcpu.index))
        .collect::<Result<Vec<_>, _>>()?;
    state.vm.restore(vm.fd())?;
    for (vcpu, fd) in state.vcpus.iter().zip(&vcpu_fds) {
        vcpu.restore(fd)?;
    }
    let loaded_ns = monotonic_ns();
    let mut vmm = start(
        &config,
        Built {
            vm,
            mem,
            devices,
            vcpu_fds,
            events: (events_tx, events_rx),
            timings: BootTimings {
                build_start_ns,
                kvm_ready_ns,
                kernel_loaded_ns: loaded_ns,
                vcpus_started_ns: loaded_ns,
                first_kvm_run_ns: None,
                rss_before_guest: None,
            },
        },
        !request.resume,
    )?;
    vmm.last_snapshot = Some(state.identity(checksum));
    Ok(vmm)
}

/// The parts of the state file that must agree with each other (the file passed its checksum,
/// but a writer bug or a hand-made file could still disagree with itself).
fn check_consistent(state: &MicrovmState) -> Result<(), VmmError> {
    let bad = |why: String| Err(VmmError::SnapshotState(why));
    if state.vcpus.len() != usize::from(state.vcpu_count) {
        return bad(format!(
            "the state file has {} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.vcpu_count
        ));
    }
    if let Some((i, vcpu)) = (0u8..).zip(&state.vcpus).find(|(i, vcpu)| vcpu.index != *i) {
        return bad(format!("vCPU state {i} is for vCPU {}", vcpu.index));
    }
    if state.memory.total_size() != state.mem_mib << 20 {
        return bad(format!(
            "the memory layout holds {} bytes, the machine has {} MiB",
            state.memory.total_size(),
            state.mem_mib
        ));
    }
    Ok(())
}
