//! Running the requested command: exec-start marker, the command's stdout+stderr forwarded to the
//! console through one pipe, zombies reaped meanwhile, then the exit marker.
//!
//! The command is done when its process exits, not when the pipe reaches EOF: a background
//! process it started may hold the pipe open for ever. What is already in the pipe at that point
//! is still forwarded, up to [`DRAIN_LIMIT`].

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::console::ConsoleWriter;
use crate::console_protocol::{ExitStatus, Marker, EXEC_FAILURE_CODE};
use crate::power::{is_power_signal, reap_all, SignalWatcher};

/// After the command exits, at most this much leftover output is forwarded, so a background
/// process that keeps writing cannot hold back the exit marker.
pub const DRAIN_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Working directory of the command (inherited if None).
    pub cwd: Option<PathBuf>,
    /// Reap every exited child, not just the command: right for PID 1, which inherits orphans;
    /// wrong for an ordinary process whose other children are waited for elsewhere.
    pub reap_orphans: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The command ended (or could not start: code 127); the exit marker has been written.
    Exited(ExitStatus),
    /// A power signal arrived first; the command was killed and no exit marker was written.
    PowerRequested(libc::c_int),
}

/// Converts a waitpid status; None for stop/continue reports.
pub fn decode_wait_status(status: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(status) as u8))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signal(libc::WTERMSIG(status)))
    } else {
        None
    }
}

/// Runs `argv` with stdin from /dev/null and stdout+stderr into the console, framed by the
/// exec-start and exit markers. A command that cannot be started gets an error marker and exit
/// code 127. `signals` (PID 1's watcher) lets a power signal interrupt the command and, with
/// `reap_orphans`, lets SIGCHLD trigger reaping of orphans while the command runs.
pub fn run_command<W: Write>(
    argv: &[OsString],
    options: &ExecOptions,
    console: &mut ConsoleWriter<W>,
    signals: Option<&mut SignalWatcher>,
) -> ExecOutcome {
    console.marker(&Marker::ExecStart);
    let outcome = match spawn(argv, options) {
        Ok(running) => running.forward(options, console, signals),
        Err(message) => {
            console.error(message);
            ExecOutcome::Exited(ExitStatus::Code(EXEC_FAILURE_CODE))
        }
    };
    if let ExecOutcome::Exited(status) = outcome {
        console.marker(&Marker::Exit(status));
    }
    outcome
}

struct Running {
    pid: libc::pid_t,
    output: File,
    /// Readable when the command exits (kernels >= 5.3); without it, exit is noticed through
    /// SIGCHLD or, failing that, the pipe's EOF.
    pidfd: Option<OwnedFd>,
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    unsafe { Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))) }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a valid fd owned by `file`.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from pidfd_open, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn spawn(argv: &[OsString], options: &ExecOptions) -> Result<Running, String> {
    let Some(program) = argv.first() else {
        return Err("exec: empty command".to_string());
    };
    let describe = |e: io::Error| format!("exec {}: {e}", program.to_string_lossy());
    let (output, input) = pipe().map_err(describe)?;
    set_nonblocking(&output).map_err(describe)?;
    let stderr = input.try_clone().map_err(describe)?;
    let mut command = Command::new(program);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(input))
        .stderr(Stdio::from(stderr));
    if let Some(cwd) = &options.cwd {
        command.current_dir(cwd);
    }
    let child = command.spawn().map_err(describe)?;
    // The Command still holds the pipe's write ends; only the command may keep it open.
    drop(command);
    let pid = child.id() as libc::pid_t;
    Ok(Running {
        pid,
        output,
        pidfd: pidfd_open(pid).ok(),
    })
}

impl Running {
    /// Reaps without blocking; returns the command's status once it has exited.
    fn reap(&self, all: bool) -> Option<ExitStatus> {
        if all {
            return reap_all()
                .into_iter()
                .filter(|(pid, _)| *pid == self.pid)
                .find_map(|(_, status)| decode_wait_status(status));
        }
        let mut status = 0;
        // SAFETY: non-blocking waitpid on our own child, status into a local.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if rc == self.pid {
            decode_wait_status(status)
        } else {
            None
        }
    }

    fn wait_blocking(&self) -> ExitStatus {
        loop {
            let mut status = 0;
            // SAFETY: blocking waitpid on our own child, status into a local.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if rc == self.pid {
                if let Some(exit) = decode_wait_status(status) {
                    return exit;
                }
            } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // ECHILD: someone else reaped it; its status is lost.
                return ExitStatus::Code(EXEC_FAILURE_CODE);
            }
        }
    }

    fn kill(&self) {
        // SAFETY: sends SIGKILL to our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        self.wait_blocking();
    }

    /// Forwards what is readable now; false once the pipe reached EOF.
    fn pump<W: Write>(&mut self, console: &mut ConsoleWriter<W>, limit: usize) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let mut forwarded = 0;
        while forwarded < limit {
            match self.output.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    console.output(&buf[..n]);
                    forwarded += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    console.error(format!("reading the command's output failed: {e}"));
                    return false;
                }
            }
        }
        true
    }

    fn forward<W: Write>(
        mut self,
        options: &ExecOptions,
        console: &mut ConsoleWriter<W>,
        mut signals: Option<&mut SignalWatcher>,
    ) -> ExecOutcome {
        let mut pipe_open = true;
        loop {
            let mut fds = Vec::with_capacity(3);
            let mut slots = [None; 3];
            if pipe_open {
                slots[0] = Some(fds.len());
                fds.push(self.output.as_raw_fd());
            }
            if let Some(pidfd) = &self.pidfd {
                slots[1] = Some(fds.len());
                fds.push(pidfd.as_raw_fd());
            }
            if let Some(watcher) = &signals {
                slots[2] = Some(fds.len());
                fds.push(watcher.as_fd().as_raw_fd());
            }
            if fds.is_empty() {
                // Pipe closed and nothing else can tell us about the exit: wait for it.
                let status = self.wait_blocking();
                return ExecOutcome::Exited(status);
            }
            let mut pollfds: Vec<libc::pollfd> = fds
                .iter()
                .map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: polls a live, correctly sized array of pollfds.
            let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                console.error(format!("poll failed while running the command: {err}"));
                let status = self.wait_blocking();
                self.pump(console, DRAIN_LIMIT);
                return ExecOutcome::Exited(status);
            }
            let ready = |slot: Option<usize>| slot.is_some_and(|i| pollfds[i].revents != 0);

            if ready(slots[0]) {
                pipe_open = self.pump(console, usize::MAX);
            }
            let mut status = None;
            if let (true, Some(watcher)) = (ready(slots[2]), signals.as_deref_mut()) {
                match watcher.take_pending() {
                    Ok(received) => {
                        if let Some(&power) = received.iter().find(|&&s| is_power_signal(s)) {
                            self.kill();
                            return ExecOutcome::PowerRequested(power);
                        }
                        if received.contains(&libc::SIGCHLD) {
                            status = self.reap(options.reap_orphans);
                        }
                    }
                    Err(e) => {
                        console.error(format!("reading signals failed: {e}"));
                        signals = None;
                    }
                }
            }
            if status.is_none() && ready(slots[1]) {
                status = self.reap(options.reap_orphans);
            }
            if let Some(status) = status {
                if pipe_open {
                    self.pump(console, DRAIN_LIMIT);
                }
                return ExecOutcome::Exited(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str) -> (ExecOutcome, String) {
        let argv: Vec<OsString> = ["sh", "-c", script].iter().map(OsString::from).collect();
        let mut console = ConsoleWriter::new(Vec::new());
        let outcome = run_command(&argv, &ExecOptions::default(), &mut console, None);
        (
            outcome,
            String::from_utf8_lossy(&console.into_inner()).into_owned(),
        )
    }

    #[test]
    fn forwards_output_and_reports_the_exit_code() {
        let (outcome, text) = run("echo hi; exit 3");
        assert_eq!(outcome, ExecOutcome::Exited(ExitStatus::Code(3)));
        assert_eq!(text, "@@agentvm:exec-start\nhi\n\n@@agentvm:exit code=3\n");
    }

    #[test]
    fn stderr_is_merged_in_order_and_bytes_are_untouched() {
        let (outcome, text) = run("printf 'a\\r\\n'; echo b >&2; printf c");
        assert_eq!(outcome, ExecOutcome::Exited(ExitStatus::Code(0)));
        assert_eq!(
            text,
            "@@agentvm:exec-start\na\r\nb\nc\n@@agentvm:exit code=0\n"
        );
    }

    #[test]
    fn reports_death_by_signal() {
        let (outcome, text) = run("kill -9 $$");
        assert_eq!(outcome, ExecOutcome::Exited(ExitStatus::Signal(9)));
        assert!(text.ends_with("\n@@agentvm:exit signal=9\n"), "{text:?}");
    }

    #[test]
    fn stdin_is_empty() {
        let (_, text) = run("wc -c");
        assert_eq!(text.lines().nth(1).map(str::trim), Some("0"));
    }

    #[test]
    fn large_output_arrives_complete() {
        let (outcome, text) = run("i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); done");
        assert_eq!(outcome, ExecOutcome::Exited(ExitStatus::Code(0)));
        let body = text
            .strip_prefix("@@agentvm:exec-start\n")
            .and_then(|t| t.strip_suffix("\n@@agentvm:exit code=0\n"))
            .unwrap();
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 20000);
        assert_eq!(lines[19999], "line19999");
    }

    #[test]
    fn a_background_process_holding_the_pipe_does_not_delay_the_exit() {
        // The sleeper inherits the pipe; waiting for EOF would take its whole lifetime. Its pid is
        // printed so the test can end it.
        let (outcome, text) = run("sleep 1000 & echo $!; exit 4");
        assert_eq!(outcome, ExecOutcome::Exited(ExitStatus::Code(4)));
        let pid: libc::pid_t = text.lines().nth(1).unwrap().parse().unwrap();
        // SAFETY: ends the orphaned sleeper started above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(text.ends_with("\n\n@@agentvm:exit code=4\n"), "{text:?}");
    }

    #[test]
    fn missing_program_is_exit_127_with_an_error_marker() {
        let argv = vec![OsString::from("/nonexistent/agentvm-no-such-program")];
        let mut console = ConsoleWriter::new(Vec::new());
        let outcome = run_command(&argv, &ExecOptions::default(), &mut console, None);
        assert_eq!(outcome, ExecOutcome::Exited(ExitStatus::Code(127)));
        let text = String::from_utf8(console.into_inner()).unwrap();
        assert!(
            text.starts_with(
                "@@agentvm:exec-start\n@@agentvm:error exec /nonexistent/agentvm-no-such-program: "
            ),
            "{text:?}"
        );
        assert!(text.ends_with("\n\n@@agentvm:exit code=127\n"), "{text:?}");

        let mut console = ConsoleWriter::new(Vec::new());
        let outcome = run_command(&[], &ExecOptions::default(), &mut console, None);
        assert_eq!(outcome, ExecOutcome::Exited(ExitStatus::Code(127)));
    }

    #[test]
    fn runs_in_the_requested_directory() {
        let argv: Vec<OsString> = vec!["pwd".into()];
        let options = ExecOptions {
            cwd: Some("/usr".into()),
            reap_orphans: false,
        };
        let mut console = ConsoleWriter::new(Vec::new());
        run_command(&argv, &options, &mut console, None);
        let text = String::from_utf8(console.into_inner()).unwrap();
        assert_eq!(
            text,
            "@@agentvm:exec-start\n/usr\n\n@@agentvm:exit code=0\n"
        );
    }

    #[test]
    fn a_pending_power_signal_kills_the_command() {
        let mut watcher = SignalWatcher::install().unwrap();
        // SAFETY: raising a signal the watcher blocks in this thread.
        unsafe { libc::raise(libc::SIGUSR2) };
        let argv: Vec<OsString> = ["sleep", "1000"].iter().map(OsString::from).collect();
        let mut console = ConsoleWriter::new(Vec::new());
        let outcome = run_command(
            &argv,
            &ExecOptions::default(),
            &mut console,
            Some(&mut watcher),
        );
        assert_eq!(outcome, ExecOutcome::PowerRequested(libc::SIGUSR2));
        assert_eq!(console.into_inner(), b"@@agentvm:exec-start\n");
    }

    #[test]
    fn wait_status_decoding() {
        assert_eq!(decode_wait_status(3 << 8), Some(ExitStatus::Code(3)));
        assert_eq!(decode_wait_status(9), Some(ExitStatus::Signal(9)));
        // A stopped child (WIFSTOPPED: 0x7f in the low byte) is not an exit.
        assert_eq!(decode_wait_status(0x137f), None);
    }
}
