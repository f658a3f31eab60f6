//! Building a VM from a [`VmConfig`], running it, and tearing it down.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::signal::Killable;

use crate::config::{ConfigError, VmConfig, VsockConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::exit::{VcpuControl, VcpuStop, VmOutcome, VmmEvent};
use crate::kernel::{self, KernelError};
use crate::memory::{self, MemoryError};
use crate::process_stats::{self, monotonic_ns, Rss};
use crate::seccomp::{ThreadKind, ThreadSeccomp};
use crate::uffd::{UffdBackend, UffdMetrics};
use crate::vstate::exit_counts::ExitCounts;
use crate::vstate::pause::{RunSwitches, VcpuGate};
use crate::vstate::vcpu::{kick_signal, Vcpu, VcpuChannels, VcpuRequest};
use crate::vstate::vm::{Vm, VmError};

mod dirty_pages;
mod restore;
mod snapshot_create;

pub use restore::{restore, MemoryBackend, RestoreConfig};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("boot setup: {0}")]
    Arch(#[from] arch::Error),
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPUs did not stop within {0:?} ({parked} of {total} parked)", parked = .1, total = .2)]
    PauseTimeout(Duration, usize, usize),
    #[error("cannot start vCPU thread {index}: {source}")]
    SpawnVcpu { index: u8, source: std::io::Error },
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("snapshot: {0}")]
    VcpuState(#[from] crate::vstate::vcpu_state::VcpuStateError),
    #[error("snapshot: {0}")]
    VmState(#[from] crate::vstate::vm_state::VmStateError),
    #[error("snapshot: {0}")]
    SnapshotState(String),
    #[error(transparent)]
    Uffd(#[from] crate::uffd::UffdError),
}

/// Milestones of one boot (CLOCK_MONOTONIC ns, see [`process_stats::monotonic_ns`]), for
/// `agentvm bench` and the boot-path profile.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BootTimings {
    pub build_start_ns: u64,
    pub kvm_ready_ns: u64,
    pub kernel_loaded_ns: u64,
    pub vcpus_started_ns: u64,
    /// When the first vCPU entered KVM_RUN (None if none has yet).
    pub first_kvm_run_ns: Option<u64>,
    /// VMM memory with the guest loaded but before any vCPU ran (only when
    /// `VmConfig::record_rss_before_guest`: reading /proc costs start-up time).
    pub rss_before_guest: Option<Rss>,
}

#[derive(Clone)]
pub struct TimingsHandle {
    base: BootTimings,
    first_run: Arc<OnceLock<u64>>,
}

impl TimingsHandle {
    pub fn get(&self) -> BootTimings {
        BootTimings {
            first_kvm_run_ns: self.first_run.get().copied(),
            ..self.base
        }
    }
}

/// What a snapshot records about the machine besides its state: enough to build it again.
#[derive(Debug, Clone)]
struct Machine {
    vcpus: u8,
    mem_mib: u64,
    vsock: Option<VsockConfig>,
    track_dirty_pages: bool,
}

/// A running VM. Dropping it stops and joins every thread it started.
pub struct Vmm {
    // Field order matters for drop: threads are stopped in `Drop` before the VM fd and the
    // memory mapping go away.
    vcpu_threads: Vec<JoinHandle<()>>,
    /// One per vCPU thread, in index order: work for a parked vCPU (saving its state).
    vcpu_requests: Vec<Sender<VcpuRequest>>,
    stop: Arc<AtomicBool>,
    gate: Arc<VcpuGate>,
    exits: ExitCounts,
    events_tx: Sender<VmmEvent>,
    events_rx: Receiver<VmmEvent>,
    devices: DeviceManager,
    timings: BootTimings,
    first_run: Arc<OnceLock<u64>>,
    machine: Machine,
    /// The state-file checksum of the snapshot this VM's memory last matched (the last one
    /// written, or the one it was restored from): the base of the next diff snapshot. None
    /// until then, or after a snapshot failed (the dirty log was consumed).
    last_snapshot: Option<[u8; 32]>,
    /// Stopped in `shutdown` after the vCPU threads: a vCPU blocked on a fault only gets out
    /// once the handler fills its page.
    memory_backend: Option<UffdBackend>,
    // Dropped only once every vCPU thread has been joined (see `shutdown`).
    vm: Option<Vm>,
    mem: Option<GuestMemoryMmap>,
    threads_stuck: bool,
}

/// Boots the VM described by `config`; guest console output goes to `console`.
pub fn boot(config: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vmm, VmmError> {
    let build_start_ns = monotonic_ns();
    config.validate()?;
    crate::host::check_kvm_access()?;
    let format = kernel::detect_format(&config.kernel)?;
    if format.is_linux() && !config.skip_linux_host_check {
        crate::host::check_can_run_linux()?;
    }

    let vm = Vm::new()?;
    let mem_bytes = config.mem_mib << 20;
    let mem = memory::create_guest_memory(mem_bytes)?;
    vm.register_memory(&mem, config.track_dirty_pages)?;
    let kvm_ready_ns = monotonic_ns();

    let (events_tx, events_rx) = channel();
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
        None,
    )?;

    let loaded = kernel::load_kernel(&mem, &config.kernel, format, config.mem_mib)?;
    let initrd = match &config.initrd {
        Some(path) => Some(kernel::load_initrd(&mem, path, loaded.end)?),
        None => None,
    };
    let cmdline = build_cmdline(&config.cmdline, devices.cmdline_device_args())?;
    let cmdline_addr = GuestAddress(arch::layout::CMDLINE_START);
    linux_loader::loader::load_cmdline(&mem, cmdline_addr, &cmdline)
        .map_err(|e| VmmError::Cmdline(e.to_string()))?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(|e| VmmError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    arch::write_boot_params(
        &mem,
        cmdline_addr,
        cmdline_size,
        initrd,
        loaded.setup_header,
    )?;
    arch::setup_mptable(&mem, config.vcpus)?;
    // After the zero page: ACPI is how Linux finds the virtio-mmio devices and the vCPUs (Debian's
    // kernel has neither MP-table parsing nor command-line virtio-mmio devices built in).
    let rsdp = arch::setup_acpi(&mem, config.vcpus, devices.acpi_devices())?;
    arch::set_acpi_rsdp(&mem, rsdp)?;
    let kernel_loaded_ns = monotonic_ns();

    let zero_page = GuestAddress(arch::layout::ZERO_PAGE_START);
    let mut vcpu_fds = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let fd = create_vcpu(&vm, index)?;
        arch::configure_vcpu(
            vm.kvm(),
            &fd,
            &mem,
            index,
            config.vcpus,
            loaded.entry,
            zero_page,
        )?;
        vcpu_fds.push(fd);
    }
    start(
        config,
        Built {
            vm,
            mem,
            devices,
            vcpu_fds,
            events: (events_tx, events_rx),
            timings: BootTimings {
                build_start_ns,
                kvm_ready_ns,
                kernel_loaded_ns,
                vcpus_started_ns: kernel_loaded_ns,
                first_kvm_run_ns: None,
                rss_before_guest: config.record_rss_before_guest.then(process_stats::rss),
            },
            memory_backend: None,
        },
        false,
    )
}

fn create_vcpu(vm: &Vm, index: u8) -> Result<VcpuFd, VmmError> {
    vm.fd()
        .create_vcpu(index as u64)
        .map_err(|source| VmmError::CreateVcpu { index, source })
}

/// A VM with its memory, devices and vCPUs set up (from a kernel or from a snapshot), not yet
/// running.
struct Built {
    vm: Vm,
    mem: GuestMemoryMmap,
    devices: DeviceManager,
    vcpu_fds: Vec<VcpuFd>,
    events: (Sender<VmmEvent>, Receiver<VmmEvent>),
    timings: BootTimings,
    /// The userfaultfd handler serving guest memory (a uffd restore).
    memory_backend: Option<UffdBackend>,
}

/// Starts the device loop and one thread per vCPU. With `paused`, the vCPUs park before their
/// first KVM_RUN until [`VcpuGate::resume`].
fn start(config: &VmConfig, built: Built, paused: bool) -> Result<Vmm, VmmError> {
    let Built {
        vm,
        mem,
        mut devices,
        vcpu_fds,
        events: (events_tx, events_rx),
        timings,
        memory_backend,
    } = built;
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(VcpuGate::default());
    if paused {
        gate.pause();
    }
    let exits = ExitCounts::default();
    let first_run = Arc::new(OnceLock::new());
    let io = devices.io_manager();
    let mut vcpus = Vec::with_capacity(vcpu_fds.len());
    let mut vcpu_requests = Vec::with_capacity(vcpu_fds.len());
    for (index, fd) in (0u8..).zip(vcpu_fds) {
        let (requests_tx, requests_rx) = channel();
        vcpu_requests.push(requests_tx);
        vcpus.push(Vcpu::new(
            index,
            fd,
            io.clone(),
            VcpuChannels {
                events: events_tx.clone(),
                requests: requests_rx,
            },
            RunSwitches {
                stop: stop.clone(),
                gate: gate.clone(),
                exits: exits.clone(),
            },
            first_run.clone(),
            // The hook fires on one vCPU only, so the report is a single line.
            ThreadSeccomp {
                test_violation: index == 0
                    && config.seccomp_test_violation == Some(ThreadKind::Vcpu),
                ..config.thread_seccomp(ThreadKind::Vcpu)
            },
        ));
    }
    devices.start_event_loop(config.thread_seccomp(ThreadKind::Devices))?;

    let mut vmm = Vmm {
        vcpu_threads: Vec::with_capacity(vcpus.len()),
        vcpu_requests,
        stop,
        gate,
        exits,
        events_tx,
        events_rx,
        devices,
        timings,
        first_run,
        machine: Machine {
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            vsock: config.vsock.clone(),
            track_dirty_pages: config.track_dirty_pages,
        },
        last_snapshot: None,
        memory_backend,
        vm: Some(vm),
        mem: Some(mem),
        threads_stuck: false,
    };
    for vcpu in vcpus {
        let index = vmm.vcpu_threads.len() as u8;
        let handle = vcpu
            .spawn()
            .map_err(|source| VmmError::SpawnVcpu { index, source })?;
        vmm.vcpu_threads.push(handle);
    }
    vmm.timings.vcpus_started_ns = monotonic_ns();
    Ok(vmm)
}

fn build_cmdline(base: &str, device_args: Vec<String>) -> Result<Cmdline, VmmError> {
    let mut cmdline = Cmdline::new(arch::layout::CMDLINE_MAX_SIZE)
        .map_err(|e| VmmError::Cmdline(e.to_string()))?;
    let base = base.trim();
    if !base.is_empty() {
        cmdline
            .insert_str(base)
            .map_err(|e| VmmError::Cmdline(format!("{e} (in {base:?})")))?;
    }
    for arg in device_args {
        cmdline
            .insert_str(&arg)
            .map_err(|e| VmmError::Cmdline(format!("{e} (adding {arg:?})")))?;
    }
    Ok(cmdline)
}

impl Vmm {
    /// Lets other parts of the process (signal handling, API, timers) end the VM.
    pub fn event_sender(&self) -> Sender<VmmEvent> {
        self.events_tx.clone()
    }

    pub fn vcpu_count(&self) -> u8 {
        self.machine.vcpus
    }

    pub fn mem_mib(&self) -> u64 {
        self.machine.mem_mib
    }

    pub fn vsock(&self) -> Option<&VsockConfig> {
        self.machine.vsock.as_ref()
    }

    pub fn timings(&self) -> BootTimings {
        self.timings_handle().get()
    }

    /// vCPU exits by reason, readable while the VM runs (and after).
    pub fn exit_counts(&self) -> ExitCounts {
        self.exits.clone()
    }

    /// The userfaultfd counters, if guest memory is served by a uffd handler.
    pub fn uffd_metrics(&self) -> Option<UffdMetrics> {
        self.memory_backend.as_ref().and_then(UffdBackend::metrics)
    }

    /// Whether the guest's driver has set up the vsock device (after a restore: had, when the
    /// snapshot was taken). False without a vsock device.
    pub fn vsock_driver_ready(&self) -> bool {
        self.devices.vsock_driver_ready()
    }

    /// The vsock device's packet and byte counters, if the VM has one.
    pub fn vsock_metrics(&self) -> Option<devices::virtio::vsock::VsockMetrics> {
        self.devices.vsock_metrics()
    }

    /// Replaces the egress policy of the VM's NIC: new connections and DNS answers follow it.
    /// False when the VM has no NIC.
    pub fn set_egress_policy(&self, policy: egress::policy::Policy) -> bool {
        self.devices.set_egress_policy(policy)
    }

    /// The NIC's counters for other threads, if the VM has a NIC.
    pub fn net_counts_reader(&self) -> Option<crate::guest_nic::NetCountsReader> {
        self.devices.net_counts_reader()
    }

    /// A handle for the SIGUSR1 state dump, usable from any thread while the VM runs.
    pub fn diagnostics(&self) -> crate::diagnostics::Diagnostics {
        crate::diagnostics::Diagnostics {
            transports: self
                .devices
                .named_transports()
                .into_iter()
                .map(|(name, t)| (name, std::sync::Arc::downgrade(&t)))
                .collect(),
            exits: self.exits.clone(),
        }
    }

    /// Timings that stay readable after [`Vmm::wait`] consumed the VM.
    pub fn timings_handle(&self) -> TimingsHandle {
        TimingsHandle {
            base: self.timings,
            first_run: self.first_run.clone(),
        }
    }

    /// Blocks until the guest ends, a vCPU fails, a stop is requested or `limit` (wall clock from
    /// now) passes; then tears down.
    pub fn wait(self, limit: Option<Duration>) -> VmOutcome {
        self.wait_inner(limit, false)
    }

    /// Like [`Vmm::wait`], but also ends the VM as soon as a vCPU first enters the guest: the
    /// boot-path benchmark measures the VMM's own start-up this way, on any host.
    pub fn wait_until_first_run(self, limit: Option<Duration>) -> VmOutcome {
        self.wait_inner(limit, true)
    }

    fn wait_inner(mut self, limit: Option<Duration>, stop_at_first_run: bool) -> VmOutcome {
        let deadline = limit.map(|l| (Instant::now() + l, l));
        let outcome = loop {
            let event = match deadline {
                Some((at, limit)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    match self.events_rx.recv_timeout(left) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => break VmOutcome::TimedOut(limit),
                        Err(RecvTimeoutError::Disconnected) => break VmOutcome::Signalled(0),
                    }
                }
                None => match self.events_rx.recv() {
                    Ok(event) => event,
                    // Unreachable while `self` holds a sender; kept total rather than panicking.
                    Err(_) => break VmOutcome::Signalled(0),
                },
            };
            match event {
                VmmEvent::GuestReset => break VmOutcome::GuestReset,
                VmmEvent::FirstKvmRun if stop_at_first_run => break VmOutcome::StoppedAtFirstRun,
                VmmEvent::FirstKvmRun => continue,
                VmmEvent::Signal(sig) => break VmOutcome::Signalled(sig),
                VmmEvent::Stop => break VmOutcome::Stopped,
                VmmEvent::Control(request) => {
                    let result = match request.action {
                        VcpuControl::Pause => self.pause().map_err(|e| e.to_string()),
                        VcpuControl::Resume => {
                            self.gate.resume();
                            Ok(())
                        }
                    };
                    (request.reply)(result);
                    continue;
                }
                VmmEvent::SetEgressPolicy(request) => {
                    (request.reply)(self.set_egress_policy(request.policy));
                    continue;
                }
                VmmEvent::MemoryBackendFailed(why) => break VmOutcome::MemoryBackendFailed(why),
                VmmEvent::WorkingSetComplete => {
                    if let Some(backend) = self.memory_backend.as_mut() {
                        backend.save_working_set();
                    }
                    continue;
                }
                VmmEvent::CreateSnapshot(request) => {
                    let result = self
                        .create_snapshot(
                            &request.snapshot_path,
                            &request.mem_file_path,
                            request.diff,
                        )
                        .map_err(|e| e.to_string());
                    (request.reply)(result);
                    continue;
                }
                VmmEvent::VcpuStopped {
                    outcome: VcpuStop::Requested,
                    ..
                } => continue,
                VmmEvent::VcpuStopped { index, outcome } => {
                    break VmOutcome::VcpuFailed {
                        index,
                        stop: outcome,
                    }
                }
            }
        };
        self.shutdown();
        outcome
    }

    /// Parks every vCPU outside KVM_RUN: each is kicked until it reaches the gate, so when this
    /// returns Ok no guest code runs until [`VcpuGate::resume`].
    fn pause(&mut self) -> Result<(), VmmError> {
        const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
        self.gate.pause();
        let total = self.vcpu_threads.len();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let parked = self.gate.parked();
            if parked == total {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.gate.resume();
                return Err(VmmError::PauseTimeout(PAUSE_TIMEOUT, parked, total));
            }
            // A kick can land just before the thread re-enters KVM_RUN; repeat until it parks.
            for handle in &self.vcpu_threads {
                let _ = handle.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stops every vCPU (kicking each out of KVM_RUN until it notices) and the device threads,
    /// then flushes the console. Idempotent.
    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.gate.wake_all();
        for handle in self.vcpu_threads.drain(..) {
            // A kick can land just before the thread re-enters KVM_RUN; repeat until it is out.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !handle.is_finished() && Instant::now() < deadline {
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_micros(200));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                tracing::error!("a vCPU thread did not stop within 5 s; leaving it detached");
                self.threads_stuck = true;
            }
        }
        self.devices.shutdown();
        if let Some(backend) = self.memory_backend.as_mut() {
            backend.finish();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
        if self.threads_stuck {
            // A vCPU thread may still touch guest memory or the VM: leak both rather than unmap
            // memory under it. The process is about to report the failure and exit anyway.
            std::mem::forget(self.vm.take());
            std::mem::forget(self.mem.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_gets_device_args_appended() {
        let c = build_cmdline(
            "console=ttyS0 quiet",
            vec!["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 quiet virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn overlong_cmdline_is_a_clear_error() {
        let long = "x".repeat(4096);
        let err = build_cmdline(&long, vec![]).unwrap_err();
        assert!(err.to_string().starts_with("kernel command line"), "{err}");
    }
}
