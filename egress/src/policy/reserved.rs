//! Address ranges no rule reaches unless it names them: the host's own network, cloud metadata
//! services and everything that is not the public Internet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A range that is always denied, and what to call it in a denial.
#[derive(Debug, Clone, Copy)]
pub struct ReservedRange {
    /// The addresses.
    pub net: IpNet,
    /// Its name in denials and the audit log.
    pub category: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8, category: &'static str) -> ReservedRange {
    ReservedRange {
        net: IpNet::V4(match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len) {
            Ok(net) => net,
            Err(_) => panic!("bad prefix length"),
        }),
        category,
    }
}

const fn v6(segments: [u16; 8], len: u8, category: &'static str) -> ReservedRange {
    let [a, b, c, d, e, f, g, h] = segments;
    ReservedRange {
        net: IpNet::V6(
            match Ipv6Net::new(Ipv6Addr::new(a, b, c, d, e, f, g, h), len) {
                Ok(net) => net,
                Err(_) => panic!("bad prefix length"),
            },
        ),
        category,
    }
}

/// Most specific first, so 169.254.169.254 is called "metadata", not "link-local".
pub const RESERVED: &[ReservedRange] = &[
    v4(169, 254, 169, 254, 32, "metadata"),
    v4(100, 100, 100, 200, 32, "metadata"),
    v4(0, 0, 0, 0, 8, "unspecified"),
    v4(127, 0, 0, 0, 8, "loopback"),
    v4(10, 0, 0, 0, 8, "private"),
    v4(172, 16, 0, 0, 12, "private"),
    v4(192, 168, 0, 0, 16, "private"),
    v4(100, 64, 0, 0, 10, "shared address space"),
    v4(169, 254, 0, 0, 16, "link-local"),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments"),
    v4(198, 18, 0, 0, 15, "benchmarking"),
    v4(224, 0, 0, 0, 4, "multicast"),
    v4(240, 0, 0, 0, 4, "reserved"),
    v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128, "metadata"),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified"),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "private"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

/// The IPv4 address an IPv6 address stands for (v4-mapped `::ffff:a.b.c.d` or NAT64
/// `64:ff9b::a.b.c.d`), so the IPv4 ranges apply to it too.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let o = ip.octets();
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

/// The address as rules see it: IPv4 when the IPv6 form only wraps an IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The reserved range `ip` (canonical) falls in, if any.
pub fn reserved_range(ip: IpAddr) -> Option<&'static ReservedRange> {
    RESERVED.iter().find(|range| range.net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn category(text: &str) -> Option<&'static str> {
        let ip = canonical(text.parse().unwrap());
        reserved_range(ip).map(|r| r.category)
    }

    #[test]
    fn categories() {
        assert_eq!(category("169.254.169.254"), Some("metadata"));
        assert_eq!(category("169.254.1.1"), Some("link-local"));
        assert_eq!(category("127.0.0.53"), Some("loopback"));
        assert_eq!(category("10.0.2.2"), Some("private"));
        assert_eq!(category("172.31.255.255"), Some("private"));
        assert_eq!(category("172.32.0.1"), None);
        assert_eq!(category("192.168.1.1"), Some("private"));
        assert_eq!(category("100.64.0.1"), Some("shared address space"));
        assert_eq!(category("255.255.255.255"), Some("reserved"));
        assert_eq!(category("8.8.8.8"), None);
        assert_eq!(category("::1"), Some("loopback"));
        assert_eq!(category("fd00:ec2::254"), Some("metadata"));
        assert_eq!(category("fe80::1"), Some("link-local"));
        assert_eq!(category("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(category("::ffff:169.254.169.254"), Some("metadata"));
        assert_eq!(category("64:ff9b::10.1.2.3"), Some("private"));
        assert_eq!(category("2606:4700::1111"), None);
    }
}
