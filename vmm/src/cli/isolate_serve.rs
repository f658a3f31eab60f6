//! `agentvm isolate serve`: the worker process of one isolate sandbox of the daemon. It checks
//! its module once in an isolate made from a template (a module the isolate refuses ends the
//! worker before its socket appears, with a line the daemon reports), then serves calls of the
//! module's functions over an HTTP API on a Unix socket (`http.rs`), one at a time in one pooled
//! isolate reset to the template after each call (`jobs.rs`). The key/value store of the guest's
//! `kv_get`/`kv_put` lives here: it is the sandbox's, kept across calls.
//!
//! Threads and their seccomp filters: the job thread runs under `isolate`, the API thread under
//! `api`, the signal thread and the main thread (which waits for a signal or for the job thread
//! to fail, then removes the socket) under `vmm`, and with `--egress-policy` the fetcher thread
//! that makes the module's `agentvm.fetch` requests under `isolate_fetch`.

mod http;
mod jobs;
mod module_info;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use clap::Args;
use vmm::isolate::{Isolate, IsolateConfig, Template};
use vmm::seccomp::{SeccompLevel, ThreadKind};

use super::signals::SignalForwarder;
use jobs::{Jobs, StartError};

/// How often the main thread looks at the job thread while it waits for a signal.
const JOB_THREAD_POLL: Duration = Duration::from_millis(200);
/// Exit status of a worker whose module the isolate refused (after a line starting with
/// [`agentvm_daemon::launcher::MODULE_REFUSED`] on stderr).
const EXIT_MODULE_REFUSED: u8 = 3;

#[derive(Args)]
pub struct ServeArgs {
    /// The API socket to create (HTTP/1.1: `GET /`, `POST /call`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// The module: WebAssembly binary, or text format.
    #[arg(long, value_name = "FILE")]
    module: PathBuf,
    /// Largest linear memory the module may have, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    max_memory_mib: u32,
    /// CPU time a call may use, in milliseconds (a call's default and its maximum).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    cpu_limit_ms: u64,
    /// Wall-clock time a call may take, in milliseconds (a call's default and its maximum).
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    wall_limit_ms: u64,
    /// Size of the sandbox's key/value store (keys and values), in bytes.
    #[arg(long, default_value_t = 16 << 20, value_name = "N")]
    kv_max_bytes: usize,
    #[command(flatten)]
    egress: super::isolate::IsolateEgressArgs,
    /// The sandbox's name in the egress audit log.
    #[arg(long, value_name = "ID", default_value = "isolate")]
    sandbox_id: String,
    /// Run without the seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

pub fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    super::isolate::check_limits(args.max_memory_mib, args.cpu_limit_ms, args.wall_limit_ms)?;
    let seccomp = if args.no_seccomp {
        SeccompLevel::Off
    } else {
        SeccompLevel::Enforce
    };
    let module = super::isolate::read_module(&args.module)?;
    // Every file the fetcher needs (policy, secrets, CA files, audit log, resolver
    // configuration) is read here, and its thread started, before any filter goes on.
    let fetcher = super::isolate::fetch_thread(&args.egress, &args.sandbox_id, seccomp)?;
    let config = IsolateConfig {
        max_wasm_mib: args.max_memory_mib,
        max_module_bytes: module.len().max(IsolateConfig::default().max_module_bytes),
    };
    let template = Template::new(config).map_err(|e| e.to_string())?;
    let isolate = Isolate::from_template(&template).map_err(|e| e.to_string())?;
    let cpu_limit = Duration::from_millis(args.cpu_limit_ms);
    let wall_limit = Duration::from_millis(args.wall_limit_ms);
    let module_bytes = module.len();
    let (jobs, job_thread) = match Jobs::start(
        isolate,
        module.clone(),
        args.kv_max_bytes,
        (cpu_limit, wall_limit),
        fetcher,
        seccomp,
    ) {
        Ok(started) => started,
        Err(StartError::ModuleRefused(e)) => {
            eprintln!(
                "{} {}: {e}",
                agentvm_daemon::launcher::MODULE_REFUSED,
                args.module.display()
            );
            return Ok(ExitCode::from(EXIT_MODULE_REFUSED));
        }
        Err(StartError::Failed(e)) => return Err(e),
    };
    // The isolate accepted the module, so its sections are well-formed; a type this reader
    // does not know (one the isolate has no use for) only costs `GET /` its export list.
    let exports = module_info::exported_functions(&module);
    if let Err(e) = &exports {
        tracing::warn!("GET / will not list the module's exports: {e}");
    }
    drop(module);

    let (signals_tx, signals) = mpsc::channel();
    let _forwarder = SignalForwarder::start(
        move |sig| {
            if super::signals::is_dump_request(sig) {
                return true;
            }
            signals_tx.send(sig).is_ok()
        },
        seccomp,
    )?;
    let server = http::ApiServer::start(
        &args.api_sock,
        http::Worker {
            jobs: jobs.clone(),
            exports,
            module_bytes,
            max_memory_mib: args.max_memory_mib,
            cpu_limit,
            wall_limit,
            kv_max_bytes: args.kv_max_bytes,
        },
        seccomp,
    )?;
    // The API thread holds the only other queue handle: once it is stopped, the job thread's
    // queue closes and it ends.
    drop(jobs);
    vmm::seccomp::install(ThreadKind::Vmm, seccomp).map_err(|e| format!("main thread: {e}"))?;
    eprintln!(
        "agentvm: isolate worker serving {} on {}",
        args.module.display(),
        args.api_sock.display()
    );
    let outcome = loop {
        if job_thread.is_finished() {
            break Err("the job thread ended".to_string());
        }
        match signals.recv_timeout(JOB_THREAD_POLL) {
            Ok(sig) => break Ok(sig),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Err("the signal thread ended".into()),
        }
    };
    drop(server);
    let job_result = job_thread
        .join()
        .map_err(|_| "the job thread panicked".to_string())?;
    match outcome {
        Ok(sig) => {
            eprintln!("agentvm: isolate worker stopped by signal {sig}");
            job_result.map(|()| super::signal_exit_code(sig))
        }
        Err(why) => Err(job_result.err().unwrap_or(why)),
    }
}
