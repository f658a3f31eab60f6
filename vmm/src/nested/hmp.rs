//! QEMU's human monitor on a Unix socket, read when L1 wedges: where each L1 CPU is (RIP, CPL,
//! halted or not) is the one thing that tells a livelock in L1's kernel from an L1 whose timers
//! stopped. Only ever used for that report, so a monitor that does not answer costs a few
//! seconds and an explanation, never a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the monitor gets to answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// `info registers -a` as a few lines per CPU (the RIP/flags line, the CPL/halt line), or why it
/// could not be read.
pub(crate) fn cpu_summary(socket: &Path) -> String {
    match query(socket, "info registers -a") {
        Ok(text) => summarise(&text),
        Err(e) => format!("(QEMU monitor at {} unreadable: {e})", socket.display()),
    }
}

fn query(socket: &Path, command: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let deadline = Instant::now() + ANSWER_WAIT;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    // HMP has no end-of-answer marker beyond the next prompt; read until it is quiet.
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                quiet_since = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !out.is_empty() && quiet_since.elapsed() > Duration::from_millis(600) {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn summarise(text: &str) -> String {
    let keep: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("CPU#") || l.starts_with("RIP=") || l.starts_with("CS ="))
        .collect();
    if keep.is_empty() {
        format!(
            "(no register dump in the monitor's answer: {:?})",
            text.trim()
        )
    } else {
        keep.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_cpu_rip_and_cs_lines() {
        let text = "QEMU 8.2 monitor\r\n(qemu) info registers -a\r\n\r\nCPU#0\r\n\
                    RAX=0 RBX=0\r\nRIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\
                    CS =0010 0 ffffffff 00a09b00 DPL=0 CS64 [-RA]\r\nCPU#1\r\n\
                    RIP=ffffffff81000010 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\n";
        let s = summarise(text);
        assert_eq!(s.lines().count(), 5, "{s}");
        assert!(s.contains("HLT=1") && s.contains("HLT=0"), "{s}");
        assert!(!s.contains("RAX"), "{s}");
    }

    #[test]
    fn a_missing_monitor_is_explained() {
        let s = cpu_summary(Path::new("/nonexistent/agentvm-monitor.sock"));
        assert!(s.contains("unreadable"), "{s}");
    }
}
