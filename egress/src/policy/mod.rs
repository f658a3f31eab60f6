//! The egress policy: default deny; rules allow TCP by domain (exact or `*.suffix`, enforced
//! through the VMM's own DNS answers) or by CIDR, on some ports; a rule may attach credential
//! headers, a connection rate limit and a byte cap. Loopback, private, link-local, metadata and
//! the host's own addresses stay denied unless a CIDR rule names them (a rule inside that range),
//! so `0.0.0.0/0` opens the Internet, not the host's network.
//!
//! File format (JSON shown; TOML has the same fields under `[[rules]]`):
//! ```json
//! { "version": 1, "rules": [
//!   { "id": "pypi", "domain": "*.pypi.org", "ports": [443] },
//!   { "id": "db", "cidr": "10.1.2.0/24", "ports": ["5432-5433"] },
//!   { "id": "api", "domain": "api.example.com", "ports": [80, 443],
//!     "inject_headers": [ { "name": "Authorization", "prefix": "Bearer ", "from_env": "API_TOKEN" } ],
//!     "rate_limit": { "connections": 60, "per_seconds": 60 }, "byte_cap": 104857600 } ] }
//! ```

mod domain;
mod file;
mod host_addresses;
mod reserved;
mod secret;

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use domain::DomainPattern;
pub use file::FORMAT_VERSION;
pub use host_addresses::host_addresses;
pub use reserved::{canonical, reserved_range, ReservedRange, RESERVED};
pub use secret::Secret;

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read egress policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not JSON / TOML of the expected shape.
    #[error("egress policy is not valid {format}: {message}")]
    Syntax {
        /// "JSON" or "TOML".
        format: &'static str,
        /// The parser's message (with line and column).
        message: String,
    },
    /// Well-formed but wrong: names the rule and the field.
    #[error("egress policy: {0}")]
    Invalid(String),
    /// The host's addresses could not be listed.
    #[error("cannot list the host's addresses (they are always denied): {0}")]
    HostAddresses(std::io::Error),
}

/// Transport protocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// "tcp" / "udp".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A connection the guest is opening.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// Destination address.
    pub ip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Transport.
    pub protocol: Protocol,
    /// Every name the VMM's resolver answered with `ip` (empty for an address the guest never
    /// looked up through it).
    pub names: &'a [String],
}

/// What a rule allows connections to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Addresses the VMM's resolver handed out for matching names.
    Domain(DomainPattern),
    /// An address range.
    Cidr(IpNet),
}

/// A connection rate limit: at most `connections` new connections in any window of `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Connections per window.
    pub connections: u32,
    /// The window.
    pub per: Duration,
}

/// A header the VMM adds to every HTTP request on connections a rule allowed (replacing any the
/// guest sent under the same name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectHeader {
    /// Header name as written in the policy.
    pub name: String,
    /// Its value (prefix included).
    pub value: Secret,
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Named in the audit log (`rule-N` when the file gives none).
    pub id: String,
    /// What it allows.
    pub target: Target,
    /// Allowed destination ports (empty: every port).
    pub ports: Vec<RangeInclusive<u16>>,
    inject: Vec<InjectHeader>,
    /// New connections allowed per window, if limited.
    pub rate_limit: Option<RateLimit>,
    /// Bytes (both directions, all connections) the rule carries before its connections are cut.
    pub byte_cap: Option<u64>,
}

impl Rule {
    /// Credential headers for requests on connections this rule allowed.
    pub fn inject_headers(&self) -> &[InjectHeader] {
        &self.inject
    }

    /// Whether `port` is one of the rule's ports.
    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|range| range.contains(&port))
    }

    /// Whether a name the guest presented (HTTP Host, TLS SNI) on a connection to `port` is one
    /// this rule allows. Address rules do not restrict names.
    pub fn matches_name(&self, name: &str, port: u16) -> bool {
        self.allows_port(port)
            && match &self.target {
                Target::Domain(pattern) => pattern.matches(name),
                Target::Cidr(_) => true,
            }
    }

    /// Whether this is a domain rule matching one of `names`.
    fn matches_any_name(&self, names: &[String]) -> bool {
        match &self.target {
            Target::Domain(pattern) => names.iter().any(|name| pattern.matches(name)),
            Target::Cidr(_) => false,
        }
    }

    /// Whether this is an address rule lying inside `range`: the way a policy names a range that
    /// is otherwise always denied.
    fn names_range(&self, range: &IpNet, ip: IpAddr) -> bool {
        match &self.target {
            Target::Cidr(net) => {
                net.contains(&ip)
                    && range.contains(&net.network())
                    && net.prefix_len() >= range.prefix_len()
            }
            Target::Domain(_) => false,
        }
    }
}

/// The verdict on a connection.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Allowed by this rule.
    Allow(Arc<Rule>),
    /// Denied.
    Deny(DenyReason),
}

/// Why a connection was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No rule allows the destination (default deny).
    NoRule,
    /// The destination is in an always-denied range (its category) and no rule names it.
    AlwaysDenied(&'static str),
    /// The rule's connection rate limit is reached.
    RateLimited,
    /// The rule's byte cap is reached.
    ByteCapReached,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRule => f.write_str("no egress rule allows this destination"),
            Self::AlwaysDenied(category) => write!(
                f,
                "{category} addresses are always denied unless a cidr rule names them"
            ),
            Self::RateLimited => f.write_str("the rule's connection rate limit is reached"),
            Self::ByteCapReached => f.write_str("the rule's byte cap is reached"),
        }
    }
}

/// How [`Policy::from_json_str_with`] parses: for callers that may not list interfaces or open
/// files while parsing (the API thread, under its seccomp filter).
#[derive(Debug, Clone, Default)]
pub struct ParseOptions {
    /// The host's own addresses (always denied), listed beforehand with [`host_addresses`].
    pub host_addresses: Vec<IpAddr>,
    /// Whether `from_file` secrets may be read; when false they are refused with an error
    /// naming the rule and header.
    pub secret_files: bool,
}

/// A loaded policy. Cheap to clone; immutable (a run-time change replaces it).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Arc<[Arc<Rule>]>,
    host_addresses: Arc<[IpAddr]>,
}

impl Policy {
    /// No rules: every connection and name is denied.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Reads a policy file: TOML when the name ends in `.toml`, JSON otherwise.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if path.extension().is_some_and(|ext| ext == "toml") {
            Self::from_toml_str(&text)
        } else {
            Self::from_json_str(&text)
        }
    }

    /// Parses a JSON policy (the API's body shape too).
    pub fn from_json_str(text: &str) -> Result<Self, PolicyError> {
        let file: file::PolicyFile =
            serde_json::from_str(text).map_err(|e| PolicyError::Syntax {
                format: "JSON",
                message: e.to_string(),
            })?;
        Self::from_rules(file.into_rules(true)?)
    }

    /// Parses a JSON policy without listing the host's addresses itself, and reading `from_file`
    /// secrets only if `options` allow it.
    pub fn from_json_str_with(text: &str, options: &ParseOptions) -> Result<Self, PolicyError> {
        let file: file::PolicyFile =
            serde_json::from_str(text).map_err(|e| PolicyError::Syntax {
                format: "JSON",
                message: e.to_string(),
            })?;
        Self::from_parsed_with(file, options)
    }

    /// Parses a TOML policy as [`Policy::from_json_str_with`] does a JSON one (the fuzz target
    /// for policies uses it: it must not list interfaces or read secret files).
    pub fn from_toml_str_with(text: &str, options: &ParseOptions) -> Result<Self, PolicyError> {
        let file: file::PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            format: "TOML",
            message: e.message().to_string(),
        })?;
        Self::from_parsed_with(file, options)
    }

    fn from_parsed_with(
        file: file::PolicyFile,
        options: &ParseOptions,
    ) -> Result<Self, PolicyError> {
        let rules = file.into_rules(options.secret_files)?;
        Ok(Self {
            rules: rules.into(),
            host_addresses: Arc::from([]),
        }
        .with_host_addresses(options.host_addresses.clone()))
    }

    /// Parses a TOML policy.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        let file: file::PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            format: "TOML",
            message: e.message().to_string(),
        })?;
        Self::from_rules(file.into_rules(true)?)
    }

    fn from_rules(rules: Vec<Arc<Rule>>) -> Result<Self, PolicyError> {
        let host = host_addresses().map_err(PolicyError::HostAddresses)?;
        Ok(Self {
            rules: rules.into(),
            host_addresses: host.into(),
        })
    }

    /// The same rules with `addresses` as the host's own (tests; a host whose addresses changed).
    pub fn with_host_addresses(mut self, addresses: Vec<IpAddr>) -> Self {
        self.host_addresses = addresses.into_iter().map(canonical).collect();
        self
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// DNS: the first rule whose domain pattern matches `name`, if any.
    pub fn rule_for_name(&self, name: &str) -> Option<Arc<Rule>> {
        self.rules
            .iter()
            .find(|rule| matches!(&rule.target, Target::Domain(pattern) if pattern.matches(name)))
            .cloned()
    }

    /// Whether an address the upstream resolver returned may be handed to the guest: not one
    /// that is always denied, unless a rule names it (no DNS rebinding onto the host's network).
    pub fn address_may_be_handed_out(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match self.always_denied_range(ip) {
            None => true,
            Some((_, range)) => self.rules.iter().any(|rule| rule.names_range(&range, ip)),
        }
    }

    /// The verdict on a new connection (rate limits and byte caps are the caller's
    /// [`RuleCounters`](crate::limits::RuleCounters)).
    pub fn check(&self, dest: &Destination<'_>) -> Decision {
        if dest.protocol != Protocol::Tcp {
            return Decision::Deny(DenyReason::NoRule);
        }
        let ip = canonical(dest.ip);
        if let Some((category, range)) = self.always_denied_range(ip) {
            // Once a rule names the range, names resolving into it are handed out, and domain
            // rules for those names apply as anywhere else (an internal service by its name).
            let opened = self.rules.iter().any(|rule| rule.names_range(&range, ip));
            return self
                .rules
                .iter()
                .find(|rule| {
                    rule.allows_port(dest.port)
                        && (rule.names_range(&range, ip)
                            || (opened && rule.matches_any_name(dest.names)))
                })
                .map_or(Decision::Deny(DenyReason::AlwaysDenied(category)), |rule| {
                    Decision::Allow(rule.clone())
                });
        }
        self.rules
            .iter()
            .find(|rule| {
                rule.allows_port(dest.port)
                    && match &rule.target {
                        Target::Cidr(net) => net.contains(&ip),
                        Target::Domain(_) => rule.matches_any_name(dest.names),
                    }
            })
            .map_or(Decision::Deny(DenyReason::NoRule), |rule| {
                Decision::Allow(rule.clone())
            })
    }

    /// The always-denied range `ip` (canonical) falls in, named. The host's own addresses are
    /// their own one-address range (only a rule for exactly that address opens one), except on
    /// loopback, where a rule for the loopback range is naming enough.
    fn always_denied_range(&self, ip: IpAddr) -> Option<(&'static str, IpNet)> {
        let reserved = reserved_range(ip);
        if self.host_addresses.contains(&ip) && !ip.is_loopback() {
            return Some(("host address", IpNet::from(ip)));
        }
        reserved.map(|reserved| (reserved.category, reserved.net))
    }
}

#[cfg(test)]
mod tests;
