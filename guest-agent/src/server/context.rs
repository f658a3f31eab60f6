//! The request context API: what a request handler gets to talk to the host.
//!
//! The dispatcher (`dispatch.rs`) registers each request under its id and runs its handler on a
//! thread of its own, handing it a [`RequestContext`]:
//!
//! ```text
//! fn handler(ctx: RequestContext, request: SomeRequest) {
//!     ctx.send(&Message::Ready(Ready { id: ctx.id() }))?;        // any message
//!     ctx.send_data(Stream::Stdout, &bytes)?;                      // windowed, split into chunks
//!     ctx.send_eof(Stream::Stdout)?;
//!     let n = ctx.input().read_timeout(&mut buf, Some(timeout))?;  // host's Data on Stdin
//!     if ctx.closed() { ... }                                      // Close received / connection gone
//!     poll([my_fd, ctx.on_close().fd()]);                          // or wait on the close signal
//!     ctx.on_control(|c| ...);                                     // Kill / Resize / Close
//!     ctx.finish(Message::Done(Done { id: ctx.id() }));            // final message, frees the id
//!     // or ctx.fail(ErrorCode::NotFound, format!("{path}: no such file"));
//! }
//! ```
//!
//! Rules the context enforces, so handlers need not:
//! - Output streams obey the host's window: [`RequestContext::send_data`] blocks while the
//!   stream's credit is zero and resumes on `Window` grants; a `Close` or the end of the
//!   connection makes it return [`ConnectionGone`] instead.
//! - Input (`Data`/`Eof` on `Stdin`) is buffered, at most one window's worth, and `Window` grants
//!   go back to the host as [`InputStream`] reads consume it.
//! - Exactly one final message: [`RequestContext::finish`] and [`RequestContext::fail`] consume
//!   the context; a handler that returns (or panics) without either answers `Internal`.
//! - The id is freed *before* the final message is written, so the host may reuse it as soon as
//!   it sees the answer.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agentvm_protocol::{
    ErrorCode, ErrorMsg, Features, Message, RecvWindow, SendWindow, Stream, Window, MAX_CHUNK,
};

use super::connection::ConnectionShared;
use super::fd::Trigger;
pub use super::writer::ConnectionGone;
use super::writer::SharedWriter;
use super::Services;

/// How long a blocked wait sleeps before looking at its conditions again; only a safety net, as
/// every state change also notifies.
const RECHECK: Duration = Duration::from_secs(1);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Host messages that steer a running request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Kill {
        signal: i32,
    },
    Resize {
        rows: u16,
        cols: u16,
    },
    /// `Close`, or the connection ended.
    Close,
}

/// Handed to a request handler, which runs on its own thread.
pub struct RequestContext {
    state: Arc<RequestState>,
    conn: Arc<ConnectionShared>,
    answered: bool,
}

impl RequestContext {
    pub(crate) fn new(state: Arc<RequestState>, conn: Arc<ConnectionShared>) -> Self {
        Self {
            state,
            conn,
            answered: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Services shared by every connection (process table, reaper).
    pub fn services(&self) -> &Arc<Services> {
        &self.conn.services
    }

    /// What this connection negotiated.
    pub fn features(&self) -> Features {
        self.conn.features
    }

    /// Sends any message (not final ones: use [`finish`](Self::finish) for those).
    pub fn send(&self, msg: &Message) -> Result<(), ConnectionGone> {
        self.conn.writer.send(msg)
    }

    /// Sends `data` on a guest→host stream in chunks of at most `MAX_CHUNK`, each within the
    /// stream's window: blocks while the window is empty. Fails once the request is closed or the
    /// connection is gone.
    pub fn send_data(&self, stream: Stream, data: &[u8]) -> Result<(), ConnectionGone> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.state.take_credit(stream, rest.len())?;
            self.conn.writer.send_data(self.id(), stream, &rest[..n])?;
            rest = &rest[n..];
        }
        Ok(())
    }

    pub fn send_eof(&self, stream: Stream) -> Result<(), ConnectionGone> {
        self.send(&Message::Eof(agentvm_protocol::Eof {
            id: self.id(),
            stream,
        }))
    }

    /// Sends the final message and frees the id.
    pub fn finish(mut self, final_msg: Message) {
        self.answered = true;
        self.release();
        let _ = self.conn.writer.send_final(self.id(), &final_msg);
    }

    /// Ends the request with an `ErrorMsg`.
    pub fn fail(self, code: ErrorCode, message: impl Into<String>) {
        let id = self.id();
        self.finish(Message::ErrorMsg(ErrorMsg {
            id,
            code,
            message: message.into(),
        }));
    }

    /// Host→guest `Data`/`Eof` on `Stdin` for this request.
    pub fn input(&self) -> &Arc<InputStream> {
        &self.state.input
    }

    /// `Close` was received or the connection is gone (or the request already ended).
    pub fn closed(&self) -> bool {
        self.state.close.is_closed()
    }

    /// A signal that fires on `Close`, at the end of the connection, or once the request ended:
    /// wait on it, or poll its fd.
    pub fn on_close(&self) -> CloseSignal {
        self.state.close.clone()
    }

    /// Routes `Kill`, `Resize` and `Close` for this request to `handler` (on the reading loop's
    /// thread: it must not block). Those that arrived earlier are delivered at once.
    pub fn on_control(&self, handler: impl FnMut(Control) + Send + 'static) {
        self.state.set_control_handler(Box::new(handler));
    }

    fn release(&self) {
        self.conn.registry.remove(self.id());
        self.state.end();
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        if !self.answered {
            self.release();
            let _ = self.conn.writer.send(&Message::ErrorMsg(ErrorMsg {
                id: self.id(),
                code: ErrorCode::Internal,
                message: format!(
                    "request {}: the agent's handler ended without an answer",
                    self.id()
                ),
            }));
        }
    }
}

type ControlHandler = Box<dyn FnMut(Control) + Send>;

enum ControlSink {
    Pending(Vec<Control>),
    Handler(ControlHandler),
}

/// One live request, as the reading loop and the handler share it.
pub(crate) struct RequestState {
    id: u64,
    windows: Mutex<SendWindows>,
    windows_changed: Condvar,
    input: Arc<InputStream>,
    close: CloseSignal,
    control: Mutex<ControlSink>,
}

struct SendWindows {
    by_stream: HashMap<Stream, SendWindow>,
    ended: bool,
}

impl RequestState {
    pub(crate) fn new(id: u64, writer: Arc<SharedWriter>) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            id,
            windows: Mutex::new(SendWindows {
                by_stream: HashMap::new(),
                ended: false,
            }),
            windows_changed: Condvar::new(),
            input: Arc::new(InputStream::new(id, writer)),
            close: CloseSignal::new()?,
            control: Mutex::new(ControlSink::Pending(Vec::new())),
        }))
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Waits for credit on `stream`, then takes up to `wanted` bytes (at most one chunk) of it.
    fn take_credit(&self, stream: Stream, wanted: usize) -> Result<usize, ConnectionGone> {
        let mut windows = lock(&self.windows);
        loop {
            if windows.ended {
                return Err(ConnectionGone);
            }
            let window = windows.by_stream.entry(stream).or_default();
            let n = window.next_chunk(wanted.min(MAX_CHUNK));
            if n > 0 {
                window
                    .consume(n)
                    .expect("next_chunk never exceeds the credit");
                return Ok(n);
            }
            windows = self
                .windows_changed
                .wait_timeout(windows, RECHECK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A `Window` grant from the host; the error names the rule it broke.
    pub(crate) fn grant(&self, stream: Stream, bytes: u32) -> Result<(), String> {
        let mut windows = lock(&self.windows);
        let result = windows.by_stream.entry(stream).or_default().grant(bytes);
        self.windows_changed.notify_all();
        result.map_err(|e| e.to_string())
    }

    pub(crate) fn push_input(&self, data: Vec<u8>) -> Result<(), String> {
        self.input.push(data)
    }

    pub(crate) fn input_eof(&self) -> Result<(), String> {
        self.input.push_eof()
    }

    pub(crate) fn control(&self, control: Control) {
        let mut sink = lock(&self.control);
        match &mut *sink {
            ControlSink::Pending(pending) => pending.push(control),
            ControlSink::Handler(handler) => handler(control),
        }
    }

    fn set_control_handler(&self, mut handler: ControlHandler) {
        let mut sink = lock(&self.control);
        if let ControlSink::Pending(pending) = &mut *sink {
            for control in pending.drain(..) {
                handler(control);
            }
        }
        *sink = ControlSink::Handler(handler);
    }

    /// `Close` from the host, or the connection ended.
    pub(crate) fn close(&self) {
        if self.close.is_closed() {
            return;
        }
        self.close.fire();
        self.end();
        self.control(Control::Close);
    }

    /// The request is over: wake everything blocked on it (threads a handler left behind, e.g.
    /// one feeding a process's stdin, watch the close signal).
    fn end(&self) {
        self.close.fire();
        lock(&self.windows).ended = true;
        self.windows_changed.notify_all();
        self.input.close();
    }
}

/// The host's input for one request (`Data`/`Eof` on `Stdin`), buffered up to the window.
pub struct InputStream {
    id: u64,
    writer: Arc<SharedWriter>,
    state: Mutex<InputState>,
    changed: Condvar,
}

struct InputState {
    buffer: VecDeque<u8>,
    eof: bool,
    closed: bool,
    window: RecvWindow,
}

impl InputStream {
    fn new(id: u64, writer: Arc<SharedWriter>) -> Self {
        Self {
            id,
            writer,
            state: Mutex::new(InputState {
                buffer: VecDeque::new(),
                eof: false,
                closed: false,
                window: RecvWindow::new(),
            }),
            changed: Condvar::new(),
        }
    }

    fn push(&self, data: Vec<u8>) -> Result<(), String> {
        let mut state = lock(&self.state);
        if state.closed {
            return Ok(());
        }
        if state.eof {
            return Err(format!("request {}: Data on Stdin after its Eof", self.id));
        }
        state
            .window
            .received(data.len())
            .map_err(|e| format!("request {}: {e}", self.id))?;
        state.buffer.extend(data);
        self.changed.notify_all();
        Ok(())
    }

    fn push_eof(&self) -> Result<(), String> {
        let mut state = lock(&self.state);
        if state.eof && !state.closed {
            return Err(format!("request {}: a second Eof on Stdin", self.id));
        }
        state.eof = true;
        self.changed.notify_all();
        Ok(())
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    /// Reads buffered input into `buf`: `Ok(0)` at `Eof`, `TimedOut` when `timeout` passes with
    /// nothing, `ConnectionAborted` once the request is closed or over. `None` waits as long as it
    /// takes (a `Close` or the end of the connection still ends the wait).
    pub fn read_timeout(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        loop {
            if state.closed {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("request {} was closed before its input ended", self.id),
                ));
            }
            if !state.buffer.is_empty() {
                break;
            }
            if state.eof {
                return Ok(0);
            }
            let wait = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no input for request {} in time", self.id),
                        ));
                    }
                    left.min(RECHECK)
                }
                None => RECHECK,
            };
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let n = buf.len().min(state.buffer.len());
        for (dst, src) in buf.iter_mut().zip(state.buffer.drain(..n)) {
            *dst = src;
        }
        let grant = state.window.consumed(n);
        drop(state);
        if let Some(bytes) = grant {
            // A lost grant only matters if the connection is gone, and then nothing does.
            let _ = self.writer.send(&Message::Window(Window {
                id: self.id,
                stream: Stream::Stdin,
                bytes,
            }));
        }
        Ok(n)
    }

    /// The next piece of input: `Ok(None)` at `Eof`; errors as for
    /// [`read_timeout`](Self::read_timeout).
    pub fn recv_timeout(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; MAX_CHUNK];
        let n = self.read_timeout(&mut buf, Some(timeout))?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some(buf))
    }
}

impl Read for &InputStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_timeout(buf, None)
    }
}

/// Fires once: on `Close`, at the end of the connection, or when the request has ended.
/// Waitable, and pollable: [`fd`](Self::fd) becomes readable (end of file) when it fires, for
/// handlers that `poll()` their own fds.
#[derive(Clone)]
pub struct CloseSignal {
    inner: Arc<CloseInner>,
}

struct CloseInner {
    fired: Mutex<bool>,
    cond: Condvar,
    trigger: Trigger,
}

impl CloseSignal {
    fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(CloseInner {
                fired: Mutex::new(false),
                cond: Condvar::new(),
                trigger: Trigger::new()?,
            }),
        })
    }

    fn fire(&self) {
        *lock(&self.inner.fired) = true;
        self.inner.cond.notify_all();
        self.inner.trigger.fire();
    }

    pub fn is_closed(&self) -> bool {
        *lock(&self.inner.fired)
    }

    /// Waits until the signal fires (true) or `timeout` passes (false).
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let fired = lock(&self.inner.fired);
        let (fired, _) = self
            .inner
            .cond
            .wait_timeout_while(fired, timeout, |fired| !*fired)
            .unwrap_or_else(|e| e.into_inner());
        *fired
    }

    /// Readable once the signal fired; never read from it, just poll it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.trigger.fd()
    }
}
