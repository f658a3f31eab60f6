//! A userspace guest on the frame link, for tests and benchmarks: a second smoltcp interface at
//! the guest's address ([`GUEST_ADDR`], default route through [`GATEWAY_ADDR`]) on the other end
//! of the `SOCK_SEQPACKET` pair whose first end the egress thread serves. It speaks to the filter
//! exactly as a virtio-net guest's frames would, so the filter can be driven (and timed) without
//! a VM. It runs on the caller's thread: every method turns the guest stack until its answer is
//! there, and gives up after [`GuestPeer::wait`] so a filter that never answers is an error, not a
//! hang.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use agentvm_protocol::net::{
    DNS_ADDR, GATEWAY_ADDR, GATEWAY_MAC, GUEST_ADDR, GUEST_MAC, PREFIX_LEN,
};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as StackInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpCidr, IpEndpoint,
};

use crate::stack::device::{FrameDevice, Received, MAX_FRAME};

pub use smoltcp::iface::SocketHandle;
pub use smoltcp::socket::tcp::State as TcpState;

/// How long one wait lasts unless [`GuestPeer::set_wait`] says otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);
/// Each TCP socket's send and receive buffer: large enough that a bulk transfer is not bound by
/// the guest's window (smoltcp scales its window to the buffer).
const TCP_BUFFER: usize = 256 * 1024;
/// The guest's first local port; each socket takes the next one.
const FIRST_PORT: u16 = 40000;
/// The guest stack is turned at least this often while it waits (milliseconds).
const MAX_POLL_MS: i64 = 50;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("guest peer: frame link: {0}")]
    Io(#[from] io::Error),
    #[error("guest peer: timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("guest peer: the egress filter closed the link")]
    LinkClosed,
    #[error("guest peer: bad DNS answer for {name}: {reason}")]
    Dns { name: String, reason: String },
    #[error("guest peer: connection ended ({state}) during {what}")]
    ConnectionEnded { state: TcpState, what: String },
    #[error("guest peer: {0}")]
    Socket(String),
}

/// A `SOCK_SEQPACKET` pair: (guest end, filter end).
pub fn frame_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    let result = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// How a guest connection attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    Established(SocketHandle),
    Reset,
}

/// What a [`GuestPeer::transfer`] moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes that arrived from upstream.
    pub received: u64,
    /// Whether the connection ended with the upstream's FIN (false: reset).
    pub fin: bool,
}

/// The guest: a smoltcp interface at GUEST_ADDR with its default route through the gateway.
pub struct GuestPeer {
    iface: Interface,
    pub sockets: SocketSet<'static>,
    device: FrameDevice,
    epoch: Instant,
    next_port: u16,
    wait: Duration,
    buffer: Vec<u8>,
}

impl GuestPeer {
    /// The guest on `fd`, the guest end of a [`frame_pair`].
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let mut device = FrameDevice::new(fd)?;
        let config = Config::new(EthernetAddress(GUEST_MAC).into());
        let mut iface = Interface::new(config, &mut device, StackInstant::from_micros(0));
        iface.update_ip_addrs(|addresses| {
            // The interface starts with no address, so the one push always has room.
            let _ = addresses.push(IpCidr::new(GUEST_ADDR.into(), PREFIX_LEN));
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_ADDR)
            .map_err(|error| io::Error::other(format!("default route: {error}")))?;
        // smoltcp rate-limits ARP requests to one per second across all neighbours, so a
        // guest that asked for the DNS address would wait a second before it may ask for the
        // gateway's. The link's MACs are fixed: tell the guest both at once.
        for address in [GATEWAY_ADDR, DNS_ADDR] {
            device.queue_for_stack(arp_reply(address));
        }
        Ok(Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            device,
            epoch: Instant::now(),
            next_port: FIRST_PORT,
            wait: DEFAULT_WAIT,
            buffer: vec![0u8; MAX_FRAME],
        })
    }

    /// How long each wait lasts before it fails with [`PeerError::Timeout`].
    pub fn wait(&self) -> Duration {
        self.wait
    }

    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    fn now(&self) -> StackInstant {
        StackInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs the guest stack until `done` holds; fails after [`GuestPeer::wait`] or when the
    /// filter closes the link.
    pub fn run_until<T>(
        &mut self,
        what: &str,
        mut done: impl FnMut(&mut Self) -> Option<T>,
    ) -> Result<T, PeerError> {
        let deadline = Instant::now() + self.wait;
        loop {
            let now = self.now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            if let Some(value) = done(self) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(PeerError::Timeout(self.wait, what.to_string()));
            }
            let delay = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map_or(MAX_POLL_MS, |delay| {
                    (delay.total_millis() as i64).min(MAX_POLL_MS)
                }) as i32;
            // Frames the stack sent may still wait for room in the socket: then room is an
            // event too, not something to learn of at the next timer.
            let events = if self.device.is_backlogged() {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            };
            let mut pollfd = libc::pollfd {
                fd: self.device.raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own, with a bounded timeout.
            unsafe { libc::poll(&mut pollfd, 1, delay) };
            self.device.flush_backlog()?;
            self.take_frames()?;
        }
    }

    /// Moves every frame the filter sent into the guest stack's queue.
    fn take_frames(&mut self) -> Result<(), PeerError> {
        loop {
            match self.device.receive_frame(&mut self.buffer)? {
                Received::Frame(length) => {
                    let frame = self.buffer[..length].to_vec();
                    self.device.queue_for_stack(frame)
                }
                Received::Empty => return Ok(()),
                Received::Closed => return Err(PeerError::LinkClosed),
            }
        }
    }

    /// Whether the filter closed its end of the link (frames still queued are dropped).
    pub fn link_closed(&mut self) -> bool {
        loop {
            match self.device.receive_frame(&mut self.buffer) {
                Ok(Received::Frame(_)) => continue,
                Ok(Received::Closed) | Err(_) => return true,
                Ok(Received::Empty) => return false,
            }
        }
    }

    fn port(&mut self) -> u16 {
        // Ports wrap within the dynamic range rather than overflow after many connections.
        self.next_port = if self.next_port == u16::MAX {
            FIRST_PORT
        } else {
            self.next_port + 1
        };
        self.next_port
    }

    fn udp_socket(&mut self) -> Result<SocketHandle, PeerError> {
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        );
        let port = self.port();
        socket
            .bind(port)
            .map_err(|error| PeerError::Socket(format!("UDP bind to port {port}: {error}")))?;
        Ok(self.sockets.add(socket))
    }

    /// Asks the filter's DNS server for the A records of `name`.
    pub fn resolve(&mut self, name: &str) -> Result<(ResponseCode, Vec<Ipv4Addr>), PeerError> {
        let dns_error = |reason: String| PeerError::Dns {
            name: name.to_string(),
            reason,
        };
        let query_name =
            Name::from_ascii(format!("{name}.")).map_err(|error| dns_error(error.to_string()))?;
        let handle = self.udp_socket()?;
        let id = self.next_port;
        let mut query = Message::new();
        query
            .set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(query_name, RecordType::A));
        let bytes = query
            .to_vec()
            .map_err(|error| dns_error(error.to_string()))?;
        let server = IpEndpoint::new(IpAddress::Ipv4(DNS_ADDR), 53);
        let sent = self
            .sockets
            .get_mut::<udp::Socket>(handle)
            .send_slice(&bytes, server)
            .map_err(|error| PeerError::Socket(format!("DNS query: {error}")));
        let answer = sent.and_then(|()| {
            self.run_until(&format!("DNS answer for {name}"), |guest| {
                let socket = guest.sockets.get_mut::<udp::Socket>(handle);
                socket
                    .recv()
                    .ok()
                    .map(|(bytes, _)| Message::from_vec(bytes))
            })
        });
        self.sockets.remove(handle);
        let answer = answer?.map_err(|error| dns_error(error.to_string()))?;
        if answer.id() != id {
            return Err(dns_error(format!("id {} answers query {id}", answer.id())));
        }
        let addresses = answer
            .answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        Ok((answer.response_code(), addresses))
    }

    /// Sends one UDP datagram (not DNS) and returns once it left the guest.
    pub fn send_udp(&mut self, to: SocketAddrV4) -> Result<(), PeerError> {
        let handle = self.udp_socket()?;
        let destination = IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port());
        let sent = self
            .sockets
            .get_mut::<udp::Socket>(handle)
            .send_slice(b"hello", destination)
            .map_err(|error| PeerError::Socket(format!("UDP send to {to}: {error}")))
            .and_then(|()| {
                self.run_until("UDP datagram sent", |guest| {
                    (guest.sockets.get::<udp::Socket>(handle).send_queue() == 0).then_some(())
                })
            });
        self.sockets.remove(handle);
        sent
    }

    /// Opens a TCP connection; waits until it is established or reset.
    pub fn connect(&mut self, to: SocketAddrV4) -> Result<Connect, PeerError> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        let port = self.port();
        socket
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(*to.ip()), to.port()),
                port,
            )
            .map_err(|error| PeerError::Socket(format!("connect to {to}: {error}")))?;
        let handle = self.sockets.add(socket);
        let established = self.run_until(&format!("connection to {to}"), |guest| {
            match guest.sockets.get::<tcp::Socket>(handle).state() {
                tcp::State::Established => Some(true),
                tcp::State::Closed => Some(false),
                _ => None,
            }
        });
        match established {
            Ok(true) => Ok(Connect::Established(handle)),
            Ok(false) => {
                self.sockets.remove(handle);
                Ok(Connect::Reset)
            }
            Err(error) => {
                self.sockets.remove(handle);
                Err(error)
            }
        }
    }

    pub fn state(&self, handle: SocketHandle) -> TcpState {
        self.sockets.get::<tcp::Socket>(handle).state()
    }

    /// Forgets a connection: aborted (RST) if it is still open, its buffers freed.
    pub fn remove(&mut self, handle: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(handle).abort();
        // The RST leaves on the next turn; a filter that already forgot the flow ignores it.
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.sockets.remove(handle);
    }

    /// Sends `data`, then FIN, and reads until the other side closes. Returns what was read and
    /// whether the connection ended with a FIN (false: reset).
    pub fn exchange(
        &mut self,
        handle: SocketHandle,
        data: &[u8],
    ) -> Result<(Vec<u8>, bool), PeerError> {
        let mut received = Vec::new();
        let fin = self.send_then_drain(handle, data, data.len() as u64, |chunk| {
            received.extend_from_slice(chunk)
        })?;
        Ok((received, fin))
    }

    /// Sends `head`, then `body_length` filler bytes, then FIN, and counts (without keeping)
    /// what arrives until the other side closes: a bulk transfer in either direction with
    /// memory bounded by the socket buffers.
    pub fn transfer(
        &mut self,
        handle: SocketHandle,
        head: &[u8],
        body_length: u64,
    ) -> Result<Transfer, PeerError> {
        let mut received = 0u64;
        let mut head_left = head;
        while !head_left.is_empty() {
            let sent = self
                .sockets
                .get_mut::<tcp::Socket>(handle)
                .send_slice(head_left)
                .map_err(|error| PeerError::Socket(format!("send: {error}")))?;
            head_left = &head_left[sent..];
            if !head_left.is_empty() {
                self.run_until("room to send", |guest| {
                    guest
                        .sockets
                        .get::<tcp::Socket>(handle)
                        .can_send()
                        .then_some(())
                })?;
            }
        }
        let filler = vec![0x5a_u8; TCP_BUFFER];
        let fin = self.send_then_drain(handle, &filler, body_length, |chunk| {
            received += chunk.len() as u64
        })?;
        Ok(Transfer { received, fin })
    }

    /// Sends `length` bytes taken cyclically from `source`, then FIN; hands every received
    /// chunk to `sink` until the connection ends. Returns whether it ended with a FIN.
    fn send_then_drain(
        &mut self,
        handle: SocketHandle,
        source: &[u8],
        length: u64,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<bool, PeerError> {
        let mut sent = 0u64;
        let mut fin_sent = false;
        let mut failure = None;
        let fin = self.run_until("exchange to finish", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            while sent < length && socket.can_send() {
                let offset = (sent % source.len() as u64) as usize;
                let left = (length - sent).min((source.len() - offset) as u64) as usize;
                match socket.send_slice(&source[offset..offset + left]) {
                    Ok(0) => break,
                    Ok(n) => sent += n as u64,
                    Err(error) => {
                        failure = Some(format!("send: {error}"));
                        return Some(false);
                    }
                }
            }
            if sent == length && !fin_sent && socket.may_send() {
                socket.close();
                fin_sent = true;
            }
            while socket.can_recv() {
                let read = socket.recv(|chunk| {
                    sink(chunk);
                    (chunk.len(), ())
                });
                if let Err(error) = read {
                    failure = Some(format!("receive: {error}"));
                    return Some(false);
                }
            }
            match socket.state() {
                tcp::State::Closed => Some(false),
                tcp::State::TimeWait => Some(true),
                // The peer's FIN arrived; ours is on its way.
                tcp::State::CloseWait if !socket.can_recv() && sent == length => {
                    socket.close();
                    fin_sent = true;
                    None
                }
                _ => None,
            }
        })?;
        match failure {
            Some(reason) => Err(PeerError::Socket(reason)),
            None => Ok(fin),
        }
    }

    /// Sends `data` without closing; returns the echo once `data.len()` bytes came back.
    pub fn echo(&mut self, handle: SocketHandle, data: &[u8]) -> Result<Vec<u8>, PeerError> {
        self.receive_after_send(handle, data, data.len())
    }

    /// Sends `data` without closing; returns what came back once `length` bytes did.
    pub fn receive_after_send(
        &mut self,
        handle: SocketHandle,
        data: &[u8],
        length: usize,
    ) -> Result<Vec<u8>, PeerError> {
        let mut sent = 0;
        let mut received = Vec::new();
        let mut ended = None;
        self.run_until("echo", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            if sent < data.len() && socket.can_send() {
                sent += socket.send_slice(&data[sent..]).unwrap_or(0);
            }
            while socket.can_recv() {
                let _ = socket.recv(|chunk| {
                    received.extend_from_slice(chunk);
                    (chunk.len(), ())
                });
            }
            if received.len() >= length {
                return Some(());
            }
            if !socket.is_active() {
                ended = Some(socket.state());
                return Some(());
            }
            None
        })?;
        match ended {
            Some(state) => Err(PeerError::ConnectionEnded {
                state,
                what: "echo".into(),
            }),
            None => Ok(received),
        }
    }

    /// Waits until `length` bytes arrived without sending anything.
    pub fn receive(&mut self, handle: SocketHandle, length: usize) -> Result<Vec<u8>, PeerError> {
        self.receive_after_send(handle, &[], length)
    }

    /// Waits until the connection is reset or closed; returns whether it was reset.
    pub fn wait_closed(&mut self, handle: SocketHandle) -> Result<bool, PeerError> {
        self.run_until("connection to end", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            while socket.can_recv() {
                let _ = socket.recv(|chunk| (chunk.len(), ()));
            }
            match socket.state() {
                tcp::State::Closed => Some(true),
                tcp::State::CloseWait => Some(false),
                _ => None,
            }
        })
    }
}

/// An ARP reply from the filter's side telling the guest that `address` is at GATEWAY_MAC.
fn arp_reply(address: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(GATEWAY_MAC),
        source_protocol_addr: address,
        target_hardware_addr: EthernetAddress(GUEST_MAC),
        target_protocol_addr: GUEST_ADDR,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: EthernetAddress(GUEST_MAC),
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = vec![0u8; ethernet.buffer_len() + arp.buffer_len()];
    let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame);
    ethernet.emit(&mut ethernet_frame);
    arp.emit(&mut ArpPacket::new_unchecked(ethernet_frame.payload_mut()));
    frame
}
