//! What a frame from the guest is, looked at before smoltcp sees it: new TCP connections need a
//! policy decision (and a listening socket) first, and traffic smoltcp would answer on its own
//! (UDP to a closed port, pings to any address) needs filtering or auditing.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpPacket, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

/// The parts of a guest frame the filter decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A TCP SYN without ACK: the guest opens a connection.
    TcpSyn {
        from: SocketAddrV4,
        to: SocketAddrV4,
    },
    /// A UDP datagram.
    Udp {
        from: SocketAddrV4,
        to: SocketAddrV4,
    },
    /// An ICMP message to this address.
    Icmp { to: Ipv4Addr },
    /// An ARP packet asking about this address.
    Arp { target: Ipv4Addr },
    /// Anything else (other TCP segments, IPv6, malformed): smoltcp handles or drops it.
    Other,
}

/// Classifies an Ethernet frame from the guest.
pub fn classify(frame: &[u8]) -> Inbound {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return Inbound::Other;
    };
    if ethernet.ethertype() == EthernetProtocol::Arp {
        let target = ArpPacket::new_checked(ethernet.payload())
            .ok()
            .and_then(|arp| <[u8; 4]>::try_from(arp.target_protocol_addr()).ok());
        return target.map_or(Inbound::Other, |target| Inbound::Arp {
            target: target.into(),
        });
    }
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return Inbound::Other;
    }
    let Ok(ip) = Ipv4Packet::new_checked(ethernet.payload()) else {
        return Inbound::Other;
    };
    // Fragments carry no port numbers past the first; smoltcp reassembly is not enabled, so
    // they are dropped there.
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Inbound::Other;
    }
    let source = ip.src_addr();
    let destination = ip.dst_addr();
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                return Inbound::Other;
            };
            if tcp.syn() && !tcp.ack() && !tcp.rst() {
                Inbound::TcpSyn {
                    from: SocketAddrV4::new(source, tcp.src_port()),
                    to: SocketAddrV4::new(destination, tcp.dst_port()),
                }
            } else {
                Inbound::Other
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                return Inbound::Other;
            };
            Inbound::Udp {
                from: SocketAddrV4::new(source, udp.src_port()),
                to: SocketAddrV4::new(destination, udp.dst_port()),
            }
        }
        IpProtocol::Icmp => Inbound::Icmp { to: destination },
        _ => Inbound::Other,
    }
}
