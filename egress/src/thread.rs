//! The egress thread: one mio event loop over the guest's frame socket, every upstream socket,
//! the resolver's sockets and a waker for commands. It sleeps until an event or smoltcp's next
//! timer; it opens no files and starts no threads, so a tight seccomp filter fits it: epoll_wait,
//! epoll_ctl, socket (AF_INET/AF_INET6, stream and datagram), connect, bind (0.0.0.0:0 for DNS
//! queries), getsockopt (SO_ERROR), getpeername, shutdown, sendto, recvfrom, read/write (the
//! waker's eventfd, the audit log), close, clock_gettime, futex, and memory (mmap, munmap,
//! madvise, brk). Poll::new, the waker's eventfd and the random seed for DNS query ids are made
//! by `spawn` on the calling thread.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentvm_protocol::net::{DNS_ADDR, GATEWAY_ADDR};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::audit::{AuditEvent, AuditLog};
use crate::dns::DnsServer;
use crate::limits::RuleCounters;
use crate::policy::{Decision, Destination, Policy, Protocol};
use crate::proxy::ca_endpoint::{is_ca_endpoint, CaRequest};
use crate::proxy::intercept::Interception;
use crate::proxy::{Connection, Context, FlowKey, Progress};
use crate::recorder::Recorder;
use crate::resolver::{Resolver, ResolverConfig};
use crate::stack::device::{FrameDevice, Received, MAX_FRAME};
use crate::stack::inbound::{classify, Inbound};
use crate::stack::Stack;

/// Everything the egress filter of one sandbox needs.
pub struct EgressConfig {
    pub policy: Policy,
    pub audit: AuditLog,
    /// The sandbox's name in audit events.
    pub sandbox: String,
    pub resolver: ResolverConfig,
    /// PEM files of extra roots trusted for upstream servers of intercepted HTTPS (on top of
    /// the compiled-in webpki roots): a corporate proxy's CA, a test server's CA. Read by
    /// `spawn` on the calling thread; production passes none.
    pub extra_upstream_roots: Vec<PathBuf>,
}

/// Counters since the thread started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressStats {
    pub connections_allowed: u64,
    pub connections_denied: u64,
    /// Guest to upstream.
    pub bytes_up: u64,
    /// Upstream to guest.
    pub bytes_down: u64,
    pub dns_queries: u64,
}

#[derive(Default)]
struct SharedStats {
    connections_allowed: AtomicU64,
    connections_denied: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    dns_queries: AtomicU64,
}

/// The egress thread's counters, readable from any thread (frozen once the thread stopped).
#[derive(Clone)]
pub struct EgressStatsReader(Arc<SharedStats>);

impl EgressStatsReader {
    /// The counters now.
    pub fn read(&self) -> EgressStats {
        let stats = &self.0;
        EgressStats {
            connections_allowed: stats.connections_allowed.load(Ordering::Relaxed),
            connections_denied: stats.connections_denied.load(Ordering::Relaxed),
            bytes_up: stats.bytes_up.load(Ordering::Relaxed),
            bytes_down: stats.bytes_down.load(Ordering::Relaxed),
            dns_queries: stats.dns_queries.load(Ordering::Relaxed),
        }
    }
}

/// The running egress thread. Dropping it stops the thread too.
pub struct EgressHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// Read by the thread at every decision, so a new policy holds for the very next
    /// connection or query once `set_policy` returns.
    policy: Arc<Mutex<Policy>>,
    stats: Arc<SharedStats>,
    /// The sandbox CA certificate (PEM) the guest must trust for intercepted HTTPS.
    ca_pem: String,
    thread: Option<JoinHandle<()>>,
}

const FRAMES: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONNECTION_TOKEN: usize = 2;
/// Resolver sockets use tokens from here on; connections stay below.
const RESOLVER_TOKENS: usize = 1 << 40;
/// How often the guest's neighbour entry is renewed while frames flow (smoltcp forgets it after
/// 60 s).
const GUEST_ADDRESS_REFRESH: Duration = Duration::from_secs(20);
/// Open connections per sandbox at most: each holds two host-side buffers and a host socket, so
/// a guest opening connections without end must not exhaust the VMM's memory or descriptors.
const MAX_CONNECTIONS: usize = 4096;
/// Frames taken per loop turn before the sockets get their turn, so a flooding guest cannot
/// starve the upstream side.
const FRAMES_PER_TURN: usize = 256;

/// Starts the egress thread ("net") on the frame socket's other end. Everything that touches
/// files (the resolver configuration, the audit log) must be opened before this call.
pub fn spawn(config: EgressConfig, frames: OwnedFd) -> io::Result<EgressHandle> {
    spawn_with_hook(config, frames, None)
}

/// Something the egress thread runs first, before it touches the frame socket (the VMM puts
/// the thread under its seccomp filter there); an error ends the thread before it serves.
pub type ThreadStartHook = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// [`spawn`], running `hook` first on the new thread.
pub fn spawn_with_hook(
    config: EgressConfig,
    frames: OwnedFd,
    hook: Option<ThreadStartHook>,
) -> io::Result<EgressHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let device = FrameDevice::new(frames)?;
    poll.registry().register(
        &mut SourceFd(&device.raw_fd()),
        FRAMES,
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let resolver = Resolver::new(config.resolver, RESOLVER_TOKENS)?;
    // The CA key is generated and the root files are read here: the thread opens no files.
    let upstream = crate::tls::upstream_client_config(&config.extra_upstream_roots)
        .map_err(io::Error::other)?;
    let interception = Interception::new(&config.sandbox, upstream).map_err(io::Error::other)?;
    let ca_pem = interception.ca.cert_pem();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(SharedStats::default());
    let policy = Arc::new(Mutex::new(config.policy));
    let mut egress = Egress {
        poll,
        stop: stop.clone(),
        stack: Stack::new(device, crate::random::seed()?),
        policy: policy.clone(),
        recorder: Recorder::new(config.audit, config.sandbox),
        resolver,
        dns: DnsServer::default(),
        connections: HashMap::new(),
        ca_requests: HashMap::new(),
        interception,
        ca_pem: ca_pem.clone(),
        counters: RuleCounters::default(),
        next_token: FIRST_CONNECTION_TOKEN,
        stats: stats.clone(),
        frames_left: false,
        guest_address_learned: Instant::now(),
        frame_buffer: vec![0; MAX_FRAME],
    };
    let thread = std::thread::Builder::new()
        .name("net".into())
        .spawn(move || {
            if let Some(hook) = hook {
                if let Err(error) = hook() {
                    tracing::error!(%error, "egress thread cannot start");
                    return;
                }
            }
            egress.run()
        })?;
    Ok(EgressHandle {
        stop,
        waker,
        policy,
        stats,
        ca_pem,
        thread: Some(thread),
    })
}

impl EgressHandle {
    /// Replaces the policy; connections and DNS queries from now on are judged by it, open
    /// connections keep going.
    pub fn set_policy(&self, policy: Policy) {
        *lock(&self.policy) = policy;
    }

    /// The sandbox CA certificate in PEM: the guest trusts it so that HTTPS to rules with
    /// credential headers can be intercepted. The guest fetches it from
    /// `http://<gateway>/agentvm/egress-ca.pem`.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub fn stats(&self) -> EgressStats {
        self.stats_reader().read()
    }

    /// The counters, readable from other threads for as long as they like (the VMM's API reads
    /// them on every metrics request, while the handle stays with the device manager).
    pub fn stats_reader(&self) -> EgressStatsReader {
        EgressStatsReader(self.stats.clone())
    }

    /// Stops the thread; every socket it held is closed when this returns.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::Relaxed);
            if let Err(error) = self.waker.wake() {
                tracing::error!(%error, "cannot wake the egress thread to stop it");
                return;
            }
            if thread.join().is_err() {
                tracing::error!("egress thread panicked");
            }
        }
    }
}

impl Drop for EgressHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Egress {
    poll: Poll,
    stop: Arc<AtomicBool>,
    stack: Stack,
    policy: Arc<Mutex<Policy>>,
    recorder: Recorder,
    resolver: Resolver,
    dns: DnsServer,
    connections: HashMap<FlowKey, Connection>,
    /// Guest connections to the CA endpoint the filter serves itself.
    ca_requests: HashMap<FlowKey, CaRequest>,
    interception: Interception,
    ca_pem: String,
    counters: RuleCounters,
    next_token: usize,
    stats: Arc<SharedStats>,
    /// The last turn stopped reading frames early: look again without sleeping.
    frames_left: bool,
    /// When the guest's MAC was last given to smoltcp.
    guest_address_learned: Instant,
    /// Where each guest frame is read into before it is judged.
    frame_buffer: Vec<u8>,
}

/// The policy is replaced whole under the lock, so a panic elsewhere cannot leave it half-set.
fn lock(policy: &Mutex<Policy>) -> std::sync::MutexGuard<'_, Policy> {
    policy
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Egress {
    /// The policy in force now (a cheap clone of shared rules).
    fn policy(&self) -> Policy {
        lock(&self.policy).clone()
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.timeout();
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(%error, "egress event loop failed");
                return;
            }
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            match self.read_frames() {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!("the VM closed its network link; egress thread ends");
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "reading guest frames failed; egress thread ends");
                    return;
                }
            }
            if let Err(error) = self.stack.device.flush_backlog() {
                tracing::error!(%error, "sending guest frames failed; egress thread ends");
                return;
            }
            self.stack.poll();
            self.serve_dns();
            self.pump_connections();
            self.stack.poll();
            self.reap_connections();
        }
    }

    fn timeout(&mut self) -> Option<Duration> {
        if self.frames_left {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let deadlines = self
            .connections
            .values()
            .filter_map(Connection::deadline)
            .chain(self.ca_requests.values().filter_map(CaRequest::deadline))
            .chain(self.resolver.next_deadline())
            .map(|deadline| deadline.saturating_duration_since(now));
        let stack_delay = if self.stack.device.is_backlogged() {
            None
        } else {
            self.stack.poll_delay()
        };
        deadlines.chain(stack_delay).min()
    }

    /// Ok(false): the VM closed its end.
    fn read_frames(&mut self) -> io::Result<bool> {
        // Taken out of self while frames are judged (which needs all of self), put back after.
        let mut buffer = std::mem::take(&mut self.frame_buffer);
        let result = self.read_frames_into(&mut buffer);
        self.frame_buffer = buffer;
        result
    }

    fn read_frames_into(&mut self, buffer: &mut [u8]) -> io::Result<bool> {
        self.frames_left = false;
        for _ in 0..FRAMES_PER_TURN {
            let length = match self.stack.device.receive_frame(buffer)? {
                Received::Frame(length) => length,
                Received::Empty => return Ok(true),
                Received::Closed => return Ok(false),
            };
            if self.guest_address_learned.elapsed() >= GUEST_ADDRESS_REFRESH {
                self.stack.learn_guest_address();
                self.guest_address_learned = Instant::now();
            }
            let frame = &buffer[..length];
            let pass = match classify(frame) {
                Inbound::TcpSyn { from, to } => {
                    self.guest_connects(from, to);
                    true
                }
                Inbound::Udp { from, to } => {
                    if to != SocketAddrV4::new(DNS_ADDR, 53) {
                        self.udp_denied(from, to);
                    }
                    // smoltcp answers other ports with ICMP port unreachable: a fast failure.
                    true
                }
                // Pings are answered for the gateway and DNS addresses only; anything else
                // answering would suggest the Internet is reachable.
                Inbound::Icmp { to } => to == GATEWAY_ADDR || to == DNS_ADDR,
                // With any_ip smoltcp would claim every address on the link, the guest's own
                // included (its duplicate-address probes would fail).
                Inbound::Arp { target } => target == GATEWAY_ADDR || target == DNS_ADDR,
                Inbound::Other => true,
            };
            if pass {
                self.stack.device.queue_for_stack(frame.to_vec());
            }
        }
        self.frames_left = true;
        Ok(true)
    }

    /// A guest SYN: decide, and when allowed, make a socket that completes the handshake and
    /// start the upstream connect. Denied SYNs find no socket and smoltcp answers them RST.
    fn guest_connects(&mut self, from: SocketAddrV4, to: SocketAddrV4) {
        let key = FlowKey {
            guest: from,
            destination: to,
        };
        if self.connections.contains_key(&key) || self.ca_requests.contains_key(&key) {
            return; // a retransmitted SYN: the existing socket answers it
        }
        let ip = IpAddr::V4(*to.ip());
        let names = self.dns.names().names_for(ip).to_vec();
        if self.connections.len() + self.ca_requests.len() >= MAX_CONNECTIONS {
            let reason = format!("the sandbox already has {MAX_CONNECTIONS} open connections");
            return self.connect_denied(to, &names, None, reason);
        }
        let now = Instant::now();
        if is_ca_endpoint(to) {
            if let Some(socket) = self.stack.listen_as(to) {
                self.ca_requests.insert(key, CaRequest::new(socket, now));
            }
            return;
        }
        let decision = self.policy().check(&Destination {
            ip,
            port: to.port(),
            protocol: Protocol::Tcp,
            names: &names,
        });
        let rule = match decision {
            Decision::Allow(rule) => match self.counters.open_connection(&rule, now) {
                Ok(()) => rule,
                Err(reason) => {
                    return self.connect_denied(
                        to,
                        &names,
                        Some(rule.id.clone()),
                        reason.to_string(),
                    )
                }
            },
            Decision::Deny(reason) => {
                return self.connect_denied(to, &names, None, reason.to_string())
            }
        };
        let Some(socket) = self.stack.listen_as(to) else {
            return self.connect_denied(to, &names, Some(rule.id.clone()), "port 0".into());
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        let registry = self.poll.registry();
        match Connection::open(
            key,
            socket,
            rule.clone(),
            names.clone(),
            token,
            registry,
            now,
        ) {
            Ok(connection) => {
                self.stats
                    .connections_allowed
                    .fetch_add(1, Ordering::Relaxed);
                self.recorder.record(AuditEvent {
                    kind: "connect",
                    protocol: Some("tcp"),
                    dest_ip: Some(ip),
                    dest_port: Some(to.port()),
                    domain: (!names.is_empty()).then(|| names.join(",")),
                    decision: "allow",
                    rule: Some(rule.id.clone()),
                    ..AuditEvent::default()
                });
                self.connections.insert(key, connection);
            }
            Err(error) => {
                self.stack.sockets.remove(socket);
                self.connect_denied(
                    to,
                    &names,
                    Some(rule.id.clone()),
                    format!("upstream connect failed: {error}"),
                );
            }
        }
    }

    fn connect_denied(
        &mut self,
        to: SocketAddrV4,
        names: &[String],
        rule: Option<String>,
        reason: String,
    ) {
        self.stats
            .connections_denied
            .fetch_add(1, Ordering::Relaxed);
        self.recorder.record(AuditEvent {
            kind: "connect",
            protocol: Some("tcp"),
            dest_ip: Some(IpAddr::V4(*to.ip())),
            dest_port: Some(to.port()),
            domain: (!names.is_empty()).then(|| names.join(",")),
            decision: "deny",
            rule,
            reason: Some(reason),
            ..AuditEvent::default()
        });
    }

    fn udp_denied(&mut self, _from: SocketAddrV4, to: SocketAddrV4) {
        self.stats
            .connections_denied
            .fetch_add(1, Ordering::Relaxed);
        self.recorder.record(AuditEvent {
            kind: "connect",
            protocol: Some("udp"),
            dest_ip: Some(IpAddr::V4(*to.ip())),
            dest_port: Some(to.port()),
            decision: "deny",
            reason: Some("only DNS to the VMM's resolver is served over UDP".into()),
            ..AuditEvent::default()
        });
    }

    fn serve_dns(&mut self) {
        let registry = self.poll.registry();
        let policy = self.policy();
        let mut packet = vec![0u8; 4096];
        while let Ok((length, metadata)) = self.stack.dns_socket().recv_slice(&mut packet) {
            let client = metadata.endpoint;
            self.stats.dns_queries.fetch_add(1, Ordering::Relaxed);
            let answer = self.dns.query(
                &packet[..length],
                client,
                &policy,
                &mut self.resolver,
                registry,
                &self.recorder,
            );
            if let Some(answer) = answer {
                // A full DNS socket drops the answer; the guest's resolver asks again.
                let _ = self.stack.dns_socket().send_slice(&answer, client);
            }
        }
        for (id, outcome) in self.resolver.poll(registry, Instant::now()) {
            if let Some((client, answer)) = self.dns.complete(id, outcome, &policy, &self.recorder)
            {
                let _ = self.stack.dns_socket().send_slice(&answer, client);
            }
        }
    }

    fn pump_connections(&mut self) {
        let mut cx = Context {
            stack: &mut self.stack,
            registry: self.poll.registry(),
            counters: &mut self.counters,
            recorder: &self.recorder,
            interception: &self.interception,
            now: Instant::now(),
        };
        let mut finished = Vec::new();
        for (key, connection) in &mut self.connections {
            if connection.pump(&mut cx) == Progress::Finished {
                finished.push(*key);
            }
            let (up, down) = connection.unreported_bytes();
            self.stats.bytes_up.fetch_add(up, Ordering::Relaxed);
            self.stats.bytes_down.fetch_add(down, Ordering::Relaxed);
        }
        for key in finished {
            if let Some(connection) = self.connections.remove(&key) {
                connection.finish(&mut self.stack, self.poll.registry(), &self.recorder);
            }
        }
        let now = Instant::now();
        let mut answered = Vec::new();
        for (key, request) in &mut self.ca_requests {
            if request.pump(&mut self.stack, &self.ca_pem, &self.recorder, now)
                == Progress::Finished
            {
                answered.push(*key);
            }
        }
        for key in answered {
            if let Some(request) = self.ca_requests.remove(&key) {
                request.finish(&mut self.stack);
            }
        }
    }

    /// Connections whose guest side closed during the last poll (a RST sent or received).
    fn reap_connections(&mut self) {
        let closed: Vec<FlowKey> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.is_closed(&mut self.stack))
            .map(|(key, _)| *key)
            .collect();
        for key in closed {
            if let Some(connection) = self.connections.remove(&key) {
                connection.finish(&mut self.stack, self.poll.registry(), &self.recorder);
            }
        }
        let closed: Vec<FlowKey> = self
            .ca_requests
            .iter()
            .filter(|(_, request)| request.is_closed(&mut self.stack))
            .map(|(key, _)| *key)
            .collect();
        for key in closed {
            if let Some(request) = self.ca_requests.remove(&key) {
                request.finish(&mut self.stack);
            }
        }
    }
}
