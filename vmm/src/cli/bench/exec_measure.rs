//! The measurements on a warm guest: exec round trips of `true`, protocol round trips (Ping),
//! streamed output throughput, and the VMM's host CPU time for them. The same code drives
//! agentvm and the peer, through the same client; only the transport differs.

use std::time::{Duration, Instant};

use agentvm_client::{AgentClient, ExecEvent, ExitStatus, ProcessSpec, ProcessSpecExt};
use serde::{Deserialize, Serialize};

use super::cpu_time::CpuTime;

/// Round trips before the measured ones (first exec of `true`, page cache, allocator).
const WARMUP_ROUND_TRIPS: u32 = 10;
/// A stream of this much before the measured ones.
const WARMUP_STREAM_MIB: u32 = 8;
/// How long one event of a stream may take (a stalled stream fails instead of hanging).
const STREAM_EVENT_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct ExecOptions {
    /// Exec round trips and ping round trips, each.
    pub runs: u32,
    pub stream_mib: u32,
    pub stream_runs: u32,
}

/// Every measured sample; each figure's median and p99 are taken from these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecSamples {
    /// Exec of `true` to its exit status, µs.
    pub exec_us: Vec<f64>,
    /// Ping to Done, µs.
    pub ping_us: Vec<f64>,
    /// `head -c M MiB /dev/zero`, MiB/s from Exec to Exited.
    pub stream_mib_s: Vec<f64>,
    /// Per exec round trip: CPU time of the VMM's non-vCPU threads (and vhost workers), µs.
    pub exec_cpu_host_us: Vec<f64>,
    /// Per exec round trip: CPU time of all the VMM's threads, vCPUs included, µs.
    pub exec_cpu_all_us: Vec<f64>,
    /// Per stream: CPU time of the non-vCPU threads per MiB streamed, ms.
    pub stream_cpu_host_ms_per_mib: Vec<f64>,
    /// Per stream: CPU time of all threads per MiB streamed, ms.
    pub stream_cpu_all_ms_per_mib: Vec<f64>,
    /// CPU time of the VMM over all measured exec round trips, divided by their number, µs.
    pub exec_cpu_host_mean_us: Option<f64>,
    pub exec_cpu_all_mean_us: Option<f64>,
}

/// Reads the VMM's CPU time.
pub type CpuReader<'a> = &'a dyn Fn() -> Result<CpuTime, String>;

pub fn measure(
    client: &AgentClient,
    cpu: CpuReader<'_>,
    opts: &ExecOptions,
) -> Result<ExecSamples, String> {
    let mut s = ExecSamples::default();
    for _ in 0..WARMUP_ROUND_TRIPS {
        exec_true(client)?;
        ping(client)?;
    }
    stream(client, WARMUP_STREAM_MIB.min(opts.stream_mib))?;

    let mut total = CpuTime::default();
    for _ in 0..opts.runs {
        let before = cpu()?;
        s.exec_us.push(exec_true(client)?);
        let used = cpu()?.since(before);
        total.vcpu_ns += used.vcpu_ns;
        total.host_ns += used.host_ns;
        s.exec_cpu_host_us.push(used.host_ns as f64 / 1e3);
        s.exec_cpu_all_us.push(used.total_ns() as f64 / 1e3);
    }
    if opts.runs > 0 {
        let n = f64::from(opts.runs);
        s.exec_cpu_host_mean_us = Some(total.host_ns as f64 / 1e3 / n);
        s.exec_cpu_all_mean_us = Some(total.total_ns() as f64 / 1e3 / n);
    }
    for _ in 0..opts.runs {
        s.ping_us.push(ping(client)?);
    }
    for _ in 0..opts.stream_runs {
        let before = cpu()?;
        let secs = stream(client, opts.stream_mib)?;
        let used = cpu()?.since(before);
        let mib = f64::from(opts.stream_mib);
        s.stream_mib_s.push(mib / secs);
        s.stream_cpu_host_ms_per_mib
            .push(used.host_ns as f64 / 1e6 / mib);
        s.stream_cpu_all_ms_per_mib
            .push(used.total_ns() as f64 / 1e6 / mib);
    }
    Ok(s)
}

/// One exec of `true`, in µs.
fn exec_true(client: &AgentClient) -> Result<f64, String> {
    let started = Instant::now();
    let out = client
        .exec_output(ProcessSpec::argv(["true"]))
        .map_err(|e| format!("exec of `true` failed: {e}"))?;
    let us = started.elapsed().as_secs_f64() * 1e6;
    if !out.success() {
        return Err(format!(
            "`true` did not succeed in the guest: {:?}{}",
            out.status,
            stderr_note(&out.stderr)
        ));
    }
    Ok(us)
}

fn ping(client: &AgentClient) -> Result<f64, String> {
    let started = Instant::now();
    client.ping().map_err(|e| format!("ping failed: {e}"))?;
    Ok(started.elapsed().as_secs_f64() * 1e6)
}

/// `head -c <mib> MiB /dev/zero`, reading (and counting) every byte; seconds from Exec to Exited.
fn stream(client: &AgentClient, mib: u32) -> Result<f64, String> {
    let expected = u64::from(mib) * MIB;
    let what = format!("`head -c {expected} /dev/zero`");
    let started = Instant::now();
    let mut exec = client
        .exec(stream_spec(mib), false)
        .map_err(|e| format!("{what} did not start: {e}"))?;
    let mut got = 0u64;
    let mut stderr = Vec::new();
    let status = loop {
        match exec.next_event_timeout(STREAM_EVENT_TIMEOUT) {
            Ok(Some(ExecEvent::Stdout(data))) => got += data.len() as u64,
            Ok(Some(ExecEvent::Stderr(data))) => stderr.extend(data),
            Ok(Some(ExecEvent::Exited { status, .. })) => break status,
            Ok(None) => return Err(format!("{what}: the stream ended without an exit status")),
            Err(e) => return Err(format!("{what} after {got} bytes: {e}")),
        }
    };
    let secs = started.elapsed().as_secs_f64();
    if status != ExitStatus::Code(0) || got != expected {
        return Err(format!(
            "{what}: {got} of {expected} bytes, exit {status:?}{}",
            stderr_note(&stderr)
        ));
    }
    Ok(secs)
}

fn stream_spec(mib: u32) -> ProcessSpec {
    let bytes = u64::from(mib) * MIB;
    ProcessSpec::argv([
        "head".to_string(),
        "-c".into(),
        bytes.to_string(),
        "/dev/zero".into(),
    ])
}

fn stderr_note(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(" (stderr: {})", text.chars().take(300).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};

    use super::*;
    use crate::cli::bench::cpu_time::cpu_time_of;

    /// The guest agent in host-process mode (`--listen-unix`), killed when dropped.
    struct HostAgent {
        child: Child,
        _dir: tempfile::TempDir,
        socket: PathBuf,
    }

    impl Drop for HostAgent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The agent binary the workspace build put beside this test's own directory (`deps/..`).
    fn agent_binary() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let path = exe.parent()?.parent()?.join("agentvm-guest-agent");
        path.is_file().then_some(path)
    }

    fn start_agent() -> Option<HostAgent> {
        let Some(binary) = agent_binary() else {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "CI=true: the guest agent binary must be built"
            );
            eprintln!("skipping: agentvm-guest-agent is not built (cargo build --release)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut child = Command::new(binary)
            .arg("--listen-unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // It says so once it accepts connections (or exits, closing stdout, if it cannot).
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let agent = HostAgent {
            child,
            _dir: dir,
            socket,
        };
        assert!(
            line.contains("listening on"),
            "agent did not start: {line:?}"
        );
        Some(agent)
    }

    #[test]
    fn measures_round_trips_streams_and_cpu_on_a_real_agent() {
        let Some(agent) = start_agent() else { return };
        let client = AgentClient::from_stream(UnixStream::connect(&agent.socket).unwrap()).unwrap();
        let pid = agent.child.id();
        let opts = ExecOptions {
            runs: 3,
            stream_mib: 2,
            stream_runs: 2,
        };
        let s = measure(&client, &|| cpu_time_of(pid, &[]), &opts).unwrap();
        assert_eq!((s.exec_us.len(), s.ping_us.len()), (3, 3));
        assert_eq!(s.stream_mib_s.len(), 2);
        assert_eq!(
            (s.exec_cpu_host_us.len(), s.stream_cpu_all_ms_per_mib.len()),
            (3, 2)
        );
        let positive = |v: &[f64]| v.iter().all(|x| x.is_finite() && *x > 0.0);
        assert!(positive(&s.exec_us) && positive(&s.ping_us) && positive(&s.stream_mib_s));
        // The agent has no vCPU threads: all its time is "host" time.
        assert_eq!(s.exec_cpu_host_us, s.exec_cpu_all_us);
        assert!(s.exec_cpu_host_mean_us.is_some_and(|m| m >= 0.0));
    }

    #[test]
    fn a_broken_connection_is_a_clear_error() {
        let Some(agent) = start_agent() else { return };
        let client = AgentClient::from_stream(UnixStream::connect(&agent.socket).unwrap()).unwrap();
        client.shutdown();
        let err = exec_true(&client).unwrap_err();
        assert!(err.contains("exec of `true` failed"), "{err}");
        let err = ping(&client).unwrap_err();
        assert!(err.contains("ping failed"), "{err}");
        let err = stream(&client, 1).unwrap_err();
        assert!(err.contains("head -c 1048576 /dev/zero"), "{err}");
    }
}
