//! Guest console protocol v0, shared by the guest agent and the host CLI.
//!
//! The host passes the command on the kernel command line as `agentvm.cmd=<base64url, no padding,
//! of the argv joined by NUL bytes>`. The agent answers on the serial console with marker lines:
//!
//! ```text
//! @@agentvm:ready boot_ns=<CLOCK_BOOTTIME ns>
//! @@agentvm:exec-start
//! <raw command output>
//! \n@@agentvm:exit code=<0..255>        or  \n@@agentvm:exit signal=<n>
//! @@agentvm:error <message>
//! @@agentvm:poweroff
//! ```
//!
//! Every marker starts a line and ends with `\n`. The `\n` written before the exit marker is not
//! command output: the host strips exactly one. [`ConsoleParser`] implements the host side.

use std::error::Error;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// What every marker line starts with.
pub const MARKER_PREFIX: &str = "@@agentvm:";
pub const READY: &str = "@@agentvm:ready";
pub const EXEC_START: &str = "@@agentvm:exec-start";
pub const EXIT: &str = "@@agentvm:exit";
pub const ERROR: &str = "@@agentvm:error";
pub const POWEROFF: &str = "@@agentvm:poweroff";

/// Kernel command-line key carrying the encoded argv.
pub const CMD_PARAM: &str = "agentvm.cmd";
/// Exit code reported when the command cannot be started (as a shell does for "not found").
pub const EXEC_FAILURE_CODE: u8 = 127;

/// A marker line longer than this is not a marker; it bounds what the parser holds back.
pub const MAX_MARKER_LINE: usize = 4096;
/// Console lines outside command output are cut into pieces of at most this size.
pub const MAX_LOG_LINE: usize = 64 * 1024;

/// How the guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u8),
    Signal(i32),
}

/// One protocol marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    Ready { boot_ns: u64 },
    ExecStart,
    Exit(ExitStatus),
    Error(String),
    Poweroff,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// `encode_cmd` was given no arguments, or an empty program name.
    EmptyCommand,
    /// An argument contains a NUL byte, which is the separator.
    NulInArgument { index: usize },
    /// The `agentvm.cmd` value is not unpadded base64url.
    InvalidBase64 { reason: &'static str },
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
            Self::InvalidBase64 { reason } => {
                write!(f, "{CMD_PARAM} is not valid base64url: {reason}")
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
// agentvm.cmd encoding

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

/// Decodes an `agentvm.cmd` value back into the argv.
pub fn decode_cmd(encoded: &str) -> Result<Vec<OsString>, ProtocolError> {
    let joined = base64url_decode(encoded)?;
    let argv: Vec<OsString> = joined
        .split(|&b| b == 0)
        .map(|arg| OsString::from_vec(arg.to_vec()))
        .collect();
    if argv.first().is_none_or(|program| program.is_empty()) {
        return Err(ProtocolError::EmptyCommand);
    }
    Ok(argv)
}

pub fn base64url_encode(data: &[u8]) -> String {
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

pub fn base64url_decode(text: &str) -> Result<Vec<u8>, ProtocolError> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 == 1 {
        return Err(ProtocolError::InvalidBase64 {
            reason: "impossible length",
        });
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 2);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let value = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'-' => 62,
                b'_' => 63,
                b'=' => {
                    return Err(ProtocolError::InvalidBase64 {
                        reason: "padding is not used",
                    })
                }
                _ => {
                    return Err(ProtocolError::InvalidBase64 {
                        reason: "character outside the base64url alphabet",
                    })
                }
            };
            n |= u32::from(value) << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        let unused_bits = n & (0x00ff_ffff >> (8 * produced));
        if unused_bits != 0 {
            return Err(ProtocolError::InvalidBase64 {
                reason: "non-canonical trailing bits",
            });
        }
        out.extend_from_slice(&n.to_be_bytes()[1..1 + produced]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// host-side stream parser

/// What the host sees on the console, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// A console line outside the command's output (kernel log, agent diagnostics), without its
    /// line ending.
    Log(Vec<u8>),
    Marker(Marker),
    /// Bytes of the command's stdout+stderr, exactly as written.
    Output(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Lines,
    Output,
}

enum LineStart {
    NotMarker,
    NeedMore,
    Marker(Marker, usize),
}

/// Incremental parser of the console byte stream. Outside command output it splits lines and
/// recognises markers anywhere in a line (a kernel message can precede one on the same line);
/// between `exec-start` and `exit` it passes bytes through, holding back only what could still
/// turn out to be a marker or the `\n` that precedes the exit marker.
#[derive(Debug)]
pub struct ConsoleParser {
    mode: Mode,
    pending: Vec<u8>,
    held_newline: bool,
    at_line_start: bool,
}

impl Default for ConsoleParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsoleParser {
    pub fn new() -> Self {
        Self {
            mode: Mode::Lines,
            pending: Vec::new(),
            held_newline: false,
            at_line_start: true,
        }
    }

    /// True between `exec-start` and the exit (or poweroff) marker.
    pub fn in_command_output(&self) -> bool {
        self.mode == Mode::Output
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ConsoleEvent> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        loop {
            let switched = match self.mode {
                Mode::Lines => self.process_lines(&mut events),
                Mode::Output => self.process_output(&mut events),
            };
            if !switched {
                return events;
            }
        }
    }

    /// Flushes whatever is held back (the console ended).
    pub fn finish(&mut self) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        match self.mode {
            Mode::Lines => {
                if !rest.is_empty() {
                    events.push(self.line_event(&rest));
                }
            }
            Mode::Output => {
                let mut out = Vec::new();
                if self.held_newline {
                    out.push(b'\n');
                }
                out.extend_from_slice(&rest);
                if !out.is_empty() {
                    events.push(ConsoleEvent::Output(out));
                }
            }
        }
        self.held_newline = false;
        events
    }

    fn line_event(&self, line: &[u8]) -> ConsoleEvent {
        ConsoleEvent::Log(line.strip_suffix(b"\r").unwrap_or(line).to_vec())
    }

    /// Returns true when the mode changed and the rest of `pending` must be re-dispatched.
    fn process_lines(&mut self, events: &mut Vec<ConsoleEvent>) -> bool {
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).take(nl).collect();
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            let found = find(line, MARKER_PREFIX.as_bytes())
                .and_then(|pos| Some((pos, Marker::parse(&line[pos..]).ok()??)));
            match found {
                Some((pos, marker)) => {
                    if pos > 0 {
                        events.push(ConsoleEvent::Log(line[..pos].to_vec()));
                    }
                    let starts_output = marker == Marker::ExecStart;
                    events.push(ConsoleEvent::Marker(marker));
                    if starts_output {
                        self.mode = Mode::Output;
                        self.at_line_start = true;
                        self.held_newline = false;
                        return true;
                    }
                }
                None => events.push(ConsoleEvent::Log(line.to_vec())),
            }
        }
        if self.pending.len() > MAX_LOG_LINE {
            let piece = std::mem::take(&mut self.pending);
            events.push(ConsoleEvent::Log(piece));
        }
        false
    }

    fn marker_at_line_start(&self) -> LineStart {
        let prefix = MARKER_PREFIX.as_bytes();
        let n = self.pending.len().min(prefix.len());
        if self.pending[..n] != prefix[..n] {
            return LineStart::NotMarker;
        }
        if self.pending.len() < prefix.len() {
            return LineStart::NeedMore;
        }
        match self.pending.iter().position(|&b| b == b'\n') {
            Some(nl) => match Marker::parse(&self.pending[..nl]) {
                Ok(Some(marker)) => LineStart::Marker(marker, nl + 1),
                _ => LineStart::NotMarker,
            },
            None if self.pending.len() > MAX_MARKER_LINE => LineStart::NotMarker,
            None => LineStart::NeedMore,
        }
    }

    fn process_output(&mut self, events: &mut Vec<ConsoleEvent>) -> bool {
        let mut out = Vec::new();
        let mut switched = false;
        while !self.pending.is_empty() {
            if self.at_line_start {
                match self.marker_at_line_start() {
                    LineStart::NeedMore => break,
                    LineStart::Marker(marker, consumed) => {
                        let ends_output = matches!(marker, Marker::Exit(_) | Marker::Poweroff);
                        // The newline before the exit marker is the agent's, not the command's.
                        if self.held_newline && !matches!(marker, Marker::Exit(_)) {
                            out.push(b'\n');
                        }
                        self.held_newline = false;
                        if !out.is_empty() {
                            events.push(ConsoleEvent::Output(std::mem::take(&mut out)));
                        }
                        self.pending.drain(..consumed);
                        events.push(ConsoleEvent::Marker(marker));
                        if ends_output {
                            self.mode = Mode::Lines;
                            switched = true;
                            break;
                        }
                        continue;
                    }
                    LineStart::NotMarker => {}
                }
            }
            if self.held_newline {
                out.push(b'\n');
                self.held_newline = false;
            }
            match self.pending.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    out.extend_from_slice(&self.pending[..nl]);
                    self.pending.drain(..=nl);
                    self.held_newline = true;
                    self.at_line_start = true;
                }
                None => {
                    out.append(&mut self.pending);
                    self.at_line_start = false;
                }
            }
        }
        if !out.is_empty() {
            events.push(ConsoleEvent::Output(out));
        }
        switched
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
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
            assert_eq!(base64url_decode(encoded).unwrap(), plain);
        }
        // The URL-safe alphabet: 0xfb 0xff -> "-_8" in base64url, "+/8" in standard base64.
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url_decode("-_8").unwrap(), vec![0xfb, 0xff]);
    }

    #[test]
    fn base64url_roundtrips_every_byte_value_and_length() {
        let data: Vec<u8> = (0..=255u8).collect();
        for len in 0..data.len() {
            let encoded = base64url_encode(&data[..len]);
            assert!(!encoded.contains(['=', '+', '/', ' ']));
            assert_eq!(base64url_decode(&encoded).unwrap(), &data[..len]);
        }
    }

    #[test]
    fn base64url_rejects_bad_input() {
        // Wrong length, padding, standard-alphabet and foreign characters, and encodings whose
        // unused trailing bits are set ("Zm9" would otherwise also decode to "fo", like "Zm8").
        for bad in [
            "Zm9vY", "Zm9v=", "Zm8=", "Zm9+", "Zm/v", "Zm 9", "Zh", "Zm9",
        ] {
            let result = base64url_decode(bad);
            assert!(
                matches!(result, Err(ProtocolError::InvalidBase64 { .. })),
                "{bad}: {result:?}"
            );
        }
    }

    #[test]
    fn cmd_roundtrip_keeps_arguments_exact() {
        let argv = os(&["sh", "-c", "echo 'a b' \"$HOME\"; exit 3", "", "ünï"]);
        let encoded = encode_cmd(&argv).unwrap();
        assert!(encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(decode_cmd(&encoded).unwrap(), argv);
        // A trailing empty argument survives too.
        let argv = os(&["printf", ""]);
        assert_eq!(decode_cmd(&encode_cmd(&argv).unwrap()).unwrap(), argv);
        // Non-UTF-8 arguments are bytes on Linux and pass through.
        let raw = vec![OsString::from("cat"), OsString::from_vec(vec![0xff, 0xfe])];
        assert_eq!(decode_cmd(&encode_cmd(&raw).unwrap()).unwrap(), raw);
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
        assert_eq!(decode_cmd(""), Err(ProtocolError::EmptyCommand));
        assert_eq!(
            decode_cmd(&base64url_encode(b"\0ls")),
            Err(ProtocolError::EmptyCommand)
        );
        assert!(matches!(
            decode_cmd("not base64!"),
            Err(ProtocolError::InvalidBase64 { .. })
        ));
    }

    #[test]
    fn markers_format_exactly() {
        assert_eq!(
            Marker::Ready { boot_ns: 123 }.to_line(),
            "@@agentvm:ready boot_ns=123\n"
        );
        assert_eq!(Marker::ExecStart.to_line(), "@@agentvm:exec-start\n");
        assert_eq!(
            Marker::Exit(ExitStatus::Code(3)).to_line(),
            "@@agentvm:exit code=3\n"
        );
        assert_eq!(
            Marker::Exit(ExitStatus::Signal(9)).to_line(),
            "@@agentvm:exit signal=9\n"
        );
        assert_eq!(
            Marker::Error("exec foo:\nnot found".into()).to_line(),
            "@@agentvm:error exec foo: not found\n"
        );
        assert_eq!(Marker::Poweroff.to_line(), "@@agentvm:poweroff\n");
    }

    #[test]
    fn markers_parse_back() {
        let markers = [
            Marker::Ready { boot_ns: 987654321 },
            Marker::ExecStart,
            Marker::Exit(ExitStatus::Code(0)),
            Marker::Exit(ExitStatus::Code(255)),
            Marker::Exit(ExitStatus::Signal(15)),
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
        assert!(matches!(
            Marker::parse(b"@@agentvm:bogus x"),
            Err(ProtocolError::UnknownMarker(_))
        ));
        for bad in [
            "@@agentvm:ready",
            "@@agentvm:ready boot_ns=-1",
            "@@agentvm:exit",
            "@@agentvm:exit code=256",
            "@@agentvm:exit code=x",
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
        // Merge adjacent output so the result does not depend on where chunks were cut.
        let mut merged: Vec<ConsoleEvent> = Vec::new();
        for event in events {
            match (merged.last_mut(), event) {
                (Some(ConsoleEvent::Output(prev)), ConsoleEvent::Output(more)) => {
                    prev.extend_from_slice(&more)
                }
                (_, event) => merged.push(event),
            }
        }
        merged
    }

    const SESSION: &[u8] = b"[    0.5] Run /init as init process\r\n\
        @@agentvm:ready boot_ns=42\n\
        @@agentvm:exec-start\n\
        hi\n@@agentvm: inside output\nno newline at end\n\
        @@agentvm:exit code=3\n\
        @@agentvm:poweroff\n\
        [    0.9] reboot: Restarting system\r\n";

    fn session_events() -> Vec<ConsoleEvent> {
        vec![
            ConsoleEvent::Log(b"[    0.5] Run /init as init process".to_vec()),
            ConsoleEvent::Marker(Marker::Ready { boot_ns: 42 }),
            ConsoleEvent::Marker(Marker::ExecStart),
            ConsoleEvent::Output(b"hi\n@@agentvm: inside output\nno newline at end".to_vec()),
            ConsoleEvent::Marker(Marker::Exit(ExitStatus::Code(3))),
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
    fn parser_strips_exactly_one_newline_before_exit() {
        let events = feed_all(&[b"@@agentvm:exec-start\nline\n\n\n@@agentvm:exit code=0\n"]);
        assert_eq!(
            events,
            vec![
                ConsoleEvent::Marker(Marker::ExecStart),
                ConsoleEvent::Output(b"line\n\n".to_vec()),
                ConsoleEvent::Marker(Marker::Exit(ExitStatus::Code(0))),
            ]
        );
        let silent = feed_all(&[b"@@agentvm:exec-start\n\n@@agentvm:exit signal=9\n"]);
        assert_eq!(
            silent,
            vec![
                ConsoleEvent::Marker(Marker::ExecStart),
                ConsoleEvent::Marker(Marker::Exit(ExitStatus::Signal(9))),
            ]
        );
    }

    #[test]
    fn parser_reports_errors_inside_output_and_keeps_going() {
        let events = feed_all(&[
            b"@@agentvm:exec-start\n@@agentvm:error exec nope: not found\n\n@@agentvm:exit code=127\n",
        ]);
        assert_eq!(
            events,
            vec![
                ConsoleEvent::Marker(Marker::ExecStart),
                ConsoleEvent::Marker(Marker::Error("exec nope: not found".into())),
                ConsoleEvent::Marker(Marker::Exit(ExitStatus::Code(127))),
            ]
        );
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
    fn parser_treats_malformed_markers_as_text() {
        let events =
            feed_all(&[b"@@agentvm:exit code=nope\n@@agentvm:exec-start\n@@agentvm:exit\nx"]);
        assert_eq!(
            events,
            vec![
                ConsoleEvent::Log(b"@@agentvm:exit code=nope".to_vec()),
                ConsoleEvent::Marker(Marker::ExecStart),
                ConsoleEvent::Output(b"@@agentvm:exit\nx".to_vec()),
            ]
        );
    }

    #[test]
    fn parser_bounds_what_it_holds_back() {
        let mut parser = ConsoleParser::new();
        parser.feed(b"@@agentvm:exec-start\n");
        let mut long = b"@@agentvm:".to_vec();
        long.resize(MAX_MARKER_LINE + 10, b'x');
        let events = parser.feed(&long);
        assert_eq!(events, vec![ConsoleEvent::Output(long)]);
        assert!(parser.in_command_output());

        let mut parser = ConsoleParser::new();
        let endless = vec![b'k'; MAX_LOG_LINE + 1];
        assert_eq!(parser.feed(&endless), vec![ConsoleEvent::Log(endless)]);
    }
}
