//! The policy file's shape (JSON or TOML, same fields) and its translation into rules, with an
//! error naming the rule and the field for every mistake.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::domain::DomainPattern;
use super::secret::Secret;
use super::{InjectHeader, PolicyError, RateLimit, Rule, Target};

/// The only format version so far; a file may omit it.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    version: Option<u32>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: Option<String>,
    domain: Option<String>,
    cidr: Option<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    protocol: Option<String>,
    #[serde(default)]
    inject_headers: Vec<HeaderFile>,
    rate_limit: Option<RateLimitFile>,
    byte_cap: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortSpec {
    One(u16),
    Range(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderFile {
    name: String,
    #[serde(default)]
    prefix: String,
    from_env: Option<String>,
    from_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    connections: u32,
    #[serde(default = "default_per_seconds")]
    per_seconds: u64,
}

fn default_per_seconds() -> u64 {
    60
}

/// Headers an injected one may not be: they frame the request, and replacing them would let a
/// rule corrupt or smuggle requests.
const FRAMING_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
];

impl PolicyFile {
    /// `secret_files`: whether `from_file` secrets may be read (see [`super::ParseOptions`]).
    pub(super) fn into_rules(self, secret_files: bool) -> Result<Vec<Arc<Rule>>, PolicyError> {
        if let Some(version) = self.version {
            if version != FORMAT_VERSION {
                return Err(PolicyError::Invalid(format!(
                    "policy format version {version} is not supported (this agentvm reads version {FORMAT_VERSION})"
                )));
            }
        }
        let mut rules: Vec<Arc<Rule>> = Vec::with_capacity(self.rules.len());
        for (index, file) in self.rules.into_iter().enumerate() {
            let number = index + 1;
            let id = file.id.clone().unwrap_or_else(|| format!("rule-{number}"));
            let context = |message: String| {
                PolicyError::Invalid(format!("rule {number} (`{id}`): {message}"))
            };
            if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control()) {
                return Err(context("`id` must be 1-64 printable characters".into()));
            }
            if rules.iter().any(|rule| rule.id == id) {
                return Err(context("another rule has the same `id`".into()));
            }
            let rule = file.into_rule(id.clone(), secret_files).map_err(context)?;
            rules.push(Arc::new(rule));
        }
        Ok(rules)
    }
}

impl RuleFile {
    fn into_rule(self, id: String, secret_files: bool) -> Result<Rule, String> {
        let target = match (self.domain, self.cidr) {
            (Some(domain), None) => Target::Domain(DomainPattern::parse(&domain)?),
            (None, Some(cidr)) => Target::Cidr(parse_cidr(&cidr)?),
            (Some(_), Some(_)) => {
                return Err("give `domain` or `cidr`, not both (write two rules)".into())
            }
            (None, None) => return Err("a rule needs a `domain` or a `cidr`".into()),
        };
        match self.protocol.as_deref() {
            None | Some("tcp") => {}
            Some("udp") => {
                return Err("`protocol = \"udp\"`: only TCP is forwarded; UDP crosses the filter only as DNS to the VMM's own resolver".into())
            }
            Some(other) => return Err(format!("unknown `protocol` `{other}` (use \"tcp\")")),
        }
        let ports = self
            .ports
            .into_iter()
            .map(parse_ports)
            .collect::<Result<Vec<_>, _>>()?;
        if !self.inject_headers.is_empty() && !matches!(target, Target::Domain(_)) {
            return Err("`inject_headers` needs a `domain` rule: credentials go to a named server, checked by its Host header or TLS name".into());
        }
        let inject = self
            .inject_headers
            .into_iter()
            .map(|header| header.into_header(secret_files))
            .collect::<Result<Vec<_>, _>>()?;
        let rate_limit = match self.rate_limit {
            None => None,
            Some(RateLimitFile { connections: 0, .. }) => {
                return Err(
                    "`rate_limit.connections` must be at least 1 (remove the rule to deny)".into(),
                )
            }
            Some(RateLimitFile { per_seconds: 0, .. }) => {
                return Err("`rate_limit.per_seconds` must be at least 1".into())
            }
            Some(limit) => Some(RateLimit {
                connections: limit.connections,
                per: Duration::from_secs(limit.per_seconds),
            }),
        };
        if self.byte_cap == Some(0) {
            return Err("`byte_cap` must be at least 1 byte (remove the rule to deny)".into());
        }
        Ok(Rule {
            id,
            target,
            ports,
            inject,
            rate_limit,
            byte_cap: self.byte_cap,
        })
    }
}

impl HeaderFile {
    fn into_header(self, secret_files: bool) -> Result<InjectHeader, String> {
        let name = self.name;
        let token_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token_ok {
            return Err(format!(
                "header name `{name}` is not a valid HTTP header name"
            ));
        }
        if FRAMING_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "header `{name}` frames the request and cannot be injected"
            ));
        }
        let value = match (self.from_env, self.from_file) {
            (Some(var), None) => Secret::from_env(&var, &self.prefix),
            (None, Some(_)) if !secret_files => Err(format!(
                "header `{name}`: from_file secrets can only be used in a policy file given on the command line; use from_env through the API"
            )),
            (None, Some(path)) => Secret::from_file(&path, &self.prefix),
            _ => Err(format!(
                "header `{name}` needs exactly one of `from_env` or `from_file` (secrets are never written in the policy itself)"
            )),
        }?;
        Ok(InjectHeader { name, value })
    }
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "`cidr` `{text}` has host bits set (did you mean `{}`?)",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`cidr` `{text}` is not an address or address/prefix"))
}

fn parse_ports(spec: PortSpec) -> Result<RangeInclusive<u16>, String> {
    let range = match spec {
        PortSpec::One(port) => port..=port,
        PortSpec::Range(text) => {
            let (low, high) = text
                .split_once('-')
                .ok_or_else(|| format!("port `{text}`: use a number or `LOW-HIGH`"))?;
            let parse = |part: &str| {
                part.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("port range `{text}`: `{part}` is not a port number"))
            };
            let (low, high) = (parse(low)?, parse(high)?);
            if low > high {
                return Err(format!("port range `{text}` is empty (low > high)"));
            }
            low..=high
        }
    };
    if *range.start() == 0 {
        return Err("port 0 cannot be connected to".into());
    }
    Ok(range)
}
