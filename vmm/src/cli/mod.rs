//! The `agentvm` command line.

mod bench;
mod boot;
mod console;
mod daemon;
mod exec;
mod isolate;
mod isolate_serve;
mod kernel_cmd;
mod nested;
mod net_args;
mod publish;
mod run;
mod serve;
mod session;
mod signals;
mod snapshot;
mod terminal;
mod timings;
mod uffd_handler;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::logging::LogFormat;

/// Exit status for failures of agentvm itself (bad input, VMM or guest failure), as `docker run`
/// uses 125, so that they are not mistaken for the guest command's own exit codes.
pub const EXIT_AGENTVM_FAILURE: u8 = 125;

#[derive(Parser)]
#[command(
    name = "agentvm",
    version,
    about = "KVM microVM sandboxes for running untrusted agent code"
)]
struct Cli {
    /// How log lines (stderr, or the `PUT /logger` file) are written: `text`, or `json` for one
    /// JSON object per line. The level comes from AGENTVM_LOG (default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM, run a command in it, stream its output and exit with its exit code.
    Run(run::RunArgs),
    /// Run a command in a VM that is already running (booted with `agentvm boot --vsock-uds`),
    /// through its guest agent; exits with the command's exit code.
    Exec(exec::ExecArgs),
    /// Boot a kernel and stream its serial console, without talking to a guest agent (custom
    /// kernels, test guests, or a VM driven with `agentvm exec` through --vsock-uds). Ends when
    /// the guest resets itself.
    Boot(boot::BootArgs),
    /// Run one VM driven over an HTTP API on a Unix socket (Firecracker-compatible subset), or
    /// booted from a config file. Exits when the guest ends.
    Serve(serve::ServeArgs),
    /// The sandbox host daemon: many sandboxes by ID over an HTTP API on a Unix socket, each a
    /// separate jailed VMM; sandboxes survive a daemon restart.
    Daemon(daemon::DaemonArgs),
    /// Snapshots of a VM run by `agentvm serve`: create one (pause, write, resume) or build a
    /// VM that has not started from one.
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// The isolate tier: WebAssembly in a hardware-isolated guest with no operating system.
    Isolate {
        #[command(subcommand)]
        command: isolate::IsolateCommand,
    },
    /// Manage guest kernels and initramfs images.
    Kernel {
        #[command(subcommand)]
        command: kernel_cmd::KernelCommand,
    },
    /// Benchmarks: boot times and memory of agentvm, beside QEMU microvm.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// Machine shape shared by `run` and `boot`.
#[derive(Args, Clone, Debug)]
pub struct MachineArgs {
    /// Number of vCPUs (1..=16).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long = "mem-mib", default_value_t = 256)]
    pub mem_mib: u64,
    /// Write the guest's serial console (kernel and agent log) to this file.
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Stop the VM after this many seconds (0 = no limit).
    #[arg(long, default_value_t = 0.0)]
    pub timeout: f64,
    /// Run the VMM's threads without their seccomp filters. For debugging only (e.g. to tell a
    /// missing syscall in a filter from another failure); never in production.
    #[arg(long)]
    pub no_seccomp: bool,
}

impl MachineArgs {
    pub fn seccomp(&self) -> vmm::seccomp::SeccompLevel {
        if self.no_seccomp {
            vmm::seccomp::SeccompLevel::Off
        } else {
            vmm::seccomp::SeccompLevel::Enforce
        }
    }

    pub fn time_limit(&self) -> Result<Option<std::time::Duration>, String> {
        if !self.timeout.is_finite() || self.timeout < 0.0 {
            return Err(format!(
                "--timeout must be a number of seconds >= 0, got {}",
                self.timeout
            ));
        }
        Ok((self.timeout > 0.0).then(|| std::time::Duration::from_secs_f64(self.timeout)))
    }
}

pub fn main() -> ExitCode {
    timings::mark_process_start();
    let cli = Cli::parse();
    vmm::logging::init("AGENTVM_LOG", cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Exec(args) => exec::exec(args),
        Command::Boot(args) => boot::boot(args),
        Command::Serve(args) => serve::serve(args),
        Command::Daemon(args) => daemon::daemon(args),
        Command::Snapshot { command } => snapshot::run(command),
        Command::Isolate { command } => isolate::run(command),
        Command::Kernel { command } => kernel_cmd::run(command),
        Command::Bench { command } => bench::run(command),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("agentvm: error: {message}");
            ExitCode::from(EXIT_AGENTVM_FAILURE)
        }
    }
}

/// Exit status of agentvm itself when a signal stopped it (shell convention 128 + n).
pub fn signal_exit_code(sig: i32) -> ExitCode {
    ExitCode::from((128 + sig.clamp(1, 127)) as u8)
}
