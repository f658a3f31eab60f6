//! The one error type of the client.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use agentvm_protocol::ErrorCode;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Everything a client call can fail with, worded for the person running the command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The guest agent refused or failed the request (its `ErrorMsg`).
    #[error("guest agent error ({code:?}): {message}")]
    Agent { code: ErrorCode, message: String },

    /// The connection to the guest agent is gone (agent killed, VM stopped, transport failure);
    /// every call pending on it fails with this.
    #[error("guest agent connection closed: {0}")]
    ConnectionClosed(String),

    /// No answer within the time allowed.
    #[error("timed out after {after:?} waiting for {what}")]
    TimedOut { what: String, after: Duration },

    /// The guest agent broke the protocol (message out of order, window overrun, ...).
    #[error("protocol error from the guest agent: {0}")]
    Protocol(String),

    /// The version handshake failed; the text says why (e.g. version mismatch with both versions).
    #[error("guest agent handshake failed: {0}")]
    Handshake(#[source] agentvm_protocol::Error),

    /// The vsock Unix socket answered in a way that retrying cannot fix.
    #[error("cannot connect to the guest agent on vsock port {port} via {}: {reason}", path.display())]
    Connect {
        path: PathBuf,
        port: u32,
        reason: String,
    },

    /// The guest agent did not accept a connection in time; `last` is why the last attempt failed.
    #[error(
        "timed out after {waited:?} connecting to the guest agent on vsock port {port} via {}: {last}",
        path.display()
    )]
    ConnectTimedOut {
        path: PathBuf,
        port: u32,
        waited: Duration,
        last: String,
    },

    /// Connecting over AF_VSOCK failed in a way that retrying cannot fix (e.g. this kernel has no
    /// vsock support).
    #[error("cannot connect to the guest agent on vsock cid {cid} port {port}: {reason}")]
    VsockConnect { cid: u32, port: u32, reason: String },

    /// Nothing accepted an AF_VSOCK connection in time; `last` is why the last attempt failed.
    #[error(
        "timed out after {waited:?} connecting to the guest agent on vsock cid {cid} port {port}: {last}"
    )]
    VsockConnectTimedOut {
        cid: u32,
        port: u32,
        waited: Duration,
        last: String,
    },

    /// A bad argument, refused before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl ClientError {
    /// The agent's error code, if the agent answered with an error.
    pub fn agent_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// As an `io::Error`, for the `Read`/`Write` adapters (the message is kept).
    pub(crate) fn into_io(self) -> io::Error {
        let kind = match &self {
            ClientError::Io(e) => return io::Error::new(e.kind(), self.to_string()),
            ClientError::ConnectionClosed(_) => io::ErrorKind::ConnectionAborted,
            ClientError::TimedOut { .. } => io::ErrorKind::TimedOut,
            ClientError::Agent {
                code: ErrorCode::NotFound,
                ..
            } => io::ErrorKind::NotFound,
            ClientError::Agent {
                code: ErrorCode::PermissionDenied,
                ..
            } => io::ErrorKind::PermissionDenied,
            ClientError::Agent {
                code: ErrorCode::ConnectionRefused,
                ..
            } => io::ErrorKind::ConnectionRefused,
            ClientError::InvalidArgument(_) => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_conversion_keeps_the_message_and_a_matching_kind() {
        let cases = [
            (
                ClientError::ConnectionClosed("agent killed".into()),
                io::ErrorKind::ConnectionAborted,
            ),
            (
                ClientError::Agent {
                    code: ErrorCode::NotFound,
                    message: "/x: No such file or directory".into(),
                },
                io::ErrorKind::NotFound,
            ),
            (
                ClientError::TimedOut {
                    what: "output".into(),
                    after: Duration::from_secs(1),
                },
                io::ErrorKind::TimedOut,
            ),
            (
                ClientError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "pipe")),
                io::ErrorKind::BrokenPipe,
            ),
        ];
        for (error, kind) in cases {
            let text = error.to_string();
            let io = error.into_io();
            assert_eq!(io.kind(), kind, "{text}");
            assert_eq!(io.to_string(), text);
        }
    }

    #[test]
    fn messages_name_the_thing() {
        let error = ClientError::ConnectTimedOut {
            path: PathBuf::from("/run/vm/vsock.sock"),
            port: 52,
            waited: Duration::from_millis(1500),
            last: "the vsock socket does not exist (yet)".into(),
        };
        assert_eq!(
            error.to_string(),
            "timed out after 1.5s connecting to the guest agent on vsock port 52 via \
             /run/vm/vsock.sock: the vsock socket does not exist (yet)"
        );
        let error = ClientError::Agent {
            code: ErrorCode::PermissionDenied,
            message: "/etc/shadow: Permission denied".into(),
        };
        assert_eq!(error.agent_code(), Some(ErrorCode::PermissionDenied));
        assert_eq!(
            error.to_string(),
            "guest agent error (PermissionDenied): /etc/shadow: Permission denied"
        );
    }
}
