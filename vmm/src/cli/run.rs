//! `agentvm run`: boot Linux with the guest agent, run one command, exit with its status.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::boot::LINUX_BASE_CMDLINE;
use super::console::{ConsoleDemux, ConsoleView};
use super::net_args::NetArgs;
use super::session::{self, GuestCommand, SessionError};
use super::signals::SignalForwarder;
use super::{signal_exit_code, MachineArgs};
use agentvm_protocol::ExitStatus;
use vmm::config::{VmConfig, VsockConfig};
use vmm::exit::{VmOutcome, VmmEvent};
use vmm::process_stats::monotonic_ns;

#[derive(Args)]
pub struct RunArgs {
    /// Guest kernel (default: the prepared Debian cloud kernel).
    #[arg(long, requires = "initrd")]
    kernel: Option<PathBuf>,
    /// Guest initramfs with the agent as /init (default: the prepared one).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Run inside the nested test host (QEMU TCG with SVM) instead of on this host's KVM. Chosen
    /// automatically when this host's KVM cannot run Linux guests.
    #[arg(long)]
    nested: bool,
    /// Write the run's timings (JSON) to this file.
    #[arg(long, hide = true, value_name = "FILE")]
    report_timings: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    machine: MachineArgs,
    #[command(flatten)]
    guest: GuestCommand,
}

/// How long the guest agent gets to come up after the VM started.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// After the agent connection broke, how long the VM may take to end on its own before the CLI
/// stops it and reports the broken connection.
const GUEST_END_GRACE: Duration = Duration::from_secs(10);

/// The vCPU and device threads run under their seccomp filters and the signal thread under the
/// `vmm` one; the main thread (agent client, PTYs, port publishing, which open sockets and files as
/// the session asks) and the thread that waits for the VM stay unfiltered.
pub fn run(args: RunArgs) -> Result<ExitCode, String> {
    let limit = args.machine.time_limit()?;
    vmm::config::validate_vcpus(args.machine.vcpus).map_err(|e| e.to_string())?;
    vmm::config::validate_mem_mib(args.machine.mem_mib, None).map_err(|e| e.to_string())?;
    let nested = args.nested || !vmm::host::can_run_linux();
    if nested && args.net.egress_policy.is_some() {
        return Err(
            "--egress-policy does not work through the nested test host yet (the policy and its \
             secrets would have to be carried into it); run on a host whose KVM runs Linux guests"
                .into(),
        );
    }
    let net = args.net.to_config(&format!("run-{}", std::process::id()))?;
    if nested && (args.guest.interactive || args.guest.tty || !args.guest.publish.is_empty()) {
        return Err(format!(
            "-i, -t and --publish do not work through the nested test host, which only runs \
             non-interactive commands ({})",
            if args.nested {
                "--nested was given"
            } else {
                "used because this host's KVM cannot run Linux guests: it is nested on a PVM host"
            }
        ));
    }
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => {
            let artefacts = vmm::artefacts::prepare_default().map_err(|e| e.to_string())?;
            (artefacts.kernel, artefacts.initrd)
        }
    };
    if nested {
        if !args.nested {
            eprintln!(
                "agentvm: note: this host's KVM cannot run Linux guests (nested on a PVM host); \
                 running inside the nested test host (QEMU TCG with SVM) instead, which is slow"
            );
        }
        return super::nested::run_nested(
            &args.machine,
            &kernel,
            &initrd,
            &args.guest.command,
            limit,
        );
    }

    let run_dir = tempfile::Builder::new()
        .prefix("agentvm-run-")
        .tempdir()
        .map_err(|e| format!("cannot create a directory for the VM's sockets: {e}"))?;
    let uds_path = run_dir.path().join("vsock.sock");
    let config = VmConfig {
        vcpus: args.machine.vcpus as u8,
        mem_mib: args.machine.mem_mib,
        kernel,
        initrd: Some(initrd),
        cmdline: format!("{LINUX_BASE_CMDLINE} quiet"),
        skip_linux_host_check: false,
        record_rss_before_guest: args.report_timings.is_some(),
        vsock: Some(VsockConfig {
            guest_cid: vmm::config::DEFAULT_GUEST_CID,
            uds_path: uds_path.clone(),
        }),
        net,
        seccomp: args.machine.seccomp(),
        track_dirty_pages: false,
        seccomp_test_violation: None,
    };
    let log: Option<Box<dyn Write + Send>> = match &args.machine.console {
        Some(path) => Some(Box::new(LineWriter::new(File::create(path).map_err(
            |e| format!("cannot create console file {}: {e}", path.display()),
        )?))),
        None => None,
    };
    let (demux, view) = ConsoleDemux::new(log);
    let vm = vmm::vmm::boot(&config, Box::new(demux)).map_err(|e| e.to_string())?;
    let stop = vm.event_sender();
    let _signals = SignalForwarder::start(
        super::signals::to_vm(vm.event_sender(), Some(vm.diagnostics())),
        args.machine.seccomp(),
    )?;
    let timings = vm.timings_handle();
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let vm_thread = std::thread::Builder::new()
        .name("vm".into())
        .spawn(move || {
            let _ = ended_tx.send(vm.wait(limit));
        })
        .map_err(|e| format!("cannot start the VM thread: {e}"))?;

    let give_up = || {
        if vm_thread.is_finished() {
            return Some(SessionError::VmEnded);
        }
        view.report()
            .agent_server_failure()
            .map(|why| SessionError::Failed(format!("the guest agent cannot serve: {why}")))
    };
    let session = session::connect(&uds_path, AGENT_CONNECT_TIMEOUT, &give_up).and_then(|client| {
        let agent_ready_ns = monotonic_ns();
        let status = session::run_session(&client, &args.guest);
        client.shutdown();
        status.map(|s| (s, agent_ready_ns, monotonic_ns()))
    });
    // A lost connection usually means the guest is going down (poweroff, panic, crash of the
    // agent, which is PID 1): let the VM end by itself for a moment so that the error names what
    // happened rather than the connection loss.
    let ended_by_itself = match &session {
        Err(SessionError::ConnectionLost(_)) => ended.recv_timeout(GUEST_END_GRACE).ok(),
        _ => None,
    };
    let outcome = match ended_by_itself {
        Some(outcome) => outcome,
        None => {
            let _ = stop.send(VmmEvent::Stop);
            ended
                .recv()
                .map_err(|_| "the VM thread ended without an outcome".to_string())?
        }
    };
    vm_thread
        .join()
        .map_err(|_| "the VM thread panicked".to_string())?;
    view.finish();
    if let (Some(path), Ok((_, ready_ns, result_ns))) = (&args.report_timings, &session) {
        let guest = super::timings::GuestMilestones {
            agent_ready_ns: Some(*ready_ns),
            result_ns: Some(*result_ns),
            agent_ready_guest_boottime_ns: view.report().ready_boot_ns,
        };
        super::timings::write_report(path, &timings.get(), Some(guest))?;
    }
    interpret(outcome, session.map(|(status, _, _)| status), &view)
}

/// Turns how the VM ended plus how the session went into agentvm's exit status.
fn interpret(
    outcome: VmOutcome,
    session: Result<ExitStatus, SessionError>,
    view: &ConsoleView,
) -> Result<ExitCode, String> {
    let report = view.report();
    for error in &report.errors {
        eprintln!("agentvm: guest agent: {error}");
    }
    if let VmOutcome::Signalled(sig) = outcome {
        eprintln!("agentvm: {}", VmOutcome::Signalled(sig));
        return Ok(signal_exit_code(sig));
    }
    let console = |lines| format!("\n--- last guest console lines ---\n{}", view.tail(lines));
    let failure = match session {
        Ok(ExitStatus::Code(code)) => return Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Ok(ExitStatus::Signal(sig)) => {
            eprintln!("agentvm: the command was killed by signal {sig}");
            return Ok(signal_exit_code(sig));
        }
        Err(SessionError::Failed(message) | SessionError::ConnectionLost(message)) => Some(message),
        Err(SessionError::VmEnded) => None,
    };
    // The VM ended (or the session broke) before the command reported an exit status.
    if let Some(panic) = view.kernel_panic() {
        return Err(format!("the guest kernel panicked: {panic}{}", console(20)));
    }
    match outcome {
        VmOutcome::GuestReset if report.powered_off => {
            eprintln!("agentvm: the guest powered off before the command finished");
            Ok(ExitCode::SUCCESS)
        }
        VmOutcome::GuestReset if report.ready_boot_ns.is_none() => Err(format!(
            "the guest reset before the guest agent came up{}",
            console(30)
        )),
        VmOutcome::GuestReset => Err(format!(
            "the guest reset before the command finished{}{}",
            failure.map(|f| format!(" ({f})")).unwrap_or_default(),
            console(20)
        )),
        VmOutcome::Stopped => Err(failure
            .unwrap_or_else(|| "the VM stopped before the command finished".into())
            + &console(20)),
        other => Err(format!("{other}{}", console(20))),
    }
}
