//! `agentvm serve`: one VMM process per VM, configured and driven over the HTTP API on a Unix
//! socket (Firecracker-compatible where they overlap), or booted at once from a config file.
//!
//! The main thread is the VMM thread: before InstanceStart it serves the requests the API thread
//! hands it (boot, open log and metrics files), unfiltered; once the VM runs it installs the `vmm`
//! filter and waits for the VM to end, serving pause/resume on the way. When the guest ends, serve
//! exits as Firecracker does: the state becomes "Stopped" (visible to a GET / racing with the
//! end), the API socket is removed, and the exit status says how the VM ended (as `agentvm boot`).

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;

use super::signal_exit_code;
use super::signals::SignalForwarder;
use vmm::api::agent::AgentWorker;
use vmm::api::config_file::ConfigFile;
use vmm::api::controller::{Controller, StartedVm};
use vmm::api::handlers::{lock, ApiContext, SharedController, VmmRequest};
use vmm::api::models::MachineConfig;
use vmm::api::server::ApiServer;
use vmm::config::VmConfig;
use vmm::exit::{VmOutcome, VmmEvent};
use vmm::seccomp::{SeccompLevel, ThreadKind, ThreadSeccomp};
use vmm::vmm::{RestoreConfig, Vmm};

#[derive(Args)]
pub struct ServeArgs {
    /// Serve the HTTP API on this Unix socket (it must not exist; it is removed on exit).
    #[arg(long, value_name = "PATH", required_unless_present = "no_api")]
    api_sock: Option<PathBuf>,
    /// Boot at once from a Firecracker-style JSON file ("boot-source", "machine-config", "vsock",
    /// "logger", "metrics", "network-interfaces", and agentvm's "audit-log").
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// The instance ID reported by GET / (1-64 characters: letters, digits, '-' and '_').
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Serve no API (only with --config-file).
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    no_api: bool,
    /// Append one JSON line per `/sandbox/exec` to this file (the exec audit log: who ran what,
    /// how it ended, how long it took; never stdin/stdout contents or env values).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Write the guest's serial console to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// Run the VMM's threads without their seccomp filters. For debugging only.
    #[arg(long)]
    no_seccomp: bool,
    /// Test-only: once its seccomp filter is on, this thread makes a syscall no filter allows
    /// (`api` only; `agentvm boot` has the hook for the other threads).
    #[arg(long, hide = true, value_name = "THREAD")]
    seccomp_test_violation: Option<ThreadKind>,
}

/// How often the VMM thread looks for a signal while it waits for InstanceStart.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

fn check_id(id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if id.is_empty() || id.len() > 64 || !id.chars().all(ok_char) {
        return Err(format!(
            "--id {id:?}: use 1-64 characters among letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

pub fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    check_id(&args.id)?;
    if let Some(kind) = args
        .seccomp_test_violation
        .filter(|&k| k != ThreadKind::Api && k != ThreadKind::AgentJobs)
    {
        return Err(format!(
            "--seccomp-test-violation {}: serve only has the hook on its api and agent-jobs \
             threads",
            kind.as_str()
        ));
    }
    let seccomp = if args.no_seccomp {
        SeccompLevel::Off
    } else {
        SeccompLevel::Enforce
    };
    let controller: SharedController = Arc::new(Mutex::new(Controller::new(
        args.id.clone(),
        seccomp,
        super::timings::process_start_ns(),
    )));
    if let Some(path) = &args.audit_log {
        let file = open_for_append(path, "--audit-log")?;
        lock(&controller)
            .set_audit_log(file)
            .map_err(|fault| fault.message)?;
    }

    // Before the VM exists a signal only ends the wait below; afterwards it ends the VM.
    let signalled = Arc::new(AtomicI32::new(0));
    type VmHandles = Option<(Sender<VmmEvent>, vmm::diagnostics::Diagnostics)>;
    let vm_handles: Arc<Mutex<VmHandles>> = Arc::new(Mutex::new(None));
    let _signals = {
        let (signalled, vm_handles) = (signalled.clone(), vm_handles.clone());
        SignalForwarder::start(
            move |sig| {
                let vm = vm_handles.lock().unwrap_or_else(|e| e.into_inner());
                if super::signals::is_dump_request(sig) {
                    super::signals::log_state_dump(vm.as_ref().map(|(_, d)| d));
                    return true;
                }
                signalled.store(sig, Ordering::Release);
                if let Some((events, _)) = vm.as_ref() {
                    let _ = events.send(VmmEvent::Signal(sig));
                }
                true
            },
            seccomp,
        )?
    };

    let (vmm_tx, vmm_rx) = channel();
    let server = match &args.api_sock {
        Some(path) if !args.no_api => Some(
            ApiServer::start(
                path,
                ApiContext {
                    controller: controller.clone(),
                    vmm_thread: vmm_tx,
                    // Started here, before the API thread's filter: see api::agent.
                    agent: AgentWorker::start(ThreadSeccomp {
                        level: seccomp,
                        test_violation: args.seccomp_test_violation == Some(ThreadKind::AgentJobs),
                    })?,
                    pty_sessions: Default::default(),
                },
                ThreadSeccomp {
                    level: seccomp,
                    test_violation: args.seccomp_test_violation == Some(ThreadKind::Api),
                },
            )
            .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };

    let vm = match &args.config_file {
        Some(path) => boot_from_file(path, &controller, args.console.as_deref())?,
        None => match wait_for_start(&vmm_rx, &controller, &args, &signalled) {
            BeforeStart::Started(vm) => *vm,
            BeforeStart::Signalled(sig) => {
                drop(server);
                eprintln!("agentvm: {}", VmOutcome::Signalled(sig));
                return Ok(signal_exit_code(sig));
            }
            BeforeStart::ApiGone => {
                return Err("the API thread ended before InstanceStart".into());
            }
        },
    };
    // Requests still queued for the pre-boot VMM thread get "dropped" answers.
    drop(vmm_rx);
    *vm_handles.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((vm.event_sender(), vm.diagnostics()));
    // A signal that arrived while the VM was being built.
    let early = signalled.load(Ordering::Acquire);
    if early != 0 {
        let _ = vm.event_sender().send(VmmEvent::Signal(early));
    }

    ThreadSeccomp {
        level: seccomp,
        test_violation: false,
    }
    .enter(ThreadKind::Vmm)
    .map_err(|e| format!("main thread: {e}"))?;
    let outcome = vm.wait(None);
    lock(&controller).stopped(outcome.to_string());
    if let Some(server) = server {
        server.stop();
    }
    match outcome {
        VmOutcome::GuestReset => Ok(ExitCode::SUCCESS),
        VmOutcome::Signalled(sig) => {
            eprintln!("agentvm: {}", VmOutcome::Signalled(sig));
            Ok(signal_exit_code(sig))
        }
        other => Err(other.to_string()),
    }
}

/// How the wait for InstanceStart ended.
enum BeforeStart {
    Started(Box<Vmm>),
    Signalled(i32),
    /// The API thread is gone (it holds the only sender): nothing can start the VM.
    ApiGone,
}

/// Serves the VMM thread's share of pre-boot requests until InstanceStart boots the VM or a
/// signal arrives.
fn wait_for_start(
    requests: &Receiver<VmmRequest>,
    controller: &SharedController,
    args: &ServeArgs,
    signalled: &AtomicI32,
) -> BeforeStart {
    loop {
        let sig = signalled.load(Ordering::Acquire);
        if sig != 0 {
            return BeforeStart::Signalled(sig);
        }
        let request = match requests.recv_timeout(SIGNAL_POLL) {
            Ok(request) => request,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return BeforeStart::ApiGone,
        };
        match request {
            VmmRequest::Start { config, reply } => {
                match boot(&config, controller, args.console.as_deref()) {
                    Ok(vm) => {
                        let _ = reply.send(Ok(()));
                        return BeforeStart::Started(Box::new(vm));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            VmmRequest::LoadSnapshot {
                config,
                reply,
                agent,
            } => match load_snapshot(&config, controller, &agent, args.console.as_deref()) {
                Ok(vm) => {
                    let _ = reply.send(Ok(()));
                    return BeforeStart::Started(Box::new(vm));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            VmmRequest::Logger { config, reply } => {
                let _ = reply.send(vmm::api::logger::apply(&config));
            }
            VmmRequest::OpenForAppend { path, what, reply } => {
                let _ = reply.send(open_for_append(&path, what));
            }
            VmmRequest::CheckEgressAuditLog { path, reply } => {
                let opened = egress::audit::AuditLog::open(&path).map(drop);
                let _ = reply.send(opened.map_err(|e| e.to_string()));
            }
        }
    }
}

/// Opens `path` for appending, created if missing; `what` names it in the error.
fn open_for_append(path: &Path, what: &str) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// Boots `config` and moves the controller to Running, or back to NotStarted on failure.
fn boot(
    config: &VmConfig,
    controller: &SharedController,
    console: Option<&Path>,
) -> Result<Vmm, String> {
    let result = open_console(console)
        .and_then(|console| vmm::vmm::boot(config, console).map_err(|e| e.to_string()));
    let mut controller = lock(controller);
    match result {
        Ok(vm) => {
            controller.started(StartedVm {
                events: vm.event_sender(),
                timings: vm.timings_handle(),
                exits: vm.exit_counts(),
                vsock: vm.vsock_metrics(),
                uffd: None,
                net: vm.net_counts_reader(),
            });
            Ok(vm)
        }
        Err(e) => {
            controller.start_failed();
            Err(e)
        }
    }
}

/// Builds the VM from a snapshot and moves the controller to Running or Paused (as the load asked),
/// or back to NotStarted on failure.
fn load_snapshot(
    config: &RestoreConfig,
    controller: &SharedController,
    agent: &AgentWorker,
    console: Option<&Path>,
) -> Result<Vmm, String> {
    let result = open_console(console)
        .and_then(|console| vmm::vmm::restore(config, console).map_err(|e| e.to_string()));
    let mut controller = lock(controller);
    match result {
        Ok(vm) => {
            controller.loaded(
                StartedVm {
                    events: vm.event_sender(),
                    timings: vm.timings_handle(),
                    exits: vm.exit_counts(),
                    vsock: vm.vsock_metrics(),
                    uffd: vm.uffd_metrics(),
                    net: vm.net_counts_reader(),
                },
                MachineConfig {
                    vcpu_count: u64::from(vm.vcpu_count()),
                    mem_size_mib: vm.mem_mib(),
                    track_dirty_pages: config.track_dirty_pages,
                    ..MachineConfig::default()
                },
                vm.vsock().cloned(),
                vm.vsock_driver_ready(),
                !config.resume,
            );
            // Under the controller's lock with the state change: no `/sandbox/...` request
            // gets in before the step.
            if let Some(step) = controller.take_after_restore() {
                agent.begin_after_restore(step);
            }
            Ok(vm)
        }
        Err(e) => {
            controller.start_failed();
            Err(e)
        }
    }
}

fn open_console(path: Option<&Path>) -> Result<Box<dyn Write + Send>, String> {
    Ok(match path {
        Some(path) => {
            Box::new(LineWriter::new(File::create(path).map_err(|e| {
                format!("cannot create console file {}: {e}", path.display())
            })?))
        }
        None => Box::new(std::io::stdout()),
    })
}

/// Applies each section of the config file as its API request would, then boots.
fn boot_from_file(
    path: &Path,
    controller: &SharedController,
    console: Option<&Path>,
) -> Result<Vmm, String> {
    let file = ConfigFile::read(path)?;
    let named = |section: &str| {
        let path = path.display().to_string();
        let section = section.to_string();
        move |fault: vmm::api::fault::Fault| {
            format!("config file {path}: section {section:?}: {}", fault.message)
        }
    };
    if let Some(logger) = &file.logger {
        vmm::api::logger::apply(logger)
            .map_err(|e| format!("config file {}: section \"logger\": {e}", path.display()))?;
    }
    let config = {
        let mut c = lock(controller);
        c.put_boot_source(file.boot_source)
            .map_err(named("boot-source"))?;
        if let Some(machine) = file.machine_config {
            c.put_machine_config(machine)
                .map_err(named("machine-config"))?;
        }
        if let Some(vsock) = file.vsock {
            c.put_vsock(vsock).map_err(named("vsock"))?;
        }
        if let Some(policy) = &file.egress_policy {
            let options = c.egress_parse_options().map_err(named("egress-policy"))?;
            let policy = egress::policy::Policy::from_json_str_with(&policy.to_string(), &options)
                .map_err(|e| {
                    format!(
                        "config file {}: section \"egress-policy\": {e}",
                        path.display()
                    )
                })?;
            c.egress_policy_target(policy)
                .map_err(named("egress-policy"))?;
        }
        for iface in file.network_interfaces {
            let id = iface.iface_id.clone();
            c.put_network_interface(&id, iface)
                .map_err(named("network-interfaces"))?;
        }
        if let Some(metrics) = &file.metrics {
            let sink = open_for_append(&metrics.metrics_path, "metrics_path")
                .map_err(|e| format!("config file {}: section \"metrics\": {e}", path.display()))?;
            c.set_metrics(sink).map_err(named("metrics"))?;
        }
        if let Some(audit) = &file.audit_log {
            let sink = open_for_append(&audit.path, "path").map_err(|e| {
                format!("config file {}: section \"audit-log\": {e}", path.display())
            })?;
            c.set_audit_log(sink).map_err(named("audit-log"))?;
        }
        c.begin_start().map_err(named("boot-source"))?
    };
    boot(&config, controller, console)
}
