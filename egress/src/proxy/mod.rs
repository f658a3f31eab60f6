//! One allowed guest connection: the smoltcp socket the guest talks to and the host socket to
//! the real destination, with bytes pumped both ways. Backpressure comes from the buffers
//! themselves: guest bytes are written upstream straight out of smoltcp's receive buffer (a full
//! upstream socket leaves them there and the guest's window closes), and upstream bytes are read
//! straight into smoltcp's send buffer only while it has room.

pub mod ca_endpoint;
pub mod filter;
pub mod intercept;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

use crate::audit::AuditEvent;
use crate::inspect::{self, RequestHead, RequestRewriter};
use crate::limits::RuleCounters;
use crate::policy::Rule;
use crate::recorder::Recorder;
use crate::stack::Stack;
use filter::{Filter, Seen, Verdict};
use intercept::{Intercepted, Interception};

/// An upstream that has not accepted the connection by then is given up on (guest gets RST).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A guest that started a TLS ClientHello or HTTP request head on a domain-rule connection must
/// finish it within this long, or the connection is refused (the name could not be checked).
pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Guest bytes the HTTP path takes at once; its output waits for upstream before more is taken,
/// so this bounds what the connection buffers beyond smoltcp's own buffers.
const HTTP_BATCH: usize = 64 * 1024;

/// The guest's side of a connection: its own address and the destination it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: SocketAddrV4,
    pub destination: SocketAddrV4,
}

enum Upstream {
    Connecting { deadline: Instant },
    Connected,
}

/// Whether a connection still needs pumping.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Open,
    Finished,
}

pub struct Connection {
    pub key: FlowKey,
    socket: SocketHandle,
    stream: TcpStream,
    rule: Arc<Rule>,
    names: Vec<String>,
    upstream: Upstream,
    filter: Filter,
    /// Set once the filter let the guest's bytes through.
    passed: bool,
    /// For a connection that speaks HTTP: every request head is found (and checked) on its
    /// way upstream, not just the first.
    http: Option<RequestRewriter>,
    /// For an intercepted HTTPS connection (a rule with credential headers): the TLS session
    /// between the guest and upstream.
    tls: Option<Box<Intercepted>>,
    /// Guest bytes the HTTP or TLS path produced that upstream has not taken yet.
    pending_up: Vec<u8>,
    upstream_write_shut: bool,
    upstream_eof: bool,
    bytes_up: u64,
    bytes_down: u64,
    reported_up: u64,
    reported_down: u64,
    opened: Instant,
    /// Set when the guest's first bytes did not yet show a verdict.
    inspect_deadline: Option<Instant>,
    /// Why the connection ended early, for its close event.
    failure: Option<String>,
}

/// What a connection needs from the loop while it pumps.
pub struct Context<'a> {
    pub stack: &'a mut Stack,
    pub registry: &'a Registry,
    pub counters: &'a mut RuleCounters,
    pub recorder: &'a Recorder,
    pub interception: &'a Interception,
    pub now: Instant,
}

impl Connection {
    /// Starts the upstream connect for a connection the policy allowed. `names`: the names the
    /// guest resolved the destination by; when the rule allows one of them, the rule is a
    /// domain rule and the guest's SNI / Host must match it too.
    pub fn open(
        key: FlowKey,
        socket: SocketHandle,
        rule: Arc<Rule>,
        names: Vec<String>,
        token: Token,
        registry: &Registry,
        now: Instant,
    ) -> io::Result<Self> {
        let mut stream = TcpStream::connect(SocketAddr::V4(key.destination))?;
        // The guest's own TCP already coalesced what it sent; Nagle here would only delay the
        // last small piece of each request by an upstream round trip.
        stream.set_nodelay(true)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let port = key.destination.port();
        let by_domain = names.iter().any(|name| rule.matches_name(name, port));
        let filter = Filter::new(by_domain.then(|| rule.clone()), port);
        Ok(Self {
            key,
            socket,
            stream,
            rule,
            names,
            upstream: Upstream::Connecting {
                deadline: now + CONNECT_TIMEOUT,
            },
            filter,
            passed: false,
            http: None,
            tls: None,
            pending_up: Vec::new(),
            upstream_write_shut: false,
            upstream_eof: false,
            bytes_up: 0,
            bytes_down: 0,
            reported_up: 0,
            reported_down: 0,
            opened: now,
            inspect_deadline: None,
            failure: None,
        })
    }

    /// When the loop must look at this connection even without events.
    pub fn deadline(&self) -> Option<Instant> {
        let connect = match self.upstream {
            Upstream::Connecting { deadline } => Some(deadline),
            Upstream::Connected => None,
        };
        let inspect = self
            .inspect_deadline
            .filter(|_| !self.passed && self.failure.is_none());
        connect.into_iter().chain(inspect).min()
    }

    /// Moves whatever can move; call after every poll of the stack and every socket event.
    pub fn pump(&mut self, cx: &mut Context<'_>) -> Progress {
        if self.is_closed(cx.stack) {
            return Progress::Finished;
        }
        // The SYN that made this socket never reached it (smoltcp dropped it as malformed).
        if cx.stack.tcp(self.socket).state() == State::Listen
            && cx.now >= self.opened + CONNECT_TIMEOUT
        {
            self.failure = Some("the guest's SYN never arrived".into());
            return Progress::Finished;
        }
        if let Upstream::Connecting { deadline } = self.upstream {
            match self.connect_progress() {
                Ok(true) => self.upstream = Upstream::Connected,
                Ok(false) if cx.now >= deadline => {
                    return self.fail(
                        cx,
                        format!("upstream connect timed out after {CONNECT_TIMEOUT:?}"),
                    );
                }
                Ok(false) => {}
                Err(error) => return self.fail(cx, format!("upstream connect failed: {error}")),
            }
        }
        if self.tls.is_some() {
            if let Upstream::Connecting { .. } = self.upstream {
                return Progress::Open;
            }
            return self.pump_intercepted(cx);
        }
        if self.failure.is_some() {
            // Refused or failed: the guest side is closing; nothing more to move or judge.
            return Progress::Open;
        }
        let judged = self.passed || self.judge(cx);
        if self.tls.is_some() {
            // Interception just started: the guest's hello still waits in its socket for the
            // session, which talks to upstream once connected.
            if let Upstream::Connecting { .. } = self.upstream {
                return Progress::Open;
            }
            return self.pump_intercepted(cx);
        }
        if let Upstream::Connecting { .. } = self.upstream {
            return Progress::Open;
        }
        // Until the guest's first bytes are judged, only upstream's bytes move: a server that
        // speaks first (SMTP, databases) must reach a guest that waits for it.
        if judged {
            if let Err(progress) = self.guest_to_upstream(cx) {
                return progress;
            }
        }
        if let Err(progress) = self.upstream_to_guest(cx) {
            return progress;
        }
        Progress::Open
    }

    /// Ok(true) once connected; errors are the connect's own failure.
    fn connect_progress(&mut self) -> io::Result<bool> {
        if let Some(error) = self.stream.take_error()? {
            return Err(error);
        }
        match self.stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Runs the filter over the guest's first bytes; false while there is no verdict yet.
    fn judge(&mut self, cx: &mut Context<'_>) -> bool {
        let socket = cx.stack.tcp(self.socket);
        let queued = socket.recv_queue();
        let guest_done = guest_finished_sending(socket.state());
        if queued == 0 && !guest_done {
            return false;
        }
        let timed_out = self
            .inspect_deadline
            .is_some_and(|deadline| cx.now >= deadline);
        let complete = guest_done || timed_out || socket.recv_capacity() == queued;
        // Nothing has been read from this fresh socket, so its buffer holds the bytes
        // contiguously from the start.
        let first = socket.peek(queued).unwrap_or(&[]);
        match self.filter.inspect(first, complete) {
            Verdict::NeedMore => {
                self.inspect_deadline
                    .get_or_insert(cx.now + INSPECT_TIMEOUT);
                false
            }
            Verdict::Pass(seen) => {
                self.passed = true;
                if seen.http {
                    // Every request gets the rule's credential headers (replacing any the guest
                    // sent under those names); the requests are audited (and their Host
                    // checked) as the rewriter finds them.
                    self.http = Some(RequestRewriter::new(self.injected_headers()));
                } else if self.wants_interception(&seen) {
                    self.start_interception(cx, seen);
                } else if seen.is_application() {
                    cx.recorder.record(self.request_event(seen, "allow", None));
                }
                true
            }
            Verdict::Deny { seen, reason, http } => {
                cx.recorder
                    .record(self.request_event(seen, "deny", Some(reason.clone())));
                let socket = cx.stack.tcp(self.socket);
                if http {
                    // The guest's request is discarded; the socket buffer has room for a
                    // short answer since nothing else was sent yet.
                    let _ = socket.recv(|data| (data.len(), ()));
                    let _ = socket.send_slice(&inspect::error_response(403, &reason));
                    socket.close();
                } else {
                    socket.abort();
                }
                self.failure = Some(reason);
                self.drop_upstream(cx.registry);
                true
            }
        }
    }

    fn guest_to_upstream(&mut self, cx: &mut Context<'_>) -> Result<(), Progress> {
        if self.failure.is_some() {
            return Ok(());
        }
        let (moved, write_error) = if self.http.is_some() {
            self.http_to_upstream(cx)?
        } else {
            self.raw_to_upstream(cx)
        };
        self.bytes_up += moved;
        if let Some(error) = write_error {
            return Err(self.fail(cx, format!("upstream write failed: {error}")));
        }
        if moved > 0 {
            if let Err(reason) = cx.counters.add_bytes(&self.rule, moved) {
                return Err(self.fail(cx, reason.to_string()));
            }
        }
        let socket = cx.stack.tcp(self.socket);
        let guest_done = guest_finished_sending(socket.state())
            && socket.recv_queue() == 0
            && self.pending_up.is_empty();
        if guest_done && !self.upstream_write_shut {
            self.upstream_write_shut = true;
            // The guest sent FIN: pass the half-close on. Failing means upstream is gone, which
            // the read side reports.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Bytes go upstream straight out of smoltcp's receive buffer. Returns the bytes moved and
    /// a write error other than WouldBlock.
    fn raw_to_upstream(&mut self, cx: &mut Context<'_>) -> (u64, Option<io::Error>) {
        let socket = cx.stack.tcp(self.socket);
        let stream = &mut self.stream;
        let mut moved = 0u64;
        let mut write_error = None;
        while socket.recv_queue() > 0 {
            let wrote = socket.recv(|data| match stream.write(data) {
                Ok(n) => (n, n),
                Err(error) => {
                    if error.kind() != io::ErrorKind::WouldBlock {
                        write_error = Some(error);
                    }
                    (0, 0)
                }
            });
            match wrote {
                Ok(0) | Err(_) => break,
                Ok(n) => moved += n as u64,
            }
        }
        (moved, write_error)
    }

    /// Bytes pass the request rewriter, which finds every request head; each must name a host
    /// the rule allows. Guest bytes are taken only once upstream took the previous batch.
    fn http_to_upstream(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Result<(u64, Option<io::Error>), Progress> {
        let mut moved = 0u64;
        loop {
            if let Err(error) = self.flush_pending() {
                return Ok((moved, Some(error)));
            }
            if !self.pending_up.is_empty() {
                return Ok((moved, None));
            }
            let socket = cx.stack.tcp(self.socket);
            let Some(rewriter) = self.http.as_mut() else {
                return Ok((moved, None));
            };
            let mut out = Vec::new();
            let fed = socket.recv(|data| {
                let take = data.len().min(HTTP_BATCH);
                (take, (take, rewriter.feed(&data[..take], &mut out)))
            });
            let heads = match fed {
                Ok((0, _)) | Err(_) => return Ok((moved, None)),
                Ok((taken, Ok(heads))) => {
                    moved += taken as u64;
                    heads
                }
                Ok((_, Err(error))) => {
                    let reason = error.to_string();
                    cx.recorder.record(AuditEvent {
                        reason: Some(reason.clone()),
                        ..self.event("http", "deny")
                    });
                    return Err(self.fail(cx, reason));
                }
            };
            for head in heads {
                if let Err(reason) = self.check_request(&head) {
                    cx.recorder.record(self.request_event(
                        seen_of(head),
                        "deny",
                        Some(reason.clone()),
                    ));
                    return Err(self.fail(cx, reason));
                }
                cx.recorder
                    .record(self.request_event(seen_of(head), "allow", None));
            }
            self.pending_up = out;
        }
    }

    fn check_request(&self, head: &RequestHead) -> Result<(), String> {
        self.filter.check_name(head.host.as_deref(), true)
    }

    /// Writes what the HTTP path holds for upstream until it is empty or upstream is full.
    fn flush_pending(&mut self) -> io::Result<()> {
        let mut written = 0;
        while written < self.pending_up.len() {
            match self.stream.write(&self.pending_up[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        self.pending_up.drain(..written);
        Ok(())
    }

    fn upstream_to_guest(&mut self, cx: &mut Context<'_>) -> Result<(), Progress> {
        if self.upstream_eof || self.failure.is_some() {
            return Ok(());
        }
        let socket = cx.stack.tcp(self.socket);
        let stream = &mut self.stream;
        let mut moved = 0u64;
        let mut read_result: io::Result<()> = Ok(());
        let mut eof = false;
        while socket.can_send() && !eof && read_result.is_ok() {
            let read = socket.send(|space| match stream.read(space) {
                Ok(0) => {
                    eof = true;
                    (0, 0)
                }
                Ok(n) => (n, n),
                Err(error) => {
                    read_result = Err(error);
                    (0, 0)
                }
            });
            match read {
                Ok(n) if n > 0 => moved += n as u64,
                _ => break,
            }
        }
        self.bytes_down += moved;
        match read_result {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {
                cx.stack.tcp(self.socket).abort();
                self.failure = Some("upstream reset the connection".into());
                self.drop_upstream(cx.registry);
                return Err(Progress::Open);
            }
            Err(error) => return Err(self.fail(cx, format!("upstream read failed: {error}"))),
            Ok(()) => {}
        }
        if moved > 0 {
            if let Err(reason) = cx.counters.add_bytes(&self.rule, moved) {
                return Err(self.fail(cx, reason.to_string()));
            }
        }
        if eof {
            self.upstream_eof = true;
            // FIN to the guest once the buffered bytes are out.
            cx.stack.tcp(self.socket).close();
        }
        Ok(())
    }

    /// Resets the guest's connection and lets go of upstream.
    fn fail(&mut self, cx: &mut Context<'_>, reason: String) -> Progress {
        cx.stack.tcp(self.socket).abort();
        self.tls = None;
        self.failure = Some(reason);
        self.drop_upstream(cx.registry);
        Progress::Open
    }

    fn drop_upstream(&mut self, registry: &Registry) {
        // Reads and writes now fail fast; the descriptor closes when the connection is dropped.
        let _ = registry.deregister(&mut self.stream);
        let _ = self.stream.shutdown(Shutdown::Both);
        self.upstream_eof = true;
        self.upstream_write_shut = true;
    }

    /// Removes the guest socket and writes the close event; the upstream socket closes on drop.
    pub fn finish(mut self, stack: &mut Stack, registry: &Registry, recorder: &Recorder) {
        let _ = registry.deregister(&mut self.stream);
        stack.sockets.remove(self.socket);
        let mut event = self.event("close", "allow");
        event.bytes_up = self.bytes_up;
        event.bytes_down = self.bytes_down;
        event.reason = self.failure.take();
        recorder.record(event);
    }

    /// Whether the guest side is gone: the connection can be finished.
    pub fn is_closed(&self, stack: &mut Stack) -> bool {
        matches!(
            stack.tcp(self.socket).state(),
            State::Closed | State::TimeWait
        )
    }

    /// Bytes moved (up, down) since the last call, for the live statistics.
    pub fn unreported_bytes(&mut self) -> (u64, u64) {
        let fresh = (
            self.bytes_up - self.reported_up,
            self.bytes_down - self.reported_down,
        );
        self.reported_up = self.bytes_up;
        self.reported_down = self.bytes_down;
        fresh
    }

    fn event(&self, kind: &'static str, decision: &'static str) -> AuditEvent {
        AuditEvent {
            kind,
            protocol: Some("tcp"),
            dest_ip: Some((*self.key.destination.ip()).into()),
            dest_port: Some(self.key.destination.port()),
            domain: (!self.names.is_empty()).then(|| self.names.join(",")),
            decision,
            rule: Some(self.rule.id.clone()),
            ..AuditEvent::default()
        }
    }

    fn request_event(
        &self,
        seen: Seen,
        decision: &'static str,
        reason: Option<String>,
    ) -> AuditEvent {
        AuditEvent {
            sni: seen.sni,
            host: seen.host,
            method: seen.method,
            path: seen.path,
            reason,
            ..self.event("http", decision)
        }
    }
}

fn seen_of(head: RequestHead) -> Seen {
    Seen {
        http: true,
        host: head.host,
        method: Some(head.method),
        path: Some(head.path),
        sni: None,
    }
}

/// Whether the guest has sent its FIN (or the connection is gone): no more bytes will come.
fn guest_finished_sending(state: State) -> bool {
    matches!(
        state,
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait | State::Closed
    )
}
