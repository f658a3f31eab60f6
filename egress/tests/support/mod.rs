//! The other ends of the egress filter for its tests: a guest (a second smoltcp interface at
//! 10.0.2.15 on the socket pair), upstream echo servers and a fake DNS server on 127.0.0.0/8,
//! and an audit log kept in memory.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentvm_protocol::net::{
    DNS_ADDR, GATEWAY_ADDR, GATEWAY_MAC, GUEST_ADDR, GUEST_MAC, PREFIX_LEN,
};
use egress::stack::device::{FrameDevice, Received, MAX_FRAME};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as StackInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpCidr, IpEndpoint,
};

/// Every wait in these tests gives up after this long (a hang is a failure, not a stall).
pub const WAIT: Duration = Duration::from_secs(20);

/// A `SOCK_SEQPACKET` pair: (guest end, filter end).
pub fn frame_pair() -> (OwnedFd, OwnedFd) {
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
    assert_eq!(result, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// How a guest connection attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    Established(SocketHandle),
    Reset,
}

/// The guest: a smoltcp interface at GUEST_ADDR with its default route through the gateway.
pub struct Guest {
    iface: Interface,
    pub sockets: SocketSet<'static>,
    device: FrameDevice,
    epoch: Instant,
    next_port: u16,
}

impl Guest {
    pub fn new(fd: OwnedFd) -> Self {
        let mut device = FrameDevice::new(fd).unwrap();
        let config = Config::new(EthernetAddress(GUEST_MAC).into());
        let mut iface = Interface::new(config, &mut device, StackInstant::from_micros(0));
        iface.update_ip_addrs(|addresses| {
            addresses
                .push(IpCidr::new(GUEST_ADDR.into(), PREFIX_LEN))
                .unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_ADDR)
            .unwrap();
        // smoltcp rate-limits ARP requests to one per second across all neighbours, so a
        // guest that asked for the DNS address would wait a second before it may ask for the
        // gateway's. The link's MACs are fixed: tell the guest both at once.
        for address in [GATEWAY_ADDR, DNS_ADDR] {
            device.queue_for_stack(arp_reply(address));
        }
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            device,
            epoch: Instant::now(),
            next_port: 40000,
        }
    }

    fn now(&self) -> StackInstant {
        StackInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs the guest stack until `done` holds; panics after [`WAIT`].
    pub fn run_until<T>(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        let mut buffer = vec![0u8; MAX_FRAME];
        loop {
            let now = self.now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            if let Some(value) = done(self) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "guest: timed out waiting for {what}"
            );
            let delay = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map_or(50, |delay| delay.total_millis().min(50)) as i32;
            let mut pollfd = libc::pollfd {
                fd: self.device.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own, with a bounded timeout.
            unsafe { libc::poll(&mut pollfd, 1, delay) };
            self.device.flush_backlog().unwrap();
            loop {
                match self.device.receive_frame(&mut buffer).unwrap() {
                    Received::Frame(length) => {
                        self.device.queue_for_stack(buffer[..length].to_vec())
                    }
                    Received::Empty => break,
                    Received::Closed => panic!("the egress filter closed the link"),
                }
            }
        }
    }

    /// Whether the filter closed its end of the link (frames still queued are dropped).
    pub fn link_closed(&mut self) -> bool {
        let mut buffer = vec![0u8; MAX_FRAME];
        loop {
            match self.device.receive_frame(&mut buffer) {
                Ok(Received::Frame(_)) => continue,
                Ok(Received::Closed) | Err(_) => return true,
                Ok(Received::Empty) => return false,
            }
        }
    }

    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    /// Asks the filter's DNS server for the A records of `name`.
    pub fn resolve(&mut self, name: &str) -> (ResponseCode, Vec<Ipv4Addr>) {
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        );
        let port = self.port();
        socket.bind(port).unwrap();
        let handle = self.sockets.add(socket);
        let mut query = Message::new();
        let id = port;
        query
            .set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(
                Name::from_ascii(format!("{name}.")).unwrap(),
                RecordType::A,
            ));
        let server = IpEndpoint::new(IpAddress::Ipv4(DNS_ADDR), 53);
        self.sockets
            .get_mut::<udp::Socket>(handle)
            .send_slice(&query.to_vec().unwrap(), server)
            .unwrap();
        let answer = self.run_until(&format!("DNS answer for {name}"), |guest| {
            let socket = guest.sockets.get_mut::<udp::Socket>(handle);
            socket
                .recv()
                .ok()
                .map(|(bytes, _)| Message::from_vec(bytes).unwrap())
        });
        self.sockets.remove(handle);
        assert_eq!(answer.id(), id);
        let addresses = answer
            .answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        (answer.response_code(), addresses)
    }

    /// Sends one UDP datagram (not DNS) and returns.
    pub fn send_udp(&mut self, to: SocketAddrV4) {
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        );
        let port = self.port();
        socket.bind(port).unwrap();
        let handle = self.sockets.add(socket);
        self.sockets
            .get_mut::<udp::Socket>(handle)
            .send_slice(
                b"hello",
                IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port()),
            )
            .unwrap();
        self.run_until("UDP datagram sent", |guest| {
            (guest.sockets.get::<udp::Socket>(handle).send_queue() == 0).then_some(())
        });
        self.sockets.remove(handle);
    }

    /// Opens a TCP connection; waits until it is established or reset.
    pub fn connect(&mut self, to: SocketAddrV4) -> Connect {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        let port = self.port();
        socket
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(*to.ip()), to.port()),
                port,
            )
            .unwrap();
        let handle = self.sockets.add(socket);
        let established = self.run_until(&format!("connection to {to}"), |guest| {
            match guest.sockets.get::<tcp::Socket>(handle).state() {
                tcp::State::Established => Some(true),
                tcp::State::Closed => Some(false),
                _ => None,
            }
        });
        if established {
            Connect::Established(handle)
        } else {
            self.sockets.remove(handle);
            Connect::Reset
        }
    }

    pub fn state(&self, handle: SocketHandle) -> tcp::State {
        self.sockets.get::<tcp::Socket>(handle).state()
    }

    /// Sends `data`, then FIN, and reads until the other side closes. Returns what was read and
    /// whether the connection ended with a FIN (false: reset).
    pub fn exchange(&mut self, handle: SocketHandle, data: &[u8]) -> (Vec<u8>, bool) {
        let mut sent = 0;
        let mut received = Vec::new();
        let mut fin_sent = false;
        let fin = self.run_until("exchange to finish", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            if sent < data.len() && socket.can_send() {
                sent += socket.send_slice(&data[sent..]).unwrap();
            }
            if sent == data.len() && !fin_sent && socket.may_send() {
                socket.close();
                fin_sent = true;
            }
            while socket.can_recv() {
                socket
                    .recv(|chunk| {
                        received.extend_from_slice(chunk);
                        (chunk.len(), ())
                    })
                    .unwrap();
            }
            match socket.state() {
                tcp::State::Closed => Some(false),
                tcp::State::TimeWait => Some(true),
                // The peer's FIN arrived; ours is on its way.
                tcp::State::CloseWait if !socket.can_recv() => {
                    socket.close();
                    None
                }
                _ => None,
            }
        });
        (received, fin)
    }

    /// Sends `data` without closing; returns the echo once `data.len()` bytes came back.
    pub fn echo(&mut self, handle: SocketHandle, data: &[u8]) -> Vec<u8> {
        self.receive_after_send(handle, data, data.len())
    }

    /// Sends `data` without closing; returns what came back once `length` bytes did.
    pub fn receive_after_send(
        &mut self,
        handle: SocketHandle,
        data: &[u8],
        length: usize,
    ) -> Vec<u8> {
        let mut sent = 0;
        let mut received = Vec::new();
        self.run_until("echo", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            if sent < data.len() && socket.can_send() {
                sent += socket.send_slice(&data[sent..]).unwrap();
            }
            while socket.can_recv() {
                socket
                    .recv(|chunk| {
                        received.extend_from_slice(chunk);
                        (chunk.len(), ())
                    })
                    .unwrap();
            }
            assert!(
                socket.is_active(),
                "connection ended during echo: {}",
                socket.state()
            );
            (received.len() >= length).then_some(())
        });
        received
    }

    /// Waits until `length` bytes arrived without sending anything.
    pub fn receive(&mut self, handle: SocketHandle, length: usize) -> Vec<u8> {
        let mut received = Vec::new();
        self.run_until("bytes from upstream", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            while socket.can_recv() {
                socket
                    .recv(|chunk| {
                        received.extend_from_slice(chunk);
                        (chunk.len(), ())
                    })
                    .unwrap();
            }
            (received.len() >= length).then_some(())
        });
        received
    }

    /// Waits until the connection is reset or closed; returns whether it was reset.
    pub fn wait_closed(&mut self, handle: SocketHandle) -> bool {
        self.run_until("connection to end", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            while socket.can_recv() {
                socket.recv(|chunk| (chunk.len(), ())).unwrap();
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

/// A TCP server on 127.0.0.x that echoes every connection until EOF, then closes.
pub struct EchoServer {
    pub address: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ip: Ipv4Addr) -> Self {
        Self::start_with_greeting(ip, b"")
    }

    /// Sends `greeting` on every connection before echoing (a server that speaks first).
    pub fn start_with_greeting(ip: Ipv4Addr, greeting: &'static [u8]) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let SocketAddr::V4(address) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        std::thread::spawn(move || {
                            stream.set_nonblocking(false).unwrap();
                            stream.set_read_timeout(Some(WAIT)).unwrap();
                            if stream.write_all(greeting).is_err() {
                                return;
                            }
                            let mut buffer = vec![0u8; 64 * 1024];
                            loop {
                                match stream.read(&mut buffer) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if stream.write_all(&buffer[..n]).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                            let _ = stream.shutdown(std::net::Shutdown::Write);
                        });
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(error) => panic!("echo server accept: {error}"),
                }
            }
        });
        Self {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server on 127.0.0.x that reads one chunk from each connection, then resets it.
pub struct ResettingServer {
    pub address: SocketAddrV4,
    thread: Option<JoinHandle<()>>,
}

impl ResettingServer {
    /// Serves one connection.
    pub fn start(ip: Ipv4Addr) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let SocketAddr::V4(address) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let thread = std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt reads a linger struct we own, of the size we pass.
            let result = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&stream),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(result, 0, "SO_LINGER: {}", io::Error::last_os_error());
            // Closing with a zero linger time sends RST instead of FIN.
            drop(stream);
        });
        Self {
            address,
            thread: Some(thread),
        }
    }
}

impl Drop for ResettingServer {
    fn drop(&mut self) {
        // Unblock a pending accept if the test never connected.
        let _ = std::net::TcpStream::connect(self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A DNS server on 127.0.0.1 answering A queries from a fixed table, NXDOMAIN otherwise.
pub struct FakeDns {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDns {
    pub fn start(table: Vec<(&'static str, Ipv4Addr)>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let address = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((length, from)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                let query = Message::from_vec(&buffer[..length]).unwrap();
                let question = query.queries()[0].clone();
                let name = question.name().to_ascii();
                let mut answer = Message::new();
                answer
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(OpCode::Query)
                    .add_query(question.clone());
                let known: Vec<Ipv4Addr> = table
                    .iter()
                    .filter(|(known, _)| format!("{known}.") == name)
                    .map(|(_, address)| *address)
                    .collect();
                if known.is_empty() {
                    answer.set_response_code(ResponseCode::NXDomain);
                } else if question.query_type() == RecordType::A {
                    for address in known {
                        answer.add_answer(Record::from_rdata(
                            question.name().clone(),
                            3600,
                            RData::A(A(address)),
                        ));
                    }
                }
                socket.send_to(&answer.to_vec().unwrap(), from).unwrap();
            }
        });
        Self {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An audit log kept in memory.
#[derive(Clone, Default)]
pub struct AuditBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for AuditBuffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AuditBuffer {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Every line so far, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}
