//! `agentvm run`: boot Linux with the guest agent, run one command, exit with its status.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::boot::LINUX_BASE_CMDLINE;
use super::console::{ConsoleDemux, ConsoleView, GuestExit};
use super::signals::SignalForwarder;
use super::{signal_exit_code, MachineArgs};
use vmm::config::VmConfig;
use vmm::exit::VmOutcome;

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
    machine: MachineArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<ExitCode, String> {
    let limit = args.machine.time_limit()?;
    vmm::config::validate_vcpus(args.machine.vcpus).map_err(|e| e.to_string())?;
    vmm::config::validate_mem_mib(args.machine.mem_mib, None).map_err(|e| e.to_string())?;
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => {
            let artefacts = vmm::artefacts::prepare_default().map_err(|e| e.to_string())?;
            (artefacts.kernel, artefacts.initrd)
        }
    };
    if args.nested || !vmm::host::can_run_linux() {
        if !args.nested {
            eprintln!(
                "agentvm: note: this host's KVM cannot run Linux guests (nested on a PVM host); \
                 running inside the nested test host (QEMU TCG with SVM) instead, which is slow"
            );
        }
        return super::nested::run_nested(&args.machine, &kernel, &initrd, &args.command, limit);
    }

    let encoded = guest_agent::console_protocol::encode_cmd(&args.command)
        .map_err(|e| format!("cannot pass the command to the guest: {e}"))?;
    let config = VmConfig {
        vcpus: args.machine.vcpus as u8,
        mem_mib: args.machine.mem_mib,
        kernel,
        initrd: Some(initrd),
        cmdline: format!("{LINUX_BASE_CMDLINE} quiet agentvm.cmd={encoded}"),
        skip_linux_host_check: false,
        record_rss_before_guest: args.report_timings.is_some(),
        vsock: None,
    };
    let log: Option<Box<dyn Write + Send>> = match &args.machine.console {
        Some(path) => Some(Box::new(LineWriter::new(File::create(path).map_err(
            |e| format!("cannot create console file {}: {e}", path.display()),
        )?))),
        None => None,
    };
    let (demux, view) = ConsoleDemux::new(Box::new(std::io::stdout()), log);
    let vm = vmm::vmm::boot(&config, Box::new(demux)).map_err(|e| e.to_string())?;
    let _signals = SignalForwarder::start(vm.event_sender())
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let timings = vm.timings_handle();
    let outcome = vm.wait(limit);
    view.finish();
    if let Some(path) = &args.report_timings {
        let report = view.report();
        let guest = super::timings::GuestMilestones {
            agent_ready_ns: report.ready_at_ns,
            result_ns: report.exit_at_ns,
            agent_ready_guest_boottime_ns: report.ready_boot_ns,
        };
        super::timings::write_report(path, &timings.get(), Some(guest))?;
    }
    interpret(outcome, &view)
}

/// Turns how the VM ended plus what the agent reported into agentvm's exit status.
fn interpret(outcome: VmOutcome, view: &ConsoleView) -> Result<ExitCode, String> {
    let report = view.report();
    for error in &report.errors {
        eprintln!("agentvm: guest agent: {error}");
    }
    match outcome {
        VmOutcome::Signalled(sig) => {
            eprintln!("agentvm: {}", VmOutcome::Signalled(sig));
            return Ok(signal_exit_code(sig));
        }
        VmOutcome::GuestReset => {}
        other => {
            return Err(format!(
                "{other}\n--- last guest console lines ---\n{}",
                view.tail(20)
            ))
        }
    }
    if let Some(panic) = view.kernel_panic() {
        return Err(format!(
            "the guest kernel panicked: {panic}\n--- last guest console lines ---\n{}",
            view.tail(20)
        ));
    }
    match report.exit {
        Some(GuestExit::Code(code)) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Some(GuestExit::Signal(sig)) => {
            eprintln!("agentvm: the command was killed by signal {sig}");
            Ok(signal_exit_code(sig))
        }
        None if report.powered_off => {
            eprintln!("agentvm: the guest powered off before the command finished");
            Ok(ExitCode::SUCCESS)
        }
        None if report.ready_boot_ns.is_none() => Err(format!(
            "the guest reset before the guest agent came up\n--- last guest console lines ---\n{}",
            view.tail(30)
        )),
        None => Err(format!(
            "the guest reset without reporting the command's exit status\n--- last guest console lines ---\n{}",
            view.tail(20)
        )),
    }
}
