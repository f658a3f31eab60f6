//! The egress filter end to end without a VM: a userspace guest (smoltcp at 10.0.2.15) on one
//! end of the frame socket pair, the filter thread on the other, echo servers and a fake DNS
//! server on 127.0.0.0/8 (always denied, so each policy opens its server's address with a
//! port-1 CIDR rule: domain rules then apply to names resolving there).

mod support;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::Duration;

use egress::audit::AuditLog;
use egress::peer::{Connect, GuestPeer};
use egress::policy::Policy;
use egress::{EgressConfig, EgressHandle, ResolverConfig};
use hickory_proto::op::ResponseCode;
use serde_json::Value;
use support::{AuditBuffer, EchoServer, FakeDns, ResettingServer};

const ECHO_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const CAPPED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const CLOSED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const GREETER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const RESETTING_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const GREETING: &[u8] = b"220 greeter ready\r\n";
const BYTE_CAP: u64 = 100_000;

const POLICY: &str = r#"{ "rules": [
    { "id": "open-echo", "cidr": "127.0.0.2/32", "ports": [1] },
    { "id": "open-capped", "cidr": "127.0.0.3/32", "ports": [1] },
    { "id": "open-closed", "cidr": "127.0.0.4/32", "ports": [1] },
    { "id": "open-greeter", "cidr": "127.0.0.5/32", "ports": [1] },
    { "id": "open-resetting", "cidr": "127.0.0.6/32", "ports": [1] },
    { "id": "echo", "domain": "echo.test" },
    { "id": "capped", "domain": "capped.test", "byte_cap": 100000 },
    { "id": "closed", "domain": "closed.test" },
    { "id": "greeter", "domain": "greeter.test" },
    { "id": "mixed", "domain": "mixed.test" },
    { "id": "private", "domain": "private.test" },
    { "id": "resetting", "domain": "resetting.test" },
    { "id": "inject", "domain": "inject.test", "inject_headers": [
        { "name": "Authorization", "prefix": "Bearer ", "from_env": "EGRESS_STACK_TEST_TOKEN" } ] }
] }"#;
/// The credential the "inject" rule reads from the host's environment.
const TOKEN: &str = "stack-test-token-5f0c";

struct Sandbox {
    guest: GuestPeer,
    egress: EgressHandle,
    audit: AuditBuffer,
    echo: EchoServer,
    capped: EchoServer,
    greeter: EchoServer,
    _dns: FakeDns,
}

fn policy(json: &str) -> Policy {
    // Every test reads the same value, so setting it from several threads is harmless.
    std::env::set_var("EGRESS_STACK_TEST_TOKEN", TOKEN);
    Policy::from_json_str(json).unwrap()
}

fn sandbox() -> Sandbox {
    let echo = EchoServer::start(ECHO_IP);
    let capped = EchoServer::start(CAPPED_IP);
    let greeter = EchoServer::start_with_greeting(GREETER_IP, GREETING);
    let dns = FakeDns::start(vec![
        ("echo.test", ECHO_IP),
        ("capped.test", CAPPED_IP),
        ("closed.test", CLOSED_IP),
        ("greeter.test", GREETER_IP),
        ("mixed.test", Ipv4Addr::new(10, 9, 9, 9)),
        ("mixed.test", ECHO_IP),
        ("private.test", Ipv4Addr::new(10, 9, 9, 9)),
        ("resetting.test", RESETTING_IP),
        ("other.test", ECHO_IP),
        ("inject.test", ECHO_IP),
    ]);
    let (guest, egress, audit) = filter(ResolverConfig {
        nameservers: vec![dns.address],
        hosts: Vec::new(),
        timeout: Duration::from_secs(5),
    });
    Sandbox {
        guest,
        egress,
        audit,
        echo,
        capped,
        greeter,
        _dns: dns,
    }
}

/// The filter thread under [`POLICY`] and the guest on its link.
fn filter(resolver: ResolverConfig) -> (GuestPeer, EgressHandle, AuditBuffer) {
    let audit = AuditBuffer::default();
    let (guest_end, filter_end) = egress::peer::frame_pair().unwrap();
    let egress = egress::spawn(
        EgressConfig {
            policy: policy(POLICY),
            audit: AuditLog::to_writer(Box::new(audit.clone())),
            sandbox: "test-sandbox".into(),
            resolver,
            extra_upstream_roots: Vec::new(),
        },
        filter_end,
    )
    .unwrap();
    (GuestPeer::new(guest_end).unwrap(), egress, audit)
}

fn established(connect: Connect) -> smoltcp::iface::SocketHandle {
    match connect {
        Connect::Established(handle) => handle,
        Connect::Reset => panic!("connection was reset"),
    }
}

/// Bytes whose every position differs from its neighbours', so a shifted, dropped or
/// duplicated chunk changes the comparison.
fn pattern(length: usize) -> Vec<u8> {
    (0..length as u64)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn events_of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["kind"] == kind)
        .collect()
}

#[test]
fn allowed_name_resolves_connects_and_echoes_5_mib_intact() {
    let mut sandbox = sandbox();
    let (code, addresses) = sandbox.guest.resolve("echo.test").unwrap();
    assert_eq!((code, addresses), (ResponseCode::NoError, vec![ECHO_IP]));
    let port = sandbox.echo.address.port();
    let handle = established(
        sandbox
            .guest
            .connect(SocketAddrV4::new(ECHO_IP, port))
            .unwrap(),
    );
    let data = pattern(5 << 20);
    let (echoed, fin) = sandbox.guest.exchange(handle, &data).unwrap();
    assert!(fin, "the connection should end with FIN, not a reset");
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "echoed bytes differ from the bytes sent");

    let stats = sandbox.egress.stats();
    assert_eq!(stats.connections_allowed, 1);
    assert_eq!(stats.bytes_up, data.len() as u64);
    assert_eq!(stats.dns_queries, 1);
    let close = sandbox
        .guest
        .run_until("close audit event", |_| {
            events_of(&sandbox.audit.events(), "close")
                .first()
                .map(|event| (*event).clone())
        })
        .unwrap();
    assert_eq!(close["sandbox"], "test-sandbox");
    assert_eq!(close["rule"], "echo");
    assert_eq!(close["domain"], "echo.test");
    assert_eq!(close["bytes_up"], data.len() as u64);
    assert_eq!(close["bytes_down"], data.len() as u64);
    let events = sandbox.audit.events();
    let dns = events_of(&events, "dns");
    assert_eq!(dns[0]["domain"], "echo.test");
    assert_eq!(dns[0]["decision"], "allow");
    assert_eq!(dns[0]["dest_ip"], "127.0.0.2");
    let connect = events_of(&events, "connect");
    assert_eq!(connect[0]["decision"], "allow");
    assert_eq!(connect[0]["dest_port"], port);
}

#[test]
fn address_never_handed_out_is_reset_until_the_guest_resolves_it() {
    let mut sandbox = sandbox();
    let target = SocketAddrV4::new(ECHO_IP, sandbox.echo.address.port());
    assert_eq!(sandbox.guest.connect(target).unwrap(), Connect::Reset);
    sandbox.guest.resolve("echo.test").unwrap();
    let handle = established(sandbox.guest.connect(target).unwrap());
    assert_eq!(sandbox.guest.echo(handle, b"ping\n").unwrap(), b"ping\n");

    let events = sandbox.audit.events();
    let connects = events_of(&events, "connect");
    assert_eq!(connects[0]["decision"], "deny");
    assert_eq!(connects[0]["dest_ip"], "127.0.0.2");
    assert!(
        connects[0]["reason"].as_str().unwrap().contains("loopback"),
        "{}",
        connects[0]
    );
    assert_eq!(connects[1]["decision"], "allow", "{connects:#?}");
    let stats = sandbox.egress.stats();
    assert_eq!(
        (stats.connections_denied, stats.connections_allowed),
        (1, 1)
    );
}

#[test]
fn denied_name_metadata_address_and_stray_udp_are_refused_and_audited() {
    let mut sandbox = sandbox();
    assert_eq!(
        sandbox.guest.resolve("other.test").unwrap(),
        (ResponseCode::NXDomain, vec![])
    );
    let metadata = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
    assert_eq!(sandbox.guest.connect(metadata).unwrap(), Connect::Reset);
    let public = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 443);
    assert_eq!(sandbox.guest.connect(public).unwrap(), Connect::Reset);
    sandbox
        .guest
        .send_udp(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 9))
        .unwrap();

    let events = sandbox
        .guest
        .run_until("UDP audit event", |_| {
            let events = sandbox.audit.events();
            events
                .iter()
                .any(|event| event["protocol"] == "udp" && event["kind"] == "connect")
                .then_some(events)
        })
        .unwrap();
    let dns = events_of(&events, "dns");
    assert_eq!(
        (&dns[0]["domain"], &dns[0]["decision"]),
        (&"other.test".into(), &"deny".into())
    );
    let connects = events_of(&events, "connect");
    assert_eq!(connects[0]["dest_ip"], "169.254.169.254");
    assert!(
        connects[0]["reason"].as_str().unwrap().contains("metadata"),
        "{}",
        connects[0]
    );
    assert_eq!(connects[1]["dest_ip"], "192.0.2.1");
    assert_eq!(connects[1]["decision"], "deny");
    assert_eq!(connects[2]["protocol"], "udp");
    assert_eq!(connects[2]["dest_port"], 9);
    // The fake upstream resolver was never asked for the denied name, and no connection
    // was made.
    assert_eq!(sandbox.egress.stats().connections_allowed, 0);
}

#[test]
fn policy_update_applies_to_new_connections_only() {
    let mut sandbox = sandbox();
    sandbox.guest.resolve("echo.test").unwrap();
    let target = SocketAddrV4::new(ECHO_IP, sandbox.echo.address.port());
    let open = established(sandbox.guest.connect(target).unwrap());
    assert_eq!(sandbox.guest.echo(open, b"before\n").unwrap(), b"before\n");

    sandbox.egress.set_policy(Policy::deny_all());
    assert_eq!(sandbox.guest.connect(target).unwrap(), Connect::Reset);
    assert_eq!(
        sandbox.guest.resolve("echo.test").unwrap().0,
        ResponseCode::NXDomain
    );
    assert_eq!(sandbox.guest.echo(open, b"after\n").unwrap(), b"after\n");

    sandbox.egress.set_policy(policy(POLICY));
    let again = established(sandbox.guest.connect(target).unwrap());
    assert_eq!(sandbox.guest.echo(again, b"again\n").unwrap(), b"again\n");
}

#[test]
fn refused_upstream_resets_the_guest() {
    let mut sandbox = sandbox();
    // A port nobody listens on: bound, then closed again.
    let port = TcpListener::bind((CLOSED_IP, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(
        sandbox.guest.resolve("closed.test").unwrap().1,
        vec![CLOSED_IP]
    );
    match sandbox
        .guest
        .connect(SocketAddrV4::new(CLOSED_IP, port))
        .unwrap()
    {
        Connect::Reset => {}
        Connect::Established(handle) => {
            assert!(
                sandbox.guest.wait_closed(handle).unwrap(),
                "expected a reset, got a FIN"
            );
        }
    }
    let close = sandbox
        .guest
        .run_until("close audit event", |_| {
            events_of(&sandbox.audit.events(), "close")
                .first()
                .map(|event| (*event).clone())
        })
        .unwrap();
    let reason = close["reason"].as_str().unwrap();
    assert!(reason.contains("upstream connect failed"), "{reason}");
}

#[test]
fn byte_cap_cuts_the_connection() {
    let mut sandbox = sandbox();
    sandbox.guest.resolve("capped.test").unwrap();
    let port = sandbox.capped.address.port();
    let handle = established(
        sandbox
            .guest
            .connect(SocketAddrV4::new(CAPPED_IP, port))
            .unwrap(),
    );
    let (echoed, fin) = sandbox.guest.exchange(handle, &pattern(1 << 20)).unwrap();
    assert!(!fin, "the capped connection should be reset");
    assert!(
        (echoed.len() as u64) < BYTE_CAP,
        "{} bytes came back",
        echoed.len()
    );
    let close = sandbox
        .guest
        .run_until("close audit event", |_| {
            events_of(&sandbox.audit.events(), "close")
                .first()
                .map(|event| (*event).clone())
        })
        .unwrap();
    assert_eq!(close["rule"], "capped");
    assert!(
        close["reason"].as_str().unwrap().contains("byte cap"),
        "{close}"
    );
    // Once over the cap, the rule refuses new connections too.
    assert_eq!(
        sandbox
            .guest
            .connect(SocketAddrV4::new(CAPPED_IP, port))
            .unwrap(),
        Connect::Reset
    );
}

#[test]
fn http_requests_get_the_rules_credential_in_place_of_the_guests() {
    let mut sandbox = sandbox();
    sandbox.guest.resolve("inject.test").unwrap();
    let target = SocketAddrV4::new(ECHO_IP, sandbox.echo.address.port());
    let handle = established(sandbox.guest.connect(target).unwrap());
    // Two keep-alive requests, the second with a header of its own under the same name; the
    // echo server sends back exactly what upstream received.
    let request = b"GET /a HTTP/1.1\r\nHost: inject.test\r\n\r\nPOST /b HTTP/1.1\r\nHost: inject.test\r\nauthorization: Bearer guessed\r\nContent-Length: 3\r\n\r\nxyz";
    let expected = format!(
        "GET /a HTTP/1.1\r\nHost: inject.test\r\nAuthorization: Bearer {TOKEN}\r\n\r\nPOST /b HTTP/1.1\r\nHost: inject.test\r\nContent-Length: 3\r\nAuthorization: Bearer {TOKEN}\r\n\r\nxyz"
    );
    let received = sandbox
        .guest
        .receive_after_send(handle, request, expected.len())
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&received), expected);
    // Connections under other rules get nothing added.
    sandbox.guest.resolve("echo.test").unwrap();
    let handle = established(sandbox.guest.connect(target).unwrap());
    let plain = b"GET /c HTTP/1.1\r\nHost: echo.test\r\n\r\n";
    assert_eq!(sandbox.guest.echo(handle, plain).unwrap(), plain);
    // The audit log names the requests, never the credential.
    let text = sandbox.audit.text();
    assert!(!text.contains(TOKEN), "{text}");
    let events = sandbox.audit.events();
    let http = events_of(&events, "http");
    assert!(
        http.iter()
            .any(|e| e["rule"] == "inject" && e["path"] == "/b"),
        "{http:?}"
    );
}

#[test]
fn http_host_outside_the_domain_rule_gets_403() {
    let mut sandbox = sandbox();
    sandbox.guest.resolve("echo.test").unwrap();
    let target = SocketAddrV4::new(ECHO_IP, sandbox.echo.address.port());
    let handle = established(sandbox.guest.connect(target).unwrap());
    let request = b"GET /secret HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    let (answer, fin) = sandbox.guest.exchange(handle, request).unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(fin, "the 403 should end with FIN");
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(answer.contains("evil.test"), "{answer}");

    // The rule's host, with the port as clients send it, passes and reaches the echo server
    // unchanged.
    let handle = established(sandbox.guest.connect(target).unwrap());
    let request = format!(
        "GET /ok HTTP/1.1\r\nHost: echo.test:{}\r\n\r\n",
        target.port()
    );
    assert_eq!(
        sandbox.guest.echo(handle, request.as_bytes()).unwrap(),
        request.as_bytes()
    );
    // A later request on the same connection is checked too: naming another host resets it.
    let smuggled = b"GET /next HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    sandbox
        .guest
        .sockets
        .get_mut::<smoltcp::socket::tcp::Socket>(handle)
        .send_slice(smuggled)
        .unwrap();
    assert!(
        sandbox.guest.wait_closed(handle).unwrap(),
        "expected a reset"
    );

    let events = sandbox.audit.events();
    let http = events_of(&events, "http");
    assert_eq!(http[0]["decision"], "deny");
    assert_eq!(http[0]["host"], "evil.test");
    assert_eq!(http[0]["method"], "GET");
    assert_eq!(http[0]["path"], "/secret");
    assert_eq!(http[1]["decision"], "allow");
    assert_eq!(http[1]["host"], format!("echo.test:{}", target.port()));
    assert_eq!(http[2]["decision"], "deny");
    assert_eq!(http[2]["path"], "/next");
    assert_eq!(http.len(), 3);
}

#[test]
fn hosts_entries_answer_locally_and_a_silent_nameserver_gives_servfail() {
    // Bound but never read: queries to it go unanswered.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (mut guest, egress, audit) = filter(ResolverConfig {
        nameservers: vec![silent.local_addr().unwrap()],
        hosts: vec![("echo.test".into(), ECHO_IP.into())],
        timeout: Duration::from_millis(300),
    });
    assert_eq!(
        guest.resolve("echo.test").unwrap(),
        (ResponseCode::NoError, vec![ECHO_IP])
    );
    assert_eq!(
        guest.resolve("capped.test").unwrap(),
        (ResponseCode::ServFail, vec![])
    );
    let events = audit.events();
    let failed = events_of(&events, "dns")[1];
    assert_eq!(failed["domain"], "capped.test");
    assert_eq!(failed["decision"], "deny");
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("upstream lookup failed"), "{reason}");

    egress.shutdown();
    assert!(
        guest.link_closed(),
        "the filter's end of the link is still open"
    );
}

#[test]
fn a_server_that_speaks_first_reaches_a_guest_that_waits() {
    let mut sandbox = sandbox();
    sandbox.guest.resolve("greeter.test").unwrap();
    let target = SocketAddrV4::new(GREETER_IP, sandbox.greeter.address.port());
    let handle = established(sandbox.guest.connect(target).unwrap());
    assert_eq!(
        sandbox.guest.receive(handle, GREETING.len()).unwrap(),
        GREETING
    );
    assert_eq!(
        sandbox.guest.echo(handle, b"QUIT\r\n").unwrap(),
        b"QUIT\r\n"
    );
}

#[test]
fn addresses_the_policy_never_allows_are_withheld_from_answers() {
    let mut sandbox = sandbox();
    // 10.9.9.9 is private and no rule names it; 127.0.0.2 is opened by a CIDR rule.
    assert_eq!(
        sandbox.guest.resolve("mixed.test").unwrap(),
        (ResponseCode::NoError, vec![ECHO_IP])
    );
    assert_eq!(
        sandbox.guest.resolve("private.test").unwrap(),
        (ResponseCode::NoError, vec![])
    );
    let events = sandbox.audit.events();
    let dns = events_of(&events, "dns");
    assert_eq!(dns[0]["decision"], "allow");
    assert!(
        dns[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("1 of 2 addresses withheld"),
        "{}",
        dns[0]
    );
    assert_eq!(dns[1]["decision"], "deny");
    assert!(
        dns[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("1 of 1 addresses withheld"),
        "{}",
        dns[1]
    );
    // The withheld address was never handed out, so connecting to it is refused.
    let target = SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 80);
    assert_eq!(sandbox.guest.connect(target).unwrap(), Connect::Reset);
}

#[test]
fn an_upstream_reset_resets_the_guest() {
    let mut sandbox = sandbox();
    let server = ResettingServer::start(RESETTING_IP);
    sandbox.guest.resolve("resetting.test").unwrap();
    let handle = established(sandbox.guest.connect(server.address).unwrap());
    sandbox
        .guest
        .sockets
        .get_mut::<smoltcp::socket::tcp::Socket>(handle)
        .send_slice(b"hello\n")
        .unwrap();
    assert!(
        sandbox.guest.wait_closed(handle).unwrap(),
        "expected a reset, got a FIN"
    );
    let close = sandbox
        .guest
        .run_until("close audit event", |_| {
            events_of(&sandbox.audit.events(), "close")
                .first()
                .map(|event| (*event).clone())
        })
        .unwrap();
    assert_eq!(close["reason"], "upstream reset the connection");
    assert_eq!(close["bytes_up"], 6);
}

#[test]
fn a_silent_nameserver_is_passed_over_for_the_next() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = FakeDns::start(vec![("echo.test", ECHO_IP)]);
    let (mut guest, _egress, _audit) = filter(ResolverConfig {
        nameservers: vec![silent.local_addr().unwrap(), dns.address],
        hosts: Vec::new(),
        timeout: Duration::from_secs(2),
    });
    assert_eq!(
        guest.resolve("echo.test").unwrap(),
        (ResponseCode::NoError, vec![ECHO_IP])
    );
}
