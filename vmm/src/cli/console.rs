//! Splits the guest's serial console into what the user asked for (the command's output, to
//! stdout) and everything else (kernel and agent log, to `--console FILE` or a tail kept for error
//! messages), following the v0 console protocol of the guest agent.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use guest_agent::console_protocol::{ExitStatus, Marker, EXIT, MARKER_PREFIX};

/// How much of the raw console to keep for error messages.
const TAIL_BYTES: usize = 16 << 10;
const PANIC_TEXT: &str = "Kernel panic - not syncing";

/// What the guest reported, shared between the console writer (vCPU thread) and the CLI.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestReport {
    pub ready_boot_ns: Option<u64>,
    /// Host CLOCK_MONOTONIC when the ready marker arrived.
    pub ready_at_ns: Option<u64>,
    /// Host CLOCK_MONOTONIC when the exit marker arrived.
    pub exit_at_ns: Option<u64>,
    pub exec_started: bool,
    pub exit: Option<GuestExit>,
    pub errors: Vec<String>,
    pub powered_off: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    Code(i32),
    Signal(i32),
}

#[derive(PartialEq, Eq)]
enum Mode {
    /// Line-oriented: kernel log, agent log and markers.
    Lines,
    /// Raw command output until the exit marker.
    Output,
}

/// The writer end, given to the serial device. vm-superio flushes after every byte it transmits,
/// so `flush` here only pushes bytes out; the end of the stream is [`ConsoleView::finish`].
pub struct ConsoleDemux {
    state: Arc<Mutex<DemuxState>>,
}

struct DemuxState {
    mode: Mode,
    line: Vec<u8>,
    /// Output bytes held back because they might be the start of the exit marker.
    held: Vec<u8>,
    stdout: Box<dyn Write + Send>,
    log: Option<Box<dyn Write + Send>>,
    tail: Arc<Mutex<VecDeque<u8>>>,
    report: Arc<Mutex<GuestReport>>,
}

/// Read side of the demux, kept by the CLI after the writer moved into the VMM.
#[derive(Clone)]
pub struct ConsoleView {
    state: Arc<Mutex<DemuxState>>,
    tail: Arc<Mutex<VecDeque<u8>>>,
    report: Arc<Mutex<GuestReport>>,
}

impl ConsoleView {
    /// Ends the stream once the VM has stopped: output held back as a possible exit-marker start
    /// was output after all, and an unfinished log line still belongs in the log.
    pub fn finish(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.finish();
        }
    }

    pub fn report(&self) -> GuestReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The last console lines, for error messages.
    pub fn tail(&self, max_lines: usize) -> String {
        let bytes: Vec<u8> = self
            .tail
            .lock()
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).replace('\r', "");
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(max_lines)..].join("\n")
    }

    /// The guest kernel's panic line, if it panicked.
    pub fn kernel_panic(&self) -> Option<String> {
        let tail = self.tail(400);
        tail.lines()
            .find(|l| l.contains(PANIC_TEXT))
            .map(|l| l[l.find(PANIC_TEXT).unwrap_or(0)..].trim().to_string())
    }
}

impl ConsoleDemux {
    pub fn new(
        stdout: Box<dyn Write + Send>,
        log: Option<Box<dyn Write + Send>>,
    ) -> (Self, ConsoleView) {
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_BYTES)));
        let report = Arc::new(Mutex::new(GuestReport::default()));
        let state = Arc::new(Mutex::new(DemuxState {
            mode: Mode::Lines,
            line: Vec::new(),
            held: Vec::new(),
            stdout,
            log,
            tail: tail.clone(),
            report: report.clone(),
        }));
        let view = ConsoleView {
            state: state.clone(),
            tail,
            report,
        };
        (Self { state }, view)
    }
}

impl DemuxState {
    fn log(&mut self, bytes: &[u8]) {
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(bytes);
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        // Kernel messages can share a line with a marker that follows them.
        let Some(pos) = find(line, MARKER_PREFIX.as_bytes()) else {
            return;
        };
        let marker = match Marker::parse(&line[pos..]) {
            Ok(Some(marker)) => marker,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("malformed guest agent marker: {e:?}");
                return;
            }
        };
        let Ok(mut report) = self.report.lock() else {
            return;
        };
        match marker {
            Marker::Ready { boot_ns } => {
                report.ready_boot_ns = Some(boot_ns);
                report.ready_at_ns = Some(vmm::process_stats::monotonic_ns());
            }
            Marker::ExecStart => {
                report.exec_started = true;
                self.mode = Mode::Output;
            }
            Marker::Exit(status) => {
                report.exit_at_ns = Some(vmm::process_stats::monotonic_ns());
                report.exit = Some(match status {
                    ExitStatus::Code(code) => GuestExit::Code(code.into()),
                    ExitStatus::Signal(sig) => GuestExit::Signal(sig),
                });
            }
            Marker::Error(msg) => report.errors.push(msg),
            Marker::Poweroff => report.powered_off = true,
        }
    }

    fn feed_lines(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.mode == Mode::Output {
                self.feed_output(data);
                return;
            }
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.line.extend_from_slice(&data[..=nl]);
                    let line = std::mem::take(&mut self.line);
                    self.log(&line);
                    self.on_line(&line);
                    data = &data[nl + 1..];
                }
                None => {
                    self.line.extend_from_slice(data);
                    // A line this long is not a marker: pass it on rather than buffer forever.
                    if self.line.len() > 4096 {
                        let line = std::mem::take(&mut self.line);
                        self.log(&line);
                    }
                    return;
                }
            }
        }
    }

    /// Passes command output through, holding back only a possible start of a marker line. Any
    /// marker ends the output: the exit marker normally, the poweroff marker when the command
    /// powered the guest off (or the agent was told to) before it finished.
    fn feed_output(&mut self, data: &[u8]) {
        self.held.extend_from_slice(data);
        let boundary = format!("\n{MARKER_PREFIX}");
        let boundary = boundary.as_bytes();
        if let Some(at) = find(&self.held, boundary) {
            // The agent writes one "\n" of its own before the exit marker; before any other
            // marker the newline ended a line of output. Wait until the marker's name tells.
            let after = &self.held[at + 1..];
            let exit = EXIT.as_bytes();
            let n = after.len().min(exit.len());
            if after.len() < exit.len() && after[..n] == exit[..n] {
                if at > 0 {
                    let _ = self.stdout.write_all(&self.held[..at]);
                    let _ = self.stdout.flush();
                    self.held.drain(..at);
                }
                return;
            }
            let own_newline = after.starts_with(exit);
            let held = std::mem::take(&mut self.held);
            let emit = if own_newline { at } else { at + 1 };
            let _ = self.stdout.write_all(&held[..emit]);
            let _ = self.stdout.flush();
            self.mode = Mode::Lines;
            self.feed_lines(&held[at + 1..]);
            return;
        }
        let keep = longest_suffix_prefix(&self.held, boundary);
        let emit = self.held.len() - keep;
        if emit > 0 {
            let _ = self.stdout.write_all(&self.held[..emit]);
            let _ = self.stdout.flush();
            self.held.drain(..emit);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `data` that is a proper prefix of `pattern`.
fn longest_suffix_prefix(data: &[u8], pattern: &[u8]) -> usize {
    let max = pattern.len().saturating_sub(1).min(data.len());
    (1..=max)
        .rev()
        .find(|&n| data[data.len() - n..] == pattern[..n])
        .unwrap_or(0)
}

impl DemuxState {
    fn write(&mut self, buf: &[u8]) {
        if let Ok(mut tail) = self.tail.lock() {
            tail.extend(buf);
            let excess = tail.len().saturating_sub(TAIL_BYTES);
            tail.drain(..excess);
        }
        self.feed_lines(buf);
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(log) = self.log.as_mut() {
            let _ = log.flush();
        }
        self.stdout.flush()
    }

    fn finish(&mut self) {
        if self.mode == Mode::Output && !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            let _ = self.stdout.write_all(&held);
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.log(&line);
            self.on_line(&line);
        }
        let _ = self.flush();
    }
}

impl Write for ConsoleDemux {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Ok(mut state) = self.state.lock() {
            state.write(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.state.lock() {
            Ok(mut state) => state.flush(),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn run(console: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>, ConsoleView) {
        let out = Shared::default();
        let log = Shared::default();
        let (mut demux, view) =
            ConsoleDemux::new(Box::new(out.clone()), Some(Box::new(log.clone())));
        for piece in console.chunks(chunk) {
            demux.write_all(piece).unwrap();
            // vm-superio flushes after every transmitted byte.
            demux.flush().unwrap();
        }
        view.finish();
        let o = out.0.lock().unwrap().clone();
        let l = log.0.lock().unwrap().clone();
        (o, l, view)
    }

    const SESSION: &[u8] = b"[    0.1] Linux version 6.1\r\n@@agentvm:ready boot_ns=123456\n@@agentvm:exec-start\nhello\nno newline at end\n@@agentvm:exit code=3\n@@agentvm:poweroff\n";

    #[test]
    fn output_and_exit_code_are_separated_from_the_log_whatever_the_chunking() {
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let (out, log, view) = run(SESSION, chunk);
            assert_eq!(out, b"hello\nno newline at end", "chunk {chunk}");
            let log = String::from_utf8(log).unwrap();
            assert!(log.contains("Linux version"), "chunk {chunk}: {log}");
            assert!(!log.contains("hello"), "chunk {chunk}");
            let report = view.report();
            assert_eq!(report.ready_boot_ns, Some(123456));
            assert!(report.exec_started && report.powered_off);
            assert_eq!(report.exit, Some(GuestExit::Code(3)));
        }
    }

    #[test]
    fn partial_marker_lookalikes_in_output_are_not_swallowed() {
        let session = b"@@agentvm:exec-start\na\n@@agent but not quite\n@@agentvm:exit signal=9\n";
        let (out, _, view) = run(session, 1);
        assert_eq!(out, b"a\n@@agent but not quite");
        assert_eq!(view.report().exit, Some(GuestExit::Signal(9)));
    }

    #[test]
    fn kernel_panic_is_found_in_the_tail() {
        let session = b"@@agentvm:ready boot_ns=1\n@@agentvm:exec-start\n[ 3.2] sysrq: Trigger a crash\r\n[ 3.2] Kernel panic - not syncing: sysrq triggered crash\r\n";
        let (_, _, view) = run(session, 5);
        assert_eq!(
            view.kernel_panic().as_deref(),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(view.report().exit, None);
    }

    /// Byte for byte what Debian's kernel and the agent printed in the nested test host.
    #[test]
    fn real_guest_console_is_understood() {
        let session = b"[    0.108500] ACPI BIOS Error (bug): A valid RSDP was not found (20220331/tbxfroot-210)\r\n[   17.614251] i8042: Can't read CTR while initializing i8042\r\nagentvm-agent: modules: 13 loaded, 0 failed, 13 total in 518.8 ms\n@@agentvm:ready boot_ns=33831665279\n@@agentvm:exec-start\nhello-from-l2\nnproc=1\n\n@@agentvm:exit code=7\n@@agentvm:poweroff\n[   34.455244] reboot: Restarting system\r\n";
        for chunk in [1, 13, 4096] {
            let (out, _, view) = run(session, chunk);
            assert_eq!(out, b"hello-from-l2\nnproc=1\n", "chunk {chunk}");
            let report = view.report();
            assert_eq!(report.ready_boot_ns, Some(33831665279));
            assert_eq!(report.exit, Some(GuestExit::Code(7)));
            assert!(report.powered_off);
        }
    }

    #[test]
    fn poweroff_during_the_command_ends_the_output() {
        let session = b"@@agentvm:ready boot_ns=9\n@@agentvm:exec-start\nbefore-poweroff\nagentvm-agent: received SIGUSR2 (poweroff): powering off\n@@agentvm:poweroff\n[    9.6] reboot: Restarting system\r\n";
        for chunk in [1, 5, 4096] {
            let (out, log, view) = run(session, chunk);
            assert_eq!(
                out,
                b"before-poweroff\nagentvm-agent: received SIGUSR2 (poweroff): powering off\n"
            );
            assert!(String::from_utf8(log)
                .unwrap()
                .contains("Restarting system"));
            let report = view.report();
            assert!(report.powered_off, "chunk {chunk}");
            assert_eq!(report.exit, None);
        }
    }

    #[test]
    fn suffix_prefix() {
        assert_eq!(longest_suffix_prefix(b"abc\n@@ag", b"\n@@agentvm:exit"), 5);
        assert_eq!(longest_suffix_prefix(b"abc", b"\n@@agentvm:exit"), 0);
        assert_eq!(longest_suffix_prefix(b"", b"\n@@"), 0);
    }
}
