//! The guest's network as both sides see it: one NIC on a private link whose other end is the
//! VMM's egress filter (a userspace stack), like slirp's 10.0.2.0/24. Every sandbox uses the same
//! addresses: each link is its own, so nothing can collide, and a snapshot forked into many
//! sandboxes needs no renumbering.

use std::net::Ipv4Addr;

/// The guest's address on its NIC.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the link.
pub const PREFIX_LEN: u8 = 24;
/// The default gateway: the egress filter answers ARP and terminates TCP here.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The only DNS server the guest is given: the egress filter's own resolver, so domain rules
/// hold (the guest may only connect to addresses this resolver handed out).
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest NIC's MAC address (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x61, 0x67, 0x00, 0x00, 0x0f];
/// The gateway's MAC address (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x61, 0x67, 0x00, 0x00, 0x02];
/// Link MTU the device offers (VIRTIO_NET_F_MTU): large frames let one TCP segment carry up to
/// 64 KiB without segmentation offloads, which the userspace stack does not implement.
pub const LINK_MTU: u16 = 65520;
/// The guest's interface name (the first virtio-net device).
pub const GUEST_IFNAME: &str = "eth0";
/// Where the egress filter serves the sandbox's CA certificate (PEM), plain HTTP on the
/// gateway's port [`EGRESS_CA_PORT`]; the guest agent installs it so intercepted HTTPS (rules
/// with credential headers) verifies.
pub const EGRESS_CA_PATH: &str = "/agentvm/egress-ca.pem";
/// The gateway port the CA is served on.
pub const EGRESS_CA_PORT: u16 = 80;
