//! Egress policies from an untrusted author (a `PUT /egress/policy` body or a policy file): JSON
//! and TOML parsed with options that neither list the host's interfaces nor read secret files,
//! then every accepted policy asked about arbitrary names, addresses and ports, as the DNS
//! server and the connection filter ask it.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use egress::policy::{Destination, ParseOptions, Policy, Protocol};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Address {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[derive(Arbitrary, Debug)]
struct Probe {
    address: Address,
    port: u16,
    tcp: bool,
    names: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    toml: bool,
    text: String,
    probes: Vec<Probe>,
}

fuzz_target!(|input: Input| {
    let options = ParseOptions {
        host_addresses: vec![
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10)),
        ],
        secret_files: false,
    };
    let parsed = if input.toml {
        Policy::from_toml_str_with(&input.text, &options)
    } else {
        Policy::from_json_str_with(&input.text, &options)
    };
    let Ok(policy) = parsed else {
        return;
    };
    for probe in input.probes.iter().take(64) {
        let ip = match probe.address {
            Address::V4(octets) => IpAddr::from(octets),
            Address::V6(octets) => IpAddr::from(octets),
        };
        for name in &probe.names {
            if let Some(rule) = policy.rule_for_name(name) {
                let _ = rule.matches_name(name, probe.port);
            }
        }
        let _ = policy.address_may_be_handed_out(ip);
        let _ = policy.check(&Destination {
            ip,
            port: probe.port,
            protocol: if probe.tcp {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            names: &probe.names,
        });
    }
});
