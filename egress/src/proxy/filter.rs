//! The per-connection step between the guest's bytes and the upstream socket: for connections a
//! domain rule allowed, the TLS SNI or HTTP Host must name a host that rule allows (the guest
//! could otherwise connect to an allowed address and ask a shared front end for any other site).
//! What passes goes on to header injection (`RequestRewriter`) or TLS interception
//! (`intercept`) when the rule carries credentials.

use std::sync::Arc;

use crate::inspect::{self, http, sni, Peek};
use crate::policy::Rule;

/// What the filter says about the guest's first bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not enough bytes to tell yet.
    NeedMore,
    /// Forward the guest's bytes unchanged from now on.
    Pass(Seen),
    /// Refuse the connection; `http` says whether the guest speaks HTTP (it then gets a 403).
    Deny {
        seen: Seen,
        reason: String,
        http: bool,
    },
}

/// What the guest's first bytes showed, for the audit log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The guest speaks HTTP/1.x: every request head is to be found and checked, not just the
    /// first.
    pub http: bool,
    pub sni: Option<String>,
    pub host: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
}

impl Seen {
    /// Whether anything was recognized (an HTTP request or a TLS hello).
    pub fn is_application(&self) -> bool {
        self.sni.is_some() || self.host.is_some() || self.method.is_some()
    }
}

pub struct Filter {
    /// The rule that allowed the connection, when it did so by domain: only then is there a
    /// name to check against.
    domain_rule: Option<Arc<Rule>>,
    port: u16,
}

impl Filter {
    pub fn new(domain_rule: Option<Arc<Rule>>, port: u16) -> Self {
        Self { domain_rule, port }
    }

    /// Judges the guest's first bytes. `complete`: no more will come before a verdict (the
    /// guest closed its side, or waited too long), so NeedMore is not an answer.
    pub fn inspect(&self, first: &[u8], complete: bool) -> Verdict {
        let peeked = inspect::peek(first);
        let Some(rule) = &self.domain_rule else {
            // An address rule has no name to check: nothing to wait for, only what to audit.
            return Verdict::Pass(match peeked {
                Peek::Tls { sni } => Seen {
                    sni,
                    ..Seen::default()
                },
                Peek::Http { method, path, host } => Seen {
                    http: true,
                    host,
                    method: Some(method),
                    path: Some(path),
                    sni: None,
                },
                Peek::NeedMore | Peek::Other => Seen::default(),
            });
        };
        let (seen, name, http) = match peeked {
            Peek::NeedMore if !complete => return Verdict::NeedMore,
            // A ClientHello or request head cut short cannot be checked; waiting it out must
            // not be a way around the check.
            Peek::NeedMore => {
                return Verdict::Deny {
                    seen: Seen::default(),
                    reason: format!(
                        "no complete TLS ClientHello or HTTP request head arrived; rule {} allows named hosts only",
                        rule.id
                    ),
                    http: false,
                }
            }
            // peek gives up on heads longer than PEEK_LIMIT; a long head must not be a way
            // around the name check.
            Peek::Other if first.len() >= inspect::PEEK_LIMIT => {
                if first.first() == Some(&0x16)
                    && matches!(sni::parse_client_hello(first), sni::ClientHello::NeedMore)
                {
                    return Verdict::Deny {
                        seen: Seen::default(),
                        reason: format!(
                            "TLS ClientHello longer than {} bytes; rule {} allows named hosts only",
                            inspect::PEEK_LIMIT,
                            rule.id
                        ),
                        http: false,
                    };
                }
                if matches!(http::parse_head(first), Ok(None)) {
                    // The request rewriter reads heads up to its own, larger limit and checks
                    // the Host once it has it.
                    return Verdict::Pass(Seen {
                        http: true,
                        ..Seen::default()
                    });
                }
                return Verdict::Pass(Seen::default());
            }
            Peek::Other => return Verdict::Pass(Seen::default()),
            Peek::Tls { sni } => (
                Seen {
                    sni: sni.clone(),
                    ..Seen::default()
                },
                sni,
                false,
            ),
            Peek::Http { method, path, host } => (
                Seen {
                    http: true,
                    host: host.clone(),
                    method: Some(method),
                    path: Some(path),
                    sni: None,
                },
                host,
                true,
            ),
        };
        match self.check_name(name.as_deref(), http) {
            Ok(()) => Verdict::Pass(seen),
            Err(reason) => Verdict::Deny { seen, reason, http },
        }
    }

    /// Whether a name the guest presented (HTTP Host / authority, TLS SNI) is one the
    /// connection's domain rule allows; Err gives the reason. Address rules allow any name.
    pub fn check_name(&self, name: Option<&str>, http: bool) -> Result<(), String> {
        let Some(rule) = &self.domain_rule else {
            return Ok(());
        };
        let Some(name) = name else {
            return Err(format!(
                "no {} name given; rule {} allows named hosts only",
                if http { "Host" } else { "SNI" },
                rule.id
            ));
        };
        // An HTTP authority may carry a port ("api.test:8080"); rules match the host alone.
        let host = if http {
            inspect::host_name(name)
        } else {
            name.to_ascii_lowercase()
        };
        if rule.matches_name(&host, self.port) {
            Ok(())
        } else {
            Err(format!("{host} is not allowed by rule {}", rule.id))
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;
    use crate::policy::Policy;

    fn rule(policy: &str) -> Arc<Rule> {
        Policy::from_json_str(policy).unwrap().rules()[0].clone()
    }

    fn domain_filter() -> Filter {
        Filter::new(
            Some(rule(
                r#"{ "rules": [ { "id": "api", "domain": "api.test", "ports": [443, 8080] } ] }"#,
            )),
            443,
        )
    }

    fn client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        hello
    }

    #[test]
    fn tls_server_name_must_be_the_rules() {
        let filter = domain_filter();
        let allowed = client_hello("api.test");
        assert!(
            matches!(filter.inspect(&allowed, false), Verdict::Pass(seen) if seen.sni.as_deref() == Some("api.test"))
        );
        let other = client_hello("evil.test");
        match filter.inspect(&other, false) {
            Verdict::Deny { reason, http, seen } => {
                assert!(!http);
                assert_eq!(seen.sni.as_deref(), Some("evil.test"));
                assert!(
                    reason.contains("evil.test") && reason.contains("api"),
                    "{reason}"
                );
            }
            verdict => panic!("{verdict:?}"),
        }
    }

    #[test]
    fn a_head_cut_short_waits_then_is_refused() {
        let filter = domain_filter();
        let hello = client_hello("api.test");
        assert_eq!(filter.inspect(&hello[..20], false), Verdict::NeedMore);
        assert!(matches!(
            filter.inspect(&hello[..20], true),
            Verdict::Deny { .. }
        ));
        assert_eq!(
            filter.inspect(b"GET / HTTP/1.1\r\nHo", false),
            Verdict::NeedMore
        );
    }

    #[test]
    fn http_host_is_matched_without_its_port_and_case() {
        let filter = domain_filter();
        assert!(matches!(
            filter.inspect(b"GET /x HTTP/1.1\r\nHost: API.test:8080\r\n\r\n", false),
            Verdict::Pass(_)
        ));
        assert!(matches!(
            filter.inspect(b"GET /x HTTP/1.1\r\n\r\n", false),
            Verdict::Deny { http: true, .. }
        ));
        assert!(filter.check_name(Some("api.test.evil.test"), true).is_err());
    }

    #[test]
    fn a_head_longer_than_peek_looks_is_still_checked() {
        let filter = domain_filter();
        let mut long_head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        long_head.resize(inspect::PEEK_LIMIT + 10, b'a');
        assert_eq!(
            filter.inspect(&long_head, false),
            Verdict::Pass(Seen {
                http: true,
                ..Seen::default()
            })
        );
        // One full-size record holding the start of a 20,000-byte ClientHello.
        let hello = client_hello("api.test");
        let mut long_hello = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x4e, 0x20];
        long_hello.extend_from_slice(&hello[9..]);
        long_hello.resize(5 + 16384, 0);
        assert!(long_hello.len() >= inspect::PEEK_LIMIT);
        assert!(matches!(
            filter.inspect(&long_hello, false),
            Verdict::Deny { http: false, .. }
        ));
    }

    #[test]
    fn other_protocols_and_address_rules_are_not_held_back() {
        assert_eq!(
            domain_filter().inspect(b"SSH-2.0-OpenSSH_9.6\r\n", false),
            Verdict::Pass(Seen::default())
        );
        let by_address = Filter::new(None, 443);
        assert_eq!(
            by_address.inspect(b"GE", false),
            Verdict::Pass(Seen::default())
        );
        assert!(matches!(
            by_address.inspect(&client_hello("anything.test"), false),
            Verdict::Pass(seen) if seen.sni.as_deref() == Some("anything.test")
        ));
    }
}
