//! One intercepted HTTPS connection, sans-IO: the guest's TLS terminates in a rustls server
//! connection (with a leaf from the sandbox CA), its requests pass through the header-injecting
//! rewriter, and a rustls client connection re-encrypts them to the real server, verifying that
//! server's certificate. The caller moves ciphertext between this session and two sockets.
//!
//! Rewritten plaintext is handed to the upstream TLS connection only in `to_upstream`, so a
//! caller can look at `heads()` after `from_guest` and `reject()` a request (e.g. a Host that
//! does not match the rule) before any of it, or its injected credential, leaves the VMM.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConnection};

use super::{SandboxCa, TlsError, ALPN_HTTP1};
use crate::inspect::{error_response, RequestHead, RequestRewriter};

/// Plaintext held for one direction before `wants_from_guest` / `wants_from_upstream` ask the
/// caller to stop reading that side (the peer then sees TCP backpressure).
const MAX_BACKLOG: usize = 256 * 1024;

/// An intercepted TLS connection between the guest and one upstream server.
pub struct MitmSession {
    guest: ServerConnection,
    upstream: ClientConnection,
    rewriter: RequestRewriter,
    /// Rewritten guest plaintext not yet given to the upstream TLS connection.
    pending_up: Vec<u8>,
    /// Upstream plaintext not yet given to the guest TLS connection.
    pending_down: Vec<u8>,
    heads: Vec<RequestHead>,
    /// The guest will send no more (close_notify, TCP EOF, or its TLS failed).
    guest_finished: bool,
    /// The upstream server will send no more.
    upstream_finished: bool,
    guest_close_sent: bool,
    upstream_close_sent: bool,
    /// A request was refused (or a side failed): nothing more is forwarded in either direction,
    /// only the answer to the guest and the closes.
    rejected: bool,
}

impl fmt::Debug for MitmSession {
    // The buffers hold injected credentials: print only their sizes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MitmSession")
            .field("rewriter", &self.rewriter)
            .field("pending_up", &self.pending_up.len())
            .field("pending_down", &self.pending_down.len())
            .field("guest_finished", &self.guest_finished)
            .field("upstream_finished", &self.upstream_finished)
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

impl MitmSession {
    /// A session for a guest connection whose ClientHello named `sni`. The guest is shown a
    /// certificate for `sni` signed by `ca`; the upstream connection verifies the real server
    /// for `sni` against `upstream`'s roots. Both sides offer only HTTP/1.1.
    pub fn new(
        ca: &SandboxCa,
        sni: &str,
        upstream: Arc<ClientConfig>,
        rewriter: RequestRewriter,
    ) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(sni.to_ascii_lowercase())
            .map_err(|_| TlsError::BadServerName(sni.to_owned()))?;
        let guest = ServerConnection::new(ca.server_config(sni)?).map_err(TlsError::Config)?;
        let upstream =
            ClientConnection::new_with_alpn(upstream, server_name, vec![ALPN_HTTP1.to_vec()])
                .map_err(TlsError::Config)?;
        Ok(Self {
            guest,
            upstream,
            rewriter,
            pending_up: Vec::new(),
            pending_down: Vec::new(),
            heads: Vec::new(),
            guest_finished: false,
            upstream_finished: false,
            guest_close_sent: false,
            upstream_close_sent: false,
            rejected: false,
        })
    }

    /// TLS bytes received from the guest (starting with the ClientHello the filter peeked).
    /// On an error, call `to_guest` once more (it carries the TLS alert or an HTTP 400) and
    /// close both connections.
    pub fn from_guest(&mut self, mut tls_bytes: &[u8]) -> Result<(), TlsError> {
        while !tls_bytes.is_empty() && !self.guest_finished {
            let processed = match self.guest.read_tls(&mut tls_bytes) {
                // rustls takes nothing more once it has seen close_notify.
                Ok(0) => break,
                Ok(_) => self.guest.process_new_packets().map(|_| ()),
                Err(error) => Err(rustls::Error::General(error.to_string())),
            };
            if let Err(error) = processed {
                self.fail_guest();
                return Err(TlsError::Guest(error));
            }
            self.drain_guest_plaintext()?;
        }
        Ok(())
    }

    /// The guest's TCP stream ended (with or without a close_notify before it).
    pub fn guest_eof(&mut self) {
        self.guest_finished = true;
    }

    /// TLS bytes received from the upstream server. An untrusted or invalid server
    /// certificate is `TlsError::UpstreamCertificate`; the guest is then answered 502 with the
    /// reason (flush it with `to_guest`) and both connections should be closed.
    pub fn from_upstream(&mut self, mut tls_bytes: &[u8]) -> Result<(), TlsError> {
        while !tls_bytes.is_empty() && !self.upstream_finished {
            let processed = match self.upstream.read_tls(&mut tls_bytes) {
                // rustls takes nothing more once it has seen close_notify.
                Ok(0) => break,
                Ok(_) => self.upstream.process_new_packets().map(|_| ()),
                Err(error) => Err(rustls::Error::General(error.to_string())),
            };
            if let Err(error) = processed {
                let error = match error {
                    rustls::Error::InvalidCertificate(reason) => {
                        TlsError::UpstreamCertificate(reason)
                    }
                    other => TlsError::Upstream(other),
                };
                self.fail_upstream(&error);
                return Err(error);
            }
            self.drain_upstream_plaintext();
        }
        Ok(())
    }

    /// The upstream server's TCP stream ended.
    pub fn upstream_eof(&mut self) {
        self.upstream_finished = true;
    }

    /// Appends the TLS bytes to send to the guest to `out`.
    pub fn to_guest(&mut self, out: &mut Vec<u8>) {
        push_plaintext(&mut self.pending_down, self.guest.writer());
        let nothing_more = self.upstream_finished || self.rejected;
        // A close_notify sent mid-handshake would overtake the plaintext rustls holds until the
        // handshake completes (such as a 502 telling the guest why).
        let handshake_done = !self.guest.is_handshaking();
        if nothing_more && handshake_done && self.pending_down.is_empty() && !self.guest_close_sent
        {
            self.guest.send_close_notify();
            self.guest_close_sent = true;
        }
        while self.guest.wants_write() {
            if !matches!(self.guest.write_tls(out), Ok(n) if n > 0) {
                break;
            }
        }
    }

    /// Appends the TLS bytes to send to the upstream server to `out`: the handshake, then the
    /// guest's rewritten requests.
    pub fn to_upstream(&mut self, out: &mut Vec<u8>) {
        if !self.rejected {
            push_plaintext(&mut self.pending_up, self.upstream.writer());
        }
        let nothing_more = self.guest_finished || self.rejected;
        if nothing_more
            && (self.pending_up.is_empty() || self.rejected)
            && !self.upstream_close_sent
        {
            self.upstream.send_close_notify();
            self.upstream_close_sent = true;
        }
        while self.upstream.wants_write() {
            if !matches!(self.upstream.write_tls(out), Ok(n) if n > 0) {
                break;
            }
        }
    }

    /// Drains the request heads the guest sent since the last call (for the audit log and the
    /// Host check).
    pub fn heads(&mut self) -> Vec<RequestHead> {
        std::mem::take(&mut self.heads)
    }

    /// Refuses the connection from here on: rewritten requests not yet sent upstream are
    /// dropped, the guest gets an HTTP response `status` with `reason` as its JSON
    /// `fault_message`, and both sides are closed.
    pub fn reject(&mut self, status: u16, reason: &str) {
        if self.rejected {
            return;
        }
        self.rejected = true;
        self.pending_up.clear();
        self.pending_down.clear();
        if !self.guest_close_sent {
            self.pending_down
                .extend_from_slice(&error_response(status, reason));
        }
    }

    /// Whether the guest has finished sending (close_notify or EOF).
    pub fn guest_closed(&self) -> bool {
        self.guest_finished
    }

    /// Whether the upstream server has finished sending (close_notify or EOF).
    pub fn upstream_closed(&self) -> bool {
        self.upstream_finished
    }

    /// Whether a request was refused or a side failed: the caller should flush `to_guest` and
    /// `to_upstream` once more and close both connections.
    pub fn is_rejected(&self) -> bool {
        self.rejected
    }

    /// Whether both directions are closed and everything has been handed out: the caller can
    /// close both sockets.
    pub fn is_done(&self) -> bool {
        let guest_side =
            self.guest_close_sent && self.pending_down.is_empty() && !self.guest.wants_write();
        let upstream_side = self.upstream_close_sent && !self.upstream.wants_write();
        let both_finished = (self.guest_finished && self.upstream_finished) || self.rejected;
        both_finished && guest_side && upstream_side
    }

    /// Whether everything for the guest, its close_notify (or alert) last, has been handed out
    /// by `to_guest`: the caller can send its TCP FIN.
    pub fn finished_to_guest(&self) -> bool {
        self.guest_close_sent && self.pending_down.is_empty() && !self.guest.wants_write()
    }

    /// Whether everything for the upstream server, its close_notify (or alert) last, has been
    /// handed out by `to_upstream`: the caller can shut down the upstream socket's write side.
    pub fn finished_to_upstream(&self) -> bool {
        self.upstream_close_sent && !self.upstream.wants_write()
    }

    /// Whether the caller may read more from the guest: false while the rewritten plaintext
    /// waiting for the upstream connection is over the backlog limit.
    pub fn wants_from_guest(&self) -> bool {
        !self.guest_finished && self.pending_up.len() < MAX_BACKLOG
    }

    /// Whether the caller may read more from the upstream server.
    pub fn wants_from_upstream(&self) -> bool {
        !self.upstream_finished && self.pending_down.len() < MAX_BACKLOG
    }

    fn drain_guest_plaintext(&mut self) -> Result<(), TlsError> {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let n = match self.guest.reader().read(&mut buffer) {
                Ok(0) => {
                    self.guest_finished = true;
                    return Ok(());
                }
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // UnexpectedEof: the stream was cut without close_notify.
                Err(_) => {
                    self.guest_finished = true;
                    return Ok(());
                }
            };
            if self.rejected {
                continue;
            }
            match self.rewriter.feed(&buffer[..n], &mut self.pending_up) {
                Ok(heads) => self.heads.extend(heads),
                Err(error) => {
                    self.reject(400, &error.to_string());
                    return Err(TlsError::BadRequest(error));
                }
            }
        }
    }

    fn drain_upstream_plaintext(&mut self) {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match self.upstream.reader().read(&mut buffer) {
                Ok(0) => {
                    self.upstream_finished = true;
                    return;
                }
                Ok(n) if !self.rejected => self.pending_down.extend_from_slice(&buffer[..n]),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.upstream_finished = true;
                    return;
                }
            }
        }
    }

    /// The guest's TLS failed: rustls has queued an alert for it; the upstream side is closed.
    fn fail_guest(&mut self) {
        self.guest_finished = true;
        self.guest_close_sent = true;
        self.rejected = true;
        self.pending_up.clear();
        self.pending_down.clear();
    }

    /// The upstream TLS failed: the guest is told why with a 502; rustls has queued an alert
    /// for the server.
    fn fail_upstream(&mut self, error: &TlsError) {
        self.upstream_finished = true;
        self.upstream_close_sent = true;
        self.reject(502, &error.to_string());
    }
}

/// Moves as much of `pending` into a TLS connection's plaintext writer as it accepts (before
/// its handshake completes it buffers only up to its limit).
fn push_plaintext(pending: &mut Vec<u8>, mut writer: rustls::Writer<'_>) {
    while !pending.is_empty() {
        match writer.write(pending) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                pending.drain(..n);
            }
        }
    }
}
