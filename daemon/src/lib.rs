//! `agentvm daemon`: the sandbox host daemon. It manages many sandboxes by stable ID over an HTTP
//! API on a Unix socket; each sandbox is a separate `agentvm serve` process (jailed by
//! `agentvm-jailer` when the daemon runs as root), configured through its own per-VM API, and
//! the agent routes (`exec`, `files`) are forwarded to it. Sandboxes outlive the daemon: their
//! records are in the state directory, and a restarted daemon adopts the VMMs that still run and
//! reports the ones that are gone as `lost`.

pub mod fault;
pub mod launcher;
pub mod model;
pub mod process;
pub mod routes;
pub mod sandboxes;
pub mod server;
pub mod store;
pub mod vm_client;

use std::path::PathBuf;

pub use launcher::{JailConfig, LaunchConfig};
pub use sandboxes::DefaultTemplate;

pub struct DaemonOptions {
    pub sock: PathBuf,
    pub state_dir: PathBuf,
    pub launch: LaunchConfig,
    pub default_template: Option<DefaultTemplate>,
    pub max_sandboxes: usize,
}

/// Runs the daemon until SIGINT or SIGTERM. Sandboxes keep running after it ends; the next
/// daemon on the same state directory adopts them.
pub fn run(options: DaemonOptions) -> Result<(), String> {
    let store = store::Store::open(&options.state_dir)?;
    let _lock = store.lock()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("daemon")
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
    let listener = server::bind(&options.sock)?;
    let result = runtime.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| format!("cannot register {}: {e}", options.sock.display()))?;
        let sandboxes = sandboxes::Sandboxes::new(
            store,
            options.launch,
            options.default_template,
            options.max_sandboxes,
        );
        for line in sandboxes.recover() {
            eprintln!("agentvm daemon: recovered {line}");
        }
        eprintln!(
            "agentvm daemon: serving on {} (state in {})",
            options.sock.display(),
            options.state_dir.display()
        );
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        tokio::select! {
            () = server::serve(listener, sandboxes) => {}
            _ = terminate.recv() => eprintln!("agentvm daemon: SIGTERM; sandboxes keep running"),
            _ = tokio::signal::ctrl_c() => eprintln!("agentvm daemon: SIGINT; sandboxes keep running"),
        }
        Ok::<(), String>(())
    });
    let _ = std::fs::remove_file(&options.sock);
    // Open connections (a long exec stream) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
