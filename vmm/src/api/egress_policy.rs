//! `PUT /egress/policy`, `GET /egress/policy` and `PUT /egress/audit-log`: the NIC's egress
//! filter through the API.
//!
//! The policy is parsed on the API thread, whose seccomp filter allows neither the netlink
//! socket that lists the host's addresses nor opening files: so the addresses come from the
//! controller (listed when `agentvm serve` started) and `from_file` secrets are refused (they
//! belong in a policy file given on the command line). Before InstanceStart the policy waits for
//! the boot, which then gives the VM a NIC; afterwards it goes to the thread waiting on the VM,
//! which hands it to the running egress filter.

use std::path::PathBuf;

use egress::policy::{Policy, Rule, Target};
use serde::Serialize;
use tokio::sync::oneshot;

use super::controller::NO_NIC;
use super::fault::Fault;
use super::handlers::{await_reply, lock, send_to_vmm, ApiContext, Reply, VmmRequest};
use super::models::{parse_body, AuditLogConfig};
use crate::exit::{EgressPolicyRequest, VmmEvent};

/// The pause a policy change may wait for: the VMM thread answers between two events.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `PUT /egress/policy`.
pub async fn put_policy(ctx: &ApiContext, body: &[u8]) -> Result<Reply, Fault> {
    const WHAT: &str = "PUT /egress/policy";
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Fault::bad_request(format!(
            "{WHAT}: the request needs a JSON body: the egress policy (\"rules\": [...])"
        )));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| Fault::bad_request(format!("{WHAT}: the body is not UTF-8: {e}")))?;
    let options = lock(&ctx.controller).egress_parse_options()?;
    let policy = Policy::from_json_str_with(text, &options)
        .map_err(|e| Fault::bad_request(format!("{WHAT}: {e}")))?;
    let Some(events) = lock(&ctx.controller).egress_policy_target(policy.clone())? else {
        return Ok(Reply::NoContent);
    };
    let (reply, answer) = oneshot::channel();
    let controller = ctx.controller.clone();
    let kept = policy.clone();
    let request = EgressPolicyRequest {
        policy,
        // Runs on the VMM thread right after the filter took the policy: two PUTs racing leave
        // GET showing the one the filter follows.
        reply: Box::new(move |taken: bool| {
            if taken {
                lock(&controller).egress_policy_applied(kept);
            }
            let _ = reply.send(taken);
        }),
    };
    events
        .send(VmmEvent::SetEgressPolicy(request))
        .map_err(|_| Fault::bad_request(format!("{WHAT}: the microVM has stopped")))?;
    if await_reply(answer, REPLY_TIMEOUT, WHAT).await? {
        Ok(Reply::NoContent)
    } else {
        Err(Fault::bad_request(NO_NIC))
    }
}

/// `GET /egress/policy`: the rules without secret values.
pub fn get_policy(ctx: &ApiContext) -> Result<Reply, Fault> {
    let controller = lock(&ctx.controller);
    let policy = controller.egress_policy().ok_or_else(|| {
        Fault::not_found(
            "GET /egress/policy: no egress policy was given (PUT /egress/policy before \
             InstanceStart gives the microVM a NIC behind the egress filter; without one it has \
             no network)",
        )
    })?;
    let view = PolicyView::of(policy);
    drop(controller);
    serde_json::to_string(&view)
        .map(Reply::Json)
        .map_err(|e| Fault::internal(format!("cannot encode the answer: {e}")))
}

/// `PUT /egress/audit-log`, before InstanceStart: the VMM thread checks the file can be opened
/// for appending (creating it 0600), and opens it again for the NIC's filter when the VM boots.
pub async fn put_audit_log(ctx: &ApiContext, body: &[u8]) -> Result<Reply, Fault> {
    const WHAT: &str = "PUT /egress/audit-log";
    let config: AuditLogConfig = parse_body(WHAT, body)?;
    lock(&ctx.controller).require_not_started(WHAT)?;
    let path: PathBuf = config.path;
    let (reply, answer) = oneshot::channel();
    send_to_vmm(
        ctx,
        VmmRequest::CheckEgressAuditLog {
            path: path.clone(),
            reply,
        },
    )?;
    await_reply(answer, REPLY_TIMEOUT, WHAT)
        .await?
        .map_err(|e| Fault::bad_request(format!("{WHAT}: {e}")))?;
    lock(&ctx.controller).set_egress_audit_log(path)?;
    Ok(Reply::NoContent)
}

/// `GET /egress/policy`'s body.
#[derive(Debug, Serialize)]
pub struct PolicyView {
    pub version: u32,
    pub rules: Vec<RuleView>,
}

/// One rule as `GET /egress/policy` shows it: headers by name only.
#[derive(Debug, Serialize)]
pub struct RuleView {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// As the policy writes them: a number or `"LOW-HIGH"`; empty: every port.
    pub ports: Vec<serde_json::Value>,
    pub protocol: &'static str,
    /// The names of the headers injected into this rule's HTTP requests (never their values).
    pub inject_header_names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_cap: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct RateLimitView {
    pub connections: u32,
    pub per_seconds: u64,
}

impl PolicyView {
    pub fn of(policy: &Policy) -> Self {
        Self {
            version: egress::policy::FORMAT_VERSION,
            rules: policy
                .rules()
                .iter()
                .map(|rule| RuleView::of(rule))
                .collect(),
        }
    }
}

impl RuleView {
    fn of(rule: &Rule) -> Self {
        let (domain, cidr) = match &rule.target {
            Target::Domain(pattern) => (Some(pattern.to_string()), None),
            Target::Cidr(net) => (None, Some(net.to_string())),
        };
        let ports = rule
            .ports
            .iter()
            .map(|range| {
                if range.start() == range.end() {
                    (*range.start()).into()
                } else {
                    format!("{}-{}", range.start(), range.end()).into()
                }
            })
            .collect();
        Self {
            id: rule.id.clone(),
            domain,
            cidr,
            ports,
            protocol: "tcp",
            inject_header_names: rule
                .inject_headers()
                .iter()
                .map(|header| header.name.clone())
                .collect(),
            rate_limit: rule.rate_limit.map(|limit| RateLimitView {
                connections: limit.connections,
                per_seconds: limit.per.as_secs(),
            }),
            byte_cap: rule.byte_cap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_names_headers_but_never_holds_their_values() {
        std::env::set_var("AGENTVM_API_EGRESS_VIEW_TOKEN", "tok-sekrit-42");
        let policy = Policy::from_json_str_with(
            r#"{ "rules": [
                { "id": "api", "domain": "*.Example.com", "ports": [443, "8000-8010"],
                  "inject_headers": [ { "name": "Authorization", "prefix": "Bearer ",
                                        "from_env": "AGENTVM_API_EGRESS_VIEW_TOKEN" } ],
                  "rate_limit": { "connections": 5, "per_seconds": 10 }, "byte_cap": 1000 },
                { "cidr": "198.51.100.0/24" } ] }"#,
            &Default::default(),
        )
        .unwrap();
        let json = serde_json::to_value(PolicyView::of(&policy)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "version": 1, "rules": [
                { "id": "api", "domain": "*.example.com", "ports": [443, "8000-8010"],
                  "protocol": "tcp", "inject_header_names": ["Authorization"],
                  "rate_limit": { "connections": 5, "per_seconds": 10 }, "byte_cap": 1000 },
                { "id": "rule-2", "cidr": "198.51.100.0/24", "ports": [], "protocol": "tcp",
                  "inject_header_names": [] } ] })
        );
        assert!(!json.to_string().contains("sekrit"));
    }
}
