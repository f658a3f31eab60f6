//! The guest's DNS server (DNS_ADDR:53/udp). Only names some rule allows are resolved (upstream,
//! by [`Resolver`]); addresses the policy never lets the guest reach are dropped from answers;
//! the rest are remembered in the [`NameMap`] that connection decisions consult.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use mio::Registry;

use crate::audit::AuditEvent;
use crate::names::NameMap;
use crate::policy::{Policy, Rule};
use crate::recorder::Recorder;
use crate::resolver::{normalize_name, LookupId, Outcome, Resolver};

/// The guest may cache an answer this long at most, so a policy change reaches it soon.
pub const MAX_TTL: u32 = 60;
/// Queries waiting for upstream at once; more get SERVFAIL rather than growing without bound.
const MAX_PENDING: usize = 256;

/// Where a DNS answer goes back to (the guest's address and port).
pub type Client = smoltcp::wire::IpEndpoint;

struct Pending {
    client: Client,
    request: Message,
    name: String,
    rule: Arc<Rule>,
}

#[derive(Default)]
pub struct DnsServer {
    pending: HashMap<LookupId, Pending>,
    names: NameMap,
}

impl DnsServer {
    pub fn names(&self) -> &NameMap {
        &self.names
    }

    /// A query from the guest. Returns the answer when it is known at once; otherwise the answer
    /// comes out of [`DnsServer::complete`] when the upstream lookup ends.
    pub fn query(
        &mut self,
        packet: &[u8],
        client: Client,
        policy: &Policy,
        resolver: &mut Resolver,
        registry: &Registry,
        recorder: &Recorder,
    ) -> Option<Vec<u8>> {
        let request = Message::from_vec(packet).ok()?;
        if request.message_type() != MessageType::Query {
            return None;
        }
        let Some(query) = request.query().cloned() else {
            return encode(&response(&request, ResponseCode::FormErr));
        };
        if request.op_code() != OpCode::Query || request.queries().len() != 1 {
            return encode(&response(&request, ResponseCode::NotImp));
        }
        let name = normalize_name(&query.name().to_ascii());
        let Some(rule) = policy.rule_for_name(&name) else {
            recorder.record(dns_event(&name, None, "deny", "no rule allows this name"));
            return encode(&response(&request, ResponseCode::NXDomain));
        };
        match query.query_type() {
            RecordType::A => {}
            // The guest's link is IPv4 only (protocol::net has no IPv6 addresses), so an IPv6
            // answer would only make the guest try an address it cannot reach first.
            _ => {
                recorder.record(dns_event(
                    &name,
                    Some(&rule),
                    "allow",
                    "no records of this type given",
                ));
                return encode(&response(&request, ResponseCode::NoError));
            }
        }
        if self.pending.len() >= MAX_PENDING {
            recorder.record(dns_event(
                &name,
                Some(&rule),
                "deny",
                "too many queries in flight",
            ));
            return encode(&response(&request, ResponseCode::ServFail));
        }
        let id = resolver.start(registry, &name, RecordType::A, Instant::now());
        self.pending.insert(
            id,
            Pending {
                client,
                request,
                name,
                rule,
            },
        );
        None
    }

    /// The answer for a finished upstream lookup, if it was one of ours.
    pub fn complete(
        &mut self,
        id: LookupId,
        outcome: Outcome,
        policy: &Policy,
        recorder: &Recorder,
    ) -> Option<(Client, Vec<u8>)> {
        let pending = self.pending.remove(&id)?;
        let mut answer = response(&pending.request, ResponseCode::NoError);
        let mut event = dns_event(&pending.name, Some(&pending.rule), "allow", "");
        event.reason = None;
        match outcome {
            Outcome::Answered(addresses) => {
                let total = addresses.len();
                let query_name = pending.request.queries()[0].name().clone();
                let mut given = 0;
                for (address, ttl) in addresses {
                    if !policy.address_may_be_handed_out(address) {
                        continue;
                    }
                    let data = match address {
                        IpAddr::V4(v4) => RData::A(A(v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                    };
                    answer.add_answer(Record::from_rdata(
                        query_name.clone(),
                        ttl.min(MAX_TTL),
                        data,
                    ));
                    self.names.record(address, &pending.name);
                    event.dest_ip.get_or_insert(address);
                    given += 1;
                }
                if given < total {
                    event.reason = Some(format!(
                        "{} of {total} addresses withheld: the policy never allows them",
                        total - given
                    ));
                    if given == 0 {
                        event.decision = "deny";
                    }
                }
            }
            Outcome::NotFound => {
                answer.set_response_code(ResponseCode::NXDomain);
                event.reason = Some("name does not exist upstream".into());
            }
            Outcome::Failed(why) => {
                answer.set_response_code(ResponseCode::ServFail);
                event.decision = "deny";
                event.reason = Some(format!("upstream lookup failed: {why}"));
            }
        }
        recorder.record(event);
        Some((pending.client, encode(&answer)?))
    }
}

/// An answer to `request` carrying its question.
fn response(request: &Message, code: ResponseCode) -> Message {
    let mut message = Message::new();
    message
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for query in request.queries() {
        message.add_query(Query::clone(query));
    }
    message
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    message.to_vec().ok()
}

fn dns_event(name: &str, rule: Option<&Rule>, decision: &'static str, reason: &str) -> AuditEvent {
    AuditEvent {
        kind: "dns",
        protocol: Some("udp"),
        domain: Some(name.to_string()),
        decision,
        rule: rule.map(|rule| rule.id.clone()),
        reason: (!reason.is_empty()).then(|| reason.to_string()),
        ..AuditEvent::default()
    }
}
