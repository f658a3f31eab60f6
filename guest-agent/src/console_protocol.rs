//! The serial console's diagnostic marker protocol, shared by the guest agent and the host CLI.
//!
//! The host drives the agent over virtio-vsock (the `agentvm-protocol` crate). The serial console
//! is only for diagnostics: the kernel log, the agent's own log lines (`agentvm-agent: ...`) and
//! three marker lines that tell the host how far the guest got, even when vsock never came up:
//!
//! ```text
//! @@agentvm:ready boot_ns=<CLOCK_BOOTTIME ns>    the agent's boot steps are done
//! @@agentvm:error <message on one line>          something failed; the agent goes on
//! @@agentvm:poweroff                             the agent is about to reset the VM
//! ```
//!
//! `ready` follows the start of the vsock server; if that failed, an `error` before it says why.
//!
//! The agent writes every marker as a whole line ending in `\n`; kernel messages written at the
//! same time can still precede it on the same console line. [`ConsoleParser`] implements the host
//! side; a line that only looks like a marker (an unknown name, such as the retired
//! `exec-start`/`exit` markers of the old console protocol, or a malformed field) is log text.

use std::error::Error;
use std::fmt;

/// What every marker line starts with.
pub const MARKER_PREFIX: &str = "@@agentvm:";
pub const READY: &str = "@@agentvm:ready";
pub const ERROR: &str = "@@agentvm:error";
pub const POWEROFF: &str = "@@agentvm:poweroff";
/// How an error marker starts when the agent cannot serve the protocol at all (no vsock device,
/// no listener): the host stops waiting for a connection when it sees one.
pub const NO_SERVER: &str = "no agent server: ";

/// Console lines are cut into pieces of at most this size, which bounds what the parser holds back.
pub const MAX_LOG_LINE: usize = 64 * 1024;

/// One protocol marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    Ready { boot_ns: u64 },
    Error(String),
    Poweroff,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A line starts with the marker prefix but names no known marker.
    UnknownMarker(String),
    /// A known marker with a missing or malformed field.
    BadMarker {
        marker: &'static str,
        reason: String,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownMarker(line) => write!(f, "unknown console marker: {line}"),
            Self::BadMarker { marker, reason } => write!(f, "malformed {marker} marker: {reason}"),
        }
    }
}

impl Error for ProtocolError {}

impl fmt::Display for Marker {
    /// The marker text without any line break. Error messages are flattened to one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ready { boot_ns } => write!(f, "{READY} boot_ns={boot_ns}"),
            Self::Error(message) => {
                let flat: String = message
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .collect();
                if flat.is_empty() {
                    f.write_str(ERROR)
                } else {
                    write!(f, "{ERROR} {flat}")
                }
            }
            Self::Poweroff => f.write_str(POWEROFF),
        }
    }
}

impl Marker {
    /// The marker followed by its `\n`.
    pub fn to_line(&self) -> String {
        format!("{self}\n")
    }

    /// Parses one console line (without its `\n`; a trailing `\r` is ignored).
    /// `Ok(None)`: the line is not a marker. `Err`: it claims to be one but is malformed.
    pub fn parse(line: &[u8]) -> Result<Option<Marker>, ProtocolError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(rest) = line.strip_prefix(MARKER_PREFIX.as_bytes()) else {
            return Ok(None);
        };
        let rest = String::from_utf8_lossy(rest);
        let (kind, args) = match rest.split_once(' ') {
            Some((kind, args)) => (kind, args),
            None => (rest.as_ref(), ""),
        };
        let marker = match kind {
            "ready" => Marker::Ready {
                boot_ns: parse_field(READY, args, "boot_ns")?,
            },
            "error" => Marker::Error(args.to_string()),
            "poweroff" => Marker::Poweroff,
            _ => {
                return Err(ProtocolError::UnknownMarker(format!(
                    "{MARKER_PREFIX}{rest}"
                )))
            }
        };
        Ok(Some(marker))
    }
}

fn field<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split_ascii_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn parse_field<T: std::str::FromStr>(
    marker: &'static str,
    args: &str,
    key: &str,
) -> Result<T, ProtocolError> {
    let value = field(args, key).ok_or_else(|| ProtocolError::BadMarker {
        marker,
        reason: format!("no {key}= field"),
    })?;
    value.parse().map_err(|_| ProtocolError::BadMarker {
        marker,
        reason: format!("{key}={value} is not a valid number"),
    })
}

// ---------------------------------------------------------------------------------------------
// host-side stream parser

/// What the host sees on the console, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// A console line that is not a marker (kernel log, agent log), without its line ending; of a
    /// line longer than [`MAX_LOG_LINE`], the pieces received so far.
    Log(Vec<u8>),
    Marker(Marker),
}

/// Incremental parser of the console byte stream: splits it into lines and recognises a marker
/// anywhere in a line, since a kernel message can precede one on the same line. A line that only
/// looks like a marker (unknown or malformed) is log text.
#[derive(Debug, Default)]
pub struct ConsoleParser {
    pending: Vec<u8>,
}

impl ConsoleParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ConsoleEvent> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).take(nl).collect();
            push_line(&line, &mut events);
        }
        if self.pending.len() > MAX_LOG_LINE {
            events.push(ConsoleEvent::Log(std::mem::take(&mut self.pending)));
        }
        events
    }

    /// The events of an unfinished last line (the console ended).
    pub fn finish(&mut self) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            push_line(&rest, &mut events);
        }
        events
    }
}

fn push_line(line: &[u8], events: &mut Vec<ConsoleEvent>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let found = find(line, MARKER_PREFIX.as_bytes())
        .and_then(|pos| Some((pos, Marker::parse(&line[pos..]).ok()??)));
    match found {
        Some((pos, marker)) => {
            if pos > 0 {
                events.push(ConsoleEvent::Log(line[..pos].to_vec()));
            }
            events.push(ConsoleEvent::Marker(marker));
        }
        None => events.push(ConsoleEvent::Log(line.to_vec())),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_format_exactly() {
        assert_eq!(
            Marker::Ready { boot_ns: 123 }.to_line(),
            "@@agentvm:ready boot_ns=123\n"
        );
        assert_eq!(
            Marker::Error("module foo:\nnot found\r".into()).to_line(),
            "@@agentvm:error module foo: not found \n"
        );
        assert_eq!(Marker::Error(String::new()).to_line(), "@@agentvm:error\n");
        assert_eq!(Marker::Poweroff.to_line(), "@@agentvm:poweroff\n");
    }

    #[test]
    fn markers_parse_back() {
        let markers = [
            Marker::Ready { boot_ns: 987654321 },
            Marker::Error("module virtio_net: No such device".into()),
            Marker::Error(String::new()),
            Marker::Poweroff,
        ];
        for marker in markers {
            let line = marker.to_line();
            let parsed = Marker::parse(line.trim_end_matches('\n').as_bytes());
            assert_eq!(parsed, Ok(Some(marker.clone())), "{line:?}");
            let with_cr = format!("{}\r", line.trim_end_matches('\n'));
            assert_eq!(Marker::parse(with_cr.as_bytes()), Ok(Some(marker)));
        }
    }

    #[test]
    fn marker_parse_errors() {
        assert_eq!(Marker::parse(b"[    0.1] random: crng init"), Ok(None));
        assert_eq!(Marker::parse(b"@agentvm:ready"), Ok(None));
        // The retired v0 command markers are unknown now, like any other name.
        for unknown in [
            "@@agentvm:bogus x",
            "@@agentvm:exec-start",
            "@@agentvm:exit code=3",
        ] {
            assert!(
                matches!(
                    Marker::parse(unknown.as_bytes()),
                    Err(ProtocolError::UnknownMarker(_))
                ),
                "{unknown}"
            );
        }
        for bad in [
            "@@agentvm:ready",
            "@@agentvm:ready boot_ns=-1",
            "@@agentvm:ready boot_ns=x",
        ] {
            assert!(
                matches!(
                    Marker::parse(bad.as_bytes()),
                    Err(ProtocolError::BadMarker { .. })
                ),
                "{bad}"
            );
        }
    }

    fn feed_all(chunks: &[&[u8]]) -> Vec<ConsoleEvent> {
        let mut parser = ConsoleParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(parser.feed(chunk));
        }
        events.extend(parser.finish());
        events
    }

    const SESSION: &[u8] = b"[    0.5] Run /init as init process\r\n\
        agentvm-agent: modules: 13 loaded, 0 failed, 13 total in 5.1 ms\n\
        @@agentvm:error cannot set hostname x: EPERM\n\
        @@agentvm:ready boot_ns=42\n\
        agentvm-agent: received SIGUSR2 (poweroff): powering off\n\
        @@agentvm:poweroff\n\
        [    0.9] reboot: Restarting system\r\n";

    fn session_events() -> Vec<ConsoleEvent> {
        vec![
            ConsoleEvent::Log(b"[    0.5] Run /init as init process".to_vec()),
            ConsoleEvent::Log(
                b"agentvm-agent: modules: 13 loaded, 0 failed, 13 total in 5.1 ms".to_vec(),
            ),
            ConsoleEvent::Marker(Marker::Error("cannot set hostname x: EPERM".into())),
            ConsoleEvent::Marker(Marker::Ready { boot_ns: 42 }),
            ConsoleEvent::Log(b"agentvm-agent: received SIGUSR2 (poweroff): powering off".to_vec()),
            ConsoleEvent::Marker(Marker::Poweroff),
            ConsoleEvent::Log(b"[    0.9] reboot: Restarting system".to_vec()),
        ]
    }

    #[test]
    fn parser_splits_a_session() {
        assert_eq!(feed_all(&[SESSION]), session_events());
    }

    #[test]
    fn parser_result_does_not_depend_on_chunking() {
        let bytewise: Vec<&[u8]> = SESSION.chunks(1).collect();
        assert_eq!(feed_all(&bytewise), session_events());
        for cut in 0..SESSION.len() {
            let (a, b) = SESSION.split_at(cut);
            assert_eq!(feed_all(&[a, b]), session_events(), "cut at {cut}");
        }
    }

    #[test]
    fn parser_finds_markers_after_kernel_text_on_the_same_line() {
        let events = feed_all(&[b"[ 1.0] virtio_mmio: probe@@agentvm:ready boot_ns=7\n"]);
        assert_eq!(
            events,
            vec![
                ConsoleEvent::Log(b"[ 1.0] virtio_mmio: probe".to_vec()),
                ConsoleEvent::Marker(Marker::Ready { boot_ns: 7 }),
            ]
        );
    }

    #[test]
    fn parser_treats_malformed_and_unknown_markers_as_text() {
        let events = feed_all(&[b"@@agentvm:ready boot_ns=nope\n@@agentvm:bogus\n\
            @@agentvm:exec-start\n[ 2.0] x@@agentvm:exit code=3\n@@agentvm:"]);
        assert_eq!(
            events,
            vec![
                ConsoleEvent::Log(b"@@agentvm:ready boot_ns=nope".to_vec()),
                ConsoleEvent::Log(b"@@agentvm:bogus".to_vec()),
                ConsoleEvent::Log(b"@@agentvm:exec-start".to_vec()),
                ConsoleEvent::Log(b"[ 2.0] x@@agentvm:exit code=3".to_vec()),
                ConsoleEvent::Log(b"@@agentvm:".to_vec()),
            ]
        );
    }

    #[test]
    fn parser_reads_a_marker_on_an_unfinished_last_line() {
        let mut parser = ConsoleParser::new();
        assert!(parser.feed(b"@@agentvm:poweroff").is_empty());
        assert_eq!(
            parser.finish(),
            vec![ConsoleEvent::Marker(Marker::Poweroff)]
        );
        assert!(parser.finish().is_empty());
    }

    #[test]
    fn parser_bounds_what_it_holds_back() {
        let mut parser = ConsoleParser::new();
        let endless = vec![b'k'; MAX_LOG_LINE + 1];
        assert_eq!(parser.feed(&endless), vec![ConsoleEvent::Log(endless)]);
        assert!(parser.finish().is_empty());
    }
}
