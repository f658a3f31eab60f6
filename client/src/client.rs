//! [`AgentClient`]: connecting, the handshake, and the one-shot requests.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_protocol::{
    handshake, AfterRestore, FrameReader, FrameWriter, Hello, Message, Negotiated, Ping, Role,
    PROTOCOL_VERSION,
};

use crate::connection::{Call, Connection};
use crate::error::{ClientError, Result};
use crate::vsock;

/// Features this client can use: all the protocol defines.
const CLIENT_FEATURES: agentvm_protocol::Features = agentvm_protocol::Features::ALL;

/// How long one-shot calls wait for their answer unless changed with
/// [`AgentClient::with_call_timeout`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to a guest agent. Cheap to clone: clones share the connection, which closes when
/// the last clone and the last handle made from it are dropped.
///
/// Calls are blocking and may be made from many threads at once; they are multiplexed on the one
/// connection. One-shot calls wait at most the call timeout; streaming handles wait for as long as
/// their process/stream lives, and every wait ends promptly with
/// [`ClientError::ConnectionClosed`] if the connection dies.
#[derive(Clone)]
pub struct AgentClient {
    pub(crate) conn: Arc<Connection>,
    pub(crate) call_timeout: Duration,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("peer", &self.conn.negotiated().peer.software_version)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// The least time the handshake gets once the connection is up. An agent that accepted sends its
/// Hello at once, but a connection made in the last milliseconds of a connect timeout must still
/// have the time to hear it: otherwise a slow boot ends in a misleading "no Hello" timeout.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

fn handshake_time(connect_deadline: Instant) -> Duration {
    connect_deadline
        .saturating_duration_since(Instant::now())
        .max(HANDSHAKE_GRACE)
}

impl AgentClient {
    /// Connects through a VMM's hybrid vsock Unix socket to the guest agent listening on `port`,
    /// retrying until `timeout` while the agent is not up yet, then runs the handshake (within
    /// what is left of `timeout`, but at least [`HANDSHAKE_GRACE`]).
    pub fn connect_vsock_uds(uds_path: &Path, port: u32, timeout: Duration) -> Result<AgentClient> {
        let deadline = Instant::now() + timeout;
        let stream = vsock::connect(uds_path, port, timeout)?;
        Self::handshake_within(stream, Some(handshake_time(deadline)))
    }

    /// Connects over AF_VSOCK to the guest agent listening on `port` of the guest with `cid`
    /// (VMMs whose vsock device the host kernel serves, e.g. QEMU with vhost-vsock), retrying
    /// until `timeout` while the guest or its agent is not up yet, then runs the handshake
    /// (within what is left of `timeout`, but at least [`HANDSHAKE_GRACE`]).
    pub fn connect_vsock(cid: u32, port: u32, timeout: Duration) -> Result<AgentClient> {
        let deadline = Instant::now() + timeout;
        let stream = crate::af_vsock::connect(cid, port, timeout)?;
        Self::handshake_within(stream, Some(handshake_time(deadline)))
    }

    /// Runs the handshake on an already connected stream (a socket pair in tests, or the agent in
    /// host-process mode) and starts the client. Waits for the agent's Hello at most
    /// [`DEFAULT_CALL_TIMEOUT`].
    pub fn from_stream(stream: UnixStream) -> Result<AgentClient> {
        Self::handshake_within(stream, Some(DEFAULT_CALL_TIMEOUT))
    }

    fn handshake_within(stream: UnixStream, timeout: Option<Duration>) -> Result<AgentClient> {
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let local = Hello::new(
            Role::Host,
            concat!("agentvm-client ", env!("CARGO_PKG_VERSION")),
            CLIENT_FEATURES,
        );
        let mut reader = FrameReader::new(stream.try_clone()?);
        let mut writer = FrameWriter::new(stream.try_clone()?);
        let negotiated = handshake(&mut reader, &mut writer, &local).map_err(|e| match e {
            agentvm_protocol::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::TimedOut {
                    what: "the guest agent's Hello".to_string(),
                    after: timeout.unwrap_or_default(),
                }
            }
            other => ClientError::Handshake(other),
        })?;
        stream.set_read_timeout(None)?;
        // Writes keep a timeout: a guest that stops reading the connection altogether must not
        // hang writers forever (a timed-out write closes the connection).
        stream.set_write_timeout(Some(DEFAULT_CALL_TIMEOUT))?;
        Ok(AgentClient {
            conn: Connection::start(stream, negotiated)?,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        })
    }

    /// The same connection with another timeout for one-shot calls.
    pub fn with_call_timeout(mut self, timeout: Duration) -> AgentClient {
        self.call_timeout = timeout;
        self
    }

    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// What the handshake agreed on: protocol version, common features, the agent's Hello
    /// (its software version).
    pub fn negotiated(&self) -> &Negotiated {
        self.conn.negotiated()
    }

    /// The protocol version this client speaks.
    pub fn protocol_version() -> agentvm_protocol::Version {
        PROTOCOL_VERSION
    }

    /// Why the connection closed, or `None` while it is up.
    pub fn closed_reason(&self) -> Option<String> {
        self.conn.closed_reason()
    }

    /// Closes the connection now: every pending call (on any clone) fails promptly.
    pub fn shutdown(&self) {
        self.conn.close("the client shut the connection down");
    }

    /// A round trip to the agent.
    pub fn ping(&self) -> Result<()> {
        let mut call = self.start(|id| Message::Ping(Ping { id }))?;
        self.expect_done(&mut call, "the answer to Ping")
    }

    /// After a snapshot restore: sets the guest clock to `realtime_ns` (ns since the Unix epoch)
    /// and mixes `entropy` into the guest's RNG.
    pub fn after_restore(&self, realtime_ns: i64, entropy: &[u8]) -> Result<()> {
        let mut call = self.start(|id| {
            Message::AfterRestore(AfterRestore {
                id,
                realtime_ns,
                entropy: entropy.to_vec(),
            })
        })?;
        self.expect_done(&mut call, "the answer to AfterRestore")
    }

    pub(crate) fn start(&self, build: impl FnOnce(u64) -> Message) -> Result<Call> {
        self.conn.start_call(false, build)
    }

    /// Waits for one message of `call` within the call timeout.
    pub(crate) fn next(&self, call: &mut Call, what: &str) -> Result<Message> {
        call.next(Some(self.call_timeout), what)
    }

    pub(crate) fn expect_done(&self, call: &mut Call, what: &str) -> Result<()> {
        match self.next(call, what)? {
            Message::Done(_) => Ok(()),
            other => Err(call.unexpected(&other, what)),
        }
    }
}
