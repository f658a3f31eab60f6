//! Running the measured processes (agentvm) and helper tools with hard time limits.
//!
//! Every child dies with this process (PR_SET_PDEATHSIG), is killed when its limit passes, and is
//! always reaped. Timestamps are CLOCK_MONOTONIC ns ([`monotonic_ns`]), comparable with the ones
//! agentvm writes into its timing report.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmm::process_stats::monotonic_ns;

use super::report::{rss_of, RssKib};

/// How often a watched child is checked (exit, limits).
const POLL: Duration = Duration::from_millis(2);
/// How often its memory is sampled: /proc reads are cheap, but not free under TCG.
const RSS_EVERY: Duration = Duration::from_millis(20);

/// This agentvm binary (the benchmark spawns itself as the VMM) and a temporary directory for the
/// runs' reports and logs, removed when dropped.
pub fn self_and_workdir() -> Result<(std::path::PathBuf, tempfile::TempDir), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the agentvm binary: {e}"))?;
    let dir = tempfile::Builder::new()
        .prefix("agentvm-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    Ok((exe, dir))
}

/// Makes the child die with this process, so a killed benchmark leaves no VMM behind.
pub(super) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What a bounded helper tool printed.
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with stdin from /dev/null, capturing stdout and stderr, and kills it after `limit`.
pub fn run_tool(mut cmd: Command, what: &str, limit: Duration) -> Result<ToolOutput, String> {
    let capture =
        || tempfile::tempfile().map_err(|e| format!("{what}: cannot create a temporary file: {e}"));
    let mut out = capture()?;
    let mut err = capture()?;
    let clone = |f: &File| f.try_clone().map_err(|e| format!("{what}: {e}"));
    cmd.stdin(Stdio::null())
        .stdout(clone(&out)?)
        .stderr(clone(&err)?);
    die_with_parent(&mut cmd);
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot start {:?}: {e}", cmd.get_program()))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill_and_reap(&mut child);
                return Err(format!(
                    "{what}: did not finish within {} s",
                    limit.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_and_reap(&mut child);
                return Err(format!("{what}: cannot wait for it: {e}"));
            }
        }
    };
    let read = |f: &mut File| -> String {
        let mut bytes = Vec::new();
        let _ = f
            .seek(SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut bytes));
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(ToolOutput {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    })
}

/// Kills the child's whole process group (children are spawned as group leaders), then reaps it.
pub(super) fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals a process group and touches no memory;
            // the child is not reaped yet, so its group id cannot have been reused.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// How to watch a VMM process.
pub struct Watch {
    /// Kill it (and report a timeout) after this long.
    pub limit: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Exited(ExitStatus),
    TimedOut,
}

/// What one watched run gave.
#[derive(Debug, Clone)]
pub struct Watched {
    /// CLOCK_MONOTONIC just before the fork.
    pub spawn_ns: u64,
    pub ended: Ended,
    /// Field-wise peak of the sampled memory.
    pub peak_rss: Option<RssKib>,
}

/// Spawns `cmd` (stdin and stdout /dev/null, stderr as the caller set it) and follows it until it
/// ends or the limit passes, sampling its memory.
pub fn watch(mut cmd: Command, watch: &Watch) -> Result<Watched, String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    die_with_parent(&mut cmd);
    // Its own process group, so a kill also reaches anything it started.
    cmd.process_group(0);
    let spawn_ns = monotonic_ns();
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut peak_rss: Option<RssKib> = None;
    let mut next_rss = started;
    let ended = loop {
        std::thread::sleep(POLL);
        let now = Instant::now();
        if now >= next_rss {
            if let Some(rss) = rss_of(child.id()) {
                peak_rss = Some(peak_rss.map_or(rss, |p| p.max(rss)));
            }
            next_rss = now + RSS_EVERY;
        }
        match child.try_wait() {
            Ok(Some(status)) => break Ended::Exited(status),
            Ok(None) => {}
            Err(e) => {
                kill_and_reap(&mut child);
                return Err(format!("cannot wait for {:?}: {e}", cmd.get_program()));
            }
        }
        if now.duration_since(started) >= watch.limit {
            kill_and_reap(&mut child);
            break Ended::TimedOut;
        }
    };
    Ok(Watched {
        spawn_ns,
        ended,
        peak_rss,
    })
}

/// `sh -c script`: a stand-in child for the tests of the code that watches VMMs.
#[cfg(test)]
pub fn shell(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_samples_memory_until_the_exit() {
        let w = Watch {
            limit: Duration::from_secs(30),
        };
        let run = watch(shell("sleep 0.1; exit 4"), &w).unwrap();
        assert!(run.spawn_ns > 0);
        assert!(matches!(run.ended, Ended::Exited(s) if s.code() == Some(4)));
        assert!(run.peak_rss.is_some_and(|r| r.total_kib > 0));
    }

    #[test]
    fn watch_enforces_the_limit() {
        let hang = Watch {
            limit: Duration::from_millis(200),
        };
        let run = watch(shell("sleep 30"), &hang).unwrap();
        assert_eq!(run.ended, Ended::TimedOut);
        let err = watch(Command::new("/nonexistent/vmm"), &hang).unwrap_err();
        assert!(err.contains("cannot start"), "{err}");
    }

    #[test]
    fn tools_are_captured_and_bounded() {
        let out = run_tool(
            shell("echo out; echo err >&2; exit 3"),
            "t",
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );
        assert_eq!(out.status.code(), Some(3));
        let err = match run_tool(shell("sleep 30"), "sleeper", Duration::from_millis(200)) {
            Err(e) => e,
            Ok(_) => panic!("the limit was not enforced"),
        };
        assert!(
            err.contains("sleeper") && err.contains("did not finish"),
            "{err}"
        );
        let err = match run_tool(
            Command::new("/nonexistent/tool"),
            "x",
            Duration::from_secs(1),
        ) {
            Err(e) => e,
            Ok(_) => panic!("a missing tool ran"),
        };
        assert!(err.contains("cannot start"), "{err}");
    }
}
