//! The one service the filter answers itself: `GET http://<gateway>/agentvm/egress-ca.pem`
//! returns the sandbox CA certificate, so the guest agent can install it in the guest's trust
//! store without anything reaching the network. Any other request on the gateway's port 80 gets
//! a 404; every other gateway port stays refused (the policy never allows the gateway).

use std::net::{IpAddr, SocketAddrV4};
use std::time::Instant;

use agentvm_protocol::net::{EGRESS_CA_PATH, EGRESS_CA_PORT, GATEWAY_ADDR};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

use super::{guest_finished_sending, Progress, INSPECT_TIMEOUT};
use crate::audit::AuditEvent;
use crate::inspect::{error_response, http, RequestHead};
use crate::recorder::Recorder;
use crate::stack::Stack;

/// Where the guest fetches the CA certificate.
pub const CA_PATH: &str = EGRESS_CA_PATH;
/// The port the filter serves the CA on (plain HTTP: the guest cannot verify anything yet).
pub const CA_PORT: u16 = EGRESS_CA_PORT;

/// Whether a guest connection to `destination` is for the CA endpoint.
pub fn is_ca_endpoint(destination: SocketAddrV4) -> bool {
    destination == SocketAddrV4::new(GATEWAY_ADDR, CA_PORT)
}

/// One guest connection to the CA endpoint: one request, one answer, then close.
pub struct CaRequest {
    socket: SocketHandle,
    /// The request head must be complete by then.
    deadline: Instant,
    answered: bool,
}

impl CaRequest {
    pub fn new(socket: SocketHandle, now: Instant) -> Self {
        Self {
            socket,
            deadline: now + INSPECT_TIMEOUT,
            answered: false,
        }
    }

    /// When the loop must look at this request without events.
    pub fn deadline(&self) -> Option<Instant> {
        (!self.answered).then_some(self.deadline)
    }

    /// Reads the request head and answers it; `ca_pem` is the body of a successful answer.
    pub fn pump(
        &mut self,
        stack: &mut Stack,
        ca_pem: &str,
        recorder: &Recorder,
        now: Instant,
    ) -> Progress {
        let socket = stack.tcp(self.socket);
        if matches!(socket.state(), State::Closed | State::TimeWait) {
            return Progress::Finished;
        }
        if self.answered {
            // Whatever else the guest sends is dropped; the close is under way.
            while socket.can_recv() && socket.recv(|data| (data.len(), ())).is_ok() {}
            return Progress::Open;
        }
        let queued = socket.recv_queue();
        let parsed = http::parse_head(socket.peek(queued).unwrap_or(&[]));
        let gave_up = guest_finished_sending(socket.state())
            || now >= self.deadline
            || (queued > 0 && queued == socket.recv_capacity());
        let (head, response, reason) = match parsed {
            Ok(Some((head, _))) => {
                let (response, reason) = answer(&head, ca_pem);
                (Some(head), response, reason)
            }
            Ok(None) if !gave_up => return Progress::Open,
            Ok(None) => {
                let reason = "no complete HTTP request head arrived".to_owned();
                (None, error_response(400, &reason), Some(reason))
            }
            Err(error) => {
                let reason = error.to_string();
                (None, error_response(400, &reason), Some(reason))
            }
        };
        let _ = socket.recv(|data| (data.len(), ()));
        // A fresh socket's send buffer (256 KiB) holds the whole answer.
        let _ = socket.send_slice(&response);
        socket.close();
        self.answered = true;
        let decision = if reason.is_none() { "allow" } else { "deny" };
        recorder.record(AuditEvent {
            kind: "ca",
            protocol: Some("tcp"),
            dest_ip: Some(IpAddr::V4(GATEWAY_ADDR)),
            dest_port: Some(CA_PORT),
            method: head.as_ref().map(|head| head.method.clone()),
            path: head.map(|head| head.path),
            bytes_up: queued as u64,
            bytes_down: response.len() as u64,
            decision,
            reason,
            ..AuditEvent::default()
        });
        Progress::Open
    }

    /// Removes the guest socket.
    pub fn finish(self, stack: &mut Stack) {
        stack.sockets.remove(self.socket);
    }

    /// Whether the guest side is gone.
    pub fn is_closed(&self, stack: &mut Stack) -> bool {
        matches!(
            stack.tcp(self.socket).state(),
            State::Closed | State::TimeWait
        )
    }
}

/// The response to a complete request head, and why it was refused (None: served).
fn answer(head: &RequestHead, ca_pem: &str) -> (Vec<u8>, Option<String>) {
    let path = head.path.split('?').next().unwrap_or_default();
    if path != CA_PATH {
        let reason = format!("the gateway serves only {CA_PATH}");
        return (error_response(404, &reason), Some(reason));
    }
    if head.method != "GET" && head.method != "HEAD" {
        let reason = format!("{CA_PATH} answers GET only");
        return (error_response(405, &reason), Some(reason));
    }
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/x-pem-file\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        ca_pem.len()
    )
    .into_bytes();
    if head.method == "GET" {
        response.extend_from_slice(ca_pem.as_bytes());
    }
    (response, None)
}
