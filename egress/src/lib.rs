//! The in-VMM egress filter. The guest's NIC is a virtio-net device whose frames arrive here over
//! a `SOCK_SEQPACKET` socket pair (one Ethernet frame per message); a userspace TCP/IP stack
//! (smoltcp) terminates the guest's TCP and DNS, and every connection the policy allows is
//! re-originated from an ordinary host socket. Nothing needs a tap device, root, or host routes.

// Traffic inspection (SNI, HTTP heads, header injection) and TLS interception: sans-IO.
pub mod inspect;
pub mod tls;
