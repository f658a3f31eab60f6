//! HTTPS credential injection on a live connection: when the rule that allowed a connection
//! carries `inject_headers` and the guest opens it with a TLS ClientHello naming a host that rule
//! allows, the guest's TLS is terminated by a [`MitmSession`] (leaf from the sandbox CA the guest
//! trusts), each request head is checked (Host) and audited, the rule's headers are injected,
//! and the requests are re-encrypted to the real server, whose certificate is verified.
//!
//! Connections under rules without credentials are never intercepted: they pass through with
//! only the SNI check.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::Arc;

use rustls::ClientConfig;

use super::filter::Seen;
use super::{guest_finished_sending, Connection, Context, Progress, HTTP_BATCH};
use crate::inspect::RequestRewriter;
use crate::tls::{MitmSession, SandboxCa, TlsError};

/// What every intercepted connection of one sandbox shares: made once when the egress thread
/// starts (the CA key is generated and the upstream roots are read on the calling thread).
pub struct Interception {
    pub ca: SandboxCa,
    /// Verifies the real servers: webpki roots plus the host's extra roots.
    pub upstream: Arc<ClientConfig>,
}

impl Interception {
    /// A fresh CA for `sandbox`; `upstream` from [`crate::tls::upstream_client_config`].
    pub fn new(sandbox: &str, upstream: Arc<ClientConfig>) -> Result<Self, TlsError> {
        Ok(Self {
            ca: SandboxCa::generate(sandbox)?,
            upstream,
        })
    }
}

/// The interception state a connection carries.
pub(super) struct Intercepted {
    session: MitmSession,
    sni: String,
    /// TLS bytes for the guest that its smoltcp send buffer has no room for yet.
    pending_down: Vec<u8>,
    guest_fin_sent: bool,
}

impl Connection {
    /// Whether the guest's first bytes (`seen`) call for interception: a ClientHello with a
    /// server name, on a connection a rule with credential headers allowed.
    pub(super) fn wants_interception(&self, seen: &Seen) -> bool {
        !seen.http && seen.sni.is_some() && !self.rule.inject_headers().is_empty()
    }

    /// Starts intercepting; the ClientHello is still in the guest socket's receive buffer and
    /// is the first thing the session is fed.
    pub(super) fn start_interception(&mut self, cx: &mut Context<'_>, seen: Seen) {
        let sni = seen.sni.clone().unwrap_or_default();
        let rewriter = RequestRewriter::new(self.injected_headers());
        match MitmSession::new(
            &cx.interception.ca,
            &sni,
            Arc::clone(&cx.interception.upstream),
            rewriter,
        ) {
            Ok(session) => {
                self.tls = Some(Box::new(Intercepted {
                    session,
                    sni,
                    pending_down: Vec::new(),
                    guest_fin_sent: false,
                }));
            }
            Err(error) => {
                let reason = format!("cannot intercept TLS for {sni}: {error}");
                cx.recorder
                    .record(self.request_event(seen, "deny", Some(reason.clone())));
                self.fail(cx, reason);
            }
        }
    }

    /// Moves an intercepted connection along: guest TLS in, upstream TLS in, then both outputs,
    /// over and over while anything moves. One round moves only what the session's and rustls'
    /// buffers hold, and a round that emptied a buffer without filling a socket produces no
    /// further socket event, so stopping early could leave the connection stalled.
    pub(super) fn pump_intercepted(&mut self, cx: &mut Context<'_>) -> Progress {
        loop {
            let moved = self.intercept_from_guest(cx).and_then(|from_guest| {
                Ok(from_guest + self.intercept_from_upstream(cx)? + self.intercept_flush(cx)?)
            });
            match moved {
                Ok(0) => return Progress::Open,
                Ok(_) if self.tls.is_some() => {}
                Ok(_) => return Progress::Open,
                Err(progress) => return progress,
            }
        }
    }

    /// Guest TLS bytes taken from its socket into the session.
    fn intercept_from_guest(&mut self, cx: &mut Context<'_>) -> Result<u64, Progress> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        let socket = cx.stack.tcp(self.socket);
        let mut moved = 0u64;
        let mut failed = None;
        while socket.can_recv() && failed.is_none() {
            let session = &mut tls.session;
            // After the guest's close_notify (or a refusal) its further bytes mean nothing;
            // they are taken and dropped so its window stays open for its FIN.
            let discard = !session.wants_from_guest() && session.guest_closed();
            if !discard && !session.wants_from_guest() {
                break; // backpressure: upstream has not taken the last requests yet
            }
            let taken = socket.recv(|data| {
                let take = data.len().min(HTTP_BATCH);
                if !discard {
                    if let Err(error) = session.from_guest(&data[..take]) {
                        failed = Some(error);
                    }
                }
                (take, take)
            });
            match taken {
                Ok(0) | Err(_) => break,
                Ok(n) => moved += n as u64,
            }
        }
        if guest_finished_sending(socket.state()) && socket.recv_queue() == 0 {
            tls.session.guest_eof();
        }
        self.bytes_up += moved;
        if moved > 0 {
            if let Err(reason) = cx.counters.add_bytes(&self.rule, moved) {
                return Err(self.fail(cx, reason.to_string()));
            }
        }
        // Each request is judged before `to_upstream` hands any of it to the server.
        let heads = self
            .tls
            .as_mut()
            .map(|tls| tls.session.heads())
            .unwrap_or_default();
        for head in heads {
            let mut seen = super::seen_of(head);
            seen.sni = self.tls.as_ref().map(|tls| tls.sni.clone());
            if let Err(reason) = self.filter.check_name(seen.host.as_deref(), true) {
                cx.recorder
                    .record(self.request_event(seen, "deny", Some(reason.clone())));
                if let Some(tls) = self.tls.as_mut() {
                    tls.session.reject(403, &reason);
                }
                self.failure.get_or_insert(reason);
                break;
            }
            cx.recorder.record(self.request_event(seen, "allow", None));
        }
        if let Some(error) = failed {
            self.intercept_failed(cx, &error);
        }
        Ok(moved)
    }

    /// Upstream TLS bytes read into the session.
    fn intercept_from_upstream(&mut self, cx: &mut Context<'_>) -> Result<u64, Progress> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        let mut buffer = [0u8; 16 * 1024];
        let mut failed = None;
        let mut moved = 0u64;
        while !self.upstream_eof && tls.session.wants_from_upstream() && failed.is_none() {
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    self.upstream_eof = true;
                    tls.session.upstream_eof();
                }
                Ok(n) => {
                    moved += n as u64;
                    if let Err(error) = tls.session.from_upstream(&buffer[..n]) {
                        failed = Some(error);
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.upstream_eof = true;
                    tls.session.upstream_eof();
                    self.failure
                        .get_or_insert(format!("upstream read failed: {error}"));
                }
            }
        }
        if let Some(error) = failed {
            self.intercept_failed(cx, &error);
        }
        Ok(moved)
    }

    /// A TLS or HTTP failure on either side: the session already queued what the guest gets
    /// (a TLS alert, or a 400 / 502 with the reason); the audit line says why.
    fn intercept_failed(&mut self, cx: &mut Context<'_>, error: &TlsError) {
        let reason = error.to_string();
        let sni = self.tls.as_ref().map(|tls| tls.sni.clone());
        let seen = Seen {
            sni,
            ..Seen::default()
        };
        cx.recorder
            .record(self.request_event(seen, "deny", Some(reason.clone())));
        self.failure.get_or_insert(reason);
    }

    /// Session output written to both sockets: the bytes written.
    fn intercept_flush(&mut self, cx: &mut Context<'_>) -> Result<u64, Progress> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        // Upstream: take more from the session only once the last batch is written.
        if self.pending_up.is_empty() && !self.upstream_write_shut {
            tls.session.to_upstream(&mut self.pending_up);
        }
        let waiting_up = self.pending_up.len();
        if let Err(error) = self.flush_pending() {
            return Err(self.fail(cx, format!("upstream write failed: {error}")));
        }
        let written_up = (waiting_up - self.pending_up.len()) as u64;
        let Some(tls) = self.tls.as_mut() else {
            return Ok(written_up);
        };
        if self.pending_up.is_empty()
            && tls.session.finished_to_upstream()
            && !self.upstream_write_shut
        {
            self.upstream_write_shut = true;
            // Failing means upstream is gone, which the read side reports.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        // Guest: the same, bounded by smoltcp's send buffer.
        if tls.pending_down.is_empty() {
            tls.session.to_guest(&mut tls.pending_down);
        }
        let socket = cx.stack.tcp(self.socket);
        let mut moved = 0u64;
        while !tls.pending_down.is_empty() && socket.can_send() {
            match socket.send_slice(&tls.pending_down) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tls.pending_down.drain(..n);
                    moved += n as u64;
                }
            }
        }
        if tls.pending_down.is_empty() && tls.session.finished_to_guest() && !tls.guest_fin_sent {
            tls.guest_fin_sent = true;
            // FIN once the buffered bytes are out; the guest may still send its own close.
            socket.close();
        }
        self.bytes_down += moved;
        if moved > 0 {
            if let Err(reason) = cx.counters.add_bytes(&self.rule, moved) {
                return Err(self.fail(cx, reason.to_string()));
            }
        }
        Ok(written_up + moved)
    }

    /// The rule's credential headers as (name, value) pairs for a request rewriter.
    pub(super) fn injected_headers(&self) -> Vec<(String, String)> {
        self.rule
            .inject_headers()
            .iter()
            .map(|header| (header.name.clone(), header.value.expose().to_owned()))
            .collect()
    }
}
