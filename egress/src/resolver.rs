//! Upstream name resolution for the egress thread, without blocking its event loop.
//!
//! Our binaries are static glibc, so `getaddrinfo` (which goes through NSS) cannot be used. The
//! VMM reads `/etc/hosts` and `/etc/resolv.conf` itself (before the egress thread starts, since
//! that thread may not open files) and asks the nameservers with hickory-proto messages over
//! non-blocking UDP sockets, one connected socket per lookup so only the asked server can answer.
//! The two file formats are parsed by hand: hickory-resolver's readers come with its async
//! runtime configuration types, while what we need is a dozen lines.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

/// Where and how long to ask.
#[derive(Clone, Debug)]
pub struct ResolverConfig {
    /// Nameservers, asked in turn.
    pub nameservers: Vec<SocketAddr>,
    /// Static entries answered without asking (lowercase names, no trailing dot).
    pub hosts: Vec<(String, IpAddr)>,
    /// How long one lookup may take in all, across every retry.
    pub timeout: Duration,
}

/// TTL given to answers from the hosts file, which has none.
const HOSTS_TTL: u32 = 60;
/// Each nameserver is tried this many times before a lookup fails.
const ROUNDS: u32 = 2;
/// The largest DNS answer over UDP we accept (EDNS0 sizes stay below this).
const MAX_ANSWER: usize = 4096;

impl ResolverConfig {
    /// The host's own configuration: `/etc/resolv.conf` nameservers (127.0.0.1 when it names
    /// none, as glibc does) and `/etc/hosts`; a missing file counts as empty.
    pub fn system() -> io::Result<Self> {
        let resolv = read_optional("/etc/resolv.conf")?;
        let hosts = read_optional("/etc/hosts")?;
        let mut nameservers = parse_resolv_conf(&resolv);
        if nameservers.is_empty() {
            nameservers.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53));
        }
        Ok(Self {
            nameservers,
            hosts: parse_hosts(&hosts),
            timeout: Duration::from_secs(5),
        })
    }
}

fn read_optional(path: &str) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(error) => Err(io::Error::new(error.kind(), format!("{path}: {error}"))),
    }
}

/// `nameserver ADDR` lines of resolv.conf(5), port 53.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            // A scoped IPv6 address ("fe80::1%eth0") cannot be used from here; skip it.
            let address: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(address, 53))
        })
        .collect()
}

/// `ADDR NAME [ALIAS...]` lines of hosts(5), comments stripped, names lowercased.
pub fn parse_hosts(text: &str) -> Vec<(String, IpAddr)> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(address) = words.next().and_then(|word| word.parse::<IpAddr>().ok()) else {
            continue;
        };
        for name in words {
            entries.push((normalize_name(name), address));
        }
    }
    entries
}

/// Lowercase, no trailing dot: the form names are compared in everywhere in this crate.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// One lookup in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LookupId(pub u64);

/// How a lookup ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The addresses of the asked type with their TTLs (may be empty: the name exists without
    /// records of that type).
    Answered(Vec<(IpAddr, u32)>),
    /// NXDOMAIN.
    NotFound,
    /// No usable answer: every server timed out, failed, or refused.
    Failed(String),
}

struct Lookup {
    name: Name,
    record_type: RecordType,
    query_id: u16,
    socket: Option<UdpSocket>,
    token: Token,
    attempt: u32,
    attempt_deadline: Instant,
    deadline: Instant,
}

/// The lookups in flight; the owner polls it from its event loop.
pub struct Resolver {
    config: ResolverConfig,
    lookups: HashMap<LookupId, Lookup>,
    finished: Vec<(LookupId, Outcome)>,
    next_id: u64,
    token_base: usize,
    random: u64,
}

impl Resolver {
    /// `token_base`: this resolver registers its sockets with tokens `token_base + n`, above
    /// every token the owner uses itself.
    pub fn new(config: ResolverConfig, token_base: usize) -> io::Result<Self> {
        Ok(Self {
            config,
            lookups: HashMap::new(),
            finished: Vec::new(),
            next_id: 0,
            token_base,
            random: crate::random::seed()? | 1,
        })
    }

    /// Starts resolving `name` (A or AAAA). Hosts-file names finish at once (see
    /// [`Resolver::poll`]); a name that is not a valid DNS name fails at once.
    pub fn start(
        &mut self,
        registry: &Registry,
        name: &str,
        record_type: RecordType,
        now: Instant,
    ) -> LookupId {
        let id = LookupId(self.next_id);
        self.next_id += 1;
        let normalized = normalize_name(name);
        let from_hosts: Vec<IpAddr> = self
            .config
            .hosts
            .iter()
            .filter(|(host, _)| *host == normalized)
            .map(|(_, address)| *address)
            .collect();
        if !from_hosts.is_empty() {
            let answers = from_hosts
                .into_iter()
                .filter(|address| matches_type(*address, record_type))
                .map(|address| (address, HOSTS_TTL))
                .collect();
            self.finished.push((id, Outcome::Answered(answers)));
            return id;
        }
        let dns_name = match Name::from_ascii(format!("{normalized}.")) {
            Ok(dns_name) => dns_name,
            Err(error) => {
                self.finished
                    .push((id, Outcome::Failed(format!("bad name {name:?}: {error}"))));
                return id;
            }
        };
        if self.config.nameservers.is_empty() {
            self.finished
                .push((id, Outcome::Failed("no nameservers configured".into())));
            return id;
        }
        let mut lookup = Lookup {
            name: dns_name,
            record_type,
            query_id: 0,
            socket: None,
            token: Token(self.token_base + id.0 as usize),
            attempt: 0,
            attempt_deadline: now,
            deadline: now + self.config.timeout,
        };
        if let Err(error) = self.send_attempt(registry, &mut lookup, now) {
            self.finished.push((id, Outcome::Failed(error.to_string())));
            return id;
        }
        self.lookups.insert(id, lookup);
        id
    }

    /// Drops a lookup whose answer nobody wants any more.
    pub fn cancel(&mut self, registry: &Registry, id: LookupId) {
        if let Some(mut lookup) = self.lookups.remove(&id) {
            close_socket(registry, &mut lookup);
        }
    }

    /// Reads every answer that arrived, retries attempts that timed out, and returns the lookups
    /// that finished since the last call.
    pub fn poll(&mut self, registry: &Registry, now: Instant) -> Vec<(LookupId, Outcome)> {
        let ids: Vec<LookupId> = self.lookups.keys().copied().collect();
        for id in ids {
            let Some(mut lookup) = self.lookups.remove(&id) else {
                continue;
            };
            match self.advance(registry, &mut lookup, now) {
                Some(outcome) => {
                    close_socket(registry, &mut lookup);
                    self.finished.push((id, outcome));
                }
                None => {
                    self.lookups.insert(id, lookup);
                }
            }
        }
        std::mem::take(&mut self.finished)
    }

    /// The earliest moment a lookup needs attention without any socket event.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.finished.is_empty() {
            return Some(Instant::now());
        }
        self.lookups
            .values()
            .map(|lookup| lookup.attempt_deadline.min(lookup.deadline))
            .min()
    }

    fn advance(
        &mut self,
        registry: &Registry,
        lookup: &mut Lookup,
        now: Instant,
    ) -> Option<Outcome> {
        if let Some(outcome) = receive_answer(lookup) {
            return Some(outcome);
        }
        if now >= lookup.deadline {
            return Some(Outcome::Failed(format!(
                "no answer from {} within {:?}",
                describe(&self.config.nameservers),
                self.config.timeout
            )));
        }
        if now >= lookup.attempt_deadline {
            let attempts = self.config.nameservers.len() as u32 * ROUNDS;
            if lookup.attempt >= attempts {
                return Some(Outcome::Failed(format!(
                    "no answer from {}",
                    describe(&self.config.nameservers)
                )));
            }
            if let Err(error) = self.send_attempt(registry, lookup, now) {
                return Some(Outcome::Failed(error.to_string()));
            }
        }
        None
    }

    /// Sends the query to the next nameserver from a fresh socket with a fresh query id.
    fn send_attempt(
        &mut self,
        registry: &Registry,
        lookup: &mut Lookup,
        now: Instant,
    ) -> io::Result<()> {
        close_socket(registry, lookup);
        let servers = &self.config.nameservers;
        let server = servers[lookup.attempt as usize % servers.len()];
        let attempts = servers.len() as u32 * ROUNDS;
        lookup.attempt += 1;
        lookup.attempt_deadline =
            now + (self.config.timeout / attempts).max(Duration::from_millis(100));
        lookup.query_id = self.next_random() as u16;

        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut socket = UdpSocket::bind(local)?;
        socket.connect(server)?;
        registry.register(&mut socket, lookup.token, Interest::READABLE)?;
        let mut query = Message::new();
        query
            .set_id(lookup.query_id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(lookup.name.clone(), lookup.record_type));
        let bytes = query
            .to_vec()
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
        lookup.socket = Some(socket);
        match lookup.socket.as_ref().map(|socket| socket.send(&bytes)) {
            // A full socket buffer or a refused port: the retry timer tries the next server.
            Some(Err(error)) if error.kind() != io::ErrorKind::WouldBlock => {
                tracing::debug!(%server, %error, "DNS query not sent")
            }
            _ => {}
        }
        Ok(())
    }

    /// xorshift64*: query ids only need to be unguessable enough that an off-path sender
    /// cannot match them by chance, and the socket is connected to the server anyway.
    fn next_random(&mut self) -> u64 {
        self.random ^= self.random >> 12;
        self.random ^= self.random << 25;
        self.random ^= self.random >> 27;
        self.random.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Resolves `name` (A and AAAA, asked at once) on the calling thread, waiting at most until
/// `deadline` (and the configuration's own timeout): for callers without an event loop of their
/// own (the isolate tier's `fetch`). Addresses come IPv4 first; an empty list means the name
/// exists without addresses. NXDOMAIN and failures are `Err` with the reason.
pub fn lookup_blocking(
    config: &ResolverConfig,
    name: &str,
    deadline: Instant,
) -> io::Result<Vec<IpAddr>> {
    let mut poll = mio::Poll::new()?;
    let mut events = mio::Events::with_capacity(4);
    let mut resolver = Resolver::new(config.clone(), 0)?;
    let now = Instant::now();
    let ids = [
        resolver.start(poll.registry(), name, RecordType::A, now),
        resolver.start(poll.registry(), name, RecordType::AAAA, now),
    ];
    let mut outcomes: [Option<Outcome>; 2] = [None, None];
    loop {
        for (id, outcome) in resolver.poll(poll.registry(), Instant::now()) {
            if let Some(slot) = ids.iter().position(|wanted| *wanted == id) {
                outcomes[slot] = Some(outcome);
            }
        }
        if outcomes.iter().all(Option::is_some) {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            for id in ids {
                resolver.cancel(poll.registry(), id);
            }
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer for {name} before the deadline"),
            ));
        }
        let wake = resolver.next_deadline().unwrap_or(deadline).min(deadline);
        match poll.poll(&mut events, Some(wake.saturating_duration_since(now))) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    let mut addresses = Vec::new();
    let mut failures = Vec::new();
    let mut not_found = 0;
    for outcome in outcomes.into_iter().flatten() {
        match outcome {
            Outcome::Answered(answers) => {
                addresses.extend(answers.into_iter().map(|(address, _)| address))
            }
            Outcome::NotFound => not_found += 1,
            Outcome::Failed(reason) => failures.push(reason),
        }
    }
    if !addresses.is_empty() {
        return Ok(addresses);
    }
    if not_found > 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{name}: no such name"),
        ));
    }
    match failures.into_iter().next() {
        Some(reason) => Err(io::Error::other(format!("{name}: {reason}"))),
        None => Ok(addresses),
    }
}

fn describe(servers: &[SocketAddr]) -> String {
    servers
        .iter()
        .map(|server| server.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn matches_type(address: IpAddr, record_type: RecordType) -> bool {
    matches!(
        (address, record_type),
        (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
    )
}

fn close_socket(registry: &Registry, lookup: &mut Lookup) {
    if let Some(mut socket) = lookup.socket.take() {
        // The socket closes on drop either way; a failed deregister only means it was not
        // registered.
        let _ = registry.deregister(&mut socket);
    }
}

/// Reads datagrams until one answers this lookup's query (id and question match).
fn receive_answer(lookup: &mut Lookup) -> Option<Outcome> {
    let socket = lookup.socket.as_ref()?;
    let mut buffer = [0u8; MAX_ANSWER];
    loop {
        let length = match socket.recv(&mut buffer) {
            Ok(length) => length,
            // ECONNREFUSED from an ICMP port unreachable and the like: wait for the retry timer.
            Err(_) => return None,
        };
        let Ok(message) = Message::from_vec(&buffer[..length]) else {
            continue;
        };
        let question_matches = message.query().is_some_and(|query| {
            query.query_type() == lookup.record_type
                && query.name().to_lowercase() == lookup.name.to_lowercase()
        });
        if message.id() != lookup.query_id
            || message.message_type() != MessageType::Response
            || !question_matches
        {
            continue;
        }
        return Some(match message.response_code() {
            ResponseCode::NoError => Outcome::Answered(addresses(&message, lookup.record_type)),
            ResponseCode::NXDomain => Outcome::NotFound,
            code => Outcome::Failed(format!("nameserver answered {code}")),
        });
    }
}

/// The A or AAAA records of an answer; a CNAME chain's final records are in the same section.
fn addresses(message: &Message, record_type: RecordType) -> Vec<(IpAddr, u32)> {
    message
        .answers()
        .iter()
        .filter_map(|record| match (record.data(), record_type) {
            (RData::A(a), RecordType::A) => Some((IpAddr::V4(a.0), record.ttl())),
            (RData::AAAA(aaaa), RecordType::AAAA) => Some((IpAddr::V6(aaaa.0), record.ttl())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.1\nnameserver ::1\nnameserver fe80::1%eth0\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec!["10.0.0.1:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }

    #[test]
    fn hosts_names_and_aliases_lowercased() {
        let text = "127.0.0.1 localhost\n# 1.2.3.4 commented\n10.1.2.3  Api.Example.COM. api # trailing\nbogus line\n";
        assert_eq!(
            parse_hosts(text),
            vec![
                ("localhost".to_string(), IpAddr::from([127, 0, 0, 1])),
                ("api.example.com".to_string(), IpAddr::from([10, 1, 2, 3])),
                ("api".to_string(), IpAddr::from([10, 1, 2, 3])),
            ]
        );
    }

    #[test]
    fn blocking_lookups_answer_hosts_entries_without_asking() {
        let config = ResolverConfig {
            nameservers: Vec::new(),
            hosts: vec![
                ("a.test".to_string(), IpAddr::from([10, 0, 0, 1])),
                ("a.test".to_string(), "fd00::1".parse().unwrap()),
            ],
            timeout: Duration::from_secs(1),
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            lookup_blocking(&config, "A.test.", deadline).unwrap(),
            vec![IpAddr::from([10, 0, 0, 1]), "fd00::1".parse().unwrap()]
        );
        let error = lookup_blocking(&config, "b.test", deadline).unwrap_err();
        assert!(error.to_string().contains("no nameservers"), "{error}");
    }
}
