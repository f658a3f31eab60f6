//! The egress filter's DNS server on queries from a hostile guest: any UDP payload sent to
//! DNS_ADDR:53 goes through `DnsServer::query`, and lookups it starts finish through
//! `complete` (from the resolver's hosts table; with no nameservers nothing leaves the machine).
//! Every answer it sends back must be a DNS response to the query's id.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use egress::audit::AuditLog;
use egress::dns::DnsServer;
use egress::policy::{ParseOptions, Policy};
use egress::recorder::Recorder;
use egress::resolver::Resolver;
use egress::ResolverConfig;
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use smoltcp::wire::{IpAddress, IpEndpoint};

const POLICY: &str = r#"{ "rules": [
    { "id": "docs", "domain": "*.allowed.test", "ports": [443] },
    { "domain": "allowed.test" },
    { "id": "lan", "cidr": "10.1.2.0/24" }
] }"#;

fn check_answer(query: &[u8], answer: &[u8]) {
    let answer = Message::from_vec(answer).expect("the DNS server sent an undecodable answer");
    assert_eq!(answer.message_type(), MessageType::Response);
    if let Ok(query) = Message::from_vec(query) {
        assert_eq!(answer.id(), query.id(), "the answer is for another query");
    }
}

fuzz_target!(|packet: &[u8]| {
    let options = ParseOptions {
        host_addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))],
        secret_files: false,
    };
    let policy = Policy::from_json_str_with(POLICY, &options).expect("the fixed policy parses");
    let config = ResolverConfig {
        nameservers: Vec::new(),
        hosts: vec![
            (
                "allowed.test".into(),
                IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34)),
            ),
            (
                "www.allowed.test".into(),
                IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            ),
            (
                "lan.allowed.test".into(),
                IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1)),
            ),
            (
                "host.allowed.test".into(),
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            ),
        ],
        timeout: Duration::from_secs(1),
    };
    let mut resolver = Resolver::new(config, 1 << 20).expect("resolver");
    let poll = mio::Poll::new().expect("epoll");
    let recorder = Recorder::new(AuditLog::disabled(), "fuzz".into());
    let client = IpEndpoint::new(IpAddress::v4(10, 0, 2, 15), 53000);
    let mut server = DnsServer::default();

    if let Some(answer) = server.query(
        packet,
        client,
        &policy,
        &mut resolver,
        poll.registry(),
        &recorder,
    ) {
        check_answer(packet, &answer);
    }
    for (id, outcome) in resolver.poll(poll.registry(), Instant::now()) {
        if let Some((to, answer)) = server.complete(id, outcome, &policy, &recorder) {
            assert_eq!(to, client, "the answer goes to another client");
            check_answer(packet, &answer);
        }
    }
});
