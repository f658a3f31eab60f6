//! One protocol connection shared by every request: a writer behind a mutex, a reader thread that
//! routes each incoming message to its request by id, and per-stream credit windows.
//!
//! The reader thread never waits on a consumer: each request's messages go into an unbounded
//! channel, which stays bounded in practice because the guest may only send `Data` within the
//! window we grant, and we grant only as the consumer takes data (see [`Call::consumed`]).

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use agentvm_protocol::{
    encode_data, Close, ErrorCode, ErrorMsg, FrameReader, FrameWriter, Message, Negotiated,
    RecvWindow, Role, SendWindow, Stream, Window,
};

use crate::error::{ClientError, Result};

/// What a request's consumer receives.
#[derive(Debug)]
pub(crate) enum Event {
    /// A message of the request; `is_final` for the one that ends it.
    Message { message: Message, is_final: bool },
    /// The request cannot go on: the connection died or the guest broke the protocol for it.
    Failed(Failure),
}

#[derive(Debug, Clone)]
pub(crate) enum Failure {
    ConnectionClosed(String),
    Protocol(String),
}

impl Failure {
    pub(crate) fn to_error(&self) -> ClientError {
        match self {
            Failure::ConnectionClosed(reason) => ClientError::ConnectionClosed(reason.clone()),
            Failure::Protocol(reason) => ClientError::Protocol(reason.clone()),
        }
    }
}

/// Why a request can no longer send data.
#[derive(Debug, Clone)]
pub(crate) enum Ended {
    /// The guest sent the request's final message (e.g. the process exited).
    Finished,
    Failed(Failure),
}

/// Window accounting of one request, shared by the reader thread and the request's handles.
#[derive(Debug, Default)]
struct FlowState {
    send: HashMap<Stream, SendWindow>,
    recv: HashMap<Stream, RecvWindow>,
    /// Set once: by the final message, a failure, or the host dropping the request.
    ended: Option<Ended>,
    /// `Close` was sent (it is sent at most once).
    close_sent: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Flow {
    state: Mutex<FlowState>,
    /// Signalled on every grant and when the request ends, for senders waiting for credit.
    changed: Condvar,
}

impl Flow {
    fn lock(&self) -> MutexGuard<'_, FlowState> {
        // A panic elsewhere while holding the lock leaves plain counters behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end(&self, why: Ended) {
        let mut state = self.lock();
        if state.ended.is_none() {
            state.ended = Some(why);
        }
        self.changed.notify_all();
    }
}

struct Slot {
    events: Sender<Event>,
    flow: Arc<Flow>,
    /// `Metadata` ends a `StatPath` but not a `ReadFile`.
    metadata_is_final: bool,
}

#[derive(Default)]
struct Registry {
    live: HashMap<u64, Slot>,
    /// Why the connection closed, once it did; no request is registered after that.
    closed: Option<String>,
}

/// The parts the reader thread shares with the handles.
struct Core {
    writer: Mutex<FrameWriter<UnixStream>>,
    registry: Mutex<Registry>,
    socket: UnixStream,
}

impl Core {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed_reason(&self) -> Option<String> {
        self.registry().closed.clone()
    }

    /// Writes already-encoded frame bytes. A failed or partial write leaves the byte stream out of
    /// sync, so it closes the connection.
    fn write_bytes(&self, bytes: &[u8]) -> Result<()> {
        if let Some(reason) = self.closed_reason() {
            return Err(ClientError::ConnectionClosed(reason));
        }
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let written = std::io::Write::write_all(writer.get_mut(), bytes);
        drop(writer);
        match written {
            Ok(()) => Ok(()),
            Err(e) => {
                let reason = format!("writing to the guest agent failed: {e}");
                self.close(&reason);
                Err(ClientError::ConnectionClosed(reason))
            }
        }
    }

    fn send(&self, message: &Message) -> Result<()> {
        let bytes = message
            .encode()
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        self.write_bytes(&bytes)
    }

    /// Marks the connection closed and fails every pending request with `reason`.
    fn close(&self, reason: &str) {
        let pending = {
            let mut registry = self.registry();
            if registry.closed.is_none() {
                registry.closed = Some(reason.to_string());
            }
            std::mem::take(&mut registry.live)
        };
        let failure = Failure::ConnectionClosed(reason.to_string());
        for slot in pending.into_values() {
            slot.flow.end(Ended::Failed(failure.clone()));
            let _ = slot.events.send(Event::Failed(failure.clone()));
        }
        // Unblocks the reader thread and any writer stuck on a full socket.
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    /// Ends request `id` because the guest broke the protocol on it: tells the guest (an
    /// `ErrorMsg` as the README asks, then `Close` so it stops the request), fails the consumer.
    fn fail_request(&self, id: u64, reason: String) {
        let slot = self.registry().live.remove(&id);
        let failure = Failure::Protocol(reason.clone());
        // Ended before anything is said, so no grant or data for the id follows our verdict.
        if let Some(slot) = &slot {
            slot.flow.end(Ended::Failed(failure.clone()));
        }
        let _ = self.send(&Message::ErrorMsg(ErrorMsg {
            id,
            code: ErrorCode::Protocol,
            message: reason,
        }));
        if let Some(slot) = slot {
            let _ = self.send(&Message::Close(Close { id }));
            let _ = slot.events.send(Event::Failed(failure));
        }
    }

    fn read_loop(&self, mut reader: FrameReader<UnixStream>) {
        let reason = loop {
            match reader.read_message() {
                Ok(Some(message)) => self.dispatch(message),
                Ok(None) => break "the guest agent closed the connection".to_string(),
                Err(e) if !e.is_fatal() => {
                    // The frame was well delimited, so the stream is still in sync; its id is
                    // unknown, hence id 0.
                    let _ = self.send(&Message::ErrorMsg(ErrorMsg {
                        id: 0,
                        code: ErrorCode::Protocol,
                        message: format!("host could not decode a frame: {e}"),
                    }));
                }
                Err(e) => break e.to_string(),
            }
        };
        self.close(&reason);
    }

    fn dispatch(&self, message: Message) {
        let id = message.request_id().unwrap_or(0);
        if !message.sent_by(Role::Guest) || matches!(message, Message::Hello(_)) {
            let reason = format!("the guest agent sent {} (not allowed here)", message.name());
            if id == 0 {
                self.close(&reason);
            } else {
                self.fail_request(id, reason);
            }
            return;
        }
        if id == 0 {
            // A complaint about the connection itself: nothing pending can be blamed, and a
            // guest that cannot go on closes the connection, which fails everything anyway.
            return;
        }
        let mut registry = self.registry();
        let Some(slot) = registry.live.get(&id) else {
            // Races with completion or with the host dropping the request (README: ignored).
            return;
        };
        match &message {
            Message::Window(Window { stream, bytes, .. }) => {
                let flow = Arc::clone(&slot.flow);
                drop(registry);
                let mut state = flow.lock();
                let granted = state.send.entry(*stream).or_default().grant(*bytes);
                flow.changed.notify_all();
                drop(state);
                if let Err(e) = granted {
                    self.fail_request(id, e.to_string());
                }
                return;
            }
            Message::Data(data) => {
                let received = slot
                    .flow
                    .lock()
                    .recv
                    .entry(data.stream)
                    .or_default()
                    .received(data.data.len());
                if let Err(e) = received {
                    drop(registry);
                    self.fail_request(id, e.to_string());
                    return;
                }
            }
            _ => {}
        }
        let is_final = match &message {
            Message::Done(_)
            | Message::Exited(_)
            | Message::Written(_)
            | Message::ProcStarted(_)
            | Message::ProcListing(_)
            | Message::ErrorMsg(_) => true,
            Message::Metadata(_) => slot.metadata_is_final,
            _ => false,
        };
        if is_final {
            let slot = registry.live.remove(&id).expect("slot looked up above");
            drop(registry);
            slot.flow.end(Ended::Finished);
            let _ = slot.events.send(Event::Message {
                message,
                is_final: true,
            });
        } else {
            let _ = slot.events.send(Event::Message {
                message,
                is_final: false,
            });
        }
    }
}

/// A live protocol connection. Dropping the last reference shuts the socket down and joins the
/// reader thread.
pub(crate) struct Connection {
    core: Arc<Core>,
    next_id: AtomicU64,
    negotiated: Negotiated,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Connection {
    /// Takes over a stream on which the handshake is done.
    pub(crate) fn start(stream: UnixStream, negotiated: Negotiated) -> Result<Arc<Connection>> {
        let read_half = stream.try_clone()?;
        let write_half = stream.try_clone()?;
        let core = Arc::new(Core {
            writer: Mutex::new(FrameWriter::new(write_half)),
            registry: Mutex::new(Registry::default()),
            socket: stream,
        });
        let reader_core = Arc::clone(&core);
        let reader = thread::Builder::new()
            .name("agentvm-client-reader".to_string())
            .spawn(move || reader_core.read_loop(FrameReader::new(read_half)))?;
        Ok(Arc::new(Connection {
            core,
            next_id: AtomicU64::new(1),
            negotiated,
            reader: Mutex::new(Some(reader)),
        }))
    }

    pub(crate) fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Why the connection is closed, or `None` while it is up.
    pub(crate) fn closed_reason(&self) -> Option<String> {
        self.core.closed_reason()
    }

    /// Closes the connection: pending calls fail with `reason`.
    pub(crate) fn close(&self, reason: &str) {
        self.core.close(reason);
    }

    /// Registers a request under a fresh id and sends `build(id)`. `metadata_is_final` is true for
    /// requests answered by a final `Metadata` (StatPath).
    pub(crate) fn start_call(
        self: &Arc<Self>,
        metadata_is_final: bool,
        build: impl FnOnce(u64) -> Message,
    ) -> Result<Call> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Encoded before registering: a request refused here never reaches the guest.
        let request = build(id)
            .encode()
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        let (sender, events) = mpsc::channel();
        let flow = Arc::new(Flow::default());
        {
            let mut registry = self.core.registry();
            if let Some(reason) = &registry.closed {
                return Err(ClientError::ConnectionClosed(reason.clone()));
            }
            registry.live.insert(
                id,
                Slot {
                    events: sender,
                    flow: Arc::clone(&flow),
                    metadata_is_final,
                },
            );
        }
        let link = CallLink {
            id,
            conn: Arc::clone(self),
            flow,
        };
        let call = Call {
            link,
            events,
            done: false,
        };
        // On failure `call` is dropped, which unregisters the id.
        call.link.conn.core.write_bytes(&request)?;
        Ok(call)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.core.close("the client closed the connection");
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reader) = reader {
            let _ = reader.join();
        }
    }
}

/// What a request's handles share: its id, the connection and its windows. Cheap to clone, so a
/// stdin writer or a controller can live on another thread than the event consumer.
#[derive(Clone)]
pub(crate) struct CallLink {
    id: u64,
    conn: Arc<Connection>,
    flow: Arc<Flow>,
}

impl CallLink {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn send(&self, message: &Message) -> Result<()> {
        self.conn.core.send(message)
    }

    /// Whether the request ended (final message, failure, or dropped by the host).
    pub(crate) fn ended(&self) -> Option<Ended> {
        self.flow.lock().ended.clone()
    }

    /// Sends a control message (`Kill`, `Resize`, `Close`) unless the request already ended, in
    /// which case there is nobody to tell and it is not an error.
    pub(crate) fn send_control(&self, message: &Message) -> Result<()> {
        match self.ended() {
            Some(Ended::Failed(failure)) => Err(failure.to_error()),
            Some(Ended::Finished) => Ok(()),
            None => self.send(message),
        }
    }

    /// Asks the guest to end the request early (`Close`), once; a no-op after the request ended.
    pub(crate) fn close(&self) -> Result<()> {
        {
            let mut state = self.flow.lock();
            if let Some(Ended::Failed(failure)) = &state.ended {
                return Err(failure.to_error());
            }
            if state.ended.is_some() || std::mem::replace(&mut state.close_sent, true) {
                return Ok(());
            }
        }
        self.send(&Message::Close(Close { id: self.id }))
    }

    /// Sends up to one chunk of `data` on `stream`, waiting for window credit until `deadline`.
    /// Returns how many bytes went out (at least 1 for non-empty `data`).
    pub(crate) fn send_data(
        &self,
        stream: Stream,
        data: &[u8],
        deadline: Option<Instant>,
    ) -> std::result::Result<usize, SendError> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut state = self.flow.lock();
        let n = loop {
            if let Some(ended) = &state.ended {
                return Err(SendError::Ended(ended.clone()));
            }
            let window = state.send.entry(stream).or_default();
            let n = window.next_chunk(data.len());
            if n > 0 {
                window
                    .consume(n)
                    .expect("next_chunk stays within the window");
                break n;
            }
            state = match deadline {
                None => self
                    .flow
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(SendError::TimedOut);
                    }
                    self.flow
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        };
        drop(state);
        let bytes = encode_data(self.id, stream, &data[..n])
            .map_err(|e| SendError::Failed(ClientError::InvalidArgument(e.to_string())))?;
        self.conn
            .core
            .write_bytes(&bytes)
            .map_err(SendError::Failed)?;
        Ok(n)
    }

    /// Sends all of `data`, waiting for credit as needed.
    pub(crate) fn send_all(
        &self,
        stream: Stream,
        mut data: &[u8],
        deadline: Option<Instant>,
    ) -> std::result::Result<(), SendError> {
        while !data.is_empty() {
            let n = self.send_data(stream, data, deadline)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// The consumer took `n` bytes of `stream`: grants credit back once enough was freed.
    pub(crate) fn consumed(&self, stream: Stream, n: usize) -> Result<()> {
        let grant = {
            let mut state = self.flow.lock();
            if state.ended.is_some() {
                return Ok(());
            }
            state.recv.entry(stream).or_default().consumed(n)
        };
        match grant {
            Some(bytes) => self.send(&Message::Window(Window {
                id: self.id,
                stream,
                bytes,
            })),
            None => Ok(()),
        }
    }
}

/// Why [`CallLink::send_data`] could not send.
#[derive(Debug)]
pub(crate) enum SendError {
    Ended(Ended),
    TimedOut,
    Failed(ClientError),
}

/// One request: its link and the channel of its incoming messages. Dropping it before the final
/// message arrived sends `Close` (the guest stops the process/watch/forward) and forgets the id.
pub(crate) struct Call {
    link: CallLink,
    events: Receiver<Event>,
    done: bool,
}

impl Call {
    pub(crate) fn link(&self) -> &CallLink {
        &self.link
    }

    pub(crate) fn id(&self) -> u64 {
        self.link.id
    }

    /// The next message of this request. `timeout: None` waits until a message or the end of the
    /// connection (which always comes: the reader thread fails every pending call when it stops).
    /// The guest's `ErrorMsg` is returned as `ClientError::Agent`.
    pub(crate) fn next(&mut self, timeout: Option<Duration>, what: &str) -> Result<Message> {
        if self.done {
            return Err(ClientError::Protocol(format!(
                "request {} already ended while waiting for {what}",
                self.link.id
            )));
        }
        let event = match timeout {
            None => self
                .events
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
            Some(timeout) => self.events.recv_timeout(timeout),
        };
        let event = match event {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                return Err(ClientError::TimedOut {
                    what: what.to_string(),
                    after: timeout.unwrap_or_default(),
                })
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.done = true;
                let reason = self
                    .link
                    .conn
                    .closed_reason()
                    .unwrap_or_else(|| "the request was dropped".to_string());
                return Err(ClientError::ConnectionClosed(reason));
            }
        };
        match event {
            Event::Failed(failure) => {
                self.done = true;
                Err(failure.to_error())
            }
            Event::Message {
                message: Message::ErrorMsg(error),
                ..
            } => {
                self.done = true;
                Err(ClientError::Agent {
                    code: error.code,
                    message: error.message,
                })
            }
            Event::Message { message, is_final } => {
                self.done = is_final;
                Ok(message)
            }
        }
    }

    /// Whether the final message was taken.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// A protocol error for a message this request does not expect here; also ends the request.
    pub(crate) fn unexpected(&mut self, message: &Message, what: &str) -> ClientError {
        let reason = format!(
            "unexpected {} for request {} while waiting for {what}",
            message.name(),
            self.link.id
        );
        if !self.done {
            self.link
                .conn
                .core
                .fail_request(self.link.id, reason.clone());
            self.done = true;
        }
        ClientError::Protocol(reason)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let slot = self.link.conn.core.registry().live.remove(&self.link.id);
        if let Some(slot) = slot {
            let _ = self.link.close();
            slot.flow.end(Ended::Failed(Failure::ConnectionClosed(
                "the request was dropped by the host".to_string(),
            )));
        }
    }
}
