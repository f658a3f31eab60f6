//! The host side of hybrid vsock: Unix sockets.
//!
//! - Host-initiated: a host process connects to the listening socket at `uds_path` and writes
//!   `CONNECT <port>\n`; the guest gets an OP_REQUEST to `port`, and when it answers with
//!   OP_RESPONSE the host process reads `OK <hostport>\n` and the stream is open.
//! - Guest-initiated: an OP_REQUEST to port P connects to `<uds_path>_P`; if nothing listens
//!   there the guest gets OP_RST.
//!
//! Connections are keyed by (host port, guest port). All host sockets are non-blocking and
//! watched by the event loop with exactly the interest each needs at the moment
//! ([`Connection::interest`]), so a socket we cannot serve (no guest credit, no rx buffers)
//! never wakes the loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use tracing::{debug, warn};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Verdict};
use super::packet::{Header, Op, HOST_CID, TYPE_STREAM};

/// Most concurrent connections; further guest requests are reset, further host ones closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most accepted host sockets still sending their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Most RSTs waiting for rx buffers; beyond that they are dropped (a guest flooding bad
/// packets must not make us queue without bound).
pub const MAX_CONTROL_PACKETS: usize = 1024;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports are handed out from here (above what guests usually listen on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// How long the guest has to accept a host-initiated connection before the host socket is
/// closed (and the guest sent an RST, so a late answer finds nothing).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often pending requests are checked while there are any.
const REQUEST_TICK: Duration = Duration::from_millis(250);

/// Epoll token of the listening socket.
pub const LISTENER_TOKEN: u32 = 8;
/// Epoll token of the request timer.
pub const TIMER_TOKEN: u32 = 10;
/// Host socket tokens are `FD_TOKEN_BASE + fd`, which is unique among open sockets.
pub const FD_TOKEN_BASE: u32 = 16;

/// (host port, guest port).
pub type ConnKey = (u32, u32);

/// Errors creating the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request timer could not be created.
    #[error("cannot create a timerfd: {0}")]
    Timer(#[source] std::io::Error),
    /// The listening socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Host sockets and connections of one vsock device.
#[derive(Debug)]
pub struct UnixBackend {
    uds_path: PathBuf,
    guest_cid: u64,
    listener: UnixListener,
    listener_registered: bool,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    /// What the event loop currently watches for each host socket.
    registered: HashMap<RawFd, EventSet>,
    /// Sockets to unregister and then close.
    closing: Vec<UnixStream>,
    /// Connections that may have packets for the guest, each at most once (`rx_queued`), so a
    /// guest that sends without ever taking packets cannot grow it.
    rx_ready: VecDeque<ConnKey>,
    rx_queued: HashSet<ConnKey>,
    /// Connections whose epoll interest may have changed since the last [`Self::sync`], so a
    /// sync costs what changed, not what is open.
    dirty: HashSet<ConnKey>,
    /// OP_RSTs for packets that match no connection.
    control: VecDeque<Header>,
    next_local_port: u32,
    /// Ticks while host-initiated requests wait for the guest. Only ever re-armed while
    /// disarmed and disarmed from its own event, so a readiness epoll reported is never
    /// cancelled before the (blocking) read of its count.
    timer: TimerFd,
    timer_registered: bool,
    request_timeout: Duration,
    tick: Duration,
}

impl UnixBackend {
    /// Listens on `uds_path` (which must not exist yet).
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Self, BackendError> {
        // Created before binding: once the path exists, only Drop removes it.
        let timer = TimerFd::new().map_err(|e| BackendError::Timer(e.into()))?;
        let listen = || -> std::io::Result<UnixListener> {
            let l = UnixListener::bind(uds_path)?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let listener = listen().map_err(|source| BackendError::Listen {
            path: uds_path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            uds_path: uds_path.to_path_buf(),
            guest_cid,
            listener,
            listener_registered: false,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            registered: HashMap::new(),
            closing: Vec::new(),
            rx_ready: VecDeque::new(),
            rx_queued: HashSet::new(),
            dirty: HashSet::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            timer,
            timer_registered: false,
            request_timeout: REQUEST_TIMEOUT,
            tick: REQUEST_TICK,
        })
    }

    /// Changes how long the guest has to accept host-initiated connections, checked every
    /// `tick`.
    pub fn set_request_timeout(&mut self, timeout: Duration, tick: Duration) {
        self.request_timeout = timeout;
        self.tick = tick;
    }

    /// The request timer fired: resets host-initiated connections the guest left unanswered.
    pub fn on_timer(&mut self) {
        if let Err(e) = self.timer.wait() {
            warn!("vsock: request timer read failed: {e}");
        }
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.awaiting_since()
                    .is_some_and(|t| now.duration_since(t) >= self.request_timeout)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            debug!("vsock: guest did not answer a connection to port {}", key.1);
            self.remove(key, Verdict::Reset);
        }
        if !self.conns.values().any(|c| c.awaiting_since().is_some()) {
            if let Err(e) = self.timer.clear() {
                warn!("vsock: cannot disarm the request timer: {e}");
            }
        }
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection and pending handshake (device reset): host sockets get closed.
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            self.closing.push(c.into_stream());
        }
        for (_, h) in self.handshakes.drain() {
            self.closing.push(h.stream);
        }
        self.fd_keys.clear();
        self.rx_ready.clear();
        self.rx_queued.clear();
        self.dirty.clear();
        self.control.clear();
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() >= MAX_CONTROL_PACKETS {
            debug!("vsock: control queue full, dropping an RST");
            return;
        }
        self.control.push_back(hdr);
    }

    /// A malformed packet from the guest: resets the connection it names, if any, else
    /// answers it with an OP_RST.
    pub fn on_bad_packet(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.remove(key, Verdict::Reset);
        } else {
            self.reset_guest_packet(hdr);
        }
    }

    /// Replies OP_RST to a guest packet `hdr` that cannot be served.
    fn reset_guest_packet(&mut self, hdr: &Header) {
        if hdr.op == Op::Rst as u16 {
            return;
        }
        self.push_control(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn remove(&mut self, key: ConnKey, verdict: Verdict) {
        if let Some(c) = self.conns.remove(&key) {
            if verdict == Verdict::Reset {
                let rst = c.rst_packet();
                self.push_control(rst);
            }
            self.fd_keys.remove(&c.stream().as_raw_fd());
            self.closing.push(c.into_stream());
        }
    }

    fn enqueue(&mut self, key: ConnKey) {
        if self.rx_queued.insert(key) {
            self.rx_ready.push_back(key);
        }
    }

    fn after(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {
                self.dirty.insert(key);
                if self.conns.get(&key).is_some_and(Connection::has_rx_work) {
                    self.enqueue(key);
                }
            }
            v => self.remove(key, v),
        }
    }

    /// Handles a validated packet from the guest.
    pub fn on_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_guest_packet(hdr, op, payload);
            self.after(key, verdict);
            return;
        }
        match op {
            Op::Request => self.guest_connect(hdr),
            Op::Rst => {}
            _ => self.reset_guest_packet(hdr),
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: {MAX_CONNECTIONS} connections open, refusing guest request");
            self.reset_guest_packet(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let key = (hdr.dst_port, hdr.src_port);
                self.fd_keys.insert(stream.as_raw_fd(), key);
                let conn = Connection::guest_initiated(stream, self.guest_cid, hdr);
                self.conns.insert(key, conn);
                self.dirty.insert(key);
                self.enqueue(key);
            }
            Err(e) => {
                debug!("vsock: guest connect to port {} refused: {e}", hdr.dst_port);
                self.reset_guest_packet(hdr);
            }
        }
    }

    /// Accepts pending host connections on the listening socket.
    pub fn accept(&mut self) {
        // Bounded so one event cannot keep the loop here; level-triggered epoll comes back.
        for _ in 0..MAX_HANDSHAKES {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES {
                        warn!("vsock: too many pending host connections, closing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: cannot make a host socket non-blocking: {e}");
                        continue;
                    }
                    let handshake = Handshake {
                        stream,
                        line: Vec::new(),
                    };
                    self.handshakes
                        .insert(handshake.stream.as_raw_fd(), handshake);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// Epoll reported host socket `fd` ready with `events`.
    pub fn on_host_event(&mut self, fd: RawFd, events: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd);
            return;
        }
        let Some(&key) = self.fd_keys.get(&fd) else {
            return;
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_host_event(events);
            self.after(key, verdict);
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte so no stream data after it is consumed.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match h.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&h.line),
                Ok(1) if h.line.len() < MAX_CONNECT_LINE => h.line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(port) = port else {
            debug!(
                "vsock: bad handshake from host: {:?}",
                String::from_utf8_lossy(&h.line)
            );
            self.closing.push(h.stream);
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: {MAX_CONNECTIONS} connections open, closing host request");
            self.closing.push(h.stream);
            return;
        }
        let local = self.allocate_local_port(port);
        let key = (local, port);
        self.fd_keys.insert(fd, key);
        self.conns.insert(
            key,
            Connection::host_initiated(h.stream, self.guest_cid, local, port),
        );
        self.dirty.insert(key);
        self.enqueue(key);
    }

    fn allocate_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// Entries waiting for rx buffers (control packets plus queued connections).
    #[cfg(test)]
    pub fn rx_backlog(&self) -> usize {
        self.control.len() + self.rx_ready.len()
    }

    /// Pending host work and every connection with its credit state, one per line.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "backend: {} connection(s), {} handshake(s), rx_ready {:?}, {} control packet(s), \
             {} socket(s) to close",
            self.conns.len(),
            self.handshakes.len(),
            self.rx_ready,
            self.control.len(),
            self.closing.len()
        );
        let mut keys: Vec<&ConnKey> = self.conns.keys().collect();
        keys.sort();
        for key in keys {
            let conn = &self.conns[key];
            let fd = conn.stream().as_raw_fd();
            out.push_str(&format!(
                "\nconn host {} guest {} fd {fd} watched {:?} has_rx_work {}: {}",
                key.0,
                key.1,
                self.registered.get(&fd),
                conn.has_rx_work(),
                conn.diagnostics()
            ));
        }
        out
    }

    /// Whether [`Self::next_rx_packet`] may produce something.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest, with up to `buf.len()` payload bytes read into `buf`.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<Header> {
        if let Some(hdr) = self.control.pop_front() {
            return Some(hdr);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            self.rx_queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            // Reading the host socket changes what it should be watched for.
            self.dirty.insert(key);
            let Some(pkt) = conn.next_rx_packet(buf) else {
                continue;
            };
            if pkt.last {
                self.remove(key, Verdict::Drop);
            } else if conn.has_rx_work() {
                self.enqueue(key);
            }
            return Some(pkt.hdr);
        }
        None
    }

    /// Queues every connection that has rx work again (after a credit change or new rx
    /// buffers nothing else would).
    pub fn requeue_all(&mut self) {
        for (key, conn) in &self.conns {
            if conn.has_rx_work() && self.rx_queued.insert(*key) {
                self.rx_ready.push_back(*key);
            }
        }
    }

    /// Brings the event loop's view of the host sockets in line: closes sockets that are done,
    /// watches new ones, and updates the interest of connections that changed.
    pub fn sync(&mut self, ops: &mut EventOps) {
        if !self.listener_registered {
            let ev = Events::with_data(&self.listener, LISTENER_TOKEN, EventSet::IN);
            match ops.add(ev) {
                Ok(()) => self.listener_registered = true,
                Err(e) => warn!("vsock: cannot watch the listening socket: {e}"),
            }
        }
        if !self.timer_registered {
            let ev = Events::with_data(&self.timer, TIMER_TOKEN, EventSet::IN);
            match ops.add(ev) {
                Ok(()) => self.timer_registered = true,
                Err(e) => warn!("vsock: cannot watch the request timer: {e}"),
            }
        }
        let waiting = self.conns.values().any(|c| c.awaiting_since().is_some());
        // An error from is_armed counts as armed: re-arming could cancel a pending tick.
        if waiting && !self.timer.is_armed().unwrap_or(true) {
            if let Err(e) = self.timer.reset(self.tick, Some(self.tick)) {
                warn!("vsock: cannot arm the request timer: {e}");
            }
        }
        for stream in self.closing.drain(..) {
            let fd = stream.as_raw_fd();
            if self.registered.remove(&fd).is_some() {
                if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                    warn!("vsock: cannot stop watching a host socket: {e}");
                }
            }
        }
        let mut wanted: Vec<(RawFd, Option<EventSet>)> = self
            .handshakes
            .keys()
            .map(|&fd| (fd, Some(EventSet::IN)))
            .collect();
        for key in self.dirty.drain() {
            if let Some(c) = self.conns.get(&key) {
                wanted.push((c.stream().as_raw_fd(), c.interest()));
            }
        }
        for (fd, want) in wanted {
            set_interest(ops, &mut self.registered, fd, want);
        }
    }
}

impl Drop for UnixBackend {
    fn drop(&mut self) {
        // The path would make the next device on it fail to bind.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            debug!("vsock: cannot remove {}: {e}", self.uds_path.display());
        }
    }
}

fn set_interest(
    ops: &mut EventOps,
    registered: &mut HashMap<RawFd, EventSet>,
    fd: RawFd,
    want: Option<EventSet>,
) {
    let Ok(token) = u32::try_from(fd).map(|f| f.saturating_add(FD_TOKEN_BASE)) else {
        return;
    };
    let have = registered.get(&fd).copied();
    if have == want {
        return;
    }
    let result = match (have, want) {
        (None, Some(set)) => ops.add(Events::with_data_raw(fd, token, set)),
        (Some(_), Some(set)) => ops.modify(Events::with_data_raw(fd, token, set)),
        (Some(_), None) => ops.remove(Events::empty_raw(fd)),
        (None, None) => Ok(()),
    };
    match result {
        Ok(()) => match want {
            Some(set) => {
                registered.insert(fd, set);
            }
            None => {
                registered.remove(&fd);
            }
        },
        Err(e) => warn!("vsock: cannot update interest of a host socket: {e}"),
    }
}

/// Connects to a Unix socket without ever waiting: std's connect blocks while the listener's
/// backlog is full, and the event loop must not. For AF_UNIX a non-blocking connect either
/// completes at once or fails (EAGAIN when the backlog is full); it is never in progress.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    // SAFETY: all-zero bytes are a valid sockaddr_un (a plain C struct of integers).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    // One byte stays zero: the path must be NUL-terminated.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long for sockaddr_un",
        ));
    }
    for (dst, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = b as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket nobody else owns; the stream closes it.
    let stream = unsafe { <UnixStream as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the call, and `len`
    // is its size.
    let ret = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT +5"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
    }

    #[test]
    fn nonblocking_connect_reaches_listeners_and_reports_errors() {
        let dir = std::env::temp_dir().join(format!("agentvm-vsock-nb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l");
        let listener = UnixListener::bind(&path).unwrap();
        let mut s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut s, b"x").unwrap();
        let mut b = [0u8; 1];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // Non-blocking from the start: nothing to read is WouldBlock, not a wait.
        let err = s.read(&mut b).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);

        let missing = connect_nonblocking(&dir.join("none")).unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        let long = dir.join("x".repeat(200));
        let too_long = connect_nonblocking(&long).unwrap_err();
        assert_eq!(too_long.kind(), ErrorKind::InvalidInput);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
