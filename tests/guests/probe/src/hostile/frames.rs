//! Ethernet frames a guest would send: IPv4 TCP SYNs and UDP datagrams with correct checksums
//! (so the filter's stack judges them as real traffic), from the guest's address to the gateway's
//! MAC (protocol/src/net.rs).

/// The guest's and the gateway's MAC and the guest's IPv4 address (protocol/src/net.rs).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x61, 0x67, 0x00, 0x00, 0x0f];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x61, 0x67, 0x00, 0x00, 0x02];
pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Largest frame built here.
pub const MAX_BUILT: usize = ETH_HLEN + IP_HLEN + TCP_HLEN + 32;

/// An IPv4 destination.
#[derive(Clone, Copy)]
pub struct Dest {
    pub ip: [u8; 4],
    pub port: u16,
}

/// Parses `a.b.c.d:port`.
pub fn parse_dest(text: &[u8]) -> Option<Dest> {
    let mut parts = text.split(|&b| b == b':');
    let ip_text = parts.next()?;
    let port = parse_decimal(parts.next()?)?;
    if parts.next().is_some() || port > u64::from(u16::MAX) {
        return None;
    }
    let mut ip = [0u8; 4];
    let mut octets = ip_text.split(|&b| b == b'.');
    for slot in &mut ip {
        let v = parse_decimal(octets.next()?)?;
        *slot = u8::try_from(v).ok()?;
    }
    if octets.next().is_some() {
        return None;
    }
    Some(Dest {
        ip,
        port: port as u16,
    })
}

fn parse_decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 5 {
        return None;
    }
    text.iter().try_fold(0u64, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
    })
}

/// A TCP SYN from the guest's `src_port` to `to`, written into `out`; returns its length.
pub fn tcp_syn(out: &mut [u8; MAX_BUILT], src_port: u16, to: Dest) -> usize {
    let l4 = ETH_HLEN + IP_HLEN;
    let len = l4 + TCP_HLEN;
    out.fill(0);
    ethernet_ipv4(out, PROTO_TCP, to.ip, TCP_HLEN);
    let tcp = &mut out[l4..len];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // sequence number
    tcp[12] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes()); // window
    let sum = l4_checksum(PROTO_TCP, to.ip, &out[l4..len]);
    out[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
    len
}

/// A UDP datagram with a 4-byte payload from the guest's `src_port` to `to`.
pub fn udp(out: &mut [u8; MAX_BUILT], src_port: u16, to: Dest) -> usize {
    let l4 = ETH_HLEN + IP_HLEN;
    let udp_len = UDP_HLEN + 4;
    let len = l4 + udp_len;
    out.fill(0);
    ethernet_ipv4(out, PROTO_UDP, to.ip, udp_len);
    let u = &mut out[l4..len];
    u[0..2].copy_from_slice(&src_port.to_be_bytes());
    u[2..4].copy_from_slice(&to.port.to_be_bytes());
    u[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    u[8..12].copy_from_slice(b"ping");
    let sum = l4_checksum(PROTO_UDP, to.ip, &out[l4..len]);
    out[l4 + 6..l4 + 8].copy_from_slice(&sum.to_be_bytes());
    len
}

fn ethernet_ipv4(out: &mut [u8], protocol: u8, dst: [u8; 4], l4_len: usize) {
    out[0..6].copy_from_slice(&GATEWAY_MAC);
    out[6..12].copy_from_slice(&GUEST_MAC);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut out[ETH_HLEN..ETH_HLEN + IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_HLEN + l4_len) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&GUEST_IP);
    ip[16..20].copy_from_slice(&dst);
    let sum = fold(sum_words(0, ip));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The TCP/UDP checksum over the IPv4 pseudo-header and `segment` (its checksum field zero).
fn l4_checksum(protocol: u8, dst: [u8; 4], segment: &[u8]) -> u16 {
    let mut sum = sum_words(0, &GUEST_IP);
    sum = sum_words(sum, &dst);
    sum += u32::from(protocol);
    sum += segment.len() as u32;
    fold(sum_words(sum, segment))
}

fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).map_or(0, |&b| u32::from(b));
        sum += hi | lo;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
