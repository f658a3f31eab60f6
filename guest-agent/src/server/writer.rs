//! The one writer every handler of a connection shares: whole frames, one `write_all` each, under
//! a mutex, so frames from concurrent handlers never interleave.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use agentvm_protocol::{encode_data, ErrorCode, ErrorMsg, Message, Stream};

/// The connection to the host is gone (closed, reset, or torn down): nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection to the host is gone")]
pub struct ConnectionGone;

pub(crate) struct SharedWriter {
    stream: Mutex<UnixStream>,
    /// A second handle on the socket, outside the mutex: shutting it down wakes a writer blocked
    /// on a host that stopped reading.
    shutdown_handle: UnixStream,
    gone: AtomicBool,
}

impl SharedWriter {
    pub(crate) fn new(stream: UnixStream) -> std::io::Result<Self> {
        let shutdown_handle = stream.try_clone()?;
        Ok(Self {
            stream: Mutex::new(stream),
            shutdown_handle,
            gone: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Sends one message. A message we cannot encode is our own bug; the host hears about it as a
    /// connection-level `Internal` error rather than the connection dying.
    pub(crate) fn send(&self, message: &Message) -> Result<(), ConnectionGone> {
        match message.encode() {
            Ok(bytes) => self.write_frame(&bytes),
            Err(e) => {
                let complaint = Message::ErrorMsg(ErrorMsg {
                    id: 0,
                    code: ErrorCode::Internal,
                    message: format!(
                        "the agent could not encode its {} message for request {}: {e}",
                        message.name(),
                        message.request_id().unwrap_or(0)
                    ),
                });
                let bytes = complaint.encode().map_err(|_| ConnectionGone)?;
                self.write_frame(&bytes)
            }
        }
    }

    /// Sends the final message of request `id`. One that cannot be encoded (say, a listing too
    /// big for a frame) becomes an `Internal` error for the same request, so the request still
    /// ends.
    pub(crate) fn send_final(&self, id: u64, message: &Message) -> Result<(), ConnectionGone> {
        match message.encode() {
            Ok(bytes) => self.write_frame(&bytes),
            Err(e) => self.send(&Message::ErrorMsg(ErrorMsg {
                id,
                code: ErrorCode::Internal,
                message: format!("request {id}: the agent could not encode its answer: {e}"),
            })),
        }
    }

    /// Sends one `Data` frame (`data` at most `MAX_CHUNK`), without copying it into a message.
    pub(crate) fn send_data(
        &self,
        id: u64,
        stream: Stream,
        data: &[u8],
    ) -> Result<(), ConnectionGone> {
        let bytes = encode_data(id, stream, data).map_err(|_| ConnectionGone)?;
        self.write_frame(&bytes)
    }

    fn write_frame(&self, bytes: &[u8]) -> Result<(), ConnectionGone> {
        if self.is_gone() {
            return Err(ConnectionGone);
        }
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_gone() {
            return Err(ConnectionGone);
        }
        match stream.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(_) => {
                drop(stream);
                self.shut_down();
                Err(ConnectionGone)
            }
        }
    }

    /// Marks the connection gone and shuts the socket down both ways, waking any blocked writer
    /// and the reading loop.
    pub(crate) fn shut_down(&self) {
        self.gone.store(true, Ordering::Release);
        let _ = self.shutdown_handle.shutdown(Shutdown::Both);
    }
}
