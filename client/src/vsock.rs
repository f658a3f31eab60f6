//! The host side of hybrid vsock (Firecracker-style): connect to the VMM's Unix socket, ask for a
//! guest port with `CONNECT <port>\n`, and read the `OK <host port>\n` answer. After that line the
//! socket is a plain byte stream to the guest's listener.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::connect_retry::{retry_until, Attempt, GaveUp};
use crate::error::{ClientError, Result};

/// Longest acceptable answer line; a VMM answers `OK <u32 port>`, far shorter.
const MAX_LINE: usize = 64;

/// Connects to `uds_path`, asks for guest `port`, and retries until `deadline`. Returns the stream
/// positioned right after the `OK` line, with no read timeout left set.
pub(crate) fn connect(uds_path: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    retry_until(timeout, |deadline| attempt(uds_path, port, deadline)).map_err(|gave_up| {
        let path = uds_path.to_path_buf();
        match gave_up {
            GaveUp::Fatal(reason) => ClientError::Connect { path, port, reason },
            GaveUp::TimedOut { waited, last } => ClientError::ConnectTimedOut {
                path,
                port,
                waited,
                last,
            },
        }
    })
}

fn attempt(uds_path: &Path, port: u32, deadline: Instant) -> Result<UnixStream, Attempt> {
    let mut stream = UnixStream::connect(uds_path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Attempt::Retry("the vsock socket does not exist (yet)".into()),
        io::ErrorKind::ConnectionRefused => {
            Attempt::Retry("the vsock socket refused the connection (VMM not accepting)".into())
        }
        _ => Attempt::Fatal(format!("connecting to the vsock socket failed: {e}")),
    })?;
    let io_failed = |what: &str, e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Attempt::Retry(format!("no answer to CONNECT {port} ({what} timed out)"))
        }
        // A VMM closing a connection with our CONNECT line unread resets it.
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
            Attempt::Retry(closed_without_ok(port))
        }
        _ => Attempt::Fatal(format!("{what} failed: {e}")),
    };
    let set_timeout = |stream: &UnixStream| {
        let left = deadline.saturating_duration_since(Instant::now());
        // A zero timeout means "none" to the OS, so the last attempt keeps a minimal one.
        let left = left.max(Duration::from_millis(1));
        stream
            .set_read_timeout(Some(left))
            .and_then(|()| stream.set_write_timeout(Some(left)))
    };
    set_timeout(&stream).map_err(|e| io_failed("setting socket timeouts", e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| io_failed("sending CONNECT", e))?;
    let line = read_line(&mut stream).map_err(|e| io_failed("reading the answer", e))?;
    let Some(line) = line else {
        return Err(Attempt::Retry(closed_without_ok(port)));
    };
    // The port in the answer is the host-side port the VMM assigned to this connection (as in
    // Firecracker), not the guest port: any number will do.
    let is_ok = line
        .strip_prefix(b"OK ")
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .is_some_and(|rest| rest.parse::<u32>().is_ok());
    if !is_ok {
        let shown: String = line
            .iter()
            .flat_map(|b| b.escape_ascii())
            .map(char::from)
            .collect();
        return Err(Attempt::Fatal(format!(
            "expected \"OK <port>\" after CONNECT {port}, got \"{shown}\": not a hybrid vsock socket"
        )));
    }
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|e| Attempt::Fatal(format!("clearing socket timeouts failed: {e}")))?;
    Ok(stream)
}

fn closed_without_ok(port: u32) -> String {
    format!(
        "the VMM closed the connection without OK (is the guest agent listening on vsock port {port}?)"
    )
}

/// Reads one `\n`-terminated line one byte at a time, so that not a byte of the protocol that
/// follows is consumed. `None` if the stream ends before the newline.
fn read_line(stream: &mut UnixStream) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == b'\n' => return Ok(Some(line)),
            Ok(_) => {
                if line.len() == MAX_LINE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("answer line longer than {MAX_LINE} bytes"),
                    ));
                }
                line.push(byte[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_line_stops_at_the_newline() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"OK 52\n\x05rest").unwrap();
        assert_eq!(read_line(&mut a).unwrap().unwrap(), b"OK 52");
        let mut rest = [0u8; 5];
        a.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"\x05rest");
    }

    #[test]
    fn read_line_reports_end_of_stream_and_overlong_lines() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"OK").unwrap();
        drop(b);
        assert!(read_line(&mut a).unwrap().is_none());

        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'x'; MAX_LINE + 1]).unwrap();
        let err = read_line(&mut a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
