//! One host connection: the Hello handshake, then the reading loop, which never blocks on a
//! request (handlers run on their own threads; their input is buffered within the window), then
//! the teardown that closes every request the connection started.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use agentvm_protocol::{
    handshake, Error, ErrorCode, ErrorMsg, Features, FrameReader, FrameWriter, Hello, Message, Role,
};

use super::dispatch::dispatch;
use super::registry::Registry;
use super::writer::SharedWriter;
use super::{ServeError, Services};

/// How long the host has to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler of one connection shares.
pub(crate) struct ConnectionShared {
    pub(crate) writer: Arc<SharedWriter>,
    pub(crate) registry: Registry,
    pub(crate) services: Arc<Services>,
    pub(crate) features: Features,
}

impl ConnectionShared {
    /// An `ErrorMsg`, final for `id` if that names a request, about the connection if 0.
    pub(crate) fn send_error(&self, id: u64, code: ErrorCode, message: impl Into<String>) {
        let _ = self.writer.send(&Message::ErrorMsg(ErrorMsg {
            id,
            code,
            message: message.into(),
        }));
    }
}

/// The agent's Hello: its version and the services it implements.
pub fn agent_hello(services: &Services) -> Hello {
    Hello::new(
        Role::Guest,
        format!("agentvm-guest-agent {}", env!("CARGO_PKG_VERSION")),
        services.features(),
    )
}

/// Serves one host connection until it ends. Every exec and PTY it started is killed when it
/// ends; background processes (`ProcStart`) live on.
///
/// `stream` may be any stream socket wrapped in a `UnixStream` (an `AF_VSOCK` socket in the
/// guest): only read, write and shutdown are used.
pub fn serve_connection(stream: UnixStream, services: &Arc<Services>) -> Result<(), ServeError> {
    let write_half = stream.try_clone().map_err(ServeError::Setup)?;
    // A peer that connects and never says Hello must not hold a thread for ever; once the
    // handshake is done, an idle connection is normal.
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(ServeError::Setup)?;
    let mut reader = FrameReader::new(BufReader::new(stream));
    let negotiated = {
        let mut hello_writer = FrameWriter::new(&write_half);
        handshake(&mut reader, &mut hello_writer, &agent_hello(services))
            .map_err(ServeError::Handshake)?
    };
    reader
        .get_ref()
        .get_ref()
        .set_read_timeout(None)
        .map_err(ServeError::Setup)?;
    let conn = Arc::new(ConnectionShared {
        writer: Arc::new(SharedWriter::new(write_half).map_err(ServeError::Setup)?),
        registry: Registry::default(),
        services: Arc::clone(services),
        features: negotiated.features,
    });
    let result = read_loop(&mut reader, &conn);
    conn.registry.close_all();
    conn.writer.shut_down();
    result
}

fn read_loop(
    reader: &mut FrameReader<BufReader<UnixStream>>,
    conn: &Arc<ConnectionShared>,
) -> Result<(), ServeError> {
    loop {
        let frame = match reader.read_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            // A shutdown of our own (the writer found the host gone) reads as an error too.
            Err(_) if conn.writer.is_gone() => return Ok(()),
            Err(e) => return Err(ServeError::Protocol(e)),
        };
        match Message::from_frame(&frame) {
            Ok(message) => dispatch(message, conn),
            Err(Error::UnknownKind(kind)) => {
                // Every message but Hello starts with its request id: answer the request, if
                // it looks like a new one, so the host's caller is not left waiting.
                let id = leading_varint(&frame.payload)
                    .filter(|id| *id != 0 && !conn.registry.contains(*id))
                    .unwrap_or(0);
                conn.send_error(
                    id,
                    ErrorCode::Unsupported,
                    format!("this agent does not know message kind {kind:#04x}"),
                );
            }
            Err(e) if !e.is_fatal() => conn.send_error(0, ErrorCode::Protocol, e.to_string()),
            Err(e) => return Err(ServeError::Protocol(e)),
        }
    }
}

/// A postcard varint (LEB128) at the start of `bytes`.
fn leading_varint(bytes: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}
