//! `agentvm boot`: a raw boot with the serial console on stdout.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::net_args::NetArgs;
use super::signals::SignalForwarder;
use super::{signal_exit_code, MachineArgs};
use vmm::config::{VmConfig, VsockConfig};
use vmm::exit::VmOutcome;
use vmm::seccomp::ThreadKind;

pub use vmm::config::LINUX_BASE_CMDLINE;

#[derive(Args)]
pub struct BootArgs {
    /// Kernel: an x86-64 ELF (vmlinux, or a freestanding test guest) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, after the base line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Do not prepend the base Linux command line.
    #[arg(long)]
    no_base_cmdline: bool,
    /// End the VM as soon as the guest is first entered (boot-path benchmark; works on any host).
    #[arg(long, hide = true)]
    stop_at_first_run: bool,
    /// Write the boot's timings (JSON) to this file.
    #[arg(long, hide = true, value_name = "FILE")]
    report_timings: Option<PathBuf>,
    /// Add a virtio-vsock device whose host side is this Unix socket (connect and send
    /// `CONNECT <port>\n` to reach a guest port; guest connections to port P go to `<PATH>_P`).
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = vmm::config::DEFAULT_GUEST_CID, requires = "vsock_uds")]
    vsock_cid: u64,
    /// Test-only: once its seccomp filter is on, this thread makes a syscall no filter allows.
    #[arg(long, hide = true, value_name = "THREAD")]
    seccomp_test_violation: Option<ThreadKind>,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    machine: MachineArgs,
}

pub fn boot(args: BootArgs) -> Result<ExitCode, String> {
    let limit = args.machine.time_limit()?;
    if args.seccomp_test_violation == Some(ThreadKind::Api) {
        return Err(
            "--seccomp-test-violation api: boot has no api thread (see agentvm serve)".into(),
        );
    }
    if args.seccomp_test_violation == Some(ThreadKind::Isolate) {
        return Err(
            "--seccomp-test-violation isolate: boot has no isolate thread (see agentvm isolate run)"
                .into(),
        );
    }
    if args.seccomp_test_violation == Some(ThreadKind::UffdHandler) {
        return Err(
            "--seccomp-test-violation uffd-handler: boot has no uffd handler (only a uffd \
             snapshot restore under agentvm serve does)"
                .into(),
        );
    }
    if args.seccomp_test_violation == Some(ThreadKind::Egress) && args.net.egress_policy.is_none() {
        return Err(
            "--seccomp-test-violation egress: there is no egress thread without --egress-policy"
                .into(),
        );
    }
    vmm::config::validate_vcpus(args.machine.vcpus).map_err(|e| e.to_string())?;
    let cmdline = if args.no_base_cmdline {
        args.cmdline.clone()
    } else {
        format!("{LINUX_BASE_CMDLINE} {}", args.cmdline)
    };
    let net = args
        .net
        .to_config(&format!("boot-{}", std::process::id()))?;
    let config = VmConfig {
        vcpus: args.machine.vcpus as u8,
        mem_mib: args.machine.mem_mib,
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline,
        skip_linux_host_check: args.stop_at_first_run,
        record_rss_before_guest: args.report_timings.is_some(),
        vsock: args.vsock_uds.map(|uds_path| VsockConfig {
            guest_cid: args.vsock_cid,
            uds_path,
        }),
        net,
        seccomp: args.machine.seccomp(),
        track_dirty_pages: false,
        seccomp_test_violation: args.seccomp_test_violation,
    };
    let console: Box<dyn Write + Send> = match &args.machine.console {
        Some(path) => {
            Box::new(LineWriter::new(File::create(path).map_err(|e| {
                format!("cannot create console file {}: {e}", path.display())
            })?))
        }
        None => Box::new(std::io::stdout()),
    };
    let vm = vmm::vmm::boot(&config, console).map_err(|e| e.to_string())?;
    let _signals = SignalForwarder::start(
        super::signals::to_vm(vm.event_sender(), Some(vm.diagnostics())),
        config.seccomp,
    )?;
    // Opened before the filter, which allows no open.
    let report = match &args.report_timings {
        Some(path) => Some(super::timings::ReportFile::create(path)?),
        None => None,
    };
    // Last: every thread this one needed is running, so none inherits the `vmm` filter.
    config
        .thread_seccomp(ThreadKind::Vmm)
        .enter(ThreadKind::Vmm)
        .map_err(|e| format!("main thread: {e}"))?;
    let timings = vm.timings_handle();
    let outcome = if args.stop_at_first_run {
        vm.wait_until_first_run(limit)
    } else {
        vm.wait(limit)
    };
    if let Some(report) = report {
        report.write(&timings.get(), None)?;
    }
    match outcome {
        VmOutcome::GuestReset | VmOutcome::StoppedAtFirstRun => Ok(ExitCode::SUCCESS),
        VmOutcome::Signalled(sig) => {
            eprintln!("agentvm: {}", VmOutcome::Signalled(sig));
            Ok(signal_exit_code(sig))
        }
        other => Err(other.to_string()),
    }
}
