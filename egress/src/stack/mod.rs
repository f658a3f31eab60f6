//! The userspace TCP/IP stack the guest talks to: a smoltcp interface that owns the gateway and
//! DNS addresses, accepts TCP to any destination (`any_ip` with a default route through itself)
//! and serves DNS on `DNS_ADDR:53`.

pub mod device;
pub mod inbound;

use std::net::SocketAddrV4;
use std::time::Duration;

use agentvm_protocol::net::{
    DNS_ADDR, GATEWAY_ADDR, GATEWAY_MAC, GUEST_ADDR, GUEST_MAC, PREFIX_LEN,
};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as StackInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpCidr, IpListenEndpoint,
};

use device::FrameDevice;

/// Per-direction buffer of each guest TCP connection: the receive window the guest sees and
/// how much upstream data waits for the guest's ACKs. Large enough for window scaling to keep a
/// fast link busy, small enough that thousands of connections stay cheap.
const TCP_BUFFER: usize = 256 * 1024;
/// DNS queries and answers held by the DNS socket at once.
const DNS_PACKETS: usize = 64;
const DNS_BUFFER: usize = 64 * 1024;
/// An idle guest connection is probed this often, and dropped when the guest stops answering
/// for [`TCP_IDLE_TIMEOUT`]; keeps a vanished guest from pinning sockets forever.
const TCP_KEEP_ALIVE: Duration = Duration::from_secs(30);
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The interface, its sockets and the frame device under them.
pub struct Stack {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub device: FrameDevice,
    dns: SocketHandle,
    epoch: std::time::Instant,
}

impl Stack {
    /// `random_seed`: for smoltcp's TCP initial sequence numbers.
    pub fn new(mut device: FrameDevice, random_seed: u64) -> Self {
        let epoch = std::time::Instant::now();
        let mut config = Config::new(EthernetAddress(GATEWAY_MAC).into());
        config.random_seed = random_seed;
        let mut iface = Interface::new(config, &mut device, StackInstant::from_micros(0));
        iface.update_ip_addrs(|addresses| {
            // Two addresses fit smoltcp's default address table.
            let _ = addresses.push(IpCidr::new(GATEWAY_ADDR.into(), PREFIX_LEN));
            let _ = addresses.push(IpCidr::new(DNS_ADDR.into(), PREFIX_LEN));
        });
        // any_ip accepts packets for a foreign address only when the route to it goes through
        // one of our own addresses.
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_ADDR)
            .expect("an empty route table has room for the default route");
        iface.set_any_ip(true);

        let mut sockets = SocketSet::new(Vec::new());
        let mut dns_socket = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; DNS_PACKETS],
                vec![0; DNS_BUFFER],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; DNS_PACKETS],
                vec![0; DNS_BUFFER],
            ),
        );
        dns_socket
            .bind(IpListenEndpoint {
                addr: Some(DNS_ADDR.into()),
                port: 53,
            })
            .expect("binding a fresh UDP socket to a fixed port cannot fail");
        let dns = sockets.add(dns_socket);
        let mut stack = Self {
            iface,
            sockets,
            device,
            dns,
            epoch,
        };
        stack.learn_guest_address();
        stack
    }

    /// Tells smoltcp the guest's MAC (fixed for the link) as if the guest had announced it.
    /// Otherwise the first packet smoltcp sends the guest after its neighbour entry is missing
    /// or expired (60 s idle) is dropped while it asks by ARP: a denied SYN's RST would then
    /// come only after the guest resends its SYN, a second later.
    pub fn learn_guest_address(&mut self) {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(GUEST_MAC),
            source_protocol_addr: GUEST_ADDR,
            target_hardware_addr: EthernetAddress(GATEWAY_MAC),
            target_protocol_addr: GATEWAY_ADDR,
        };
        let ethernet = EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress(GATEWAY_MAC),
            ethertype: EthernetProtocol::Arp,
        };
        let mut frame = vec![0u8; ethernet.buffer_len() + arp.buffer_len()];
        let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame);
        ethernet.emit(&mut ethernet_frame);
        arp.emit(&mut ArpPacket::new_unchecked(ethernet_frame.payload_mut()));
        self.device.queue_for_stack(frame);
    }

    /// smoltcp's clock: time since the stack was made.
    pub fn now(&self) -> StackInstant {
        StackInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Processes queued frames and sends what the sockets have to send.
    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
    }

    /// How long the loop may sleep before smoltcp has timers to run.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|delay| Duration::from_micros(delay.total_micros()))
    }

    /// A socket listening on exactly `destination`, so the SYN being handed to smoltcp next is
    /// answered by it (the guest believes it talks to `destination` itself).
    /// None for port 0, which no socket can listen on.
    pub fn listen_as(&mut self, destination: SocketAddrV4) -> Option<SocketHandle> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        // Segments on this link are up to 64 KiB, so an ACK per segment is cheap, and the
        // guest's sender never waits out a delayed-ACK timer.
        socket.set_ack_delay(None);
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(
            TCP_KEEP_ALIVE.as_secs(),
        )));
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(
            TCP_IDLE_TIMEOUT.as_secs(),
        )));
        socket
            .listen(IpListenEndpoint {
                addr: Some((*destination.ip()).into()),
                port: destination.port(),
            })
            .ok()?;
        Some(self.sockets.add(socket))
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    pub fn dns_socket(&mut self) -> &mut udp::Socket<'static> {
        self.sockets.get_mut::<udp::Socket>(self.dns)
    }
}
