//! Port forwarding: byte streams to TCP servers on the guest's loopback, and a host listener that
//! forwards each accepted client through its own `Connect` request.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use agentvm_protocol::{Connect, Eof, Message, Stream};

use crate::call_reader::CallReader;
use crate::client::AgentClient;
use crate::connection::CallLink;
use crate::error::Result;
use crate::exec::send_error_to_io;

impl AgentClient {
    /// Opens a TCP connection to `guest_port` on the guest's loopback; returns once connected.
    pub fn connect_port(&self, guest_port: u16) -> Result<PortStream> {
        let mut call = self.start(|id| {
            Message::Connect(Connect {
                id,
                port: guest_port,
            })
        })?;
        let what = format!("the connection to guest port {guest_port}");
        match self.next(&mut call, &what)? {
            Message::Ready(_) => {}
            other => return Err(call.unexpected(&other, &what)),
        }
        let writer = PortWriter {
            link: call.link().clone(),
            shut: false,
        };
        Ok(PortStream {
            reader: PortReader {
                stream: CallReader::new(call, Stream::Stdout),
                guest_port,
            },
            writer,
        })
    }

    /// Accepts clients on `listener` on a background thread and forwards each to `guest_port`
    /// through its own connection request, until the handle is stopped or dropped.
    pub fn forward_listener(
        &self,
        listener: impl Into<ForwardListener>,
        guest_port: u16,
    ) -> Result<ForwardHandle> {
        let listener = listener.into();
        // Non-blocking accept polled against the stop flag: std offers no way to interrupt a
        // blocking accept, and a short poll keeps the accept latency negligible.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::default();
        let client = self.clone();
        let (thread_stop, thread_clients) = (Arc::clone(&stop), Arc::clone(&clients));
        let thread = thread::Builder::new()
            .name(format!("agentvm-forward-{guest_port}"))
            .spawn(move || {
                accept_loop(client, listener, guest_port, thread_stop, thread_clients)
            })?;
        Ok(ForwardHandle {
            stop,
            clients,
            thread: Some(thread),
        })
    }
}

/// A connection to a guest TCP port: `Read` what the guest server sends, `Write` to it.
pub struct PortStream {
    reader: PortReader,
    writer: PortWriter,
}

impl PortStream {
    /// Bounds each `read`'s wait for data; see [`PortReader::set_read_timeout`].
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.reader.set_read_timeout(timeout);
    }

    /// Half-closes: the guest server reads end of file; reading goes on.
    pub fn shutdown_write(&mut self) -> Result<()> {
        self.writer.shutdown_write()
    }

    /// Separate halves, to pump both directions from two threads.
    pub fn split(self) -> (PortReader, PortWriter) {
        (self.reader, self.writer)
    }
}

impl Read for PortStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for PortStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest → host half. Dropping it before the connection ended closes the connection.
pub struct PortReader {
    stream: CallReader,
    guest_port: u16,
}

impl PortReader {
    /// Bounds each `read`'s wait for data (an `io::ErrorKind::TimedOut` error; the stream stays
    /// usable). `None`, the default, waits as long as the connection lasts.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.stream.read_timeout = timeout;
    }

    /// After both directions ended (end of file read, write half shut down): waits up to
    /// `timeout` for the guest to confirm the connection is over, so that dropping the reader
    /// does not have to `Close` it. Data still arriving is discarded.
    pub fn wait_closed(&mut self, timeout: Duration) -> Result<()> {
        let what = format!("guest port {} connection to end", self.guest_port);
        while !self.stream.call.is_done() {
            match self.stream.call.next(Some(timeout), &what)? {
                Message::Data(data) if data.stream == Stream::Stdout => self
                    .stream
                    .call
                    .link()
                    .consumed(Stream::Stdout, data.data.len())?,
                Message::Eof(_) | Message::Done(_) => {}
                other => return Err(self.stream.call.unexpected(&other, &what)),
            }
        }
        Ok(())
    }

    /// Closes the whole connection.
    pub fn close(&self) -> Result<()> {
        self.stream.call.link().close()
    }
}

impl Read for PortReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let guest_port = self.guest_port;
        self.stream
            .read(buf, || format!("data from guest port {guest_port}"))
    }
}

/// The host → guest half.
pub struct PortWriter {
    link: CallLink,
    shut: bool,
}

impl PortWriter {
    /// Closes the whole connection (both directions), e.g. to end a blocked read on the other
    /// half from this thread.
    pub fn close(&self) -> Result<()> {
        self.link.close()
    }

    /// Sends end of file to the guest server (once).
    pub fn shutdown_write(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.shut, true) {
            return Ok(());
        }
        self.link.send_control(&Message::Eof(Eof {
            id: self.link.id(),
            stream: Stream::Stdin,
        }))
    }
}

impl Write for PortWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the write half was shut down",
            ));
        }
        self.link
            .send_data(Stream::Stdin, buf, None)
            .map_err(|e| send_error_to_io(e, "the guest connection ended"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A host listener to forward from.
pub enum ForwardListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for ForwardListener {
    fn from(listener: TcpListener) -> Self {
        ForwardListener::Tcp(listener)
    }
}

impl From<UnixListener> for ForwardListener {
    fn from(listener: UnixListener) -> Self {
        ForwardListener::Unix(listener)
    }
}

impl ForwardListener {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            ForwardListener::Tcp(l) => l.set_nonblocking(on),
            ForwardListener::Unix(l) => l.set_nonblocking(on),
        }
    }

    fn accept(&self) -> io::Result<Client> {
        match self {
            ForwardListener::Tcp(l) => l.accept().map(|(s, _)| Client::Tcp(s)),
            ForwardListener::Unix(l) => l.accept().map(|(s, _)| Client::Unix(s)),
        }
    }
}

/// An accepted host client.
enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Client {
    fn try_clone(&self) -> io::Result<Client> {
        Ok(match self {
            Client::Tcp(s) => Client::Tcp(s.try_clone()?),
            Client::Unix(s) => Client::Unix(s.try_clone()?),
        })
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Client::Tcp(s) => s.set_nonblocking(on),
            Client::Unix(s) => s.set_nonblocking(on),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Client::Tcp(s) => s.shutdown(how),
            Client::Unix(s) => s.shutdown(how),
        };
    }
}

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Client::Tcp(s) => s.read(buf),
            Client::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Client {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Client::Tcp(s) => s.write(buf),
            Client::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A running forwarder. Stopping (or dropping) it stops accepting and disconnects every client
/// it forwarded.
pub struct ForwardHandle {
    stop: Arc<AtomicBool>,
    clients: Clients,
    thread: Option<JoinHandle<()>>,
}

impl ForwardHandle {
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let clients = std::mem::take(&mut *lock(&self.clients));
        for forwarded in clients.into_values() {
            forwarded.host.shutdown(Shutdown::Both);
            if let Some(guest) = forwarded.guest {
                let _ = guest.close();
            }
        }
    }
}

impl Drop for ForwardHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}

const ACCEPT_POLL: Duration = Duration::from_millis(20);

fn accept_loop(
    client: AgentClient,
    listener: ForwardListener,
    guest_port: u16,
    stop: Arc<AtomicBool>,
    clients: Clients,
) {
    let mut next_key = 0u64;
    while !stop.load(Ordering::SeqCst) && client.closed_reason().is_none() {
        let accepted = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A client that vanished between SYN and accept, or fd exhaustion: keep serving.
            Err(_) => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if accepted.set_nonblocking(false).is_err() {
            continue;
        }
        let Ok(copy) = accepted.try_clone() else {
            continue;
        };
        next_key += 1;
        let key = next_key;
        lock(&clients).insert(
            key,
            Forwarded {
                host: copy,
                guest: None,
            },
        );
        let agent = client.clone();
        let own_clients = Arc::clone(&clients);
        let _ = thread::Builder::new()
            .name(format!("agentvm-forward-{guest_port}-conn"))
            .spawn(move || {
                forward_one(agent, accepted, guest_port, key, &own_clients);
                lock(&own_clients).remove(&key);
            });
    }
}

/// Accepted clients still being forwarded, so that stopping can disconnect them.
type Clients = Arc<Mutex<HashMap<u64, Forwarded>>>;

/// One forwarded client: its host socket and, once connected, its guest request.
struct Forwarded {
    host: Client,
    guest: Option<CallLink>,
}

fn lock(clients: &Clients) -> std::sync::MutexGuard<'_, HashMap<u64, Forwarded>> {
    clients.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pumps one accepted client through its own `Connect` request, both directions, until both end.
fn forward_one(agent: AgentClient, mut host: Client, guest_port: u16, key: u64, clients: &Clients) {
    let port = match agent.connect_port(guest_port) {
        Ok(port) => port,
        Err(_) => {
            // Nothing listens in the guest (or the agent is gone): the client sees a closed
            // connection, like connecting to a closed port.
            host.shutdown(Shutdown::Both);
            return;
        }
    };
    match lock(clients).get_mut(&key) {
        Some(forwarded) => forwarded.guest = Some(port.reader.stream.call.link().clone()),
        // The forwarder was stopped while this client connected.
        None => return,
    }
    let (mut from_guest, mut to_guest) = port.split();
    let Ok(mut host_reader) = host.try_clone() else {
        host.shutdown(Shutdown::Both);
        return;
    };
    let upstream = thread::spawn(move || {
        let _ = io::copy(&mut host_reader, &mut to_guest);
        let _ = to_guest.shutdown_write();
    });
    let _ = io::copy(&mut from_guest, &mut host);
    host.shutdown(Shutdown::Write);
    let _ = upstream.join();
    host.shutdown(Shutdown::Both);
    let _ = from_guest.wait_closed(agent.call_timeout());
}
