//! The VM's lifecycle as the API sees it: NotStarted (collecting the pending configuration) →
//! Running ⇄ Paused → Stopped. Pre-boot resources are refused once InstanceStart was accepted.

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use devices::virtio::vsock::VsockMetrics;
use egress::policy::{ParseOptions, Policy};
use hyper::Method;

use super::after_restore::{self, AfterRestoreMetrics, AfterRestoreStep, AgentRoute};
use super::audit::AuditLog;
use super::exec_metrics::ExecMetrics;
use super::exec_trace::ExecObserver;
use super::fault::Fault;
use super::models::{
    BootSource, InstanceInfo, MachineConfig, MachineConfigPatch, NetworkInterface, SnapshotCreate,
    SnapshotLoad, SnapshotType, Vsock,
};
use crate::config::{
    host_mem_mib, NetConfig, VmConfig, VsockConfig, LINUX_BASE_CMDLINE, MAX_VCPUS, MIN_MEM_MIB,
};
use crate::exit::VmmEvent;
use crate::guest_nic::NetCountsReader;
use crate::process_stats::monotonic_ns;
use crate::seccomp::SeccompLevel;
use crate::uffd::UffdMetrics;
use crate::vmm::{RestoreConfig, TimingsHandle};
use crate::vstate::exit_counts::{ExitCounts, ExitReason};

use super::metrics::MetricsSnapshot;
use super::request_counts::RequestCounts;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    /// InstanceStart accepted; the VMM thread is building the VM.
    Starting,
    Running,
    Paused,
    Stopped {
        reason: String,
    },
}

/// A VM the VMM thread has booted: how to reach it.
pub struct StartedVm {
    pub events: Sender<VmmEvent>,
    pub timings: TimingsHandle,
    pub exits: ExitCounts,
    /// None: the VM has no vsock device.
    pub vsock: Option<VsockMetrics>,
    /// The userfaultfd counters of a uffd restore (None: memory is not served by uffd).
    pub uffd: Option<UffdMetrics>,
    /// None: the VM has no NIC.
    pub net: Option<NetCountsReader>,
}

pub struct Controller {
    id: String,
    state: VmState,
    boot_source: Option<BootSource>,
    machine: MachineConfig,
    vsock: Option<VsockConfig>,
    seccomp: SeccompLevel,
    vm: Option<StartedVm>,
    started_at: Option<Instant>,
    metrics: Option<File>,
    requests: RequestCounts,
    exec: ExecMetrics,
    audit: Option<Arc<AuditLog>>,
    /// CLOCK_MONOTONIC ns: the VMM process's start, and when InstanceStart was done.
    vmm_start_ns: u64,
    running_ns: Option<u64>,
    /// Read once at start-up: the API thread's seccomp filter allows no file opening.
    host_mem_mib: Option<u64>,
    /// A loaded VM's after-restore step, until the VM first runs.
    after_restore_due: Option<AgentRoute>,
    after_restore: AfterRestoreMetrics,
    /// The egress policy: before InstanceStart, the one the NIC will get (None: no NIC);
    /// afterwards, the one the running NIC follows.
    egress_policy: Option<Policy>,
    /// Where the NIC's egress audit log goes (checked openable by the VMM thread).
    egress_audit: Option<PathBuf>,
    /// Listed once at start-up: the API thread's seccomp filter allows no netlink socket.
    host_addresses: Result<Vec<IpAddr>, String>,
}

const NET_MISSING: &str = "agentvm has no host-interface NICs: the guest's only network is a NIC \
     behind the VMM's egress filter, which the microVM gets when PUT /egress/policy is given \
     before InstanceStart";

/// `PUT /egress/policy` after InstanceStart on a microVM booted without a NIC.
pub const NO_NIC: &str =
    "PUT /egress/policy: this microVM has no NIC: PUT /egress/policy before InstanceStart";

impl Controller {
    /// `vmm_start_ns`: the process's start (CLOCK_MONOTONIC), the origin of the boot milestones.
    pub fn new(id: String, seccomp: SeccompLevel, vmm_start_ns: u64) -> Self {
        Self {
            id,
            state: VmState::NotStarted,
            boot_source: None,
            machine: MachineConfig::default(),
            vsock: None,
            seccomp,
            vm: None,
            started_at: None,
            metrics: None,
            requests: RequestCounts::default(),
            exec: ExecMetrics::default(),
            audit: None,
            vmm_start_ns,
            running_ns: None,
            host_mem_mib: host_mem_mib(),
            after_restore_due: None,
            after_restore: AfterRestoreMetrics::default(),
            egress_policy: None,
            egress_audit: None,
            host_addresses: egress::policy::host_addresses().map_err(|e| e.to_string()),
        }
    }

    /// How the API thread parses an egress policy: with the host's addresses listed at start-up,
    /// and no secret files (its filter forbids opening files).
    pub fn egress_parse_options(&self) -> Result<ParseOptions, Fault> {
        match &self.host_addresses {
            Ok(addresses) => Ok(ParseOptions {
                host_addresses: addresses.clone(),
                secret_files: false,
            }),
            Err(e) => Err(Fault::internal(format!(
                "PUT /egress/policy: the host's addresses (always denied) could not be listed \
                 when agentvm serve started: {e}"
            ))),
        }
    }

    /// The policy the NIC follows (after InstanceStart) or will get (before); None: no NIC.
    pub fn egress_policy(&self) -> Option<&Policy> {
        self.egress_policy.as_ref()
    }

    /// `PUT /egress/policy`: before InstanceStart the policy is kept for the NIC the VM will
    /// get (`Ok(None)`); afterwards, where to send it so the running NIC takes it.
    pub fn egress_policy_target(
        &mut self,
        policy: Policy,
    ) -> Result<Option<Sender<VmmEvent>>, Fault> {
        match (&self.state, &self.vm) {
            (VmState::NotStarted, _) => {
                self.egress_policy = Some(policy);
                Ok(None)
            }
            (VmState::Running | VmState::Paused, Some(vm)) if vm.net.is_some() => {
                Ok(Some(vm.events.clone()))
            }
            (VmState::Running | VmState::Paused, _) => Err(Fault::bad_request(NO_NIC)),
            (VmState::Starting, _) => Err(Fault::bad_request(
                "PUT /egress/policy: the microVM is starting; try again once InstanceStart \
                 has answered",
            )),
            (VmState::Stopped { reason }, _) => Err(Fault::bad_request(format!(
                "PUT /egress/policy: the microVM has stopped ({reason})"
            ))),
        }
    }

    /// The running NIC took `policy`.
    pub fn egress_policy_applied(&mut self, policy: Policy) {
        self.egress_policy = Some(policy);
    }

    /// The NIC the microVM gets at InstanceStart or PUT /snapshot/load (`request`), if PUT
    /// /egress/policy was given.
    fn net_config(&self, request: &str) -> Result<Option<NetConfig>, Fault> {
        if self.egress_audit.is_some() && self.egress_policy.is_none() {
            return Err(Fault::bad_request(format!(
                "{request}: PUT /egress/audit-log was given but no PUT /egress/policy: the \
                 audit log is the NIC's, and the microVM gets a NIC only with an egress policy"
            )));
        }
        Ok(self.egress_policy.clone().map(|policy| NetConfig {
            policy,
            audit_log: self.egress_audit.clone(),
            sandbox: self.id.clone(),
            upstream_roots: Vec::new(),
        }))
    }

    /// `PUT /egress/audit-log`, before InstanceStart: the NIC's audit log (the VMM thread has
    /// checked it can be opened for appending).
    pub fn set_egress_audit_log(&mut self, path: PathBuf) -> Result<(), Fault> {
        self.require_not_started("PUT /egress/audit-log")?;
        self.egress_audit = Some(path);
        Ok(())
    }

    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// An answered request; `route` is the matched route's template (or the unmatched label).
    pub fn count_request(&mut self, method: &Method, route: &'static str, status: u16) {
        self.requests.add(method, route, status);
    }

    /// Where `/sandbox/exec` jobs report how each exec ended.
    pub fn exec_observer(&self) -> ExecObserver {
        ExecObserver {
            sandbox_id: self.id.clone(),
            metrics: self.exec.clone(),
            audit: self.audit.clone(),
        }
    }

    /// The exec audit log's file (opened for appending), before InstanceStart.
    pub fn set_audit_log(&mut self, file: File) -> Result<(), Fault> {
        self.require_not_started("PUT /audit-log")?;
        self.audit = Some(Arc::new(AuditLog::new(file)));
        Ok(())
    }

    pub fn info(&self) -> InstanceInfo {
        let (state, stopped_reason) = match &self.state {
            VmState::NotStarted | VmState::Starting => ("Not started", None),
            VmState::Running => ("Running", None),
            VmState::Paused => ("Paused", None),
            VmState::Stopped { reason } => ("Stopped", Some(reason.clone())),
        };
        InstanceInfo {
            id: self.id.clone(),
            state: state.into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            app_name: "agentvm".into(),
            stopped_reason,
        }
    }

    /// Pre-boot-only requests pass this first.
    pub fn require_not_started(&self, what: &str) -> Result<(), Fault> {
        match self.state {
            VmState::NotStarted => Ok(()),
            _ => Err(Fault::after_start(what)),
        }
    }

    pub fn put_boot_source(&mut self, source: BootSource) -> Result<(), Fault> {
        self.require_not_started("PUT /boot-source")?;
        if !source.kernel_image_path.is_file() {
            return Err(Fault::bad_request(format!(
                "kernel_image_path {}: no such file",
                source.kernel_image_path.display()
            )));
        }
        if let Some(initrd) = &source.initrd_path {
            if !initrd.is_file() {
                return Err(Fault::bad_request(format!(
                    "initrd_path {}: no such file",
                    initrd.display()
                )));
            }
        }
        self.boot_source = Some(source);
        Ok(())
    }

    pub fn machine_config(&self) -> MachineConfig {
        self.machine
    }

    pub fn put_machine_config(&mut self, config: MachineConfig) -> Result<(), Fault> {
        self.require_not_started("PUT /machine-config")?;
        check_machine_config(&config, self.host_mem_mib)?;
        self.machine = config;
        Ok(())
    }

    pub fn patch_machine_config(&mut self, patch: MachineConfigPatch) -> Result<(), Fault> {
        self.require_not_started("PATCH /machine-config")?;
        let config = MachineConfig {
            vcpu_count: patch.vcpu_count.unwrap_or(self.machine.vcpu_count),
            mem_size_mib: patch.mem_size_mib.unwrap_or(self.machine.mem_size_mib),
            smt: patch.smt.unwrap_or(self.machine.smt),
            track_dirty_pages: patch
                .track_dirty_pages
                .unwrap_or(self.machine.track_dirty_pages),
        };
        check_machine_config(&config, self.host_mem_mib)?;
        self.machine = config;
        Ok(())
    }

    pub fn put_vsock(&mut self, vsock: Vsock) -> Result<(), Fault> {
        self.require_not_started("PUT /vsock")?;
        let config = VsockConfig {
            guest_cid: vsock.guest_cid,
            uds_path: vsock.uds_path,
        };
        config
            .validate()
            .map_err(|e| Fault::bad_request(e.to_string()))?;
        self.vsock = Some(config);
        Ok(())
    }

    pub fn put_network_interface(
        &mut self,
        path_id: &str,
        iface: NetworkInterface,
    ) -> Result<(), Fault> {
        self.require_not_started("PUT /network-interfaces")?;
        if iface.iface_id != path_id {
            return Err(Fault::bad_request(format!(
                "iface_id {:?} in the body does not match {path_id:?} in the path",
                iface.iface_id
            )));
        }
        Err(Fault::bad_request(NET_MISSING))
    }

    /// PUT /snapshot/create: where to send the request, once the body and the state allow it
    /// (the microVM must be paused, as Firecracker requires).
    pub fn snapshot_create_target(
        &self,
        request: &SnapshotCreate,
    ) -> Result<Sender<VmmEvent>, Fault> {
        super::snapshot::check_create(request)?;
        if request.snapshot_type == Some(SnapshotType::Diff) && !self.machine.track_dirty_pages {
            return Err(Fault::bad_request(
                "PUT /snapshot/create: snapshot_type \"Diff\" needs dirty page tracking: set \
                 track_dirty_pages in PUT /machine-config before InstanceStart (or in PUT \
                 /snapshot/load)",
            ));
        }
        match (&self.state, &self.vm) {
            (VmState::Paused, Some(vm)) => Ok(vm.events.clone()),
            (VmState::Running, _) => Err(Fault::bad_request(
                "PUT /snapshot/create: the microVM must be paused first (PATCH /vm                  {\"state\": \"Paused\"})",
            )),
            (VmState::Stopped { reason }, _) => Err(Fault::bad_request(format!(
                "PUT /snapshot/create: the microVM has stopped ({reason})"
            ))),
            _ => Err(Fault::bad_request(
                "PUT /snapshot/create: the microVM is not running yet (InstanceStart, or PUT \
                 /snapshot/load, first)",
            )),
        }
    }

    /// PUT /snapshot/load, first half: only before InstanceStart (the VM is built from the
    /// snapshot instead); the state is Starting until [`Controller::started`] or
    /// [`Controller::start_failed`].
    pub fn begin_load(&mut self, request: &SnapshotLoad) -> Result<RestoreConfig, Fault> {
        if self.state != VmState::NotStarted {
            return Err(Fault::bad_request(format!(
                "PUT /snapshot/load: {}",
                super::fault::AFTER_START
            )));
        }
        let net = self.net_config("PUT /snapshot/load")?;
        let mut config = super::snapshot::restore_config(request, self.seccomp)?;
        config.net = net;
        self.state = VmState::Starting;
        Ok(config)
    }

    /// A snapshot was loaded: the machine is the snapshot's, running or paused.
    /// `vsock_driver_ready`: the guest had set up its vsock device when the snapshot was taken.
    /// Once the VM runs, [`Controller::take_after_restore`] hands out its after-restore step.
    pub fn loaded(
        &mut self,
        vm: StartedVm,
        machine: MachineConfig,
        vsock: Option<VsockConfig>,
        vsock_driver_ready: bool,
        paused: bool,
    ) {
        self.after_restore_due = Some(match &vsock {
            None => AgentRoute::None(after_restore::NO_VSOCK),
            Some(_) if !vsock_driver_ready => AgentRoute::None(after_restore::NO_VSOCK_DRIVER),
            Some(v) => AgentRoute::Vsock(v.uds_path.clone()),
        });
        self.machine = machine;
        self.vsock = vsock;
        if let Some(uffd) = vm.uffd.clone() {
            // The working set is what the guest touched until it first answered an exec; it is
            // written then by the VMM thread (this hook runs on an agent job thread, which may
            // not create files).
            let events = vm.events.clone();
            self.exec.when_first_result(move || {
                uffd.end_recording();
                let _ = events.send(VmmEvent::WorkingSetComplete);
            });
        }
        self.started(vm);
        if paused {
            self.state = VmState::Paused;
        }
    }

    /// InstanceStart, first half: checks the pending configuration and hands out the VM's config;
    /// the state is Starting until [`Controller::started`] or [`Controller::start_failed`].
    pub fn begin_start(&mut self) -> Result<VmConfig, Fault> {
        if self.state != VmState::NotStarted {
            return Err(Fault::bad_request(super::fault::AFTER_START));
        }
        let source = self.boot_source.clone().ok_or_else(|| {
            Fault::bad_request(
                "InstanceStart needs a kernel first: PUT /boot-source with kernel_image_path",
            )
        })?;
        let net = self.net_config("InstanceStart")?;
        let config = VmConfig {
            // check_machine_config kept vcpu_count within 1..=MAX_VCPUS.
            vcpus: self.machine.vcpu_count.min(MAX_VCPUS as u64) as u8,
            mem_mib: self.machine.mem_size_mib,
            kernel: source.kernel_image_path,
            initrd: source.initrd_path,
            cmdline: source
                .boot_args
                .unwrap_or_else(|| LINUX_BASE_CMDLINE.to_string()),
            skip_linux_host_check: false,
            record_rss_before_guest: false,
            vsock: self.vsock.clone(),
            net,
            seccomp: self.seccomp,
            track_dirty_pages: self.machine.track_dirty_pages,
            seccomp_test_violation: None,
        };
        // The full `VmConfig::validate` runs on the VMM thread as it boots (it reads /proc, which
        // this thread's filter forbids); a kernel deleted since PUT /boot-source is caught here.
        if !config.kernel.is_file() {
            return Err(Fault::bad_request(format!(
                "InstanceStart: kernel_image_path {} no longer exists",
                config.kernel.display()
            )));
        }
        self.state = VmState::Starting;
        Ok(config)
    }

    /// The after-restore step of a loaded VM that now runs (once per load).
    pub fn take_after_restore(&mut self) -> Option<AfterRestoreStep> {
        if self.state != VmState::Running {
            return None;
        }
        self.after_restore_due.take().map(|route| AfterRestoreStep {
            route,
            metrics: self.after_restore.clone(),
        })
    }

    pub fn start_failed(&mut self) {
        self.state = VmState::NotStarted;
    }

    pub fn started(&mut self, vm: StartedVm) {
        self.vm = Some(vm);
        self.started_at = Some(Instant::now());
        self.running_ns = Some(monotonic_ns());
        self.state = VmState::Running;
    }

    pub fn stopped(&mut self, reason: String) {
        self.vm = None;
        self.state = VmState::Stopped { reason };
    }

    /// PATCH /vm: where to send the pause/resume request, if the state allows it now.
    /// `Ok(None)`: already in the asked state (Firecracker answers 204 then too).
    pub fn vm_events_for(&self, pause: bool) -> Result<Option<Sender<VmmEvent>>, Fault> {
        match (&self.state, pause) {
            (VmState::Running, false) | (VmState::Paused, true) => Ok(None),
            (VmState::Running, true) | (VmState::Paused, false) => {
                Ok(self.vm.as_ref().map(|vm| vm.events.clone()))
            }
            (VmState::Stopped { reason }, _) => Err(Fault::bad_request(format!(
                "the microVM has stopped ({reason})"
            ))),
            (VmState::NotStarted | VmState::Starting, _) => Err(Fault::bad_request(
                "the microVM is not running yet: PATCH /vm works after InstanceStart",
            )),
        }
    }

    /// `/sandbox/...` requests: the vsock Unix socket through which the guest agent answers, when
    /// the microVM has a vsock device and is running.
    pub fn agent_uds(&self, what: &str) -> Result<PathBuf, Fault> {
        let Some(vsock) = &self.vsock else {
            return Err(Fault::conflict(format!(
                "{what} needs the guest agent, which answers over vsock: this microVM has no \
                 vsock device (configure one with PUT /vsock before InstanceStart)"
            )));
        };
        match &self.state {
            VmState::Running => Ok(vsock.uds_path.clone()),
            VmState::NotStarted | VmState::Starting => Err(Fault::conflict(format!(
                "{what}: the microVM is not running yet (PUT /actions InstanceStart first)"
            ))),
            VmState::Paused => Err(Fault::conflict(format!(
                "{what}: the microVM is paused (PATCH /vm {{\"state\": \"Resumed\"}} first)"
            ))),
            VmState::Stopped { reason } => Err(Fault::conflict(format!(
                "{what}: the microVM has stopped ({reason})"
            ))),
        }
    }

    pub fn set_paused(&mut self, paused: bool) {
        if matches!(self.state, VmState::Running | VmState::Paused) {
            self.state = if paused {
                VmState::Paused
            } else {
                VmState::Running
            };
        }
    }

    pub fn set_metrics(&mut self, file: File) -> Result<(), Fault> {
        self.require_not_started("PUT /metrics")?;
        self.metrics = Some(file);
        Ok(())
    }

    /// FlushMetrics: one JSON line of the counters to the metrics file.
    pub fn flush_metrics(&mut self) -> Result<(), Fault> {
        let utc_timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = self.metrics().json_line(utc_timestamp_ms);
        let file = self.metrics.as_mut().ok_or_else(|| {
            Fault::bad_request("FlushMetrics needs a metrics file first: PUT /metrics")
        })?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| Fault::internal(format!("cannot write the metrics file: {e}")))
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        let timings = self.vm.as_ref().map(|vm| vm.timings.get());
        let since_start = |ns: u64| ns.saturating_sub(self.vmm_start_ns) / 1000;
        let exec = self.exec.snapshot();
        MetricsSnapshot {
            id: self.id.clone(),
            state: self.info().state,
            requests: self.requests.snapshot(),
            start_to_running_us: self.running_ns.map(since_start),
            start_to_first_exec_us: exec.first_result_ns.map(since_start),
            exec,
            vsock: self
                .vm
                .as_ref()
                .and_then(|vm| vm.vsock.as_ref())
                .map(VsockMetrics::snapshot),
            uffd: self
                .vm
                .as_ref()
                .and_then(|vm| vm.uffd.as_ref())
                .map(|u| u.totals()),
            after_restore: self.after_restore.snapshot(),
            net: self
                .vm
                .as_ref()
                .and_then(|vm| vm.net.as_ref())
                .map(NetCountsReader::read),
            boot_time_us: timings.and_then(|t| {
                t.first_kvm_run_ns
                    .map(|first| first.saturating_sub(t.build_start_ns) / 1000)
            }),
            boot_kvm_ready_us: timings
                .map(|t| t.kvm_ready_ns.saturating_sub(t.build_start_ns) / 1000),
            boot_loaded_us: timings
                .map(|t| t.kernel_loaded_ns.saturating_sub(t.build_start_ns) / 1000),
            uptime_ms: self.started_at.map(|t| t.elapsed().as_millis() as u64),
            vcpu_exits: match &self.vm {
                Some(vm) => vm.exits.snapshot(),
                None => ExitReason::ALL.iter().map(|&r| (r, 0)).collect(),
            },
        }
    }
}

fn check_machine_config(config: &MachineConfig, host_mib: Option<u64>) -> Result<(), Fault> {
    if config.vcpu_count == 0 || config.vcpu_count > u64::from(MAX_VCPUS) {
        return Err(Fault::bad_request(format!(
            "vcpu_count must be between 1 and {MAX_VCPUS}, got {}",
            config.vcpu_count
        )));
    }
    if config.mem_size_mib < MIN_MEM_MIB {
        return Err(Fault::bad_request(format!(
            "mem_size_mib must be at least {MIN_MEM_MIB}, got {}",
            config.mem_size_mib
        )));
    }
    if let Some(host) = host_mib {
        if config.mem_size_mib > host {
            return Err(Fault::bad_request(format!(
                "mem_size_mib {} is more than this host's {host} MiB of RAM",
                config.mem_size_mib
            )));
        }
    }
    if config.smt {
        return Err(Fault::bad_request(
            "smt: simultaneous multithreading is not supported by agentvm's machine model",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        Controller::new("t".into(), SeccompLevel::Off, monotonic_ns())
    }

    #[test]
    fn machine_config_bounds_and_state_rules() {
        let mut c = controller();
        for (vcpus, mem) in [(0, 128), (17, 128), (1, 8)] {
            let bad = MachineConfig {
                vcpu_count: vcpus,
                mem_size_mib: mem,
                ..MachineConfig::default()
            };
            assert!(c.put_machine_config(bad).is_err(), "{vcpus} {mem}");
        }
        assert!(c
            .patch_machine_config(MachineConfigPatch {
                vcpu_count: Some(2),
                mem_size_mib: None,
                smt: None,
                track_dirty_pages: None
            })
            .is_ok());
        assert_eq!(c.machine_config().vcpu_count, 2);
        let no_kernel = c.begin_start().unwrap_err();
        assert!(
            no_kernel.message.contains("PUT /boot-source"),
            "{no_kernel:?}"
        );
        assert_eq!(c.state(), &VmState::NotStarted);
        assert!(c.vm_events_for(true).is_err());
        c.state = VmState::Running;
        let late = c.put_machine_config(MachineConfig::default()).unwrap_err();
        assert!(late.message.starts_with(super::super::fault::AFTER_START));
        assert!(c.begin_start().is_err());
        assert_eq!(c.info().state, "Running");
    }

    #[test]
    fn egress_policy_waits_for_the_boot_and_needs_a_nic_afterwards() {
        let mut c = controller();
        let options = c.egress_parse_options().unwrap();
        assert!(!options.secret_files);
        let policy =
            Policy::from_json_str_with(r#"{"rules": [{"cidr": "0.0.0.0/0"}]}"#, &options).unwrap();
        assert!(c.egress_policy_target(policy.clone()).unwrap().is_none());
        assert_eq!(c.egress_policy().map(|p| p.rules().len()), Some(1));
        c.state = VmState::Starting;
        let starting = c.egress_policy_target(policy.clone()).unwrap_err();
        assert!(starting.message.contains("starting"), "{starting:?}");
        // Running without a StartedVm holding a NIC reader: no NIC.
        c.state = VmState::Running;
        let no_nic = c.egress_policy_target(policy).unwrap_err();
        assert_eq!(no_nic.message, NO_NIC);
        let late = c
            .set_egress_audit_log("/tmp/egress.jsonl".into())
            .unwrap_err();
        assert!(late.message.starts_with(super::super::fault::AFTER_START));
    }
}
