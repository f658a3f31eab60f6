//! Running the measured processes (agentvm, QEMU) and helper tools with hard time limits.
//!
//! Every child dies with this process (PR_SET_PDEATHSIG), is killed when its limit passes, and is
//! always reaped. Timestamps are CLOCK_MONOTONIC ns ([`monotonic_ns`]), comparable with the ones
//! agentvm writes into its timing report.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_agent::console_protocol::{ExitStatus as GuestStatus, Marker, MARKER_PREFIX};
use vmm::process_stats::monotonic_ns;

use super::report::{rss_of, RssKib};

/// How often a watched child is checked (exit, limits).
const POLL: Duration = Duration::from_millis(2);
/// How often its memory is sampled: /proc reads are cheap, but not free under TCG.
const RSS_EVERY: Duration = Duration::from_millis(20);
/// Console lines kept for error messages.
const TAIL_LINES: usize = 40;
/// A console "line" longer than this is cut: it cannot be a marker, and must not grow unbounded.
const MAX_LINE: usize = 64 << 10;
/// How long the console reader may take to see end-of-file after the child ended.
const READER_GRACE: Duration = Duration::from_secs(2);

/// Makes the child die with this process, so a killed benchmark leaves no VMM behind.
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
    /// Its stdout is a guest serial console: timestamp the guest agent's markers on it.
    pub console_on_stdout: bool,
    /// Kill it (and report a timeout) after this long.
    pub limit: Duration,
    /// Once the command's result arrived on the console, give the process this long to end by
    /// itself (guest reboot), then kill it: the figures are taken by then.
    pub after_result: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Exited(ExitStatus),
    TimedOut,
    /// Killed by us after the result arrived, because it did not end by itself.
    KilledAfterResult,
}

/// What one watched run gave.
#[derive(Debug, Clone)]
pub struct Watched {
    /// CLOCK_MONOTONIC just before the fork.
    pub spawn_ns: u64,
    pub ready_ns: Option<u64>,
    pub result_ns: Option<u64>,
    pub guest_exit: Option<GuestStatus>,
    pub agent_errors: Vec<String>,
    pub ended: Ended,
    /// Field-wise peak of the sampled memory.
    pub peak_rss: Option<RssKib>,
    /// The last console lines (for error messages).
    pub console_tail: String,
}

struct Console {
    thread: JoinHandle<()>,
    markers: Receiver<(Marker, u64)>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// Spawns `cmd` (stdin /dev/null; stdout piped when it is a console, else discarded; stderr as
/// the caller set it) and follows it until it ends, the limit passes, or the result is in.
pub fn watch(mut cmd: Command, watch: &Watch) -> Result<Watched, String> {
    cmd.stdin(Stdio::null());
    cmd.stdout(if watch.console_on_stdout {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    die_with_parent(&mut cmd);
    // Its own process group, so a kill also reaches anything it started (which could otherwise
    // keep the console pipe open).
    cmd.process_group(0);
    let spawn_ns = monotonic_ns();
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let console = match child.stdout.take() {
        Some(stdout) => match spawn_console_reader(stdout) {
            Ok(console) => Some(console),
            Err(e) => {
                kill_and_reap(&mut child);
                return Err(format!("cannot start the console reader thread: {e}"));
            }
        },
        None => None,
    };

    let mut run = Watched {
        spawn_ns,
        ready_ns: None,
        result_ns: None,
        guest_exit: None,
        agent_errors: Vec::new(),
        ended: Ended::TimedOut,
        peak_rss: None,
        console_tail: String::new(),
    };
    let mut next_rss = started;
    let mut result_seen: Option<Instant> = None;
    run.ended = loop {
        if let Some(console) = &console {
            match console.markers.recv_timeout(POLL) {
                Ok((marker, at)) => {
                    if record(&mut run, marker, at) && result_seen.is_none() {
                        result_seen = Some(Instant::now());
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The console closed: nothing more to wait for on it.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(POLL),
            }
        } else {
            std::thread::sleep(POLL);
        }
        let now = Instant::now();
        if now >= next_rss {
            if let Some(rss) = rss_of(child.id()) {
                run.peak_rss = Some(run.peak_rss.map_or(rss, |p| p.max(rss)));
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
        if result_seen.is_some_and(|at| now.duration_since(at) >= watch.after_result) {
            kill_and_reap(&mut child);
            break Ended::KilledAfterResult;
        }
        if now.duration_since(started) >= watch.limit {
            kill_and_reap(&mut child);
            break Ended::TimedOut;
        }
    };
    if let Some(console) = console {
        // The pipe closes when the child is gone, unless something it started still holds it:
        // then leave the reader behind rather than hang.
        let give_up = Instant::now() + READER_GRACE;
        while !console.thread.is_finished() && Instant::now() < give_up {
            std::thread::sleep(POLL);
        }
        if console.thread.is_finished() {
            let _ = console.thread.join();
        }
        for (marker, at) in console.markers.try_iter() {
            record(&mut run, marker, at);
        }
        let tail = console.tail.lock().map(|t| t.clone()).unwrap_or_default();
        run.console_tail = Vec::from(tail).join("\n");
    }
    Ok(run)
}

/// Notes one marker; true when it was the command's result.
fn record(run: &mut Watched, marker: Marker, at: u64) -> bool {
    match marker {
        Marker::Ready { .. } => {
            run.ready_ns.get_or_insert(at);
        }
        Marker::Exit(status) => {
            run.result_ns.get_or_insert(at);
            run.guest_exit.get_or_insert(status);
            return true;
        }
        Marker::Error(message) => run.agent_errors.push(message),
        Marker::ExecStart | Marker::Poweroff => {}
    }
    false
}

fn spawn_console_reader(mut stdout: impl Read + Send + 'static) -> std::io::Result<Console> {
    let (tx, markers) = channel();
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let keep = tail.clone();
    let thread = std::thread::Builder::new()
        .name("bench-console".into())
        .spawn(move || {
            let mut lines = LineSplitter::default();
            let mut buf = [0u8; 16 << 10];
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // One timestamp per read: markers are written whole, and each read returns as soon
                // as bytes arrive.
                let at = monotonic_ns();
                for line in lines.feed(&buf[..n]) {
                    if let Some(marker) = parse_marker(&line) {
                        let _ = tx.send((marker, at));
                    }
                    if let Ok(mut t) = keep.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(String::from_utf8_lossy(&line).trim_end().to_string());
                    }
                }
            }
        })?;
    Ok(Console {
        thread,
        markers,
        tail,
    })
}

/// A marker anywhere in a console line (kernel messages can precede it on the same line).
fn parse_marker(line: &[u8]) -> Option<Marker> {
    let prefix = MARKER_PREFIX.as_bytes();
    let at = line.windows(prefix.len()).position(|w| w == prefix)?;
    let line = line[at..].strip_suffix(b"\n").unwrap_or(&line[at..]);
    Marker::parse(line).ok().flatten()
}

/// Splits a byte stream into lines (each with its "\n"), cutting overlong ones.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn feed(&mut self, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..=nl]);
            lines.push(std::mem::take(&mut self.partial));
            data = &data[nl + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > MAX_LINE {
            lines.push(std::mem::take(&mut self.partial));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_whatever_the_chunking() {
        let text = b"[ 0.1] boot\r\n@@agentvm:ready boot_ns=5\n@@agentvm:exit code=0\npartial";
        for chunk in [1, 3, 7, 100] {
            let mut s = LineSplitter::default();
            let lines: Vec<Vec<u8>> = text.chunks(chunk).flat_map(|c| s.feed(c)).collect();
            assert_eq!(lines.len(), 3, "chunk {chunk}");
            assert_eq!(lines[1], b"@@agentvm:ready boot_ns=5\n");
            assert_eq!(s.partial, b"partial");
        }
        let mut s = LineSplitter::default();
        assert_eq!(s.feed(&vec![b'x'; MAX_LINE + 1]).len(), 1);
        assert!(s.partial.is_empty());
    }

    #[test]
    fn markers_are_found_after_kernel_text() {
        assert_eq!(
            parse_marker(b"[ 3.0] random: x@@agentvm:ready boot_ns=42\r\n"),
            Some(Marker::Ready { boot_ns: 42 })
        );
        assert_eq!(
            parse_marker(b"@@agentvm:exit code=3\n"),
            Some(Marker::Exit(GuestStatus::Code(3)))
        );
        assert_eq!(parse_marker(b"plain kernel line\n"), None);
        assert_eq!(parse_marker(b"@@agentvm:bogus\n"), None);
    }

    fn shell(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[test]
    fn watch_timestamps_markers_and_samples_memory() {
        let w = Watch {
            console_on_stdout: true,
            limit: Duration::from_secs(30),
            after_result: Duration::from_secs(30),
        };
        let run = watch(
            shell(
                "echo '@@agentvm:ready boot_ns=1'; sleep 0.1; echo '@@agentvm:error oops'; \
                 echo '@@agentvm:exit code=0'",
            ),
            &w,
        )
        .unwrap();
        let ready = run.ready_ns.unwrap();
        let result = run.result_ns.unwrap();
        assert!(run.spawn_ns <= ready && ready < result, "{run:?}");
        assert_eq!(run.guest_exit, Some(GuestStatus::Code(0)));
        assert_eq!(run.agent_errors, ["oops"]);
        assert!(matches!(run.ended, Ended::Exited(s) if s.success()));
        assert!(run.peak_rss.is_some_and(|r| r.total_kib > 0));
        assert!(run.console_tail.ends_with("@@agentvm:exit code=0"));
    }

    #[test]
    fn watch_enforces_the_limit_and_the_after_result_grace() {
        let hang = Watch {
            console_on_stdout: false,
            limit: Duration::from_millis(200),
            after_result: Duration::from_secs(30),
        };
        let run = watch(shell("sleep 30"), &hang).unwrap();
        assert_eq!(run.ended, Ended::TimedOut);

        let lingering = Watch {
            console_on_stdout: true,
            limit: Duration::from_secs(30),
            after_result: Duration::from_millis(100),
        };
        // exec: the shell's own stdout must close when it is killed.
        let run = watch(
            shell("echo '@@agentvm:exit code=0'; exec sleep 30"),
            &lingering,
        )
        .unwrap();
        assert_eq!(run.ended, Ended::KilledAfterResult);
        assert!(run.result_ns.is_some());
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
