//! One stream between a guest socket and a host Unix socket: its state, credit accounting in
//! both directions and the packets it owes the guest.
//!
//! Credit (virtio 1.2 section 5.10.6.3): each side advertises `buf_alloc` (its receive buffer)
//! and `fwd_cnt` (bytes it has consumed from it, ever). A sender may have at most
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight. Towards the guest we never exceed its credit
//! and stop reading the host socket while it is zero; towards the host our receive buffer is
//! `tx_buf`, bounded by [`CONN_BUF_SIZE`], and a guest that overruns it is reset.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer advertised to the guest for each connection: the most guest data the VMM
/// holds for a host socket that does not read.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;

/// A credit update is volunteered once the host has consumed this much since the last one.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: OP_REQUEST owed or sent, waiting for the guest's OP_RESPONSE.
    AwaitingResponse,
    /// Data may flow.
    Established,
}

/// What the connection wants done after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep going.
    Keep,
    /// Send the guest an OP_RST and drop the connection.
    Reset,
    /// Drop the connection without telling the guest (it reset it).
    Drop,
}

/// Control packets owed to the guest.
#[derive(Debug, Default, Clone, Copy)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    shutdown: Option<u32>,
}

/// A packet the connection produced for the guest's rx queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPacket {
    /// Its header (len set).
    pub hdr: Header,
    /// The connection must be dropped after this packet (it is an OP_RST).
    pub last: bool,
}

/// One guest ↔ host stream.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    state: State,
    guest_cid: u64,
    /// Host-side port (our end).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    owed: Owed,

    /// Guest data waiting for the host socket. A ring, so a host that drains slowly but never
    /// completely cannot make it grow past what is pending. The first `tx_uncounted` bytes are
    /// the handshake's `OK` line, which is not guest data and earns no credit.
    tx_buf: VecDeque<u8>,
    tx_uncounted: usize,
    /// Guest payload bytes received, ever.
    recv_cnt: Wrapping<u32>,
    /// Guest payload bytes written to the host socket, ever.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,

    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest, ever.
    rx_cnt: Wrapping<u32>,
    credit_request_sent: bool,

    /// Epoll said the host socket has data (or EOF) we have not read yet.
    host_readable: bool,
    /// When the OP_REQUEST of a host-initiated connection went to the guest.
    requested_at: Option<Instant>,
    host_eof: bool,
    /// The host closed its socket entirely: no more events are useful, only reads of what is
    /// left.
    host_hup: bool,
    /// Directions the guest shut down (SHUTDOWN_* bits).
    guest_shutdown: u32,
}

impl Connection {
    /// A connection the host asked for (after `CONNECT <port>`): owes the guest an OP_REQUEST.
    pub fn host_initiated(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            State::AwaitingResponse,
        );
        c.owed.request = true;
        c
    }

    /// A connection the guest asked for (OP_REQUEST `hdr`), already connected on the host:
    /// owes the guest an OP_RESPONSE.
    pub fn guest_initiated(stream: UnixStream, guest_cid: u64, hdr: &Header) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            hdr.dst_port,
            hdr.src_port,
            State::Established,
        );
        c.update_peer_credit(hdr);
        c.owed.response = true;
        c
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: State,
    ) -> Self {
        Self {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            owed: Owed::default(),
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_request_sent: false,
            host_readable: false,
            requested_at: None,
            host_eof: false,
            host_hup: false,
            guest_shutdown: 0,
        }
    }

    /// The host socket (for epoll registration).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the host socket up (to be unregistered, then closed).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// When the guest was asked to accept this host-initiated connection, while it has not
    /// answered.
    pub fn awaiting_since(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingResponse => self.requested_at,
            State::Established => None,
        }
    }

    /// Bytes we may still send the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn tx_pending(&self) -> usize {
        self.tx_buf.len()
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        let changed =
            hdr.buf_alloc != self.peer_buf_alloc || Wrapping(hdr.fwd_cnt) != self.peer_fwd_cnt;
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if changed {
            self.credit_request_sent = false;
        }
    }

    /// Handles a validated packet from the guest addressed to this connection.
    pub fn on_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8]) -> Verdict {
        self.update_peer_credit(hdr);
        match (op, self.state) {
            (Op::Rst, _) => Verdict::Drop,
            (Op::Response, State::AwaitingResponse) => {
                self.state = State::Established;
                let line = format!("OK {}\n", self.local_port);
                self.tx_uncounted = line.len();
                self.tx_buf.extend(line.as_bytes());
                self.flush_or_reset()
            }
            (Op::Request | Op::Response, _) | (_, State::AwaitingResponse) => Verdict::Reset,
            (Op::Rw, State::Established) => self.on_guest_data(payload),
            (Op::CreditUpdate, State::Established) => Verdict::Keep,
            (Op::CreditRequest, State::Established) => {
                self.owed.credit_update = true;
                Verdict::Keep
            }
            (Op::Shutdown, State::Established) => {
                self.guest_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush_or_reset()
            }
        }
    }

    fn on_guest_data(&mut self, payload: &[u8]) -> Verdict {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return Verdict::Reset;
        }
        let held = (self.recv_cnt - self.fwd_cnt).0 as usize;
        if held + payload.len() > CONN_BUF_SIZE as usize {
            tracing::warn!(
                "vsock: guest port {} overran its credit ({held} + {} bytes held)",
                self.peer_port,
                payload.len()
            );
            return Verdict::Reset;
        }
        self.recv_cnt += Wrapping(payload.len() as u32);
        let mut written = 0;
        if self.tx_pending() == 0 {
            match write_some(&mut self.stream, payload) {
                Ok(n) => written = n,
                Err(_) => return Verdict::Reset,
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        if written < payload.len() {
            self.tx_buf.extend(&payload[written..]);
        }
        self.note_forwarded();
        self.finish_if_drained()
    }

    /// Writes what it can of `tx_buf`; resets on a host socket error.
    fn flush_or_reset(&mut self) -> Verdict {
        if self.flush_tx().is_err() {
            return Verdict::Reset;
        }
        self.finish_if_drained()
    }

    fn flush_tx(&mut self) -> io::Result<()> {
        while self.tx_pending() > 0 {
            let n = write_some(&mut self.stream, self.tx_buf.as_slices().0)?;
            if n == 0 {
                break;
            }
            self.tx_buf.drain(..n);
            let uncounted = n.min(self.tx_uncounted);
            self.tx_uncounted -= uncounted;
            self.fwd_cnt += Wrapping((n - uncounted) as u32);
        }
        if self.tx_pending() == 0 {
            // Keeps the buffer's memory bounded by what is pending, not by what ever was.
            self.tx_buf = VecDeque::new();
        }
        self.note_forwarded();
        Ok(())
    }

    fn note_forwarded(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
    }

    /// Applies the guest's shutdown once the data it sent before has reached the host.
    fn finish_if_drained(&mut self) -> Verdict {
        if self.tx_pending() > 0 {
            return Verdict::Keep;
        }
        if self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            return Verdict::Reset;
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            // ENOTCONN only means the host already closed; the next write reports that.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Verdict::Keep
    }

    /// Epoll reported the host socket ready with `events`.
    pub fn on_host_event(&mut self, events: EventSet) -> Verdict {
        if events.contains(EventSet::OUT) && self.tx_pending() > 0 {
            let v = self.flush_or_reset();
            if v != Verdict::Keep {
                return v;
            }
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.host_hup = true;
            if self.host_eof && self.state == State::Established {
                // The guest already knows the host sends no more; now it receives none either.
                self.owed.shutdown = Some(SHUTDOWN_SEND | SHUTDOWN_RCV);
            }
            if self.flush_tx().is_err() || self.tx_pending() > 0 {
                return Verdict::Reset;
            }
            if self.state != State::Established || self.guest_shutdown & SHUTDOWN_RCV != 0 {
                return Verdict::Reset;
            }
            // Data the host wrote before closing is still readable; read it, then EOF.
            self.host_readable = true;
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
            self.host_readable = true;
        }
        Verdict::Keep
    }

    fn wants_to_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
    }

    /// The epoll interest the host socket needs now; `None` means "not registered" (after a
    /// hang-up epoll would report it forever).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut set = EventSet::empty();
        if self.wants_to_read() && !self.host_readable {
            set |= EventSet::IN;
        }
        if self.tx_pending() > 0 {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Whether [`Self::next_rx_packet`] would produce something.
    pub fn has_rx_work(&self) -> bool {
        let o = &self.owed;
        if o.request || o.response || o.credit_update || o.credit_request || o.shutdown.is_some() {
            return true;
        }
        self.host_readable
            && self.wants_to_read()
            && (self.peer_credit() > 0 || !self.credit_request_sent)
    }

    fn header(&self, op: Op, len: u32, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn emit(&mut self, op: Op, len: u32, flags: u32) -> RxPacket {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        // Every packet carries our credit, so none is owed separately any more.
        self.owed.credit_update = false;
        RxPacket {
            hdr: self.header(op, len, flags),
            last: op == Op::Rst,
        }
    }

    /// The next packet for the guest, its payload (if any) read from the host socket into
    /// `buf` (at most `buf.len()` bytes). `None` when there is nothing to send.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        if self.owed.request {
            self.owed.request = false;
            self.requested_at = Some(Instant::now());
            return Some(self.emit(Op::Request, 0, 0));
        }
        if self.owed.response {
            self.owed.response = false;
            return Some(self.emit(Op::Response, 0, 0));
        }
        if self.host_readable && self.wants_to_read() {
            if let Some(p) = self.read_host(buf) {
                return Some(p);
            }
        }
        if let Some(flags) = self.owed.shutdown.take() {
            return Some(self.emit(Op::Shutdown, 0, flags));
        }
        if self.owed.credit_request {
            self.owed.credit_request = false;
            return Some(self.emit(Op::CreditRequest, 0, 0));
        }
        if self.owed.credit_update {
            return Some(self.emit(Op::CreditUpdate, 0, 0));
        }
        None
    }

    fn read_host(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if !self.credit_request_sent {
                self.credit_request_sent = true;
                self.owed.credit_request = true;
            }
            return None;
        }
        let want = credit.min(buf.len());
        loop {
            return match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.host_readable = false;
                    self.host_eof = true;
                    let mut flags = SHUTDOWN_SEND;
                    if self.host_hup {
                        flags |= SHUTDOWN_RCV;
                    }
                    self.owed.shutdown = Some(flags);
                    None
                }
                Ok(n) => {
                    self.rx_cnt += Wrapping(n as u32);
                    Some(self.emit(Op::Rw, n as u32, 0))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    None
                }
                Err(e) => {
                    tracing::debug!("vsock: host socket read failed: {e}");
                    self.host_readable = false;
                    self.host_eof = true;
                    self.owed.shutdown = Some(SHUTDOWN_SEND | SHUTDOWN_RCV);
                    None
                }
            };
        }
    }

    /// State and credit in both directions on one line.
    pub fn diagnostics(&self) -> String {
        format!(
            "{:?} owed {:?} to-host: recv_cnt {} fwd_cnt {} last_fwd_cnt_sent {} buffered {} | \
             to-guest: rx_cnt {} peer_buf_alloc {} peer_fwd_cnt {} credit {} \
             credit_request_sent {} | host readable {} eof {} hup {} | guest_shutdown {:#x}",
            self.state,
            self.owed,
            self.recv_cnt,
            self.fwd_cnt,
            self.last_fwd_cnt_sent,
            self.tx_buf.len(),
            self.rx_cnt,
            self.peer_buf_alloc,
            self.peer_fwd_cnt,
            self.peer_credit(),
            self.credit_request_sent,
            self.host_readable,
            self.host_eof,
            self.host_hup,
            self.guest_shutdown
        )
    }

    /// An OP_RST for this connection (it is being dropped).
    pub fn rst_packet(&self) -> Header {
        self.header(Op::Rst, 0, 0)
    }
}

/// Writes as much of `data` as the non-blocking socket takes; 0 when it takes nothing.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}
