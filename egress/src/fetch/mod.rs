//! A blocking, policy-checked HTTP(S) client for the isolate tier's `fetch` host call: the
//! isolate has no network of its own, so the VMM makes the request on its behalf under the same
//! egress policy (and the same rule counters and audit log) as a microVM's NIC.
//!
//! Hand-written HTTP/1.1 (`http1`) rather than ureq or reqwest: every address a name resolves to
//! must pass the policy, and names must be resolved by our own resolver (static glibc has no
//! working `getaddrinfo`); TLS must use our rustls configuration (Mozilla roots plus the
//! operator's extra roots); redirects must not be followed (each hop would need its own policy
//! check, and the isolate should see the 3xx); and one request per connection needs no pool.
//! reqwest also needs tokio, and ureq resolves and redirects by itself. What remains is a request
//! head, a response head (httparse) and three ways of framing a body.
//!
//! One fetch: the URL is taken apart (`target`); a name with no domain rule is denied without
//! being resolved (as the microVM tier's DNS answers NXDOMAIN for it), otherwise it is resolved
//! (`resolver::lookup_blocking`) and each address checked with the name; an address literal is
//! checked with no names, so only CIDR rules allow it. The allowed addresses are tried in turn,
//! the rule's rate limit and byte cap counted, the request sent with the rule's credential
//! headers replacing any of the same name, and the response read. Every wait ends at the
//! caller's deadline. One audit event (`kind: "fetch"`) records each fetch, never a header value.

mod http1;
mod stream;
mod target;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rustls::ClientConfig;

use crate::audit::{AuditEvent, AuditLog};
use crate::limits::RuleCounters;
use crate::policy::{Decision, DenyReason, Destination, Policy, Protocol, Rule};
use crate::resolver::{lookup_blocking, ResolverConfig};
use crate::tls::{upstream_client_config, TlsError};

use stream::{time_left, Connection, DeadlineStream};
use target::Target;

pub use http1::MAX_HEAD;

/// Everything a [`Fetcher`] needs, read before it runs (its thread may not open files).
#[derive(Debug, Clone)]
pub struct FetcherConfig {
    /// What may be reached.
    pub policy: Policy,
    /// Hosts entries and nameservers.
    pub resolver: ResolverConfig,
    /// PEM files of roots trusted for HTTPS beside Mozilla's.
    pub extra_upstream_roots: Vec<PathBuf>,
    /// Where the fetch events go.
    pub audit: AuditLog,
    /// The sandbox's id in the audit log.
    pub sandbox: String,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
}

/// One request. The isolate may not set `Host`, `Content-Length`, `Connection` or
/// `Transfer-Encoding`: the fetcher writes them itself, and a request naming one is refused with
/// [`FetchError::BadRequest`] (not silently corrected, so the caller learns of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchRequest {
    pub method: String,
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The response, whatever its status (a 3xx is not followed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a fetch failed. No variant carries a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The egress policy does not allow it; the text names the rule or range.
    #[error("denied by the egress policy: {0}")]
    Denied(String),
    /// The request itself is wrong (URL, method, header).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// DNS, connect, TLS or I/O failed.
    #[error("network failure: {0}")]
    Network(String),
    /// The response does not fit.
    #[error("response too large: {0}")]
    TooLarge(String),
    /// The deadline passed (while doing what the text says).
    #[error("timed out {0}")]
    Timeout(String),
}

/// Makes fetches under one policy, counting its rules' limits across fetches.
pub struct Fetcher {
    policy: Policy,
    resolver: ResolverConfig,
    tls: Arc<ClientConfig>,
    audit: AuditLog,
    sandbox: String,
    max_response_bytes: usize,
    counters: RuleCounters,
}

/// An address the policy allowed, with its rule.
struct Allowed {
    ip: IpAddr,
    rule: Arc<Rule>,
}

impl Fetcher {
    /// Builds the TLS configuration now (reading the extra roots).
    pub fn new(config: FetcherConfig) -> Result<Self, TlsError> {
        Ok(Self {
            tls: upstream_client_config(&config.extra_upstream_roots)?,
            policy: config.policy,
            resolver: config.resolver,
            audit: config.audit,
            sandbox: config.sandbox,
            max_response_bytes: config.max_response_bytes,
            counters: RuleCounters::default(),
        })
    }

    /// Makes `request`, giving up at `deadline`.
    pub fn fetch(
        &mut self,
        request: &FetchRequest,
        deadline: Instant,
    ) -> Result<FetchResponse, FetchError> {
        let mut event = AuditEvent {
            sandbox: self.sandbox.clone(),
            kind: "fetch",
            protocol: Some("tcp"),
            method: Some(request.method.clone()),
            decision: "deny",
            ..AuditEvent::default()
        };
        let result = self.fetch_audited(request, deadline, &mut event);
        if let Err(error) = &result {
            event.reason = Some(error.to_string());
        }
        self.audit.record(&event);
        result
    }

    fn fetch_audited(
        &mut self,
        request: &FetchRequest,
        deadline: Instant,
        event: &mut AuditEvent,
    ) -> Result<FetchResponse, FetchError> {
        let target = target::parse(request)?;
        event.host = Some(target.host_header.clone());
        event.path = Some(target.path.clone());
        event.dest_port = Some(target.port);
        let allowed = self.allowed_addresses(&target, deadline, event)?;
        let mut last_error = None;
        for Allowed { ip, rule } in allowed {
            event.dest_ip = Some(ip);
            event.rule = Some(rule.id.clone());
            if let Err(reason) = self.counters.open_connection(&rule, Instant::now()) {
                return Err(FetchError::Denied(format!("rule {}: {reason}", rule.id)));
            }
            let stream = match DeadlineStream::connect(SocketAddr::new(ip, target.port), deadline) {
                Ok(stream) => stream,
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
            event.decision = "allow";
            return self.exchange(request, &target, &rule, stream, event);
        }
        Err(last_error.unwrap_or_else(|| {
            FetchError::Network(format!("{} has no address to connect to", target.host))
        }))
    }

    /// The addresses of `target` the policy allows, in the resolver's order, or the reason none is.
    fn allowed_addresses(
        &self,
        target: &Target,
        deadline: Instant,
        event: &mut AuditEvent,
    ) -> Result<Vec<Allowed>, FetchError> {
        let port = target.port;
        let (addresses, names) = match target.literal {
            Some(ip) => (vec![ip], Vec::new()),
            None => {
                event.domain = Some(target.host.clone());
                if self.policy.rule_for_name(&target.host).is_none() {
                    return Err(FetchError::Denied(format!(
                        "no rule allows {}:{port}",
                        target.host
                    )));
                }
                let mut resolver = self.resolver.clone();
                resolver.timeout = resolver.timeout.min(time_left(deadline)?);
                let addresses =
                    lookup_blocking(&resolver, &target.host, deadline).map_err(|e| {
                        if e.kind() == std::io::ErrorKind::TimedOut {
                            FetchError::Timeout(format!("resolving {}", target.host))
                        } else {
                            FetchError::Network(format!("cannot resolve {}: {e}", target.host))
                        }
                    })?;
                (addresses, vec![target.host.clone()])
            }
        };
        let mut allowed = Vec::new();
        let mut first_denial = None;
        for ip in addresses {
            let verdict = if names.is_empty() || self.policy.address_may_be_handed_out(ip) {
                self.policy.check(&Destination {
                    ip,
                    port,
                    protocol: Protocol::Tcp,
                    names: &names,
                })
            } else {
                // The same verdict names the always-denied range the address is in.
                self.policy.check(&Destination {
                    ip,
                    port,
                    protocol: Protocol::Tcp,
                    names: &[],
                })
            };
            match verdict {
                Decision::Allow(rule) => allowed.push(Allowed { ip, rule }),
                Decision::Deny(reason) => {
                    first_denial.get_or_insert((ip, reason));
                }
            }
        }
        if !allowed.is_empty() {
            return Ok(allowed);
        }
        match first_denial {
            Some((ip, reason)) => {
                event.dest_ip = Some(ip);
                Err(FetchError::Denied(denial_text(target, ip, reason)))
            }
            None => Err(FetchError::Network(format!(
                "{} resolves to no address",
                target.host
            ))),
        }
    }

    /// Sends the request on `stream` and reads the response, counting bytes against `rule`.
    fn exchange(
        &mut self,
        request: &FetchRequest,
        target: &Target,
        rule: &Arc<Rule>,
        stream: DeadlineStream,
        event: &mut AuditEvent,
    ) -> Result<FetchResponse, FetchError> {
        let mut connection = if target.https {
            Connection::tls(self.tls.clone(), &target.host, stream)?
        } else {
            Connection::Plain(stream)
        };
        let headers = request_headers(target, &request.headers, rule);
        // A byte cap bounds what this response may bring, on top of the fetcher's own bound.
        let cap_left = rule
            .byte_cap
            .map(|cap| cap.saturating_sub(self.counters.bytes(&rule.id)));
        let result = http1::write_request(
            &mut connection,
            &request.method,
            &target.path,
            &headers,
            &request.body,
        )
        .and_then(|()| {
            let (sent, _) = connection.transferred();
            let body_limit = match cap_left {
                Some(left) => self
                    .max_response_bytes
                    .min(left.saturating_sub(sent as u64) as usize),
                None => self.max_response_bytes,
            };
            http1::read_response(&mut connection, &request.method, body_limit)
        });
        let (sent, received) = connection.transferred();
        event.bytes_up = sent as u64;
        event.bytes_down = received as u64;
        let capped = self
            .counters
            .add_bytes(rule, (sent + received) as u64)
            .is_err();
        match result {
            Ok(response) => Ok(FetchResponse {
                status: response.status,
                headers: response.headers,
                body: response.body,
            }),
            // Past the cap, or cut short by it: the cap is the reason, not the response's size.
            Err(FetchError::TooLarge(_))
                if capped || cap_left.is_some_and(|left| left < self.max_response_bytes as u64) =>
            {
                Err(FetchError::Denied(format!(
                    "rule {}: {}",
                    rule.id,
                    DenyReason::ByteCapReached
                )))
            }
            Err(error) => Err(error),
        }
    }
}

/// Host first, then the caller's headers except those the rule injects, then the rule's.
fn request_headers(
    target: &Target,
    headers: &[(String, String)],
    rule: &Rule,
) -> Vec<(String, String)> {
    let injected = rule.inject_headers();
    let mut out = vec![("Host".to_string(), target.host_header.clone())];
    out.extend(
        headers
            .iter()
            .filter(|(name, _)| {
                !injected
                    .iter()
                    .any(|inject| inject.name.eq_ignore_ascii_case(name))
            })
            .cloned(),
    );
    out.extend(
        injected
            .iter()
            .map(|inject| (inject.name.clone(), inject.value.expose().to_string())),
    );
    out
}

/// Why `ip` (an address of `target`) was denied, naming the range or the missing rule.
fn denial_text(target: &Target, ip: IpAddr, reason: DenyReason) -> String {
    let port = target.port;
    let subject = match target.literal {
        Some(_) => ip.to_string(),
        None => format!("{} resolves to {ip}, which", target.host),
    };
    match reason {
        DenyReason::AlwaysDenied(category) => {
            format!("{subject} is always denied ({category}) unless a cidr rule names it")
        }
        DenyReason::NoRule if target.literal.is_some() => {
            format!("no rule allows {ip}:{port} (an address is allowed only by a cidr rule)")
        }
        DenyReason::NoRule => format!(
            "no rule allows {}:{port} ({} resolves to {ip})",
            target.host, target.host
        ),
        other => other.to_string(),
    }
}
