//! Port forwarding: a TCP connection to a server on the guest's loopback, pumped both ways
//! between it and the request's streams.
//!
//! The socket→host direction runs on the calling thread, waiting with `poll` on the socket and
//! on the request's close signal; the host→socket direction runs on a scoped thread, blocked in
//! the input stream's read (which a close also ends). A close shuts the socket down both ways,
//! which ends whatever the other direction was blocked in.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use agentvm_protocol::{ErrorCode, MAX_CHUNK};

use super::service_error::{os_reason, ServiceError};
use crate::server::fd::poll_ready;

/// Bound on each connection attempt: loopback connects are immediate unless the guest is
/// overloaded or a firewall rule drops packets.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle wait lasts before the loop looks again; only a safety net (a close makes the
/// close signal readable at once).
const IDLE_RECHECK: Duration = Duration::from_secs(60);

/// Connects to `port` on 127.0.0.1, then on [::1].
pub fn connect_loopback(port: u16, timeout: Duration) -> Result<TcpStream, ServiceError> {
    if port == 0 {
        return Err(ServiceError::invalid("cannot forward guest port 0"));
    }
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let first = match TcpStream::connect_timeout(&v4, timeout) {
        Ok(stream) => return Ok(stream),
        Err(e) => e,
    };
    let second = match TcpStream::connect_timeout(&v6, timeout) {
        Ok(stream) => return Ok(stream),
        Err(e) => e,
    };
    // A guest without IPv6 fails the second attempt with something other than a refusal: the
    // IPv4 answer is then the one that matters.
    let refused = |e: &io::Error| e.kind() == io::ErrorKind::ConnectionRefused;
    let no_v6 = matches!(
        second.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT | libc::ENETUNREACH)
    );
    if refused(&first) && (refused(&second) || no_v6) {
        return Err(ServiceError::new(
            ErrorCode::ConnectionRefused,
            format!("nothing listens on guest port {port}"),
        ));
    }
    let e = if refused(&first) { &second } else { &first };
    Err(ServiceError::new(
        ErrorCode::from_io(e),
        format!("cannot connect to guest port {port}: {}", os_reason(e)),
    ))
}

/// How the forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpEnd {
    /// Both directions reached their end.
    Finished,
    /// The request was closed (or its sender failed) first.
    Closed,
}

/// Pumps until both directions ended or `stop` becomes readable.
///
/// - `input`: host→guest bytes; `Ok(0)` is the host's `Eof` (the socket's write side is shut
///   down), an error is a close.
/// - `send`: guest→host bytes (may block on the window); `send_eof` once the server closed its
///   side. An error from either means the request is gone.
pub fn pump<E>(
    socket: &TcpStream,
    input: impl Read + Send,
    stop: BorrowedFd<'_>,
    mut send: impl FnMut(&[u8]) -> Result<(), E>,
    mut send_eof: impl FnMut() -> Result<(), E>,
) -> PumpEnd {
    std::thread::scope(|scope| {
        let upstream = scope.spawn(|| copy_to_socket(input, socket));
        let mut end = PumpEnd::Finished;
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let ready = match poll_ready(
                &[(socket.as_fd(), libc::POLLIN), (stop, libc::POLLIN)],
                Some(IDLE_RECHECK),
            ) {
                Ok(ready) => ready,
                Err(_) => {
                    end = PumpEnd::Closed;
                    break;
                }
            };
            if ready[1] {
                end = PumpEnd::Closed;
                break;
            }
            if !ready[0] {
                continue;
            }
            let n = match (&*socket).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A reset ends the stream like a close would: the host sees its end.
                Err(_) => 0,
            };
            if n == 0 {
                if send_eof().is_err() {
                    end = PumpEnd::Closed;
                }
                break;
            }
            if send(&buf[..n]).is_err() {
                end = PumpEnd::Closed;
                break;
            }
        }
        if end == PumpEnd::Closed {
            // Wakes the upstream thread if it is blocked writing to the server.
            let _ = socket.shutdown(Shutdown::Both);
        }
        // The upstream thread ends at the host's Eof, a close (its read fails) or a socket
        // error; a close was either seen above or makes its read fail promptly.
        match upstream.join() {
            Ok(UpstreamEnd::Eof) => end,
            _ => PumpEnd::Closed,
        }
    })
}

enum UpstreamEnd {
    /// The host sent Eof; the socket's write side is shut down.
    Eof,
    /// The request was closed or the server stopped reading.
    Broken,
}

fn copy_to_socket(mut input: impl Read, socket: &TcpStream) -> UpstreamEnd {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => {
                let _ = socket.shutdown(Shutdown::Write);
                return UpstreamEnd::Eof;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return UpstreamEnd::Broken,
        };
        if (&*socket).write_all(&buf[..n]).is_err() {
            return UpstreamEnd::Broken;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    fn free_port() -> u16 {
        // Bound and dropped: nothing listens on it afterwards (unless another test grabs it in
        // between, which then refuses or accepts — both fail the refused test loudly).
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn refused_port_names_the_port() {
        let port = free_port();
        let err = connect_loopback(port, CONNECT_TIMEOUT).unwrap_err();
        assert_eq!(err.code, ErrorCode::ConnectionRefused);
        assert_eq!(err.message, format!("nothing listens on guest port {port}"));
        assert_eq!(
            connect_loopback(0, CONNECT_TIMEOUT).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn echoes_both_ways_with_half_close() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            // Echo until the client's write side closes, then close ours.
            let (mut conn, _) = listener.accept().unwrap();
            let mut received = Vec::new();
            conn.read_to_end(&mut received).unwrap();
            conn.write_all(&received).unwrap();
            received.len()
        });
        let socket = connect_loopback(port, CONNECT_TIMEOUT).unwrap();
        let (_stop_tx, stop_rx) = UnixStream::pair().unwrap();
        let upload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let received = Arc::new(Mutex::new(Vec::new()));
        let eofs = Arc::new(Mutex::new(0));
        let end = pump::<()>(
            &socket,
            &upload[..],
            stop_rx.as_fd(),
            |data| {
                received.lock().unwrap().extend_from_slice(data);
                Ok(())
            },
            || {
                *eofs.lock().unwrap() += 1;
                Ok(())
            },
        );
        assert_eq!(end, PumpEnd::Finished);
        assert_eq!(server.join().unwrap(), upload.len());
        assert_eq!(*received.lock().unwrap(), upload);
        assert_eq!(*eofs.lock().unwrap(), 1);
    }

    /// Input that never ends until the test says so: like a host that keeps the stream open.
    struct Endless(UnixStream);

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed")),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn close_ends_both_directions() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"hello").unwrap();
            // Holds the connection open until the agent side shuts it down.
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap();
        });
        let socket = connect_loopback(port, CONNECT_TIMEOUT).unwrap();
        let (stop_tx, stop_rx) = UnixStream::pair().unwrap();
        let (input_tx, input_rx) = UnixStream::pair().unwrap();
        let stop_tx = Mutex::new(Some(stop_tx));
        let input_tx = Mutex::new(Some(input_tx));
        let end = pump::<()>(
            &socket,
            Endless(input_rx),
            stop_rx.as_fd(),
            |data| {
                assert_eq!(data, b"hello");
                // The host closes the request once it saw the greeting.
                stop_tx.lock().unwrap().take();
                input_tx.lock().unwrap().take();
                Ok(())
            },
            || Ok(()),
        );
        assert_eq!(end, PumpEnd::Closed);
        server.join().unwrap();
    }
}
