use std::io;

use crate::hello::{Role, Version};

/// Everything that can go wrong on a protocol connection.
///
/// [`Error::is_fatal`] separates errors after which the byte stream is no longer in sync (drop the
/// connection) from errors confined to one well-delimited frame (report it and carry on).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on the protocol stream: {0}")]
    Io(#[from] io::Error),

    /// The length prefix exceeds the limit; nothing of that size was allocated.
    #[error("peer announced a {len}-byte frame payload, more than the {max}-byte limit")]
    FrameTooLarge { len: u32, max: usize },

    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {received} of {expected} bytes received")]
    Truncated { expected: usize, received: usize },

    /// A well-delimited frame whose kind this version does not know.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),

    /// A well-delimited frame whose payload does not decode as its kind's message.
    #[error("malformed {name} payload (frame kind {kind:#04x}): {reason}")]
    BadPayload {
        kind: u8,
        name: &'static str,
        reason: String,
    },

    /// A message that decodes but breaks a protocol rule (or one refused for encoding).
    #[error("invalid {name} message: {reason}")]
    InvalidMessage { name: &'static str, reason: String },

    /// A message that would not fit in a frame.
    #[error("{name} message encodes to {len} bytes, more than the {max}-byte frame limit")]
    MessageTooLarge {
        name: &'static str,
        len: usize,
        max: usize,
    },

    #[error("failed to encode {name} message: {reason}")]
    Encode { name: &'static str, reason: String },

    /// The connection closed before the peer's Hello arrived.
    #[error("connection closed before the peer sent its Hello (is the agentvm agent running on the other end?)")]
    ClosedBeforeHello,

    /// The first frame was not a Hello.
    #[error("expected a Hello as the first frame, got frame kind {kind:#04x}: the peer does not speak the agentvm protocol")]
    NotHello { kind: u8 },

    /// The first bytes from the peer are not even a plausible frame header.
    #[error(
        "the peer's first bytes ({}) are not a protocol frame: it does not speak the agentvm \
         protocol, or a transport handshake line (vsock `OK <port>`) was left unread",
        show_bytes(first_bytes)
    )]
    GarbageBeforeHello { first_bytes: [u8; 4] },

    /// A Hello frame whose payload does not decode.
    #[error("the peer's Hello is malformed ({reason}): it does not speak the agentvm protocol")]
    BadHello { reason: String },

    #[error("peer's Hello has magic {found:02x?} instead of {expected:02x?}: the peer does not speak the agentvm protocol")]
    BadMagic { found: [u8; 4], expected: [u8; 4] },

    /// Both ends claim the same role (e.g. a host connected to another host).
    #[error("peer claims to be the {peer} too; expected the {expected}")]
    WrongRole { peer: Role, expected: Role },

    /// The peers speak incompatible major protocol versions.
    #[error(
        "protocol version mismatch: this {local_role} ({local_software}) speaks protocol v{local}, \
         but the {peer_role} ({peer_software}) speaks protocol v{peer}; both ends need the same major \
         version (v{local_major}.x)",
        local_major = local.major
    )]
    VersionMismatch {
        local_role: Role,
        local: Version,
        local_software: String,
        peer_role: Role,
        peer: Version,
        peer_software: String,
    },
}

impl Error {
    /// True when the connection can no longer be used (the frame boundaries are lost, the
    /// transport failed, or the handshake failed). False for errors confined to one frame, which a
    /// receiver reports (with an [`ErrorCode::Protocol`](crate::ErrorCode::Protocol) `Error`
    /// message) before reading on.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Error::UnknownKind(_)
                | Error::BadPayload { .. }
                | Error::InvalidMessage { .. }
                | Error::MessageTooLarge { .. }
                | Error::Encode { .. }
        )
    }
}

/// Bytes as printable ASCII where possible, for errors about unexpected input.
fn show_bytes(bytes: &[u8]) -> String {
    let text: String = bytes
        .iter()
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect();
    format!("\"{text}\"")
}
