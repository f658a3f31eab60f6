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
//! side.
//!
//! Kept only for the boot benchmark (`vmm/src/cli/bench/`), which still boots the guest the
//! retired v0 way (command on the kernel command line, output and exit status on the console):
//! [`CMD_PARAM`], [`encode_cmd`], [`ExitStatus`] and the [`Marker::ExecStart`] and
//! [`Marker::Exit`] markers. The agent neither reads nor writes any of them.

use std::error::Error;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

/// What every marker line starts with.
pub const MARKER_PREFIX: &str = "@@agentvm:";
pub const READY: &str = "@@agentvm:ready";
pub const ERROR: &str = "@@agentvm:error";
pub const POWEROFF: &str = "@@agentvm:poweroff";
const EXEC_START: &str = "@@agentvm:exec-start";
const EXIT: &str = "@@agentvm:exit";

/// Console lines are cut into pieces of at most this size, which bounds what the parser holds back.
pub const MAX_LOG_LINE: usize = 64 * 1024;

/// One protocol marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    Ready {
        boot_ns: u64,
    },
    /// v0, boot benchmark only: the command started.
    ExecStart,
    /// v0, boot benchmark only: how the command ended.
    Exit(ExitStatus),
    Error(String),
    Poweroff,
}

/// v0, boot benchmark only: how the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u8),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// `encode_cmd` was given no arguments, or an empty program name.
    EmptyCommand,
    /// An argument contains a NUL byte, which is the separator.
    NulInArgument { index: usize },
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
            Self::EmptyCommand => write!(f, "the command is empty"),
            Self::NulInArgument { index } => {
                write!(
                    f,
                    "argument {index} contains a NUL byte, which cannot be passed"
                )
            }
            Self::UnknownMarker(line) => write!(f, "unknown console marker: {line}"),
            Self::BadMarker { marker, reason } => write!(f, "malformed {marker} marker: {reason}"),
        }
    }
}

impl Error for ProtocolError {}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "code={code}"),
            Self::Signal(signal) => write!(f, "signal={signal}"),
        }
    }
}

impl fmt::Display for Marker {
    /// The marker text without any line break. Error messages are flattened to one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ready { boot_ns } => write!(f, "{READY} boot_ns={boot_ns}"),
            Self::ExecStart => f.write_str(EXEC_START),
            Self::Exit(status) => write!(f, "{EXIT} {status}"),
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
            "exec-start" => Marker::ExecStart,
            "exit" => Marker::Exit(parse_exit(args)?),
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

fn parse_exit(args: &str) -> Result<ExitStatus, ProtocolError> {
    if field(args, "code").is_some() {
        return Ok(ExitStatus::Code(parse_field(EXIT, args, "code")?));
    }
    if field(args, "signal").is_some() {
        let signal: i32 = parse_field(EXIT, args, "signal")?;
        if signal <= 0 {
            return Err(ProtocolError::BadMarker {
                marker: EXIT,
                reason: format!("signal={signal} is not a signal number"),
            });
        }
        return Ok(ExitStatus::Signal(signal));
    }
    Err(ProtocolError::BadMarker {
        marker: EXIT,
        reason: "neither code= nor signal=".to_string(),
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

// ---------------------------------------------------------------------------------------------
// v0 command encoding, boot benchmark only

/// Kernel command-line key carrying the encoded argv.
pub const CMD_PARAM: &str = "agentvm.cmd";

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Encodes an argv for `agentvm.cmd=`: the arguments joined by NUL, as unpadded base64url, which
/// survives the kernel command line (no spaces, quotes or `=` to be reinterpreted).
pub fn encode_cmd<S: AsRef<OsStr>>(argv: &[S]) -> Result<String, ProtocolError> {
    match argv.first() {
        None => return Err(ProtocolError::EmptyCommand),
        Some(program) if program.as_ref().is_empty() => return Err(ProtocolError::EmptyCommand),
        Some(_) => {}
    }
    let mut joined = Vec::new();
    for (index, arg) in argv.iter().enumerate() {
        let bytes = arg.as_ref().as_bytes();
        if bytes.contains(&0) {
            return Err(ProtocolError::NulInArgument { index });
        }
        if index > 0 {
            joined.push(0);
        }
        joined.extend_from_slice(bytes);
    }
    Ok(base64url_encode(&joined))
}

/// Hand-written rather than a dependency: these dozen lines serve only the benchmark's retired
/// boot path and go with it.
fn base64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            out.push(B64URL[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
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
        assert_eq!(Marker::ExecStart.to_line(), "@@agentvm:exec-start\n");
        assert_eq!(
            Marker::Exit(ExitStatus::Code(3)).to_line(),
            "@@agentvm:exit code=3\n"
        );
        assert_eq!(
            Marker::Exit(ExitStatus::Signal(9)).to_line(),
            "@@agentvm:exit signal=9\n"
        );
    }

    #[test]
    fn markers_parse_back() {
        let markers = [
            Marker::Ready { boot_ns: 987654321 },
            Marker::Error("module virtio_net: No such device".into()),
            Marker::Error(String::new()),
            Marker::Poweroff,
            Marker::ExecStart,
            Marker::Exit(ExitStatus::Code(0)),
            Marker::Exit(ExitStatus::Code(255)),
            Marker::Exit(ExitStatus::Signal(15)),
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
        assert!(matches!(
            Marker::parse(b"@@agentvm:bogus x"),
            Err(ProtocolError::UnknownMarker(_))
        ));
        for bad in [
            "@@agentvm:ready",
            "@@agentvm:ready boot_ns=-1",
            "@@agentvm:ready boot_ns=x",
            "@@agentvm:exit",
            "@@agentvm:exit code=256",
            "@@agentvm:exit signal=0",
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
        let events = feed_all(&[b"@@agentvm:ready boot_ns=nope\n@@agentvm:bogus\n@@agentvm:"]);
        assert_eq!(
            events,
            vec![
                ConsoleEvent::Log(b"@@agentvm:ready boot_ns=nope".to_vec()),
                ConsoleEvent::Log(b"@@agentvm:bogus".to_vec()),
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

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64url_encode(plain), encoded);
        }
        // The URL-safe alphabet: 0xfb 0xff -> "-_8" in base64url, "+/8" in standard base64.
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn cmd_encoding_joins_arguments_with_nul() {
        assert_eq!(
            encode_cmd(&["sh", "-c", "echo ü"]).unwrap(),
            base64url_encode("sh\0-c\0echo ü".as_bytes())
        );
        // A trailing empty argument is kept.
        assert_eq!(
            encode_cmd(&["printf", ""]).unwrap(),
            base64url_encode(b"printf\0")
        );
    }

    #[test]
    fn cmd_encoding_rejects_what_cannot_be_represented() {
        let empty: [&str; 0] = [];
        assert_eq!(encode_cmd(&empty), Err(ProtocolError::EmptyCommand));
        assert_eq!(encode_cmd(&["", "x"]), Err(ProtocolError::EmptyCommand));
        assert_eq!(
            encode_cmd(&["echo", "a\0b"]),
            Err(ProtocolError::NulInArgument { index: 1 })
        );
    }
}
