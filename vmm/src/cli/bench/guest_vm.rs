//! A guest that stays up to be driven: its VMM as a child process (agentvm with a hybrid vsock
//! Unix socket, or QEMU microvm with a vhost-vsock device reached over AF_VSOCK) and a client
//! connected to the guest agent. The VMM's whole process group is killed and reaped when the
//! value is dropped, on every path.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_client::{AgentClient, ClientError};
use agentvm_protocol::AGENT_VSOCK_PORT;
use vmm::process_stats::monotonic_ns;

use super::child::{die_with_parent, kill_and_reap};
use super::report::{rss_of, RssKib};

/// One connection attempt, handshake included (so not too short for a slow guest); between
/// attempts the VMM is checked (exited?) and its memory sampled.
const CONNECT_SLICE: Duration = Duration::from_secs(1);
const LOG_TAIL_LINES: usize = 15;

/// How the host reaches the guest agent.
#[derive(Debug, Clone)]
pub enum Transport {
    /// agentvm: Firecracker-style hybrid vsock on this Unix socket.
    HybridUds(PathBuf),
    /// A vsock device the host kernel serves (vhost-vsock): AF_VSOCK to this guest CID.
    Vsock { cid: u32 },
}

pub struct GuestVm {
    child: Child,
    pub client: AgentClient,
    pub pid: u32,
    /// CLOCK_MONOTONIC right before the VMM was spawned.
    pub spawn_ns: u64,
    /// When the handshake with the guest agent completed.
    pub connected_ns: u64,
    /// Field-wise peak of the VMM's memory, sampled while waiting for the agent.
    pub peak_rss: Option<RssKib>,
}

impl GuestVm {
    /// Spawns `cmd` (stdout and stderr to `log`) and connects to the guest agent within
    /// `timeout` of the spawn.
    pub fn start(
        mut cmd: Command,
        transport: &Transport,
        timeout: Duration,
        log: &Path,
    ) -> Result<GuestVm, String> {
        let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        cmd.process_group(0);
        let spawn_ns = monotonic_ns();
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let pid = child.id();
        // From here on, dropping `guard` kills the VMM.
        let mut guard = Spawned { child: Some(child) };
        let mut peak_rss: Option<RssKib> = None;
        let fail = |what: String| format!("{what}\n--- VMM output (last lines) ---\n{}", tail(log));
        let client = loop {
            if let Some(rss) = rss_of(pid) {
                peak_rss = Some(peak_rss.map_or(rss, |p| p.max(rss)));
            }
            if let Some(Ok(Some(status))) = guard.child.as_mut().map(Child::try_wait) {
                return Err(fail(format!(
                    "the VMM exited ({status}) before the guest agent answered"
                )));
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(fail(format!(
                    "the guest agent did not answer within {} s of the VMM's start",
                    timeout.as_secs()
                )));
            }
            let slice = CONNECT_SLICE.min(left);
            let attempt = match transport {
                Transport::HybridUds(uds) => {
                    AgentClient::connect_vsock_uds(uds, AGENT_VSOCK_PORT, slice)
                }
                Transport::Vsock { cid } => {
                    AgentClient::connect_vsock(*cid, AGENT_VSOCK_PORT, slice)
                }
            };
            match attempt {
                Ok(client) => break client,
                // Not up yet; the handshake, too, can time out while a slow guest's agent starts.
                Err(
                    ClientError::ConnectTimedOut { .. }
                    | ClientError::VsockConnectTimedOut { .. }
                    | ClientError::TimedOut { .. },
                ) => {}
                Err(e) => return Err(fail(format!("cannot connect to the guest agent: {e}"))),
            }
        };
        let connected_ns = monotonic_ns();
        let child = guard
            .child
            .take()
            .ok_or("internal error: the VMM process was lost")?;
        Ok(GuestVm {
            child,
            client,
            pid,
            spawn_ns,
            connected_ns,
            peak_rss,
        })
    }

    /// Samples the VMM's memory into the peak.
    pub fn sample_rss(&mut self) {
        if let Some(rss) = rss_of(self.pid) {
            self.peak_rss = Some(self.peak_rss.map_or(rss, |p| p.max(rss)));
        }
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        self.client.shutdown();
        kill_and_reap(&mut self.child);
    }
}

/// Kills a VMM that did not get as far as a connected client.
struct Spawned {
    child: Option<Child>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            kill_and_reap(child);
        }
    }
}

/// `agentvm boot` of the kernel and initramfs with a vsock device on `uds`, stopping itself
/// after `limit_secs`.
pub fn agentvm_command(
    exe: &Path,
    kernel: &Path,
    initrd: &Path,
    mem_mib: u64,
    uds: &Path,
    limit_secs: u64,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("boot")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg("quiet")
        .arg("--vsock-uds")
        .arg(uds)
        .arg("--mem-mib")
        .arg(mem_mib.to_string())
        .arg("--timeout")
        .arg(limit_secs.to_string())
        .env("AGENTVM_LOG", "warn");
    cmd
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::super::child::shell;
    use super::*;

    #[test]
    fn a_vmm_that_exits_early_is_reported_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let uds = Transport::HybridUds(dir.path().join("none.sock"));
        let err = match GuestVm::start(
            shell("echo no kvm here >&2; exit 3"),
            &uds,
            Duration::from_secs(60),
            &log,
        ) {
            Err(e) => e,
            Ok(_) => panic!("a guest appeared from nowhere"),
        };
        assert!(
            err.contains("exited") && err.contains("no kvm here"),
            "{err}"
        );
    }

    #[test]
    fn an_agent_that_never_answers_times_out_and_the_vmm_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let pid_file = dir.path().join("pid");
        let uds = Transport::HybridUds(dir.path().join("none.sock"));
        let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
        let err = match GuestVm::start(shell(&script), &uds, Duration::from_secs(2), &log) {
            Err(e) => e,
            Ok(_) => panic!("a guest appeared from nowhere"),
        };
        assert!(err.contains("did not answer"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new("/proc").join(pid.trim()).exists(),
            "the VMM was left running"
        );
    }

    #[test]
    fn the_agentvm_command_has_a_vsock_device_and_a_limit() {
        let cmd = agentvm_command(
            Path::new("/bin/agentvm"),
            Path::new("/k"),
            Path::new("/i"),
            256,
            Path::new("/tmp/v.sock"),
            90,
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |f: &str| {
            args.iter()
                .position(|a| a == f)
                .map(|i| args[i + 1].as_str())
        };
        assert_eq!(args[0], "boot");
        assert_eq!(after("--vsock-uds"), Some("/tmp/v.sock"));
        assert_eq!(after("--timeout"), Some("90"));
        assert_eq!(after("--mem-mib"), Some("256"));
    }
}
