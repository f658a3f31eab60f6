//! Connecting to a guest agent over a kernel AF_VSOCK socket, for VMMs whose vsock device is
//! served by the host kernel (vhost-vsock, e.g. QEMU's `vhost-vsock-device`) instead of a hybrid
//! vsock Unix socket. The connected socket is handed on as a [`UnixStream`]: the client only
//! reads, writes, clones, shuts down and sets timeouts, which work on any stream socket.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::connect_retry::{retry_until, Attempt, GaveUp};
use crate::error::{ClientError, Result};

/// Connects to `cid`:`port`, retrying until `timeout` while nothing accepts. The stream is
/// blocking, with no timeouts set.
pub(crate) fn connect(cid: u32, port: u32, timeout: Duration) -> Result<UnixStream> {
    retry_until(timeout, |deadline| attempt(cid, port, deadline)).map_err(|gave_up| match gave_up {
        GaveUp::Fatal(reason) => ClientError::VsockConnect { cid, port, reason },
        GaveUp::TimedOut { waited, last } => ClientError::VsockConnectTimedOut {
            cid,
            port,
            waited,
            last,
        },
    })
}

fn attempt(cid: u32, port: u32, deadline: Instant) -> Result<UnixStream, Attempt> {
    let socket = Socket::new(Domain::VSOCK, Type::STREAM, None).map_err(|e| {
        if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
            Attempt::Fatal(format!(
                "this kernel has no AF_VSOCK sockets (load the vsock module, and vhost_vsock for \
                 guests of vhost-vsock devices): {e}"
            ))
        } else {
            Attempt::Fatal(format!("cannot create an AF_VSOCK socket: {e}"))
        }
    })?;
    // A zero timeout means "wait forever" to poll(2)'s caller here, so keep a minimal one.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    socket
        .connect_timeout(&SockAddr::vsock(cid, port), left)
        .map_err(|e| classify(&e))?;
    Ok(UnixStream::from(OwnedFd::from(socket)))
}

fn classify(e: &io::Error) -> Attempt {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock, _) => {
            Attempt::Retry(format!("no answer ({e})"))
        }
        (io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused, _) => Attempt::Retry(
            format!("nothing accepted the connection (is the guest agent listening?): {e}"),
        ),
        // The host kernel has no route to that CID yet: the VM (its vhost-vsock device) is not up.
        (_, Some(libc::ENODEV | libc::EHOSTUNREACH | libc::ENETUNREACH)) => {
            Attempt::Retry(format!(
                "no guest with this CID (VM not up yet, or no vhost_vsock in this kernel): {e}"
            ))
        }
        (io::ErrorKind::Interrupted, _) => Attempt::Retry(format!("interrupted: {e}")),
        _ => Attempt::Fatal(format!("connect failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CID 1 is the local host (vsock_loopback). Whatever this kernel offers (no AF_VSOCK at all,
    /// no loopback transport, or loopback with nothing listening on the port), nothing accepts: the
    /// error must come within the time limit and name the address.
    #[test]
    fn nothing_listening_is_a_clear_error_within_the_limit() {
        let limit = Duration::from_millis(300);
        let started = Instant::now();
        let err = connect(1, 65_432, limit).unwrap_err();
        assert!(started.elapsed() < limit + Duration::from_secs(5));
        match &err {
            ClientError::VsockConnect { cid, port, reason } => {
                assert_eq!((*cid, *port), (1, 65_432));
                assert!(!reason.is_empty());
            }
            ClientError::VsockConnectTimedOut {
                cid, port, last, ..
            } => {
                assert_eq!((*cid, *port), (1, 65_432));
                assert!(!last.is_empty());
            }
            other => panic!("unexpected error: {other}"),
        }
        let text = err.to_string();
        assert!(text.contains("cid 1 port 65432"), "{text}");
    }

    #[test]
    fn errors_are_sorted_into_retry_and_fatal() {
        let retry = |e: io::Error| matches!(classify(&e), Attempt::Retry(_));
        assert!(retry(io::Error::from(io::ErrorKind::TimedOut)));
        assert!(retry(io::Error::from_raw_os_error(libc::ENODEV)));
        assert!(retry(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert!(!retry(io::Error::from(io::ErrorKind::PermissionDenied)));
        assert!(!retry(io::Error::from_raw_os_error(libc::EINVAL)));
    }
}
