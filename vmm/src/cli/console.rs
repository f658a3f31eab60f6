//! The guest's serial console as `agentvm run` sees it: a diagnostic stream (kernel log, agent
//! log, the agent's ready/error/poweroff markers) written to `--console FILE` if asked for, with a
//! tail kept for error messages. The command's own output travels over vsock, not here.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use guest_agent::console_protocol::{ConsoleEvent, ConsoleParser, Marker};

/// How much of the raw console to keep for error messages.
const TAIL_BYTES: usize = 16 << 10;
const PANIC_TEXT: &str = "Kernel panic - not syncing";

/// What the guest agent reported on the console.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestReport {
    /// The guest's CLOCK_BOOTTIME when the agent was ready.
    pub ready_boot_ns: Option<u64>,
    pub errors: Vec<String>,
    pub powered_off: bool,
}

impl GuestReport {
    /// The agent's own word that it cannot serve the protocol (so nobody should wait for it).
    pub fn agent_server_failure(&self) -> Option<&str> {
        self.errors
            .iter()
            .find_map(|e| e.strip_prefix(guest_agent::console_protocol::NO_SERVER))
    }
}

/// The writer end, given to the serial device. vm-superio flushes after every byte it transmits,
/// so `flush` here only pushes bytes out; the end of the stream is [`ConsoleView::finish`].
pub struct ConsoleDemux {
    state: Arc<Mutex<DemuxState>>,
}

struct DemuxState {
    parser: ConsoleParser,
    log: Option<Box<dyn Write + Send>>,
    tail: VecDeque<u8>,
    report: GuestReport,
}

/// Read side of the demux, kept by the CLI after the writer moved into the VMM.
#[derive(Clone)]
pub struct ConsoleView {
    state: Arc<Mutex<DemuxState>>,
}

impl ConsoleView {
    /// Ends the stream once the VM has stopped: a last line without its `\n` can still hold a
    /// marker.
    pub fn finish(&self) {
        if let Ok(mut state) = self.state.lock() {
            let events = state.parser.finish();
            state.record(events);
            state.flush_log();
        }
    }

    pub fn report(&self) -> GuestReport {
        self.state
            .lock()
            .map(|s| s.report.clone())
            .unwrap_or_default()
    }

    /// The last console lines, for error messages.
    pub fn tail(&self, max_lines: usize) -> String {
        let bytes: Vec<u8> = self
            .state
            .lock()
            .map(|s| s.tail.iter().copied().collect())
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
    /// `log` receives the console unchanged (`--console FILE`).
    pub fn new(log: Option<Box<dyn Write + Send>>) -> (Self, ConsoleView) {
        let state = Arc::new(Mutex::new(DemuxState {
            parser: ConsoleParser::new(),
            log,
            tail: VecDeque::with_capacity(TAIL_BYTES),
            report: GuestReport::default(),
        }));
        let view = ConsoleView {
            state: state.clone(),
        };
        (Self { state }, view)
    }
}

impl DemuxState {
    fn write(&mut self, buf: &[u8]) {
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(buf);
        }
        self.tail.extend(buf);
        let excess = self.tail.len().saturating_sub(TAIL_BYTES);
        self.tail.drain(..excess);
        let events = self.parser.feed(buf);
        self.record(events);
    }

    fn record(&mut self, events: Vec<ConsoleEvent>) {
        for event in events {
            let ConsoleEvent::Marker(marker) = event else {
                continue;
            };
            match marker {
                Marker::Ready { boot_ns } => self.report.ready_boot_ns = Some(boot_ns),
                Marker::Error(message) => self.report.errors.push(message),
                Marker::Poweroff => self.report.powered_off = true,
            }
        }
    }

    fn flush_log(&mut self) {
        if let Some(log) = self.log.as_mut() {
            let _ = log.flush();
        }
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
        if let Ok(mut state) = self.state.lock() {
            state.flush_log();
        }
        Ok(())
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

    fn run(console: &[u8], chunk: usize) -> (Vec<u8>, ConsoleView) {
        let log = Shared::default();
        let (mut demux, view) = ConsoleDemux::new(Some(Box::new(log.clone())));
        for piece in console.chunks(chunk) {
            demux.write_all(piece).unwrap();
            // vm-superio flushes after every transmitted byte.
            demux.flush().unwrap();
        }
        view.finish();
        let l = log.0.lock().unwrap().clone();
        (l, view)
    }

    /// Byte for byte what Debian's kernel and the agent printed in the nested test host.
    const SESSION: &[u8] = b"[    0.108500] ACPI BIOS Error (bug): A valid RSDP was not found (20220331/tbxfroot-210)\r\n[   17.614251] i8042: Can't read CTR while initializing i8042\r\nagentvm-agent: modules: 13 loaded, 0 failed, 13 total in 518.8 ms\n@@agentvm:ready boot_ns=33831665279\nagentvm-agent: received SIGUSR2 (poweroff): powering off\n@@agentvm:poweroff\n[   34.455244] reboot: Restarting system\r\n";

    #[test]
    fn real_guest_console_is_logged_unchanged_and_understood_whatever_the_chunking() {
        for chunk in [1, 2, 7, 13, 4096] {
            let (log, view) = run(SESSION, chunk);
            assert_eq!(log, SESSION, "chunk {chunk}");
            let report = view.report();
            assert_eq!(report.ready_boot_ns, Some(33831665279), "chunk {chunk}");
            assert!(report.powered_off, "chunk {chunk}");
            assert!(report.errors.is_empty(), "chunk {chunk}");
            assert_eq!(view.kernel_panic(), None);
        }
    }

    #[test]
    fn an_agent_without_a_server_says_so() {
        let (_, view) = run(b"@@agentvm:error cannot set hostname x: EPERM\n", 5);
        assert_eq!(view.report().agent_server_failure(), None);
        let (_, view) = run(
            b"@@agentvm:error no agent server: cannot listen on vsock port 1024: ENODEV\n",
            5,
        );
        assert_eq!(
            view.report().agent_server_failure(),
            Some("cannot listen on vsock port 1024: ENODEV")
        );
    }

    #[test]
    fn agent_errors_are_collected_in_order() {
        let session = b"@@agentvm:error cannot set hostname x: EPERM\n[ 1.0] random: x@@agentvm:error cannot listen on vsock port 1024\r\n@@agentvm:ready boot_ns=5\n";
        let (_, view) = run(session, 3);
        let report = view.report();
        assert_eq!(
            report.errors,
            [
                "cannot set hostname x: EPERM",
                "cannot listen on vsock port 1024"
            ]
        );
        assert_eq!(report.ready_boot_ns, Some(5));
        assert!(!report.powered_off);
    }

    #[test]
    fn a_marker_on_the_unfinished_last_line_counts() {
        let (_, view) = run(b"@@agentvm:ready boot_ns=1\n@@agentvm:poweroff", 4);
        assert!(view.report().powered_off);
    }

    #[test]
    fn unknown_and_malformed_markers_are_only_logged() {
        // `exec-start`/`exit` are the retired v0 command markers: unknown now, so plain text.
        let session = b"@@agentvm:exec-start\n@@agentvm:exit code=3\n@@agentvm:ready boot_ns=x\n";
        let (log, view) = run(session, 5);
        assert_eq!(log, session);
        assert_eq!(view.report(), GuestReport::default());
    }

    #[test]
    fn kernel_panic_is_found_in_the_tail() {
        let session = b"@@agentvm:ready boot_ns=1\n[ 3.2] sysrq: Trigger a crash\r\n[ 3.2] Kernel panic - not syncing: sysrq triggered crash\r\n";
        let (_, view) = run(session, 5);
        assert_eq!(
            view.kernel_panic().as_deref(),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(
            view.tail(2),
            "[ 3.2] sysrq: Trigger a crash\n[ 3.2] Kernel panic - not syncing: sysrq triggered crash"
        );
    }

    #[test]
    fn the_tail_is_bounded() {
        let mut console = vec![b'x'; TAIL_BYTES * 2];
        console.extend_from_slice(b"\nlast line\n");
        let (_, view) = run(&console, 4096);
        assert_eq!(view.tail(1), "last line");
        assert!(view.tail(usize::MAX).len() <= TAIL_BYTES);
    }
}
