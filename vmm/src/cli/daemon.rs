//! `agentvm daemon`: the sandbox host daemon (the `agentvm-daemon` crate), with the defaults
//! only this binary knows: itself as the VMM, the jailer beside it, the prepared guest kernel.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use agentvm_daemon::model::Template;
use agentvm_daemon::{DaemonOptions, JailConfig, LaunchConfig};
use clap::Args;
use vmm::config::LINUX_BASE_CMDLINE;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The daemon's API socket (HTTP/1.1; see daemon/api/openapi.yaml). The Python SDK looks
    /// here unless told otherwise.
    #[arg(long, default_value = "/run/agentvm/daemon.sock")]
    sock: PathBuf,
    /// Sandbox records, logs and jails. Sandboxes survive a daemon restart on the same directory.
    #[arg(long, default_value = "/var/lib/agentvm")]
    state_dir: PathBuf,
    /// Run each VMM without the jailer. For development only (the jailer needs root).
    #[arg(long)]
    no_jail: bool,
    /// The jailer binary (default: agentvm-jailer beside this binary).
    #[arg(long)]
    jailer: Option<PathBuf>,
    /// The user jailed VMMs run as.
    #[arg(long, default_value_t = 65534)]
    uid: u32,
    /// The group jailed VMMs run as.
    #[arg(long, default_value_t = 65534)]
    gid: u32,
    /// Most sandboxes running at once; creates beyond it are refused (409).
    #[arg(long, default_value_t = 1000)]
    max_sandboxes: usize,
}

pub fn daemon(args: DaemonArgs) -> Result<ExitCode, String> {
    let agentvm =
        std::env::current_exe().map_err(|e| format!("cannot locate the agentvm binary: {e}"))?;
    let jail = if args.no_jail {
        None
    } else {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "jailing sandboxes needs root: run the daemon as root, or pass --no-jail \
                 (development only)"
                    .into(),
            );
        }
        let jailer = args
            .jailer
            .clone()
            .unwrap_or_else(|| agentvm.with_file_name("agentvm-jailer"));
        if !jailer.is_file() {
            return Err(format!(
                "the jailer {} does not exist (build it with `cargo build --release -p jailer`, \
                 name it with --jailer, or pass --no-jail)",
                jailer.display()
            ));
        }
        Some(JailConfig {
            jailer,
            uid: args.uid,
            gid: args.gid,
        })
    };
    if args.max_sandboxes == 0 {
        return Err("--max-sandboxes must be at least 1".into());
    }
    let default_template: agentvm_daemon::DefaultTemplate = Arc::new(|| {
        let artefacts = vmm::artefacts::prepare_default().map_err(|e| e.to_string())?;
        Ok(Template {
            kernel_image_path: artefacts.kernel,
            initrd_path: Some(artefacts.initrd),
            boot_args: Some(format!("{LINUX_BASE_CMDLINE} quiet")),
            vcpu_count: 1,
            mem_size_mib: 256,
            agent: true,
        })
    });
    agentvm_daemon::run(DaemonOptions {
        sock: args.sock,
        state_dir: args.state_dir,
        launch: LaunchConfig { agentvm, jail },
        default_template: Some(default_template),
        max_sandboxes: args.max_sandboxes,
    })?;
    Ok(ExitCode::SUCCESS)
}
