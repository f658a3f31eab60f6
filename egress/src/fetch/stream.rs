//! The connection of one fetch: a TCP socket whose every read and write is bounded by the fetch's
//! deadline, optionally under rustls.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::FetchError;

/// A blocking socket that sets its timeouts to the time left before each call, so no single
/// read or write (nor the sum of them) outlives the deadline.
pub struct DeadlineStream {
    socket: TcpStream,
    deadline: Instant,
    sent: usize,
    received: usize,
}

impl DeadlineStream {
    /// Connects to `address`, giving up at `deadline`.
    pub fn connect(address: SocketAddr, deadline: Instant) -> Result<Self, FetchError> {
        let left = time_left(deadline)?;
        let socket = TcpStream::connect_timeout(&address, left).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                FetchError::Timeout(format!("connecting to {address}"))
            } else {
                FetchError::Network(format!("cannot connect to {address}: {e}"))
            }
        })?;
        // Requests are written whole; Nagle would only delay the last segment.
        let _ = socket.set_nodelay(true);
        Ok(Self {
            socket,
            deadline,
            sent: 0,
            received: 0,
        })
    }

    fn arm(
        &self,
        set: impl FnOnce(&TcpStream, Option<Duration>) -> io::Result<()>,
    ) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        set(&self.socket, Some(left))
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(TcpStream::set_read_timeout)?;
        let n = self.socket.read(buf).map_err(as_timeout)?;
        self.received += n;
        Ok(n)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(TcpStream::set_write_timeout)?;
        let n = self.socket.write(buf).map_err(as_timeout)?;
        self.sent += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

/// A socket timeout shows as EAGAIN; callers should see it as what it is.
fn as_timeout(error: io::Error) -> io::Error {
    if error.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "deadline passed")
    } else {
        error
    }
}

/// The time left before `deadline`, or Timeout.
pub fn time_left(deadline: Instant) -> Result<Duration, FetchError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(FetchError::Timeout("(the deadline had passed)".into()));
    }
    Ok(left)
}

/// Plain or TLS: what the HTTP code reads and writes.
pub enum Connection {
    Plain(DeadlineStream),
    Tls(Box<StreamOwned<ClientConnection, DeadlineStream>>),
}

impl Connection {
    /// TLS to `server_name` over `stream` (the handshake runs on first use).
    pub fn tls(
        config: Arc<ClientConfig>,
        server_name: &str,
        stream: DeadlineStream,
    ) -> Result<Self, FetchError> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|_| {
            FetchError::BadRequest(format!("{server_name:?} is not a valid TLS server name"))
        })?;
        let session = ClientConnection::new(config, name)
            .map_err(|e| FetchError::Network(format!("TLS: {e}")))?;
        Ok(Self::Tls(Box::new(StreamOwned::new(session, stream))))
    }

    /// Bytes sent and received on the socket so far (TLS records included), for byte caps and
    /// the audit log: counted whether the exchange succeeded or not.
    pub fn transferred(&self) -> (usize, usize) {
        let stream = match self {
            Self::Plain(stream) => stream,
            Self::Tls(tls) => &tls.sock,
        };
        (stream.sent, stream.received)
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.read(buf),
            Self::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.write(buf),
            Self::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(stream) => stream.flush(),
            Self::Tls(stream) => stream.flush(),
        }
    }
}

/// An I/O error on the connection as a fetch error: a timeout, or a network failure saying
/// what was being done.
pub fn io_error(doing: &str, error: io::Error) -> FetchError {
    if error.kind() == io::ErrorKind::TimedOut {
        FetchError::Timeout(doing.to_string())
    } else {
        FetchError::Network(format!("{doing}: {error}"))
    }
}
