//! Firecracker's external-handler protocol: the VMM connects to the handler's Unix socket and
//! sends one message, a JSON array of the guest memory mappings, with the userfaultfd as
//! SCM_RIGHTS ancillary data. Nothing else is ever sent; the connection stays open for the VM's
//! life, so the handler sees end-of-file when the VM ends.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{GuestRange, PAGE_SIZE};

/// Firecracker's `GuestRegionUffdMapping`: one guest memory region, where the VMM mapped it and
/// where its bytes are in the memory file. Current Firecracker sends the page size (in bytes)
/// as `page_size` and, for handlers written against older versions, again under its deprecated
/// misnomer `page_size_kib` (also bytes); agentvm sends both and accepts either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    #[serde(default)]
    pub page_size: u64,
    #[serde(default)]
    pub page_size_kib: u64,
}

impl GuestRegionUffdMapping {
    fn from_range(range: &GuestRange) -> Self {
        Self {
            base_host_virt_addr: range.host_addr,
            size: range.len,
            offset: range.file_offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        }
    }

    /// The page size the VMM gave, whichever name it used.
    pub fn page_size(&self) -> u64 {
        if self.page_size != 0 {
            self.page_size
        } else {
            self.page_size_kib
        }
    }
}

/// The mappings message is a few hundred bytes; this bounds what a handler accepts.
const MAX_MESSAGE: usize = 64 << 10;

/// Connects to the handler's socket, giving up after `timeout` (a handler whose listen backlog
/// is full would block connect(2) forever). std's UnixStream has no connect timeout; the send
/// timeout set before connect bounds a Unix-socket connect in Linux.
pub(super) fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    sockopt::set_socket_timeout(&socket, sockopt::Timeout::Send, Some(timeout))?;
    sockopt::set_socket_timeout(&socket, sockopt::Timeout::Recv, Some(timeout))?;
    let address = SocketAddrUnix::new(path)?;
    match rustix::net::connect(&socket, &address) {
        Ok(()) => Ok(UnixStream::from(socket)),
        Err(rustix::io::Errno::AGAIN) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?} (the handler is not accepting)"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Sends the mappings of `ranges` with `uffd` attached (bounded by the socket's send timeout).
pub(super) fn send(
    stream: &UnixStream,
    ranges: &[GuestRange],
    uffd: &OwnedFd,
) -> std::io::Result<()> {
    let mappings: Vec<GuestRegionUffdMapping> = ranges
        .iter()
        .map(GuestRegionUffdMapping::from_range)
        .collect();
    let body = serde_json::to_vec(&mappings).map_err(std::io::Error::other)?;
    let sent = stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map_err(std::io::Error::from)?;
    if sent != body.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {sent} of the mappings' {} bytes", body.len()),
        ));
    }
    Ok(())
}

/// What a handler receives from one VMM.
pub struct Received {
    pub mappings: Vec<GuestRegionUffdMapping>,
    pub uffd: OwnedFd,
}

/// Receives the mappings and the userfaultfd (waits at most the stream's read timeout).
pub fn receive(stream: &UnixStream) -> Result<Received, String> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (len, file) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("receiving the mappings: {e}"))?;
    if len == 0 {
        return Err("the VMM closed the connection without sending the mappings".into());
    }
    let uffd = file
        .map(OwnedFd::from)
        .ok_or("the mappings came without a userfaultfd (SCM_RIGHTS)")?;
    let mappings: Vec<GuestRegionUffdMapping> = serde_json::from_slice(&buf[..len])
        .map_err(|e| format!("the mappings are not Firecracker's JSON array: {e}"))?;
    if mappings.is_empty() {
        return Err("the VMM sent no memory mappings".into());
    }
    for m in &mappings {
        if m.page_size() != PAGE_SIZE {
            return Err(format!(
                "mapping at {:#x}: page size {} (only {PAGE_SIZE}-byte pages are served)",
                m.base_host_virt_addr,
                m.page_size()
            ));
        }
        if m.size == 0 || !(m.base_host_virt_addr | m.size | m.offset).is_multiple_of(PAGE_SIZE) {
            return Err(format!(
                "mapping at {:#x} (size {:#x}, offset {:#x}) is empty or not page-aligned",
                m.base_host_virt_addr, m.size, m.offset
            ));
        }
    }
    Ok(Received { mappings, uffd })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_has_firecrackers_field_names_and_either_page_size_name_is_accepted() {
        let range = GuestRange {
            host_addr: 0x7f00_0000_0000,
            guest_addr: Some(0),
            len: 2 << 20,
            file_offset: 0,
        };
        let json = serde_json::to_value([GuestRegionUffdMapping::from_range(&range)]).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "base_host_virt_addr": 0x7f00_0000_0000u64,
                "size": 2 << 20,
                "offset": 0,
                "page_size": 4096,
                "page_size_kib": 4096,
            }])
        );
        let old: GuestRegionUffdMapping = serde_json::from_str(
            r#"{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size_kib": 4096}"#,
        )
        .unwrap();
        assert_eq!(old.page_size(), 4096);
    }

    #[test]
    fn mappings_and_the_uffd_cross_a_socket_pair() {
        let (vmm, handler) = UnixStream::pair().unwrap();
        let range = GuestRange {
            host_addr: 0x10_0000,
            guest_addr: None,
            len: 0x4000,
            file_offset: 0x2000,
        };
        let fd = OwnedFd::from(tempfile::tempfile().unwrap());
        send(&vmm, &[range], &fd).unwrap();
        let got = receive(&handler).unwrap();
        assert_eq!(got.mappings, [GuestRegionUffdMapping::from_range(&range)]);
        assert_ne!(got.uffd.as_raw_fd(), fd.as_raw_fd());

        send(
            &vmm,
            &[GuestRange {
                len: 0x1001,
                ..range
            }],
            &fd,
        )
        .unwrap();
        let err = receive(&handler).err().unwrap();
        assert!(err.contains("not page-aligned"), "{err}");
        drop(vmm);
        let err = receive(&handler).err().unwrap();
        assert!(err.contains("closed the connection"), "{err}");
    }
}
