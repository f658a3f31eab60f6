//! One guest for the checks: `agentvm boot` with a vsock device, as a child process that is
//! killed when this value drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_client::{AgentClient, ClientError};
use agentvm_protocol::AGENT_VSOCK_PORT;

pub struct Guest {
    pub child: Child,
    pub uds: PathBuf,
    pub console: PathBuf,
}

pub struct BootOptions<'a> {
    pub agentvm: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub work_dir: &'a Path,
    pub name: &'a str,
    pub extra_cmdline: &'a str,
    pub mem_mib: u32,
    /// More `agentvm boot` arguments, and environment variables for it.
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Guest {
    pub fn boot(o: &BootOptions<'_>) -> Result<Guest, String> {
        let uds = o.work_dir.join(format!("{}.vsock", o.name));
        let console = o.work_dir.join(format!("{}.console", o.name));
        let child = Command::new(o.agentvm)
            .arg("boot")
            .arg("--kernel")
            .arg(o.kernel)
            .arg("--initrd")
            .arg(o.initrd)
            .arg("--cmdline")
            .arg(format!("quiet {}", o.extra_cmdline))
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--console")
            .arg(&console)
            .args(["--vcpus", &crate::GUEST_VCPUS.to_string()])
            .args(["--mem-mib", &o.mem_mib.to_string()])
            .args(&o.extra_args)
            .envs(o.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", o.agentvm.display()))?;
        Ok(Guest {
            child,
            uds,
            console,
        })
    }

    /// Connects to the agent, waiting for the guest to boot (up to `timeout`).
    pub fn connect(&mut self, timeout: Duration) -> Result<AgentClient, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice =
                Duration::from_secs(2).min(deadline.saturating_duration_since(Instant::now()));
            match AgentClient::connect_vsock_uds(&self.uds, AGENT_VSOCK_PORT, slice) {
                Ok(c) => return Ok(c),
                Err(e @ ClientError::ConnectTimedOut { .. })
                    if Instant::now() < deadline && self.running() =>
                {
                    let _ = e;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the VMM to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
