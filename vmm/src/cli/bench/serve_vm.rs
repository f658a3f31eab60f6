//! One `agentvm serve` process driven over its API socket, as the restore benchmark uses it: its
//! console goes to a file (so the benchmark sees the guest make progress), it is stopped with
//! SIGTERM (so a uffd restore writes its working set) and killed with its process group if it
//! does not end in time, or when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_daemon::vm_client;
use hyper::{Method, StatusCode};
use tokio::runtime::Runtime;

use super::child::{die_with_parent, kill_and_reap};

/// Hang detector of one API call (a snapshot of a large guest takes seconds).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `serve` may take to listen on its API socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERM'd `serve` may take to tear its VM down (and write a working set).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// `serve`'s exit status after an orderly SIGTERM teardown.
const SIGTERM_EXIT: i32 = 128 + libc::SIGTERM;
/// How often the socket, the console and the exit are checked.
const POLL: Duration = Duration::from_micros(100);

/// The figures `GET /metrics` gives the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmMetrics {
    /// VM build start (kernel load or snapshot load) to the first KVM_RUN, in µs.
    pub build_to_first_run_us: Option<u64>,
    /// Build start to the VM created with guest memory registered, in µs.
    pub build_to_kvm_ready_us: Option<u64>,
    /// Build start to the guest (kernel or snapshot state) loaded, in µs.
    pub build_to_loaded_us: Option<u64>,
    pub uffd_faults: Option<u64>,
    pub uffd_zero_pages: Option<u64>,
    pub uffd_prefetched_pages: Option<u64>,
    pub uffd_fault_service_s: Option<f64>,
}

pub struct ServeVm {
    child: Child,
    pub sock: PathBuf,
    pub console: PathBuf,
    stderr: PathBuf,
}

impl ServeVm {
    /// Starts `agentvm serve` with its socket, console and stderr in `dir`, named after `name`,
    /// and waits for its API socket.
    pub fn start(exe: &Path, dir: &Path, name: &str) -> Result<ServeVm, String> {
        let sock = dir.join(format!("{name}.sock"));
        let console = dir.join(format!("{name}.console"));
        let stderr = dir.join(format!("{name}.stderr"));
        let stderr_file = File::create(&stderr)
            .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(name)
            .arg("--console")
            .arg(&console)
            .env("AGENTVM_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file);
        die_with_parent(&mut cmd);
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} serve: {e}", exe.display()))?;
        let mut vm = ServeVm {
            child,
            sock,
            console,
            stderr,
        };
        vm.wait_for_socket()?;
        Ok(vm)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_for_socket(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        // The socket file appears at bind(2), before listen(2): wait until it takes connections.
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(&format!("ended before its API socket ({status})")));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "did not listen on its API socket within {} s",
                    SOCKET_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// `what` about this serve, with the end of its stderr.
    pub fn failure(&self, what: &str) -> String {
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = &lines[lines.len().saturating_sub(10)..];
        let mut message = format!("agentvm serve {}: {what}", self.sock.display());
        if !tail.is_empty() {
            message = format!("{message}\nits stderr ends:\n{}", tail.join("\n"));
        }
        message
    }

    /// One API call that must answer 204.
    pub fn call(
        &self,
        rt: &Runtime,
        method: Method,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(), String> {
        rt.block_on(call(self.sock.clone(), method, path.to_string(), body))
            .map_err(|e| self.failure(&e))
    }

    pub fn metrics(&self, rt: &Runtime) -> Result<VmMetrics, String> {
        let answer = rt
            .block_on(vm_client::call(
                &self.sock,
                Method::GET,
                "/metrics",
                None,
                CALL_TIMEOUT,
            ))
            .map_err(|e| self.failure(&e))?;
        if answer.status != StatusCode::OK {
            return Err(self.failure(&format!(
                "GET /metrics: {} {}",
                answer.status.as_u16(),
                answer.fault_message()
            )));
        }
        Ok(parse_metrics(&String::from_utf8_lossy(&answer.body)))
    }

    /// Waits until the VM has entered the guest (its build-to-first-KVM_RUN time is known).
    pub fn wait_first_run(&self, rt: &Runtime, timeout: Duration) -> Result<VmMetrics, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics(rt)?;
            if m.build_to_first_run_us.is_some() {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "no vCPU entered the guest within {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the console file holds `lines` complete lines: the guest ran that far.
    pub fn wait_console_lines(&mut self, lines: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read(&self.console).unwrap_or_default();
            if text.iter().filter(|&&b| b == b'\n').count() >= lines {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(&format!("ended before its guest printed ({status})")));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "the guest printed fewer than {lines} console line(s) within {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, then waits for a clean exit; a serve that does not end in time is killed and
    /// reported.
    pub fn stop(self) -> Result<(), String> {
        self.terminate();
        self.wait_stopped()
    }

    /// Asks `serve` to end its VM and exit (SIGTERM: the same teardown as a guest exit).
    pub fn terminate(&self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) touches no memory; the child is not reaped yet (only
            // `wait_stopped` and `Drop` reap it, and both take it), so its pid cannot have been
            // reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Waits for the clean exit [`ServeVm::terminate`] asked for.
    pub fn wait_stopped(mut self) -> Result<(), String> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                // serve ends with 128 + SIGTERM after an orderly teardown.
                Ok(Some(status)) if status.success() || status.code() == Some(SIGTERM_EXIT) => {
                    return Ok(())
                }
                Ok(Some(status)) => {
                    return Err(self.failure(&format!("ended badly after SIGTERM ({status})")))
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => {
                    kill_and_reap(&mut self.child);
                    return Err(self.failure(&format!(
                        "did not end within {} s of SIGTERM",
                        STOP_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }
}

impl Drop for ServeVm {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// One API call that must answer 204 (owned arguments, so several can run as tasks at once).
pub async fn call(
    sock: PathBuf,
    method: Method,
    path: String,
    body: serde_json::Value,
) -> Result<(), String> {
    crate::cli::snapshot::call_expecting_no_content(&sock, method, &path, body, CALL_TIMEOUT).await
}

/// The samples the benchmark needs from `GET /metrics`'s Prometheus text (every sample carries
/// an `id` label; a gauge absent from the text is unknown).
fn parse_metrics(text: &str) -> VmMetrics {
    let value = |name: &str| -> Option<f64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = rest.strip_prefix('{').map_or(Some(rest), |labels| {
                labels.split_once('}').map(|(_, after)| after)
            })?;
            rest.trim().parse::<f64>().ok()
        })
    };
    let count = |name: &str| value(name).map(|v| v as u64);
    let us = |name: &str| value(name).map(|s| (s * 1e6).round() as u64);
    VmMetrics {
        build_to_first_run_us: us("agentvm_boot_time_seconds"),
        build_to_kvm_ready_us: us("agentvm_boot_kvm_ready_seconds"),
        build_to_loaded_us: us("agentvm_boot_loaded_seconds"),
        uffd_faults: count("agentvm_uffd_faults_total"),
        uffd_zero_pages: count("agentvm_uffd_zero_pages_total"),
        uffd_prefetched_pages: count("agentvm_uffd_prefetched_pages_total"),
        uffd_fault_service_s: value("agentvm_uffd_fault_service_seconds_total"),
    }
}

/// Proportional set size of `pid` in KiB (shared pages divided among the processes that map
/// them): what N VMs restored from one memory file really cost together.
pub fn pss_kib(pid: u32) -> Option<u64> {
    vmm::process_stats::smaps_rollup_kib(Some(pid), "Pss")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_read_by_name_whatever_the_labels() {
        let text = "# HELP agentvm_boot_time_seconds x\n\
                    agentvm_boot_time_seconds{id=\"a\"} 0.001500\n\
                    agentvm_boot_loaded_seconds{id=\"a\"} 0.001200\n\
                    agentvm_uffd_faults_total{id=\"a\"} 12\n\
                    agentvm_uffd_faults_totally{id=\"a\"} 99\n\
                    agentvm_uffd_fault_service_seconds_total 0.003000\n";
        let m = parse_metrics(text);
        assert_eq!(m.build_to_first_run_us, Some(1500));
        assert_eq!(m.build_to_loaded_us, Some(1200));
        assert_eq!(m.build_to_kvm_ready_us, None);
        assert_eq!(m.uffd_faults, Some(12));
        assert_eq!(m.uffd_fault_service_s, Some(0.003));
        assert_eq!(m.uffd_prefetched_pages, None);
    }

    #[test]
    fn this_process_has_a_pss() {
        assert!(pss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
