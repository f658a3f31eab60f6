//! Building a VM from a snapshot: the same machine as the one saved (vCPU count, memory layout,
//! devices in the same slots), guest RAM mapped privately from the memory file (or, with the
//! uffd backend, anonymous and filled on demand by a userfaultfd handler), then the saved
//! device, VM and vCPU state written over the fresh one instead of loading a kernel. Everything
//! is checked before any vCPU runs: a bad snapshot leaves nothing running.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::channel;

use super::{create_vcpu, start, BootTimings, Built, Vmm, VmmError};
use crate::config::{NetConfig, VmConfig, VsockConfig};
use crate::device_manager::DeviceManager;
use crate::memory;
use crate::persist::MicrovmState;
use crate::process_stats::monotonic_ns;
use crate::seccomp::{SeccompLevel, ThreadKind};
use crate::uffd::{ExternalSetup, UffdBackend, UffdSetup};
use crate::vstate::vm::Vm;
use snapshot::MemoryKind;

/// How guest memory comes back from the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBackend {
    /// mmap MAP_PRIVATE: the kernel's page cache faults pages in.
    File,
    /// Anonymous memory registered with userfaultfd; a handler thread copies pages in on first
    /// touch, after prefetching the recorded working set (see [`crate::uffd`]).
    Uffd,
    /// Anonymous memory registered with userfaultfd, handed to an external handler listening
    /// on the Unix socket at `mem_file_path` (Firecracker's protocol): this VMM never sees the
    /// memory file, so only the state file is checked here; the handler checks the mappings
    /// against its memory file.
    UffdSocket,
}

/// What `PUT /snapshot/load` asks for.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub snapshot_path: PathBuf,
    /// The memory file, or with [`MemoryBackend::UffdSocket`] the external handler's socket.
    pub mem_file_path: PathBuf,
    pub backend: MemoryBackend,
    /// Run the vCPUs at once; otherwise the VM starts paused.
    pub resume: bool,
    pub seccomp: SeccompLevel,
    /// KVM dirty logging on guest RAM, so the restored VM can take diff snapshots (relative to
    /// this snapshot).
    pub track_dirty_pages: bool,
    /// Another vsock Unix socket path and optionally CID than the snapshot's, so several VMs
    /// restored from one snapshot do not collide.
    pub vsock_override: Option<(PathBuf, Option<u64>)>,
    /// The NIC's egress filter, required exactly when the snapshot's VM has a NIC: a snapshot
    /// never holds the policy (its credentials stay off disk), and each restore of one snapshot
    /// may give its sandbox another policy, audit log and name.
    pub net: Option<NetConfig>,
}

pub fn restore(request: &RestoreConfig, console: Box<dyn Write + Send>) -> Result<Vmm, VmmError> {
    let build_start_ns = monotonic_ns();
    let (state, checksum): (MicrovmState, _) =
        snapshot::read_state_file_with_checksum(&request.snapshot_path)?;
    state.check_consistent().map_err(VmmError::SnapshotState)?;
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
    match (&request.net, &state.devices.net) {
        (None, Some(_)) => {
            return Err(VmmError::SnapshotState(
                "the snapshot's microVM has a NIC: give the restored one its egress policy \
                 (--egress-policy FILE, or PUT /egress/policy before PUT /snapshot/load); \
                 snapshots do not keep the policy, whose credentials never go to disk"
                    .into(),
            ))
        }
        (Some(_), None) => {
            return Err(VmmError::SnapshotState(
                "an egress policy was given, but the snapshot's microVM has no NIC (it was \
                 booted without one, and a restore cannot add a device)"
                    .into(),
            ))
        }
        _ => {}
    }
    let config = VmConfig {
        vcpus: state.vcpu_count,
        mem_mib: state.mem_mib,
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        skip_linux_host_check: true,
        record_rss_before_guest: false,
        vsock,
        net: request.net.clone(),
        seccomp: request.seccomp,
        track_dirty_pages: request.track_dirty_pages,
        seccomp_test_violation: None,
    };
    config.validate_machine()?;
    let mem_file = match request.backend {
        MemoryBackend::UffdSocket => None,
        MemoryBackend::File | MemoryBackend::Uffd => Some(snapshot::open_memory_file(
            &request.mem_file_path,
            &state.memory,
        )?),
    };
    let working_set = match (request.backend, &mem_file) {
        (MemoryBackend::Uffd, Some(file)) => usable_working_set(&request.mem_file_path, file)?,
        _ => None,
    };
    crate::host::check_kvm_access()?;

    let (events_tx, events_rx) = channel();
    let vm = Vm::new()?;
    let (mem, memory_backend) = match (request.backend, mem_file) {
        (MemoryBackend::File, Some(mem_file)) => (
            memory::map_memory_file(mem_file, &state.memory, state.mem_mib)?,
            None,
        ),
        (MemoryBackend::Uffd, Some(mem_file)) => {
            let mem = memory::map_anonymous(&state.memory, state.mem_mib)?;
            // Started before anything (KVM, device restore) can touch guest memory.
            let backend = UffdBackend::start(UffdSetup {
                mem: &mem,
                layout: &state.memory,
                mem_file,
                mem_file_path: request.mem_file_path.clone(),
                working_set,
                events: events_tx.clone(),
                seccomp: config.thread_seccomp(ThreadKind::UffdHandler),
            })?;
            (mem, Some(backend))
        }
        (_, _) => {
            let mem = memory::map_anonymous(&state.memory, state.mem_mib)?;
            // Handed over before anything (KVM, device restore) can touch guest memory.
            let backend = UffdBackend::connect(ExternalSetup {
                mem: &mem,
                layout: &state.memory,
                socket_path: &request.mem_file_path,
                events: events_tx.clone(),
                seccomp: config.thread_seccomp(ThreadKind::UffdHandler),
            })?;
            (mem, Some(backend))
        }
    };
    vm.register_memory(&mem, config.track_dirty_pages)?;
    let kvm_ready_ns = monotonic_ns();

    let devices = DeviceManager::new(
        vm.fd(),
        &mem,
        console,
        events_tx.clone(),
        config.vsock.as_ref(),
        config
            .net
            .as_ref()
            .map(|net| (net, config.thread_seccomp(ThreadKind::Egress))),
        Some(&state.devices),
    )?;
    let vcpu_fds = state
        .vcpus
        .iter()
        .map(|vcpu| create_vcpu(&vm, vcpu.index))
        .collect::<Result<Vec<_>, _>>()?;
    state.vm.restore(vm.fd())?;
    for (vcpu, fd) in state.vcpus.iter().zip(&vcpu_fds) {
        vcpu.restore(fd, vm.xsave_size())?;
    }
    if let Some(backend) = &memory_backend {
        backend.check_connected()?;
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
            memory_backend,
        },
        !request.resume,
    )?;
    vmm.last_snapshot = Some(state.identity(checksum));
    Ok(vmm)
}

/// The working set recorded for this memory file by an earlier uffd restore, if there is one and
/// it is this file's (a set left from an earlier snapshot under the same name is ignored, and a
/// new one recorded). A corrupt set is refused: it says something is wrong with the snapshot.
fn usable_working_set(
    mem_file_path: &std::path::Path,
    mem_file: &std::fs::File,
) -> Result<Option<snapshot::WorkingSet>, VmmError> {
    let path = snapshot::working_set_path(mem_file_path);
    let Some(set) = snapshot::read_working_set(&path)? else {
        return Ok(None);
    };
    if set.matches(snapshot::memory_file_identity(mem_file_path, mem_file)?) {
        Ok(Some(set))
    } else {
        tracing::warn!(
            "{}: recorded for another memory file (size or mtime differ); recording a new one",
            path.display()
        );
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_working_set_of_another_memory_file_is_ignored_and_a_corrupt_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("vm.mem");
        std::fs::write(&mem, vec![1u8; 8 << 12]).unwrap();
        let file = std::fs::File::open(&mem).unwrap();
        assert!(
            usable_working_set(&mem, &file).unwrap().is_none(),
            "none yet"
        );
        let identity = snapshot::memory_file_identity(&mem, &file).unwrap();
        let set = snapshot::WorkingSet {
            mem_file_len: identity.0,
            mem_file_mtime_ns: identity.1,
            pages: vec![3, 1],
        };
        let ws = snapshot::working_set_path(&mem);
        snapshot::write_working_set(&ws, &set).unwrap();
        assert_eq!(usable_working_set(&mem, &file).unwrap(), Some(set.clone()));
        let stale = snapshot::WorkingSet {
            mem_file_mtime_ns: identity.1 + 1,
            ..set
        };
        snapshot::write_working_set(&ws, &stale).unwrap();
        assert!(usable_working_set(&mem, &file).unwrap().is_none(), "stale");
        std::fs::write(&ws, b"AGVMWSET\x01").unwrap();
        let err = usable_working_set(&mem, &file).unwrap_err().to_string();
        assert!(err.contains("vm.mem.ws: truncated"), "{err}");
    }
}
