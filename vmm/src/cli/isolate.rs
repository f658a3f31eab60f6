//! `agentvm isolate run`: one WebAssembly function call in a fresh isolate (the no-OS tier).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use vmm::isolate::{
    FetchError, FetchThread, FetcherConfig, HostContext, Isolate, IsolateConfig, IsolateError,
    JobSpec, KvStore, FETCH_MAX_RESPONSE_BYTES, NO_FETCH_POLICY,
};

use super::net_args::NetArgs;

#[derive(Subcommand)]
pub enum IsolateCommand {
    /// Call a function of a WebAssembly module (binary `.wasm` or text `.wat`) in a new isolate
    /// and print its results, one per line. The module may import `agentvm.log`,
    /// `agentvm.kv_get`, `agentvm.kv_put` and `agentvm.fetch` (see the README).
    Run(RunArgs),
    /// Serve calls of a module's functions over an HTTP API on a Unix socket, one isolate
    /// sandbox of the daemon (`POST /sandboxes` with `"tier": "isolate"` starts one).
    Serve(super::isolate_serve::ServeArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The module: WebAssembly binary, or text format.
    module: PathBuf,
    /// The exported function to call.
    #[arg(long, default_value = "main", value_name = "FUNC")]
    invoke: String,
    /// An argument, parsed by the function's parameter type (repeat for each, in order).
    #[arg(long = "arg", value_name = "VALUE", allow_hyphen_values = true)]
    args: Vec<String>,
    /// CPU time the call may use, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    cpu_limit_ms: u64,
    /// Wall-clock time the call may take, in milliseconds.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    wall_limit_ms: u64,
    /// Largest linear memory the module may have, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    max_memory_mib: u32,
    #[command(flatten)]
    egress: IsolateEgressArgs,
    /// Run without the seccomp filter (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

/// What an isolate's `agentvm.fetch` may reach (`isolate run` and `isolate serve`).
#[derive(Args)]
pub struct IsolateEgressArgs {
    /// Let the module's `agentvm.fetch` reach what this egress policy file (JSON, or TOML by its
    /// `.toml` name) allows, as a microVM's NIC would. Without it every fetch is denied.
    #[arg(long, value_name = "FILE")]
    egress_policy: Option<PathBuf>,
    /// Append one JSON line per fetch (destination, method, path, decision, rule; never a
    /// credential) to this file.
    #[arg(long, value_name = "FILE", requires = "egress_policy")]
    egress_audit: Option<PathBuf>,
    /// Also trust the certificates in this PEM file for HTTPS fetches, on top of the
    /// compiled-in Mozilla roots. Repeatable.
    #[arg(long, value_name = "FILE", requires = "egress_policy")]
    egress_upstream_ca: Vec<PathBuf>,
}

impl IsolateEgressArgs {
    fn net_args(&self) -> NetArgs {
        NetArgs {
            egress_policy: self.egress_policy.clone(),
            egress_audit: self.egress_audit.clone(),
            egress_upstream_ca: self.egress_upstream_ca.clone(),
        }
    }
}

/// The sandbox name of a CLI run in the egress audit log.
const AUDIT_SANDBOX: &str = "isolate-cli";

/// Bounds of the CLI's in-memory key/value store (it lives for one call).
const KV_MAX_BYTES: usize = 16 << 20;
const MAX_MEMORY_MIB: u32 = 4096;

pub fn run(command: IsolateCommand) -> Result<ExitCode, String> {
    match command {
        IsolateCommand::Run(args) => run_module(args),
        IsolateCommand::Serve(args) => super::isolate_serve::serve(args),
    }
}

pub fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.starts_with(b"\0asm") {
        return Ok(bytes);
    }
    wat::parse_bytes(&bytes)
        .map(|b| b.into_owned())
        .map_err(|e| {
            format!(
                "{} is neither a WebAssembly binary nor valid text format: {e}",
                path.display()
            )
        })
}

/// The flags both `run` and `serve` take.
pub fn check_limits(
    max_memory_mib: u32,
    cpu_limit_ms: u64,
    wall_limit_ms: u64,
) -> Result<(), String> {
    if max_memory_mib == 0 || max_memory_mib > MAX_MEMORY_MIB {
        return Err(format!(
            "--max-memory-mib must be 1..={MAX_MEMORY_MIB}, got {max_memory_mib}"
        ));
    }
    if cpu_limit_ms == 0 || wall_limit_ms == 0 {
        return Err("--cpu-limit-ms and --wall-limit-ms must be at least 1".into());
    }
    Ok(())
}

fn run_module(args: RunArgs) -> Result<ExitCode, String> {
    check_limits(args.max_memory_mib, args.cpu_limit_ms, args.wall_limit_ms)?;
    let module = read_module(&args.module)?;
    let config = IsolateConfig {
        max_wasm_mib: args.max_memory_mib,
        max_module_bytes: module.len().max(IsolateConfig::default().max_module_bytes),
    };
    let job = JobSpec {
        module,
        function: args.invoke,
        args: args.args,
        cpu_limit: Duration::from_millis(args.cpu_limit_ms),
        wall_limit: Duration::from_millis(args.wall_limit_ms),
    };
    let level = if args.no_seccomp {
        vmm::seccomp::SeccompLevel::Off
    } else {
        vmm::seccomp::SeccompLevel::Enforce
    };
    // Every file (policy, secrets, CA files, audit log, resolver configuration) is read here,
    // before the filters go on; the fetcher thread is started before the job's filter, which
    // allows no thread creation.
    let fetcher = fetch_thread(&args.egress, AUDIT_SANDBOX, level)?;
    let mut isolate = Isolate::boot(config).map_err(|e| e.to_string())?;
    // From here on this thread only runs the guest and prints: no file, socket or process.
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Isolate, level).map_err(|e| e.to_string())?;
    let mut kv = KvStore::new(KV_MAX_BYTES);
    let mut log = |line: &str| eprintln!("isolate: {line}");
    let mut fetch = |request: &_, deadline| match &fetcher {
        Some(thread) => thread.fetch(request, deadline),
        None => Err(FetchError::Denied(NO_FETCH_POLICY.into())),
    };
    let result = isolate.run(
        &job,
        &mut HostContext {
            kv: &mut kv,
            log: &mut log,
            fetch: Some(&mut fetch),
        },
    );
    match result {
        Ok(values) => {
            let mut out = std::io::stdout().lock();
            for v in values {
                writeln!(out, "{v}").map_err(|e| format!("cannot write the results: {e}"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        // The job's own failure (bad module, trap, limit): exit 1, as a failed command would.
        Err(e @ (IsolateError::Setup(_) | IsolateError::Kvm(_))) => Err(e.to_string()),
        Err(e) => {
            eprintln!("agentvm: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The fetcher for `--egress-policy`, or None without one; `sandbox` names the caller in the
/// audit log.
pub fn fetch_thread(
    egress: &IsolateEgressArgs,
    sandbox: &str,
    level: vmm::seccomp::SeccompLevel,
) -> Result<Option<FetchThread>, String> {
    let Some(config) = egress.net_args().to_config(sandbox)? else {
        return Ok(None);
    };
    let audit = match &config.audit_log {
        Some(path) => egress::audit::AuditLog::open(path).map_err(|e| e.to_string())?,
        None => egress::audit::AuditLog::disabled(),
    };
    let resolver = egress::ResolverConfig::system()
        .map_err(|e| format!("cannot read the resolver configuration: {e}"))?;
    FetchThread::spawn(
        FetcherConfig {
            policy: config.policy,
            resolver,
            extra_upstream_roots: config.upstream_roots,
            audit,
            sandbox: config.sandbox,
            max_response_bytes: FETCH_MAX_RESPONSE_BYTES,
        },
        level,
    )
    .map(Some)
}
