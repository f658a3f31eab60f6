//! Running the `agentvm` binary from tests: finding it, checking for KVM, and driving the process
//! with timeouts that kill it instead of hanging the test.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Overrides [`agentvm_bin`], e.g. to test a release build or a binary built elsewhere.
pub const AGENTVM_BIN_ENV: &str = "AGENTVM_BIN";

/// The `agentvm` binary built with the same cargo profile as the running test executable.
///
/// Test executables live in `target/<triple>/<profile>/deps/`; the binary is
/// `target/<triple>/<profile>/agentvm`. Cargo does not build another package's binaries for a test,
/// so this panics with the command to run when it is missing.
pub fn agentvm_bin() -> PathBuf {
    if let Some(path) = std::env::var_os(AGENTVM_BIN_ENV) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("cannot locate the running test executable");
    let exe_dir = exe.parent().expect("executable has a parent directory");
    let profile_dir = if exe_dir.ends_with("deps") {
        exe_dir.parent().expect("deps/ has a parent directory")
    } else {
        exe_dir
    };
    let bin = profile_dir.join("agentvm");
    if !bin.is_file() {
        let profile_flag = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => String::new(),
            Some("release") => " --release".to_string(),
            Some(other) => format!(" --profile {other}"),
        };
        panic!(
            "agentvm binary not found at {}: run `cargo build -p vmm{profile_flag}` first (or set \
             {AGENTVM_BIN_ENV})",
            bin.display()
        );
    }
    bin
}

/// Whether `/dev/kvm` can be opened read-write. If not, prints why and returns false so the test
/// can return early; with `CI=true` it panics instead, because KVM tests must fail, not skip, in CI.
pub fn require_kvm() -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            let why = format!("/dev/kvm is not usable: {e}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why} (CI=true: KVM tests must not be skipped)");
            }
            eprintln!("skipping KVM test: {why}");
            false
        }
    }
}

/// The end state of a finished `agentvm` process.
pub struct VmOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl VmOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// How much of each stream error messages and `Debug` show: the end is what explains a failure.
const SHOWN_TAIL: usize = 4096;

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(SHOWN_TAIL);
    let prefix = if start > 0 { "[...]" } else { "" };
    format!("{prefix}{}", String::from_utf8_lossy(&bytes[start..]))
}

impl fmt::Debug for VmOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n--- stdout ({} bytes) ---\n{}\n--- stderr ({} bytes) ---\n{}",
            self.status,
            self.stdout.len(),
            tail(&self.stdout),
            self.stderr.len(),
            tail(&self.stderr)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the process failed: {0}")]
    Wait(#[source] std::io::Error),
    #[error("cannot send signal {signal} to pid {pid}: {source}")]
    Signal {
        signal: i32,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("still running after {after:?}; killed it.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")]
    TimedOut {
        after: Duration,
        stdout: String,
        stderr: String,
    },
    #[error(
        "{what:?} did not appear on stdout within {after:?} (process {state}).\n--- stdout ---\n\
         {stdout}\n--- stderr ---\n{stderr}"
    )]
    NoMatch {
        what: String,
        after: Duration,
        state: String,
        stdout: String,
        stderr: String,
    },
}

/// Bytes read from one of the child's pipes, shared with the thread that reads them.
#[derive(Default)]
struct Captured {
    state: Mutex<CapturedState>,
    changed: Condvar,
}

#[derive(Default)]
struct CapturedState {
    bytes: Vec<u8>,
    eof: bool,
}

impl Captured {
    fn start(mut pipe: impl Read + Send + 'static) -> Arc<Self> {
        let captured = Arc::new(Self::default());
        let writer = Arc::clone(&captured);
        thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let mut state = writer.state.lock().expect("capture lock poisoned");
                if n == 0 {
                    state.eof = true;
                } else {
                    state.bytes.extend_from_slice(&buf[..n]);
                }
                writer.changed.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        captured
    }

    fn snapshot(&self) -> Vec<u8> {
        self.state
            .lock()
            .expect("capture lock poisoned")
            .bytes
            .clone()
    }

    /// Waits until the pipe reaches EOF or `deadline` passes, then returns everything read.
    fn finish(&self, deadline: Instant) -> Vec<u8> {
        let mut state = self.state.lock().expect("capture lock poisoned");
        while !state.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .expect("capture lock poisoned")
                .0;
        }
        std::mem::take(&mut state.bytes)
    }
}

/// How long to keep reading a pipe after the process exited: a grandchild could hold it open.
const PIPE_DRAIN: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A running `agentvm` (or any) process with captured stdout/stderr. Dropping it kills the process,
/// so a failing assertion never leaves a VM behind.
pub struct VmProcess {
    child: Child,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
}

impl VmProcess {
    /// Starts `command` with stdin closed and stdout/stderr captured.
    pub fn spawn(mut command: Command) -> Result<Self, HarnessError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HarnessError::Spawn { program, source })?;
        let stdout = Captured::start(child.stdout.take().expect("stdout is piped"));
        let stderr = Captured::start(child.stderr.take().expect("stderr is piped"));
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    /// Starts `agentvm` with `args`.
    pub fn agentvm<I, S>(args: I) -> Result<Self, HarnessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(agentvm_bin());
        command.args(args);
        Self::spawn(command)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Blocks until `needle` appears on stdout. Fails if `timeout` passes or stdout closes first.
    pub fn wait_for_stdout(&self, needle: &[u8], timeout: Duration) -> Result<(), HarnessError> {
        self.wait_for(&self.stdout, "stdout", needle, timeout)
    }

    /// Blocks until `needle` appears on stderr. Fails if `timeout` passes or stderr closes first.
    pub fn wait_for_stderr(&self, needle: &[u8], timeout: Duration) -> Result<(), HarnessError> {
        self.wait_for(&self.stderr, "stderr", needle, timeout)
    }

    fn wait_for(
        &self,
        stream: &Captured,
        name: &str,
        needle: &[u8],
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut state = stream.state.lock().expect("capture lock poisoned");
        loop {
            if state.bytes.windows(needle.len()).any(|w| w == needle) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.eof || left.is_zero() {
                drop(state);
                return Err(HarnessError::NoMatch {
                    what: format!("{} on {name}", String::from_utf8_lossy(needle)),
                    after: timeout,
                    state: if left.is_zero() {
                        "still running".into()
                    } else {
                        format!("closed {name}")
                    },
                    stdout: tail(&self.stdout.snapshot()),
                    stderr: tail(&self.stderr.snapshot()),
                });
            }
            state = stream
                .changed
                .wait_timeout(state, left)
                .expect("capture lock poisoned")
                .0;
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) -> Result<(), HarnessError> {
        let pid = self.child.id();
        let raw_pid = libc::pid_t::try_from(pid).expect("Linux pids fit in pid_t");
        // SAFETY: kill(2) takes two integers and touches no memory of ours. The pid is our child's
        // and cannot have been reused: the child is reaped only by `wait`, which consumes `self`.
        let rc = unsafe { libc::kill(raw_pid, signal) };
        if rc != 0 {
            return Err(HarnessError::Signal {
                signal,
                pid,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits for the process to exit. After `timeout` it is killed and `TimedOut` carries what it
    /// printed; the timeout is a hang detector, not a performance assertion.
    pub fn wait(mut self, timeout: Duration) -> Result<VmOutput, HarnessError> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().map_err(HarnessError::Wait)? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(POLL_INTERVAL);
        };
        let Some(status) = status else {
            // Ignoring errors: the process may have exited between try_wait and kill.
            let _ = self.child.kill();
            let _ = self.child.wait();
            let drain = Instant::now() + PIPE_DRAIN;
            return Err(HarnessError::TimedOut {
                after: timeout,
                stdout: tail(&self.stdout.finish(drain)),
                stderr: tail(&self.stderr.finish(drain)),
            });
        };
        let drain = Instant::now() + PIPE_DRAIN;
        Ok(VmOutput {
            status,
            stdout: self.stdout.finish(drain),
            stderr: self.stderr.finish(drain),
        })
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `agentvm` with `args` to completion, killing it after `timeout`.
pub fn run_agentvm<I, S>(args: I, timeout: Duration) -> Result<VmOutput, HarnessError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    VmProcess::agentvm(args)?.wait(timeout)
}

/// Runs an arbitrary program to completion, killing it after `timeout`.
pub fn run_with_timeout(
    program: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<VmOutput, HarnessError> {
    let mut command = Command::new(program);
    command.args(args);
    VmProcess::spawn(command)?.wait(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> VmProcess {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", script]);
        VmProcess::spawn(command).unwrap()
    }

    #[test]
    fn captures_output_and_status() {
        let out = sh("printf 'out'; printf 'err' >&2; exit 3")
            .wait(Duration::from_secs(60))
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out");
        assert_eq!(out.stderr, b"err");
    }

    #[test]
    fn kills_a_process_that_outlives_its_timeout() {
        let vm = sh("echo started; exec sleep 1000");
        vm.wait_for_stdout(b"started\n", Duration::from_secs(60))
            .unwrap();
        let err = vm.wait(Duration::from_millis(200)).unwrap_err();
        match err {
            HarnessError::TimedOut { stdout, .. } => assert_eq!(stdout, "started\n"),
            other => panic!("expected TimedOut, got {other}"),
        }
    }

    #[test]
    fn waits_for_output_then_signals() {
        let vm =
            sh("trap 'echo got-term; exit 143' TERM; echo ready; while :; do sleep 0.01; done");
        vm.wait_for_stdout(b"ready\n", Duration::from_secs(60))
            .unwrap();
        vm.signal(libc::SIGTERM).unwrap();
        let out = vm.wait(Duration::from_secs(60)).unwrap();
        assert_eq!(out.status.code(), Some(143));
        assert_eq!(out.stdout_text(), "ready\ngot-term\n");
    }

    #[test]
    fn reports_output_that_never_arrives() {
        let vm = sh("echo other");
        let err = vm
            .wait_for_stdout(b"never", Duration::from_secs(60))
            .unwrap_err();
        assert!(
            matches!(&err, HarnessError::NoMatch { state, stdout, .. }
                if state == "closed stdout" && stdout == "other\n"),
            "{err}"
        );
    }

    #[test]
    fn run_with_timeout_runs_a_program() {
        let out = run_with_timeout(
            Path::new("/bin/sh"),
            &["-c", "echo hi"],
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout_text(), "hi\n");
    }
}
