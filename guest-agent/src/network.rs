//! The guest's NIC: when the VMM gave the guest a virtio-net device (its egress filter on the
//! other end), address it, route everything through the filter's gateway and use the filter's
//! resolver. The addresses are fixed (`agentvm_protocol::net`): every sandbox's link is its own.
//!
//! Done with the classic ioctls on a throwaway socket, as [`crate::loopback`] does: a netlink
//! crate would be far more code for one address and one route.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use agentvm_protocol::net::{DNS_ADDR, GATEWAY_ADDR, GUEST_ADDR, GUEST_IFNAME, PREFIX_LEN};

/// Where the resolver configuration goes.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What [`configure_nic`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum NicOutcome {
    /// No NIC: the VM has no network, which is the default.
    Absent,
    /// eth0 is up with the guest address, the default route and the resolver.
    Configured,
}

/// Set once [`configure_nic`] has configured eth0: a restored snapshot's after-restore step then
/// also refreshes what the restoring VMM's new egress filter changed (see
/// `server::after_restore`).
static CONFIGURED: AtomicBool = AtomicBool::new(false);

/// Whether this guest has a configured NIC.
pub fn nic_configured() -> bool {
    CONFIGURED.load(Ordering::Relaxed)
}

/// `struct rtentry` of <linux/route.h>; the libc crate defines it only for musl and uclibc.
#[repr(C)]
struct RouteEntry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// Configures eth0 if it exists and points `resolv_conf` (normally [`RESOLV_CONF`]) at the
/// egress filter's resolver.
pub fn configure_nic(resolv_conf: &Path) -> io::Result<NicOutcome> {
    let socket = control_socket()?;
    let mut request = ifreq(GUEST_IFNAME);
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into the ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } != 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENODEV) => Ok(NicOutcome::Absent),
            _ => Err(step_error("read flags of", error)),
        };
    }
    set_address(&socket, libc::SIOCSIFADDR, GUEST_ADDR)
        .map_err(|e| step_error("set the address of", e))?;
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN)));
    set_address(&socket, libc::SIOCSIFNETMASK, mask)
        .map_err(|e| step_error("set the netmask of", e))?;
    // SAFETY: the flags member was written by SIOCGIFFLAGS above.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the name and flags from the ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } != 0 {
        return Err(step_error("bring up", io::Error::last_os_error()));
    }
    add_default_route(&socket)?;
    write_resolv_conf(resolv_conf)?;
    CONFIGURED.store(true, Ordering::Relaxed);
    Ok(NicOutcome::Configured)
}

/// The resolver file naming only the egress filter's resolver.
pub fn write_resolv_conf(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, resolv_conf_text())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
}

fn resolv_conf_text() -> String {
    format!("# written by the agentvm guest agent: the VMM's egress filter resolves names\nnameserver {DNS_ADDR}\noptions timeout:2 attempts:2\n")
}

fn step_error(step: &str, error: io::Error) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("cannot {step} {GUEST_IFNAME}: {error}"),
    )
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    request
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes); the kernel reads the
    // family to know which one it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn set_address(socket: &OwnedFd, request_code: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
    let mut request = ifreq(GUEST_IFNAME);
    request.ifr_ifru.ifru_addr = sockaddr(addr);
    // SAFETY: SIOCSIFADDR / SIOCSIFNETMASK read the name and the address from the ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request_code, &request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_default_route(socket: &OwnedFd) -> io::Result<()> {
    let mut device = *b"eth0\0";
    let mut route = RouteEntry {
        pad1: 0,
        dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        gateway: sockaddr(GATEWAY_ADDR),
        genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        flags: (libc::RTF_UP | libc::RTF_GATEWAY),
        pad2: 0,
        pad3: 0,
        pad4: std::ptr::null_mut(),
        metric: 0,
        dev: device.as_mut_ptr().cast(),
        mtu: 0,
        window: 0,
        irtt: 0,
    };
    // SAFETY: SIOCADDRT reads a struct rtentry (RouteEntry mirrors it) and the device name it
    // points to, which lives until the call returns.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &mut route) } != 0 {
        let error = io::Error::last_os_error();
        // A restored snapshot's guest already has it.
        if error.raw_os_error() != Some(libc::EEXIST) {
            return Err(step_error("add the default route through", error));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_entry_matches_the_kernel_layout() {
        // sizeof(struct rtentry) on x86_64 Linux.
        assert_eq!(std::mem::size_of::<RouteEntry>(), 120);
    }

    #[test]
    fn resolver_is_the_filter_only() {
        let dir = std::env::temp_dir().join(format!("agent-resolv-{}", std::process::id()));
        let path = dir.join("etc/resolv.conf");
        write_resolv_conf(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let servers: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nameserver"))
            .collect();
        assert_eq!(servers, ["nameserver 10.0.2.3"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Child half of the namespace test: runs inside `unshare --net` with a veth eth0.
    #[test]
    #[ignore = "run by configures_eth0_in_a_fresh_network_namespace"]
    fn configure_in_namespace_child() {
        let path = std::env::var("AGENT_NET_TEST_RESOLV").unwrap();
        assert_eq!(
            configure_nic(Path::new(&path)).unwrap(),
            NicOutcome::Configured
        );
        // Idempotent: a restored guest configures again.
        assert_eq!(
            configure_nic(Path::new(&path)).unwrap(),
            NicOutcome::Configured
        );
    }

    #[test]
    fn configures_eth0_in_a_fresh_network_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || which("unshare").is_none() || which("ip").is_none() {
            eprintln!(
                "skipped: needs root, unshare and ip to make a network namespace with a veth eth0"
            );
            return;
        }
        // Removed when dropped, the failing paths included.
        let dir = tempfile::Builder::new()
            .prefix("agent-nic-")
            .tempdir()
            .unwrap();
        let resolv = dir.path().join("resolv.conf");
        let test_binary = std::env::current_exe().unwrap();
        let script = format!(
            "set -e; ip link add eth0 type veth peer name peer0; ip link set peer0 up; {} --ignored --exact network::tests::configure_in_namespace_child --quiet >/dev/null; ip -4 -o addr show dev eth0; ip -4 route; ip -o link show dev eth0",
            test_binary.display()
        );
        let output = std::process::Command::new("unshare")
            .args(["--net", "--", "sh", "-c", &script])
            .env("AGENT_NET_TEST_RESOLV", &resolv)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("inet 10.0.2.15/24"), "{stdout}");
        assert!(stdout.contains("default via 10.0.2.2 dev eth0"), "{stdout}");
        assert!(stdout.contains(",UP"), "{stdout}");
        assert!(std::fs::read_to_string(&resolv)
            .unwrap()
            .contains("nameserver 10.0.2.3"));
    }

    #[test]
    fn no_nic_is_not_an_error() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || which("unshare").is_none() {
            eprintln!("skipped: needs root and unshare");
            return;
        }
        let test_binary = std::env::current_exe().unwrap();
        let status = std::process::Command::new("unshare")
            .args(["--net", "--"])
            .arg(&test_binary)
            .args([
                "--ignored",
                "--exact",
                "network::tests::absent_in_namespace_child",
                "--quiet",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    #[ignore = "run by no_nic_is_not_an_error"]
    fn absent_in_namespace_child() {
        let path = std::env::temp_dir().join("agent-nic-absent-never-written");
        assert_eq!(configure_nic(&path).unwrap(), NicOutcome::Absent);
        assert!(!path.exists());
    }

    fn which(program: &str) -> Option<std::path::PathBuf> {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    }

    #[test]
    fn netmask_of_the_prefix() {
        assert_eq!(
            Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN))),
            Ipv4Addr::new(255, 255, 255, 0)
        );
    }
}
