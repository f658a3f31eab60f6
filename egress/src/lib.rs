//! The in-VMM egress filter. The guest's NIC is a virtio-net device whose frames arrive here over
//! a `SOCK_SEQPACKET` socket pair (one Ethernet frame per message); a userspace TCP/IP stack
//! (smoltcp) terminates the guest's TCP and DNS, and every connection the policy allows is
//! re-originated from an ordinary host socket. Nothing needs a tap device, root, or host routes.
//!
//! - [`policy`]: the rules (default deny; domains, CIDRs, ports; credential headers) and the
//!   always-denied address ranges.
//! - [`limits`]: per-rule connection rates and byte caps.
//! - [`audit`]: one JSON line per DNS answer, connection and HTTP request.
//! - [`inspect`], [`tls`]: traffic inspection (SNI, HTTP heads, header injection) and TLS
//!   interception, sans-IO.
//! - [`stack`]: smoltcp over the frame socket, answering for every destination.
//! - [`dns`], [`resolver`], [`names`]: the guest's DNS server, upstream lookups, and which names
//!   the guest was handed for each address.
//! - [`proxy`]: each allowed connection pumped between the guest and its host socket; HTTPS
//!   under rules with credential headers intercepted (`proxy::intercept`); the sandbox CA served
//!   to the guest on the gateway (`proxy::ca_endpoint`).
//! - [`fetch`]: a blocking, policy-checked HTTP(S) client for the isolate tier's `fetch` host
//!   call (no NIC: the VMM makes the request itself).
//! - [`thread`]: the event loop and [`spawn`].
//! - [`peer`]: a userspace guest on the frame link, for tests and benchmarks.

pub mod audit;
pub mod dns;
pub mod fetch;
pub mod inspect;
pub mod limits;
pub mod names;
pub mod peer;
pub mod policy;
pub mod proxy;
pub mod random;
pub mod recorder;
pub mod resolver;
pub mod stack;
pub mod thread;
pub mod tls;

pub use resolver::ResolverConfig;
pub use thread::{
    spawn, spawn_with_hook, EgressConfig, EgressHandle, EgressStats, EgressStatsReader,
    ThreadStartHook,
};
