//! Every message, its frame kind and its direction.
//!
//! Conventions (the README has the full story):
//! - The host starts a request with a fresh, nonzero `id`; everything about that request — the
//!   guest's responses, stream data in both directions, window grants, kill/resize/close — carries
//!   that `id`. Id 0 is reserved for [`ErrorMsg`]s about the connection itself.
//! - A request ends with exactly one final message: [`Done`], [`Exited`], [`Written`],
//!   [`Metadata`] (for `StatPath`), [`ProcListing`], [`ProcStarted`], or [`ErrorMsg`].
//! - Messages naming an id that already ended are ignored: they race with completion.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::frame::{Frame, HEADER_LEN, MAX_PAYLOAD};
use crate::hello::{Hello, Role};

/// Largest `data` in one [`Data`] message. Bounded chunks keep one busy stream from holding the
/// connection for long and make window accounting fine-grained.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Bytes of [`Data`] a sender may have outstanding per stream before the receiver grants more
/// with [`Window`]. Equal to the vsock device's per-connection buffer, so one stream alone can
/// keep the transport full.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// Frame kinds. Values are never reused; a new message gets a new kind (a minor version bump).
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const ERROR: u8 = 0x02;
    pub const DONE: u8 = 0x03;
    pub const DATA: u8 = 0x04;
    pub const EOF: u8 = 0x05;
    pub const WINDOW: u8 = 0x06;
    pub const CLOSE: u8 = 0x07;
    pub const PING: u8 = 0x08;
    pub const READY: u8 = 0x09;

    pub const EXEC: u8 = 0x10;
    pub const STARTED: u8 = 0x11;
    pub const EXITED: u8 = 0x12;
    pub const KILL: u8 = 0x13;

    pub const PROC_START: u8 = 0x18;
    pub const PROC_STARTED: u8 = 0x19;
    pub const PROC_LIST: u8 = 0x1a;
    pub const PROC_LISTING: u8 = 0x1b;
    pub const PROC_WAIT: u8 = 0x1c;
    pub const PROC_KILL: u8 = 0x1d;
    pub const PROC_LOGS: u8 = 0x1e;
    pub const LOGS_START: u8 = 0x1f;

    pub const PTY_OPEN: u8 = 0x20;
    pub const RESIZE: u8 = 0x21;

    pub const WATCH_START: u8 = 0x28;
    pub const WATCH_EVENTS: u8 = 0x29;

    pub const READ_FILE: u8 = 0x30;
    pub const WRITE_FILE: u8 = 0x31;
    pub const LIST_DIR: u8 = 0x32;
    pub const STAT_PATH: u8 = 0x33;
    pub const MAKE_DIR: u8 = 0x34;
    pub const REMOVE_PATH: u8 = 0x35;
    pub const METADATA: u8 = 0x38;
    pub const DIR_ENTRIES: u8 = 0x39;
    pub const WRITTEN: u8 = 0x3a;

    pub const CONNECT: u8 = 0x40;

    pub const AFTER_RESTORE: u8 = 0x48;
}

/// Who may send a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    HostToGuest,
    GuestToHost,
    Both,
}

/// Serde helper: `Vec<u8>` as one length-prefixed byte string (a memcpy) rather than a sequence
/// of separately visited elements.
mod bytes {
    use serde::de::{Error as _, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer, T: AsRef<[u8]>>(
        data: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(data.as_ref())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(byte) = seq.next_element::<u8>()? {
                    if out.len() == super::MAX_PAYLOAD {
                        return Err(A::Error::custom("byte string longer than a frame"));
                    }
                    out.push(byte);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

/// Which byte stream of a request a [`Data`]/[`Eof`]/[`Window`] message is about. Per service:
/// exec and background logs: the process's stdin/stdout/stderr; PTY: `Stdin` is keyboard input,
/// `Stdout` the terminal output; ReadFile: `Stdout` carries the contents; WriteFile: `Stdin`
/// carries them; Connect: `Stdin` is host→guest bytes, `Stdout` guest→host bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

/// Error categories, so that callers can react without parsing messages. Unknown codes from a
/// newer peer decode as [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u32", into = "u32")]
pub enum ErrorCode {
    /// A frame could not be decoded or broke a protocol rule.
    Protocol,
    /// A request this peer does not implement (unknown kind or missing feature).
    Unsupported,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    AlreadyExists,
    /// The id is already in use by a running request.
    DuplicateId,
    /// A `ProcWait` timed out (the process keeps running).
    TimedOut,
    /// Too many concurrent requests, streams or processes.
    ResourceLimit,
    /// The process could not be started (not found, not executable, bad user, ...).
    SpawnFailed,
    /// Port forward: nothing accepts connections on that guest port.
    ConnectionRefused,
    /// Any other I/O error; the message carries the OS error text.
    Io,
    Internal,
    Other(u32),
}

impl From<u32> for ErrorCode {
    fn from(value: u32) -> Self {
        match value {
            1 => Self::Protocol,
            2 => Self::Unsupported,
            3 => Self::InvalidArgument,
            4 => Self::NotFound,
            5 => Self::PermissionDenied,
            6 => Self::AlreadyExists,
            7 => Self::DuplicateId,
            8 => Self::TimedOut,
            9 => Self::ResourceLimit,
            10 => Self::SpawnFailed,
            11 => Self::ConnectionRefused,
            12 => Self::Io,
            13 => Self::Internal,
            other => Self::Other(other),
        }
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        match code {
            ErrorCode::Protocol => 1,
            ErrorCode::Unsupported => 2,
            ErrorCode::InvalidArgument => 3,
            ErrorCode::NotFound => 4,
            ErrorCode::PermissionDenied => 5,
            ErrorCode::AlreadyExists => 6,
            ErrorCode::DuplicateId => 7,
            ErrorCode::TimedOut => 8,
            ErrorCode::ResourceLimit => 9,
            ErrorCode::SpawnFailed => 10,
            ErrorCode::ConnectionRefused => 11,
            ErrorCode::Io => 12,
            ErrorCode::Internal => 13,
            ErrorCode::Other(other) => other,
        }
    }
}

impl ErrorCode {
    /// The code for an OS error, for agents answering failed file or process operations.
    pub fn from_io(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::NotFound => Self::NotFound,
            ErrorKind::PermissionDenied => Self::PermissionDenied,
            ErrorKind::AlreadyExists => Self::AlreadyExists,
            ErrorKind::InvalidInput => Self::InvalidArgument,
            ErrorKind::ConnectionRefused => Self::ConnectionRefused,
            ErrorKind::TimedOut => Self::TimedOut,
            _ => Self::Io,
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Executed directly, looked up in `PATH` when `argv[0]` has no `/`. Must not be empty.
    Argv(Vec<String>),
    /// Run as `/bin/sh -c <string>`.
    Shell(String),
}

/// How to start a process (exec, background process, PTY).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub command: Command,
    /// Added to (or, with `clear_env`, replacing) the agent's environment, in order.
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    /// Working directory; the agent's (`/`) when absent.
    pub cwd: Option<String>,
    /// User name, numeric uid, or `uid:gid`; the agent's user (root) when absent.
    pub user: Option<String>,
    /// After this long the whole process group is killed (SIGKILL) and the exit reports
    /// `timed_out`.
    pub timeout_ms: Option<u64>,
}

impl ProcessSpec {
    /// A spec running `command` with no environment changes, cwd, user or timeout.
    pub fn new(command: Command) -> Self {
        Self {
            command,
            env: Vec::new(),
            clear_env: false,
            cwd: None,
            user: None,
            timeout_ms: None,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// A failed request (final), or with id 0 a complaint about the connection (e.g. a frame that
/// could not be decoded, so its id is unknown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub id: u64,
    pub code: ErrorCode,
    pub message: String,
}

/// A request finished successfully with nothing more to say (final).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub id: u64,
}

/// A chunk of a stream, at most [`MAX_CHUNK`] bytes, counted against the stream's window.
/// Empty data is allowed (and costs no window) but means nothing; end of stream is [`Eof`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data {
    pub id: u64,
    pub stream: Stream,
    #[serde(with = "bytes")]
    pub data: Vec<u8>,
}

/// No more [`Data`] on this stream (stdin EOF, end of a file upload, TCP half-close). A final
/// message implies end of every stream of its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eof {
    pub id: u64,
    pub stream: Stream,
}

/// The receiver of a stream allows `bytes` more of it (flow control; see the README).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub id: u64,
    pub stream: Stream,
    pub bytes: u32,
}

/// Host: end the request early. Exec: SIGKILL to the process group; PTY: hang up (SIGHUP to the
/// session, master closed); watch: stop; logs with follow: stop; port forward: close the TCP
/// connection. The request then ends with its usual final message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    pub id: u64,
}

/// Host: answered by [`Done`]; measures round trips and liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub id: u64,
}

/// Guest: the request is established and streaming may start (watch set up, port connected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub id: u64,
}

/// Host: run a process and stream its output. Answers: [`Started`], then [`Data`] on `Stdout`
/// and `Stderr` (each in order), then [`Exited`]. With `stdin`, the host sends its input as
/// [`Data`] on `Stdin` and ends it with [`Eof`]; without, stdin is `/dev/null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub id: u64,
    pub spec: ProcessSpec,
    pub stdin: bool,
}

/// Guest: the process of an Exec or PtyOpen runs, with this pid (also its process group id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub id: u64,
    pub pid: u32,
}

/// Guest: the process ended (final for Exec, PtyOpen and ProcWait), after all its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    pub id: u64,
    pub status: ExitStatus,
    /// The spec's timeout expired and the agent killed the process group.
    pub timed_out: bool,
}

/// Host: send `signal` to the process group of the Exec or PtyOpen `id`. No answer of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kill {
    pub id: u64,
    pub signal: i32,
}

/// Host: start a background process; the agent keeps its output (bounded, oldest dropped).
/// Answered by [`ProcStarted`] (final).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStart {
    pub id: u64,
    pub spec: ProcessSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStarted {
    pub id: u64,
    /// The agent's id for the process, valid until the agent restarts; never reused.
    pub proc_id: u64,
    pub pid: u32,
}

/// Host: list background processes. Answered by [`ProcListing`] (final).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcList {
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub proc_id: u64,
    pub pid: u32,
    pub command: Command,
    /// Wall-clock start time (guest clock), ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// `None` while running.
    pub status: Option<ExitStatus>,
    /// Total bytes the process wrote to stdout and stderr so far.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcListing {
    pub id: u64,
    pub procs: Vec<ProcInfo>,
}

/// Host: wait for a background process. Answered by [`Exited`], or [`ErrorMsg`] with
/// [`ErrorCode::TimedOut`] when `timeout_ms` passes first (the process is left alone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcWait {
    pub id: u64,
    pub proc_id: u64,
    pub timeout_ms: Option<u64>,
}

/// Host: signal a background process's group. Answered by [`Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcKill {
    pub id: u64,
    pub proc_id: u64,
    pub signal: i32,
}

/// Host: read a background process's output from byte `offset` of `stream` (`Stdout` or
/// `Stderr`). Answers: [`LogsStart`], [`Data`] on that stream, then [`Done`] at the end of the
/// log — or, with `follow`, once the process has exited and everything was sent (or on
/// [`Close`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcLogs {
    pub id: u64,
    pub proc_id: u64,
    pub stream: Stream,
    pub offset: u64,
    pub follow: bool,
}

/// Guest: the log data that follows starts at `offset`, later than requested when older output
/// was already dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsStart {
    pub id: u64,
    pub offset: u64,
}

/// Host: start a process on a new pseudo-terminal (it becomes the session leader with the PTY as
/// controlling terminal, `TERM` set). Answers: [`Started`], [`Data`] on `Stdout` (terminal
/// output), and [`Exited`]. Input is [`Data`] on `Stdin`; [`Resize`] changes the size (the
/// program gets SIGWINCH); [`Close`] hangs up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyOpen {
    pub id: u64,
    pub spec: ProcessSpec,
    pub term: String,
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub id: u64,
    pub rows: u16,
    pub cols: u16,
}

/// Host: watch `path` (with `recursive`, every directory below it, including ones created later).
/// Globs match the path relative to `path`, `*` within a component and `**` across them; an
/// event is reported if it matches some `include` (or `include` is empty) and no `exclude`.
/// Answers: [`Ready`] once the watches are in place, [`WatchEvents`] batches, and [`Done`] after
/// [`Close`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchStart {
    pub id: u64,
    pub path: String,
    pub recursive: bool,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

/// A filesystem change. Paths are absolute guest paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    Created {
        path: String,
        is_dir: bool,
    },
    Modified {
        path: String,
    },
    Deleted {
        path: String,
        is_dir: bool,
    },
    /// A rename within the watched tree. A move in from outside is `Created`, one out `Deleted`.
    Moved {
        from: String,
        to: String,
        is_dir: bool,
    },
    /// Events were lost (kernel queue overflow): rescan if exact state matters.
    Overflow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvents {
    pub id: u64,
    pub events: Vec<WatchEvent>,
}

/// Host: read a file from `offset`, at most `len` bytes (to the end when absent). Answers:
/// [`Metadata`] of the file, [`Data`] on `Stdout`, then [`Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFile {
    pub id: u64,
    pub path: String,
    pub offset: u64,
    pub len: Option<u64>,
}

/// Host: write a file whose contents follow as [`Data`] on `Stdin`, ended by [`Eof`] (the host
/// may start sending within [`INITIAL_WINDOW`] right away). With `atomic`, the agent writes a
/// temporary file in the same directory, syncs it and renames it over `path`, so readers see the
/// old or the new file, never a mix; without, it truncates and writes in place. Answered by
/// [`Written`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub id: u64,
    pub path: String,
    /// Permission bits; 0o644 for a new file, the old file's when replacing, if absent.
    pub mode: Option<u32>,
    pub create_parents: bool,
    pub atomic: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub id: u64,
    pub bytes: u64,
}

/// Host: list a directory. Answers: [`DirEntries`] batches, then [`Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDir {
    pub id: u64,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    /// Of the entry itself (symlinks not followed).
    pub metadata: FileMetadata,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntries {
    pub id: u64,
    pub entries: Vec<DirEntry>,
}

/// Host: stat a path. Answered by [`Metadata`] (final).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatPath {
    pub id: u64,
    pub path: String,
    pub follow_symlinks: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMetadata {
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// For symlinks, where they point.
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub id: u64,
    pub metadata: FileMetadata,
}

/// Host: create a directory (`mode` defaults to 0o755). Answered by [`Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeDir {
    pub id: u64,
    pub path: String,
    pub parents: bool,
    pub mode: Option<u32>,
}

/// Host: remove a file, symlink or empty directory; with `recursive`, a whole tree. Answered by
/// [`Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovePath {
    pub id: u64,
    pub path: String,
    pub recursive: bool,
}

/// Host: open a TCP connection to `port` on the guest's loopback (127.0.0.1, then ::1). Answers:
/// [`Ready`] when connected, then bytes both ways as [`Data`] (`Stdin` to the guest server,
/// `Stdout` from it) with [`Eof`] for half-closes, and [`Done`] when both directions ended or
/// after [`Close`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    pub id: u64,
    pub port: u16,
}

/// Host, after a snapshot restore: set the guest's wall clock and mix `entropy` into its RNG
/// (and credit it, so reads of `/dev/random` do not block); a guest with a NIC also fetches the
/// egress filter's CA again (the restoring VMM's filter has a new one). Answered by [`Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfterRestore {
    pub id: u64,
    /// Host wall-clock time, ns since the Unix epoch.
    pub realtime_ns: i64,
    #[serde(with = "bytes")]
    pub entropy: Vec<u8>,
}

/// [`Data`] with borrowed bytes: encodes identically, without copying `data` into a `Vec` first.
#[derive(Serialize)]
struct DataRef<'a> {
    id: u64,
    stream: Stream,
    #[serde(serialize_with = "bytes::serialize")]
    data: &'a [u8],
}

/// The wire bytes of `Data { id, stream, data }` (header included), straight from a borrowed
/// buffer: the hot path of streaming output, which would otherwise copy each chunk twice.
pub fn encode_data(id: u64, stream: Stream, data: &[u8]) -> Result<Vec<u8>, Error> {
    let invalid = |reason: String| Error::InvalidMessage {
        name: "Data",
        reason,
    };
    if data.len() > MAX_CHUNK {
        return Err(invalid(format!(
            "{} bytes of data, more than the {MAX_CHUNK}-byte chunk limit",
            data.len()
        )));
    }
    if id == 0 {
        return Err(invalid(
            "request id 0 is reserved for connection errors".to_string(),
        ));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + 16 + data.len());
    out.extend_from_slice(&[0, 0, 0, 0, kind::DATA]);
    let mut out =
        postcard::to_extend(&DataRef { id, stream, data }, out).map_err(|e| Error::Encode {
            name: "Data",
            reason: e.to_string(),
        })?;
    let len = (out.len() - HEADER_LEN) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

macro_rules! messages {
    ($($kind:path => $variant:ident, $dir:ident;)*) => {
        /// Any message, one per frame kind.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Message {
            $($variant($variant),)*
        }

        $(impl From<$variant> for Message {
            fn from(message: $variant) -> Message {
                Message::$variant(message)
            }
        })*

        impl Message {
            /// The frame kind carrying this message.
            pub fn kind(&self) -> u8 {
                match self {
                    $(Message::$variant(_) => $kind,)*
                }
            }

            /// The message's name, for errors and logs.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Message::$variant(_) => stringify!($variant),)*
                }
            }

            /// The name of the message a frame kind carries, if the kind is known.
            pub fn kind_name(kind: u8) -> Option<&'static str> {
                match kind {
                    $($kind => Some(stringify!($variant)),)*
                    _ => None,
                }
            }

            /// Who may send this message; a receiver treats the wrong direction as a protocol
            /// error.
            pub fn direction(&self) -> Direction {
                match self {
                    $(Message::$variant(_) => Direction::$dir,)*
                }
            }

            fn encode_payload(&self, out: Vec<u8>) -> postcard::Result<Vec<u8>> {
                match self {
                    $(Message::$variant(m) => postcard::to_extend(m, out),)*
                }
            }

            fn decode_payload(kind: u8, payload: &[u8]) -> Result<Message, Error> {
                match kind {
                    $($kind => decode::<$variant>(kind, stringify!($variant), payload)
                        .map(Message::$variant),)*
                    _ => Err(Error::UnknownKind(kind)),
                }
            }
        }
    };
}

messages! {
    kind::HELLO => Hello, Both;
    kind::ERROR => ErrorMsg, Both;
    kind::DONE => Done, GuestToHost;
    kind::DATA => Data, Both;
    kind::EOF => Eof, Both;
    kind::WINDOW => Window, Both;
    kind::CLOSE => Close, HostToGuest;
    kind::PING => Ping, HostToGuest;
    kind::READY => Ready, GuestToHost;
    kind::EXEC => Exec, HostToGuest;
    kind::STARTED => Started, GuestToHost;
    kind::EXITED => Exited, GuestToHost;
    kind::KILL => Kill, HostToGuest;
    kind::PROC_START => ProcStart, HostToGuest;
    kind::PROC_STARTED => ProcStarted, GuestToHost;
    kind::PROC_LIST => ProcList, HostToGuest;
    kind::PROC_LISTING => ProcListing, GuestToHost;
    kind::PROC_WAIT => ProcWait, HostToGuest;
    kind::PROC_KILL => ProcKill, HostToGuest;
    kind::PROC_LOGS => ProcLogs, HostToGuest;
    kind::LOGS_START => LogsStart, GuestToHost;
    kind::PTY_OPEN => PtyOpen, HostToGuest;
    kind::RESIZE => Resize, HostToGuest;
    kind::WATCH_START => WatchStart, HostToGuest;
    kind::WATCH_EVENTS => WatchEvents, GuestToHost;
    kind::READ_FILE => ReadFile, HostToGuest;
    kind::WRITE_FILE => WriteFile, HostToGuest;
    kind::LIST_DIR => ListDir, HostToGuest;
    kind::STAT_PATH => StatPath, HostToGuest;
    kind::MAKE_DIR => MakeDir, HostToGuest;
    kind::REMOVE_PATH => RemovePath, HostToGuest;
    kind::METADATA => Metadata, GuestToHost;
    kind::DIR_ENTRIES => DirEntries, GuestToHost;
    kind::WRITTEN => Written, GuestToHost;
    kind::CONNECT => Connect, HostToGuest;
    kind::AFTER_RESTORE => AfterRestore, HostToGuest;
}

fn decode<T: serde::de::DeserializeOwned>(
    kind: u8,
    name: &'static str,
    payload: &[u8],
) -> Result<T, Error> {
    let (value, rest) = postcard::take_from_bytes::<T>(payload).map_err(|e| Error::BadPayload {
        kind,
        name,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::BadPayload {
            kind,
            name,
            reason: format!("{} bytes after the message", rest.len()),
        });
    }
    Ok(value)
}

impl Message {
    /// The request this message belongs to; `None` for Hello.
    pub fn request_id(&self) -> Option<u64> {
        macro_rules! ids {
            ($($variant:ident),*) => {
                match self {
                    Message::Hello(_) => None,
                    $(Message::$variant(m) => Some(m.id),)*
                }
            };
        }
        ids!(
            ErrorMsg,
            Done,
            Data,
            Eof,
            Window,
            Close,
            Ping,
            Ready,
            Exec,
            Started,
            Exited,
            Kill,
            ProcStart,
            ProcStarted,
            ProcList,
            ProcListing,
            ProcWait,
            ProcKill,
            ProcLogs,
            LogsStart,
            PtyOpen,
            Resize,
            WatchStart,
            WatchEvents,
            ReadFile,
            WriteFile,
            ListDir,
            StatPath,
            MakeDir,
            RemovePath,
            Metadata,
            DirEntries,
            Written,
            Connect,
            AfterRestore
        )
    }

    /// Whether a peer in `role` may send this message; receivers answer a message from the
    /// wrong side with an `ErrorMsg` of code `Protocol`.
    pub fn sent_by(&self, role: Role) -> bool {
        matches!(
            (self.direction(), role),
            (Direction::Both, _)
                | (Direction::HostToGuest, Role::Host)
                | (Direction::GuestToHost, Role::Guest)
        )
    }

    /// Protocol rules beyond what the types express, checked on both encode and decode.
    fn validate(&self) -> Result<(), String> {
        match self {
            Message::Data(d) if d.data.len() > MAX_CHUNK => Err(format!(
                "{} bytes of data, more than the {MAX_CHUNK}-byte chunk limit",
                d.data.len()
            )),
            Message::Exec(Exec { spec, .. })
            | Message::ProcStart(ProcStart { spec, .. })
            | Message::PtyOpen(PtyOpen { spec, .. })
                if matches!(&spec.command, Command::Argv(argv) if argv.is_empty()) =>
            {
                Err("empty argv".to_string())
            }
            Message::ProcLogs(ProcLogs {
                stream: Stream::Stdin,
                ..
            }) => Err("a process log is Stdout or Stderr, not Stdin".to_string()),
            Message::Hello(_) | Message::ErrorMsg(_) => Ok(()),
            other if other.request_id() == Some(0) => {
                Err("request id 0 is reserved for connection errors".to_string())
            }
            _ => Ok(()),
        }
    }

    /// This message as a frame (its kind and encoded payload).
    pub fn to_frame(&self) -> Result<Frame, Error> {
        let bytes = self.encode()?;
        Ok(Frame {
            kind: bytes[HEADER_LEN - 1],
            payload: bytes[HEADER_LEN..].to_vec(),
        })
    }

    /// The complete wire bytes: header and payload, ready for one write.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let name = self.name();
        self.validate()
            .map_err(|reason| Error::InvalidMessage { name, reason })?;
        let hint = match self {
            Message::Data(d) => d.data.len() + 16,
            _ => 64,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + hint);
        out.extend_from_slice(&[0, 0, 0, 0, self.kind()]);
        let mut out = self.encode_payload(out).map_err(|e| Error::Encode {
            name,
            reason: e.to_string(),
        })?;
        let len = out.len() - HEADER_LEN;
        if len > MAX_PAYLOAD {
            return Err(Error::MessageTooLarge {
                name,
                len,
                max: MAX_PAYLOAD,
            });
        }
        out[..4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(out)
    }

    /// Decodes a frame. Errors are confined to this frame (see [`Error::is_fatal`]).
    pub fn from_frame(frame: &Frame) -> Result<Message, Error> {
        let message = Self::decode_payload(frame.kind, &frame.payload)?;
        message.validate().map_err(|reason| Error::InvalidMessage {
            name: message.name(),
            reason,
        })?;
        Ok(message)
    }
}
