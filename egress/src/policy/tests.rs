use std::net::IpAddr;

use super::*;

fn policy(json: &str) -> Policy {
    Policy::from_json_str(json)
        .unwrap()
        .with_host_addresses(vec![
            "127.0.0.1".parse().unwrap(),
            "203.0.113.7".parse().unwrap(),
        ])
}

fn verdict(policy: &Policy, ip: &str, port: u16, names: &[&str]) -> Result<String, DenyReason> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let dest = Destination {
        ip: ip.parse::<IpAddr>().unwrap(),
        port,
        protocol: Protocol::Tcp,
        names: &names,
    };
    match policy.check(&dest) {
        Decision::Allow(rule) => Ok(rule.id.clone()),
        Decision::Deny(reason) => Err(reason),
    }
}

const RULES: &str = r#"{ "rules": [
    { "id": "pypi", "domain": "*.pypi.org", "ports": [443] },
    { "domain": "example.com" },
    { "id": "db", "cidr": "10.1.2.0/24", "ports": ["5432-5433"] },
    { "id": "inet", "cidr": "0.0.0.0/0", "ports": [22] },
    { "id": "local", "cidr": "127.0.0.1", "ports": [8080] }
] }"#;

#[test]
fn default_deny_and_domain_rules_need_the_resolvers_names() {
    let p = policy(RULES);
    assert_eq!(
        verdict(&p, "151.101.0.223", 443, &["files.pypi.org"]),
        Ok("pypi".into())
    );
    assert_eq!(
        verdict(&p, "151.101.0.223", 80, &["files.pypi.org"]),
        Err(DenyReason::NoRule)
    );
    // The same address as an IP literal the resolver never handed out.
    assert_eq!(
        verdict(&p, "151.101.0.223", 443, &[]),
        Err(DenyReason::NoRule)
    );
    assert_eq!(
        verdict(&p, "93.184.215.14", 8443, &["EXAMPLE.com."]),
        Ok("rule-2".into())
    );
    assert_eq!(
        verdict(&p, "93.184.215.14", 443, &["other.net"]),
        Err(DenyReason::NoRule)
    );
    assert_eq!(Policy::deny_all().rule_for_name("example.com"), None);
    assert_eq!(p.rule_for_name("pypi.org"), None);
    assert_eq!(p.rule_for_name("x.pypi.org").unwrap().id, "pypi");
}

#[test]
fn always_denied_ranges_open_only_to_rules_that_name_them() {
    let p = policy(RULES);
    assert_eq!(verdict(&p, "10.1.2.9", 5433, &[]), Ok("db".into()));
    assert_eq!(
        verdict(&p, "10.1.3.9", 5433, &[]),
        Err(DenyReason::AlwaysDenied("private"))
    );
    // 0.0.0.0/0 opens the Internet, not the host's network.
    assert_eq!(verdict(&p, "8.8.8.8", 22, &[]), Ok("inet".into()));
    assert_eq!(
        verdict(&p, "192.168.1.1", 22, &[]),
        Err(DenyReason::AlwaysDenied("private"))
    );
    assert_eq!(
        verdict(&p, "169.254.169.254", 22, &[]),
        Err(DenyReason::AlwaysDenied("metadata"))
    );
    assert_eq!(
        verdict(&p, "::ffff:169.254.169.254", 22, &[]),
        Err(DenyReason::AlwaysDenied("metadata"))
    );
    assert_eq!(
        verdict(&p, "203.0.113.7", 22, &[]),
        Err(DenyReason::AlwaysDenied("host address"))
    );
    assert_eq!(verdict(&p, "127.0.0.1", 8080, &[]), Ok("local".into()));
    assert_eq!(
        verdict(&p, "127.0.0.1", 8081, &[]),
        Err(DenyReason::AlwaysDenied("loopback"))
    );
    assert_eq!(
        verdict(&p, "::1", 8080, &[]),
        Err(DenyReason::AlwaysDenied("loopback"))
    );
    // A domain rule cannot reach a private address through a name (DNS rebinding).
    assert_eq!(
        verdict(&p, "10.9.9.9", 443, &["evil.pypi.org"]),
        Err(DenyReason::AlwaysDenied("private"))
    );
    assert!(!p.address_may_be_handed_out("10.9.9.9".parse().unwrap()));
    assert!(p.address_may_be_handed_out("10.1.2.3".parse().unwrap()));
    assert!(!p.address_may_be_handed_out("::ffff:127.0.0.2".parse().unwrap()));
    assert!(p.address_may_be_handed_out("2606:4700::1111".parse().unwrap()));
}

#[test]
fn udp_is_never_allowed_by_rules() {
    let p = policy(RULES);
    let dest = Destination {
        ip: "8.8.8.8".parse().unwrap(),
        port: 22,
        protocol: Protocol::Udp,
        names: &[],
    };
    assert!(matches!(p.check(&dest), Decision::Deny(DenyReason::NoRule)));
}

#[test]
fn names_presented_after_connect_are_checked_against_the_rule() {
    let p = policy(RULES);
    let pypi = p.rule_for_name("files.pypi.org").unwrap();
    assert!(pypi.matches_name("files.pypi.org", 443));
    assert!(!pypi.matches_name("evil.com", 443));
    assert!(!pypi.matches_name("files.pypi.org", 80));
}

#[test]
fn toml_and_json_give_the_same_rules() {
    let toml = r#"
        version = 1
        [[rules]]
        id = "pypi"
        domain = "*.pypi.org"
        ports = [443]
        [[rules]]
        domain = "example.com"
        [[rules]]
        id = "db"
        cidr = "10.1.2.0/24"
        ports = ["5432-5433"]
        [[rules]]
        id = "inet"
        cidr = "0.0.0.0/0"
        ports = [22]
        [[rules]]
        id = "local"
        cidr = "127.0.0.1"
        ports = [8080]
    "#;
    let from_toml = Policy::from_toml_str(toml).unwrap();
    let from_json = Policy::from_json_str(RULES).unwrap();
    assert_eq!(from_toml.rules(), from_json.rules());
}

#[test]
fn credentials_come_from_the_host_and_are_never_printed() {
    std::env::set_var("AGENTVM_EGRESS_POLICY_TEST_TOKEN", "s3cr3t-value");
    let p = policy(
        r#"{ "rules": [ { "id": "api", "domain": "api.example.com",
            "inject_headers": [ { "name": "Authorization", "prefix": "Bearer ", "from_env": "AGENTVM_EGRESS_POLICY_TEST_TOKEN" } ],
            "rate_limit": { "connections": 2, "per_seconds": 10 }, "byte_cap": 1000 } ] }"#,
    );
    let rule = p.rule_for_name("api.example.com").unwrap();
    assert_eq!(
        rule.inject_headers()[0].value.expose(),
        "Bearer s3cr3t-value"
    );
    assert_eq!(
        rule.rate_limit,
        Some(RateLimit {
            connections: 2,
            per: Duration::from_secs(10)
        })
    );
    assert_eq!(rule.byte_cap, Some(1000));
    assert!(!format!("{p:?}").contains("s3cr3t"));
}

#[test]
fn every_mistake_is_named() {
    let cases: &[(&str, &str)] = &[
        ("{", "not valid JSON"),
        (
            r#"{"rules": [{"domain": "a.com", "port": [1]}]}"#,
            "unknown field `port`",
        ),
        (r#"{"version": 2}"#, "version 2 is not supported"),
        (
            r#"{"rules": [{"id": "x"}]}"#,
            "rule 1 (`x`): a rule needs a `domain` or a `cidr`",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "cidr": "1.2.3.4"}]}"#,
            "not both",
        ),
        (
            r#"{"rules": [{"cidr": "10.1.2.3/24"}]}"#,
            "host bits set (did you mean `10.1.2.0/24`?)",
        ),
        (
            r#"{"rules": [{"cidr": "banana"}]}"#,
            "`cidr` `banana` is not an address",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "ports": ["9-1"]}]}"#,
            "is empty",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "ports": [0]}]}"#,
            "port 0",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "ports": ["x-2"]}]}"#,
            "`x` is not a port number",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "protocol": "udp"}]}"#,
            "only TCP is forwarded",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "protocol": "sctp"}]}"#,
            "unknown `protocol`",
        ),
        (
            r#"{"rules": [{"id": "a", "domain": "a.com"}, {"id": "a", "domain": "b.com"}]}"#,
            "rule 2 (`a`): another rule has the same `id`",
        ),
        (
            r#"{"rules": [{"cidr": "1.2.3.4", "inject_headers": [{"name": "A", "from_env": "X"}]}]}"#,
            "needs a `domain` rule",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "inject_headers": [{"name": "Host", "from_env": "X"}]}]}"#,
            "frames the request",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "inject_headers": [{"name": "Bad Name", "from_env": "X"}]}]}"#,
            "not a valid HTTP header name",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "inject_headers": [{"name": "A"}]}]}"#,
            "exactly one of `from_env` or `from_file`",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "inject_headers": [{"name": "A", "from_env": "AGENTVM_EGRESS_UNSET_VAR"}]}]}"#,
            "AGENTVM_EGRESS_UNSET_VAR is not set",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "rate_limit": {"connections": 0}}]}"#,
            "at least 1",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "byte_cap": 0}]}"#,
            "at least 1 byte",
        ),
        (r#"{"rules": [{"domain": "*.com"}]}"#, "top-level"),
    ];
    for (text, needle) in cases {
        let err = Policy::from_json_str(text).unwrap_err().to_string();
        assert!(
            err.contains(needle),
            "{text}\n  gave: {err}\n  wanted: {needle}"
        );
    }
    let err = Policy::from_toml_str("[[rules]]\ndomain = 3")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid TOML"), "{err}");
    let err = Policy::from_file(Path::new("/nonexistent/policy.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read egress policy /nonexistent/policy.json"),
        "{err}"
    );
}

#[test]
fn domain_rules_reach_a_named_private_range_by_name() {
    let p = policy(
        r#"{ "rules": [
            { "id": "git", "domain": "git.corp.internal", "ports": [443] },
            { "id": "corp", "cidr": "10.1.0.0/16", "ports": [9] },
            { "id": "me", "cidr": "203.0.113.7/32", "ports": [9] },
            { "id": "svc", "domain": "svc.test", "ports": [8080] }
        ] }"#,
    );
    assert_eq!(
        verdict(&p, "10.1.2.3", 443, &["git.corp.internal"]),
        Ok("git".into())
    );
    assert_eq!(verdict(&p, "10.1.2.3", 9, &[]), Ok("corp".into()));
    // Not by literal, not on another port, not in a range no rule names.
    assert_eq!(
        verdict(&p, "10.1.2.3", 443, &[]),
        Err(DenyReason::AlwaysDenied("private"))
    );
    assert_eq!(
        verdict(&p, "10.1.2.3", 80, &["git.corp.internal"]),
        Err(DenyReason::AlwaysDenied("private"))
    );
    assert_eq!(
        verdict(&p, "10.2.0.1", 443, &["git.corp.internal"]),
        Err(DenyReason::AlwaysDenied("private"))
    );
    // The host's own address, named exactly.
    assert_eq!(
        verdict(&p, "203.0.113.7", 8080, &["svc.test"]),
        Ok("svc".into())
    );
    assert!(p.address_may_be_handed_out("203.0.113.7".parse().unwrap()));
}

#[test]
fn parsing_with_given_addresses_refuses_secret_files() {
    let options = ParseOptions {
        host_addresses: vec!["203.0.113.7".parse().unwrap()],
        secret_files: false,
    };
    let p = Policy::from_json_str_with(
        r#"{ "rules": [ { "id": "web", "cidr": "0.0.0.0/0", "ports": [443] } ] }"#,
        &options,
    )
    .unwrap();
    assert_eq!(
        verdict(&p, "203.0.113.7", 443, &[]),
        Err(DenyReason::AlwaysDenied("host address"))
    );
    assert_eq!(verdict(&p, "198.51.100.1", 443, &[]), Ok("web".into()));
    let err = Policy::from_json_str_with(
        r#"{ "rules": [ { "id": "api", "domain": "api.example.com",
            "inject_headers": [ { "name": "Authorization", "from_file": "/etc/hostname" } ] } ] }"#,
        &options,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "egress policy: rule 1 (`api`): header `Authorization`: from_file secrets can only be \
         used in a policy file given on the command line; use from_env through the API"
    );
}

#[test]
fn toml_parsing_with_given_addresses_refuses_secret_files_too() {
    let options = ParseOptions {
        host_addresses: vec!["203.0.113.7".parse().unwrap()],
        secret_files: false,
    };
    let p = Policy::from_toml_str_with(
        "[[rules]]\nid = \"web\"\ncidr = \"0.0.0.0/0\"\nports = [443]\n",
        &options,
    )
    .unwrap();
    assert_eq!(
        verdict(&p, "203.0.113.7", 443, &[]),
        Err(DenyReason::AlwaysDenied("host address"))
    );
    assert_eq!(verdict(&p, "198.51.100.1", 443, &[]), Ok("web".into()));
    let err = Policy::from_toml_str_with(
        "[[rules]]\nid = \"api\"\ndomain = \"api.example.com\"\n\
         [[rules.inject_headers]]\nname = \"Authorization\"\nfrom_file = \"/etc/hostname\"\n",
        &options,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("from_file secrets can only be used"), "{err}");
    let syntax = Policy::from_toml_str_with("[[rules]]\ndomain = 3", &options)
        .unwrap_err()
        .to_string();
    assert!(syntax.contains("TOML"), "{syntax}");
}
