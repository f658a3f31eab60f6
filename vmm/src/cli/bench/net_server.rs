//! The upstream end of `agentvm bench net`: one TCP server on 127.0.0.1 that both the filtered
//! guest and the host peer talk to, so the two paths end at the same code. Each connection's
//! first byte says what it wants:
//!
//! - [`PROBE`]: the server answers one byte ([`PROBE_REPLY`]), reads to EOF and closes
//!   (connection setup runs: the reply shows the connection reached the server);
//! - [`SINK`]: the server reads to EOF, reports how many bytes came after the command, closes;
//! - [`SOURCE`] + u64 LE length: the server writes that many bytes, closes its side, reads to EOF.
//!
//! Connections are served one after another (the benchmark opens one at a time); every read
//! and write has a time limit, so a stuck client cannot hold the server.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const PROBE: u8 = b'C';
pub const PROBE_REPLY: u8 = b'c';
pub const SINK: u8 = b'U';
pub const SOURCE: u8 = b'D';
/// Chunk size of the server's reads and writes.
const CHUNK: usize = 256 * 1024;

/// The running server; dropping it stops and joins its thread.
pub struct BenchServer {
    pub address: SocketAddrV4,
    stop: Arc<AtomicBool>,
    /// Bytes each SINK connection received, in order.
    sunk: Receiver<io::Result<u64>>,
    thread: Option<JoinHandle<()>>,
}

impl BenchServer {
    /// Listens on 127.0.0.1 (a free port); `io_timeout` bounds every read and write.
    pub fn start(io_timeout: Duration) -> Result<Self, String> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("bench server: cannot listen on 127.0.0.1: {e}"))?;
        let address = match listener.local_addr() {
            Ok(std::net::SocketAddr::V4(address)) => address,
            other => return Err(format!("bench server: unexpected local address {other:?}")),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let (sunk_tx, sunk) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    if let Some(result) = serve(stream, io_timeout) {
                        let _ = sunk_tx.send(result);
                    }
                }
            })
            .map_err(|e| format!("bench server: cannot start its thread: {e}"))?;
        Ok(BenchServer {
            address,
            stop,
            sunk,
            thread: Some(thread),
        })
    }

    /// What the last SINK connection received, waiting up to `timeout` for it.
    pub fn sunk_bytes(&self, timeout: Duration) -> Result<u64, String> {
        match self.sunk.recv_timeout(timeout) {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(format!("bench server: sink connection failed: {e}")),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "bench server: no sink connection finished within {timeout:?}"
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err("bench server: its thread ended early".into())
            }
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The thread waits in accept: one more connection lets it see the flag.
        let _ = TcpStream::connect_timeout(&self.address.into(), Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves one connection; returns the byte count of a SINK connection.
fn serve(mut stream: TcpStream, io_timeout: Duration) -> Option<io::Result<u64>> {
    let setup = stream
        .set_read_timeout(Some(io_timeout))
        .and_then(|()| stream.set_write_timeout(Some(io_timeout)))
        .and_then(|()| stream.set_nodelay(true));
    if setup.is_err() {
        return None;
    }
    let mut command = [0u8; 1];
    if stream.read_exact(&mut command).is_err() {
        return None;
    }
    match command[0] {
        SINK => Some(drain(&mut stream)),
        SOURCE => {
            let mut length = [0u8; 8];
            if stream.read_exact(&mut length).is_ok()
                && write_filler(&mut stream, u64::from_le_bytes(length)).is_ok()
                && stream.shutdown(Shutdown::Write).is_ok()
            {
                let _ = drain(&mut stream);
            }
            None
        }
        PROBE => {
            if stream.write_all(&[PROBE_REPLY]).is_ok() {
                let _ = drain(&mut stream);
            }
            None
        }
        _ => None,
    }
}

/// Reads to EOF; returns how many bytes came.
pub fn drain(stream: &mut TcpStream) -> io::Result<u64> {
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes `length` filler bytes.
pub fn write_filler(stream: &mut TcpStream, length: u64) -> io::Result<()> {
    let buffer = vec![0xa5u8; CHUNK];
    let mut left = length;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The head of a SOURCE connection asking for `length` bytes.
pub fn source_head(length: u64) -> [u8; 9] {
    let mut head = [0u8; 9];
    head[0] = SOURCE;
    head[1..].copy_from_slice(&length.to_le_bytes());
    head
}
