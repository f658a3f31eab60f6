//! `agentvm snapshot create|load`: the per-VM API's snapshot requests from the command line, for a
//! VM run by `agentvm serve --api-sock`; `agentvm snapshot merge`: a diff snapshot onto its base,
//! offline; `agentvm snapshot uffd-handler`: an external userfaultfd handler (see
//! `super::uffd_handler`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agentvm_daemon::vm_client;
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};

/// Hang detector for one API call: writing or mapping a large guest's memory takes seconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Pause the VM, write its snapshot (state file + memory file), and resume it unless
    /// --keep-paused.
    Create(CreateArgs),
    /// Build a VM that has not started from a snapshot (instead of InstanceStart).
    Load(LoadArgs),
    /// Apply a diff snapshot onto its base: a full snapshot of the diff's moment. Checks that
    /// the diff was taken against that base. The outputs may name the inputs (merge in place).
    Merge(MergeArgs),
    /// Serve restored VMs' guest memory from a memory file as an external userfaultfd handler
    /// (Firecracker's protocol): load with `--backend uffd --mem <this socket>`. Prints one line
    /// per VM when it ends, with the page faults served.
    UffdHandler(super::uffd_handler::UffdHandlerArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base snapshot's state file (a full snapshot, or an earlier merge).
    #[arg(long, value_name = "FILE")]
    base_snapshot: PathBuf,
    /// The base snapshot's memory file.
    #[arg(long, value_name = "FILE")]
    base_mem: PathBuf,
    /// The diff snapshot's state file.
    #[arg(long, value_name = "FILE")]
    diff_snapshot: PathBuf,
    /// The diff snapshot's memory file.
    #[arg(long, value_name = "FILE")]
    diff_mem: PathBuf,
    /// Where to write the merged state file.
    #[arg(long, value_name = "FILE")]
    out_snapshot: PathBuf,
    /// Where to write the merged memory file.
    #[arg(long, value_name = "FILE")]
    out_mem: PathBuf,
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's API socket (`agentvm serve --api-sock`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Where to write the state file.
    #[arg(long, value_name = "FILE")]
    snapshot: PathBuf,
    /// Where to write guest memory.
    #[arg(long, value_name = "FILE")]
    mem: PathBuf,
    /// Leave the VM paused after the snapshot.
    #[arg(long)]
    keep_paused: bool,
    /// Write only the pages changed since the VM's previous snapshot (or the snapshot it was
    /// restored from); needs track_dirty_pages. Restore it after `agentvm snapshot merge`.
    #[arg(long)]
    diff: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Backend {
    File,
    Uffd,
}

#[derive(Args)]
pub struct LoadArgs {
    /// The API socket of a VM that has not started (`agentvm serve --api-sock`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// The state file.
    #[arg(long, value_name = "FILE")]
    snapshot: PathBuf,
    /// The memory file; with `--backend uffd`, or the Unix socket of an external handler
    /// (`agentvm snapshot uffd-handler`).
    #[arg(long, value_name = "FILE")]
    mem: PathBuf,
    /// How guest memory comes back: `file` maps the memory file privately (the page cache
    /// faults pages in); `uffd` serves first touches from a userfaultfd handler thread and
    /// prefetches the working set recorded by an earlier uffd restore (`<mem>.ws`), or, when
    /// --mem is a Unix socket, hands guest memory to the external handler listening there.
    #[arg(long, value_enum, default_value_t = Backend::File)]
    backend: Backend,
    /// Run the VM at once instead of leaving it paused.
    #[arg(long)]
    resume: bool,
    /// Track dirty pages so the restored VM can take diff snapshots (against this snapshot).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Listen for the guest's vsock connections on this Unix socket instead of the snapshot's
    /// (several VMs restored from one snapshot at once each need their own).
    #[arg(long, value_name = "PATH")]
    vsock_uds_path: Option<PathBuf>,
    /// Give the restored guest this vsock CID instead of the snapshot's (with --vsock-uds-path).
    #[arg(long, value_name = "CID", requires = "vsock_uds_path")]
    vsock_guest_cid: Option<u64>,
    /// The egress policy (JSON, or TOML by its `.toml` name) of the restored VM's NIC, sent as
    /// PUT /egress/policy before the load. Required when the snapshot's VM has a NIC (snapshots
    /// never hold the policy, whose credentials stay off disk), refused when it has none.
    #[arg(long, value_name = "FILE")]
    egress_policy: Option<PathBuf>,
    /// Append the restored NIC's egress audit log to this file (PUT /egress/audit-log).
    #[arg(long, value_name = "FILE", requires = "egress_policy")]
    egress_audit: Option<PathBuf>,
}

pub fn run(command: SnapshotCommand) -> Result<ExitCode, String> {
    match command {
        SnapshotCommand::Create(args) => block_on(create(args))?,
        SnapshotCommand::Load(args) => block_on(load(args))?,
        SnapshotCommand::Merge(args) => merge(args)?,
        SnapshotCommand::UffdHandler(args) => return super::uffd_handler::run(args),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one API exchange on a current-thread runtime.
fn block_on(call: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(call)
}

/// Absolute, so the VMM (whose working directory may differ) finds the same files.
fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

async fn call(
    sock: &Path,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> Result<(), String> {
    call_expecting_no_content(sock, method, path, body, CALL_TIMEOUT).await
}

/// One per-VM API call that must answer 204; any other status is an error with the API's
/// `fault_message`. Shared with `bench restore`, which drives serves the same way.
pub(crate) async fn call_expecting_no_content(
    sock: &Path,
    method: Method,
    path: &str,
    body: serde_json::Value,
    timeout: Duration,
) -> Result<(), String> {
    let answer = vm_client::call(sock, method.clone(), path, Some(body), timeout).await?;
    if answer.status == StatusCode::NO_CONTENT {
        Ok(())
    } else {
        Err(format!(
            "{method} {path}: {} {}",
            answer.status.as_u16(),
            answer.fault_message()
        ))
    }
}

async fn create(args: CreateArgs) -> Result<(), String> {
    let sock = &args.api_sock;
    let body = serde_json::json!({
        "snapshot_path": absolute(&args.snapshot)?,
        "mem_file_path": absolute(&args.mem)?,
        "snapshot_type": if args.diff { "Diff" } else { "Full" },
    });
    call(
        sock,
        Method::PATCH,
        "/vm",
        serde_json::json!({"state": "Paused"}),
    )
    .await?;
    let created = call(sock, Method::PUT, "/snapshot/create", body).await;
    // Resumed even when the snapshot failed: the VM was running before this command.
    if !args.keep_paused {
        call(
            sock,
            Method::PATCH,
            "/vm",
            serde_json::json!({"state": "Resumed"}),
        )
        .await?;
    }
    created
}

async fn load(args: LoadArgs) -> Result<(), String> {
    let backend_type = match args.backend {
        Backend::File => "File",
        Backend::Uffd => "Uffd",
    };
    let mut body = serde_json::json!({
        "snapshot_path": absolute(&args.snapshot)?,
        "mem_backend": {"backend_type": backend_type, "backend_path": absolute(&args.mem)?},
        "resume_vm": args.resume,
        "track_dirty_pages": args.track_dirty_pages,
    });
    if let Some(policy) = &args.egress_policy {
        call(
            &args.api_sock,
            Method::PUT,
            "/egress/policy",
            policy_body(policy)?,
        )
        .await?;
    }
    if let Some(audit) = &args.egress_audit {
        let body = serde_json::json!({"path": absolute(audit)?});
        call(&args.api_sock, Method::PUT, "/egress/audit-log", body).await?;
    }
    if let Some(path) = &args.vsock_uds_path {
        body["vsock_override"] = serde_json::json!({
            "uds_path": absolute(path)?,
            "guest_cid": args.vsock_guest_cid,
        });
    }
    call(&args.api_sock, Method::PUT, "/snapshot/load", body).await
}

/// A policy file as the API's JSON body (a TOML file converted; the API checks the rules).
fn policy_body(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--egress-policy {}: {e}", path.display()))?;
    if path.extension().is_some_and(|ext| ext == "toml") {
        toml::from_str(&text).map_err(|e| format!("--egress-policy {}: {e}", path.display()))
    } else {
        serde_json::from_str(&text).map_err(|e| format!("--egress-policy {}: {e}", path.display()))
    }
}

fn merge(args: MergeArgs) -> Result<(), String> {
    vmm::snapshot_merge::merge(&vmm::snapshot_merge::MergePaths {
        base_snapshot: args.base_snapshot,
        base_mem: args.base_mem,
        diff_snapshot: args.diff_snapshot,
        diff_mem: args.diff_mem,
        out_snapshot: args.out_snapshot,
        out_mem: args.out_mem,
    })
    .map_err(|e| format!("snapshot merge: {e}"))
}
