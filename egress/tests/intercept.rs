//! HTTPS credential injection through the whole filter: the userspace guest (smoltcp at
//! 10.0.2.15) runs a rustls client over its TCP socket; the filter thread intercepts TLS for a
//! rule with credential headers and reaches a rustls server on 127.0.0.x whose certificate a
//! test CA signed (passed to the filter as an extra upstream root). The server records every
//! request head it received. Also the CA endpoint the filter serves on the gateway.

mod support;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use agentvm_protocol::net::GATEWAY_ADDR;
use egress::audit::AuditLog;
use egress::peer::{frame_pair, Connect, GuestPeer as Guest};
use egress::policy::Policy;
use egress::tls::upstream::client_config_with_roots;
use egress::{EgressConfig, EgressHandle, ResolverConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use serde_json::Value;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use support::{AuditBuffer, FakeDns, WAIT};

/// The trusted upstream (certificate for api.test and plain.test from the test CA).
const TRUSTED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);
/// An upstream whose certificate comes from a CA the filter does not trust.
const UNTRUSTED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 8);
const TOKEN: &str = "intercept-test-token-8c1d";
const TOKEN_ENV: &str = "EGRESS_INTERCEPT_TEST_TOKEN";

const POLICY: &str = r#"{ "rules": [
    { "id": "open-trusted", "cidr": "127.0.0.7/32", "ports": [1] },
    { "id": "open-untrusted", "cidr": "127.0.0.8/32", "ports": [1] },
    { "id": "api", "domain": "api.test", "inject_headers": [
        { "name": "Authorization", "prefix": "Bearer ", "from_env": "EGRESS_INTERCEPT_TEST_TOKEN" } ] },
    { "id": "untrusted", "domain": "untrusted.test", "inject_headers": [
        { "name": "Authorization", "prefix": "Bearer ", "from_env": "EGRESS_INTERCEPT_TEST_TOKEN" } ] },
    { "id": "plain", "domain": "plain.test" }
] }"#;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA made for the test, and server configurations for names it signs.
struct TestCa {
    pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        let leaf_key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &self.cert, &self.key)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }
}

/// A rustls HTTPS server on 127.0.0.x: reads one request head per connection, records it,
/// answers 200 "ok" and closes.
struct TlsUpstream {
    address: SocketAddrV4,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TlsUpstream {
    fn start(ip: Ipv4Addr, config: Arc<ServerConfig>) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let SocketAddr::V4(address) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (stopping, recorded) = (stop.clone(), heads.clone());
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (config, recorded) = (config.clone(), recorded.clone());
                        std::thread::spawn(move || serve_one(stream, config, recorded));
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(error) => panic!("TLS server accept: {error}"),
                }
            }
        });
        Self {
            address,
            heads,
            stop,
            thread: Some(thread),
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn serve_one(
    stream: std::net::TcpStream,
    config: Arc<ServerConfig>,
    recorded: Arc<Mutex<Vec<String>>>,
) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let Ok(connection) = ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tls.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            // A failed handshake (the filter refused our certificate) ends here.
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    recorded.lock().unwrap().push(head.clone());
    // POST /echo answers with the request body; anything else with "ok".
    let body = if head.starts_with("POST /echo ") {
        let mut body = vec![0u8; content_length(&head)];
        if tls.read_exact(&mut body).is_err() {
            return;
        }
        body
    } else {
        b"ok".to_vec()
    };
    let _ = tls.write_all(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let _ = tls.write_all(&body);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(std::net::Shutdown::Write);
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A PEM file removed when dropped.
struct TempPem(PathBuf);

impl TempPem {
    fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "egress-intercept-test-{}-{:?}.pem",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempPem {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Sandbox {
    guest: Guest,
    egress: EgressHandle,
    audit: AuditBuffer,
    upstream_ca: TestCa,
    trusted: TlsUpstream,
    untrusted: TlsUpstream,
    _dns: FakeDns,
    _roots: TempPem,
}

fn sandbox() -> Sandbox {
    let upstream_ca = TestCa::new("upstream test CA");
    let rogue_ca = TestCa::new("a CA nobody trusts");
    let trusted = TlsUpstream::start(
        TRUSTED_IP,
        upstream_ca.server_config(&["api.test", "plain.test"]),
    );
    let untrusted = TlsUpstream::start(UNTRUSTED_IP, rogue_ca.server_config(&["untrusted.test"]));
    let dns = FakeDns::start(vec![
        ("api.test", TRUSTED_IP),
        ("plain.test", TRUSTED_IP),
        ("untrusted.test", UNTRUSTED_IP),
    ]);
    let roots = TempPem::new(&upstream_ca.pem);
    // Every test sets the same value, so setting it from several threads is harmless.
    std::env::set_var(TOKEN_ENV, TOKEN);
    let audit = AuditBuffer::default();
    let (guest_end, filter_end) = frame_pair().unwrap();
    let egress = egress::spawn(
        EgressConfig {
            policy: Policy::from_json_str(POLICY).unwrap(),
            audit: AuditLog::to_writer(Box::new(audit.clone())),
            sandbox: "intercept-sandbox".into(),
            resolver: ResolverConfig {
                nameservers: vec![dns.address],
                hosts: Vec::new(),
                timeout: Duration::from_secs(5),
            },
            extra_upstream_roots: vec![roots.0.clone()],
        },
        filter_end,
    )
    .unwrap();
    Sandbox {
        guest: Guest::new(guest_end).unwrap(),
        egress,
        audit,
        upstream_ca,
        trusted,
        untrusted,
        _dns: dns,
        _roots: roots,
    }
}

/// A guest TLS client trusting exactly the certificate(s) in `pem`.
fn client_trusting(pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    client_config_with_roots(roots).unwrap()
}

/// How a guest HTTPS exchange ended.
#[derive(Debug)]
enum Outcome {
    /// The response plaintext, read until the server's close_notify or the TCP close.
    Response(String),
    /// The guest's TLS failed (e.g. it did not trust the certificate it was shown).
    TlsError(rustls::Error),
}

/// Resolves `name`, connects to `to` and sends `request` over TLS for `name`.
fn https(
    sandbox: &mut Sandbox,
    name: &str,
    to: SocketAddrV4,
    trust: &str,
    request: &str,
) -> Outcome {
    https_with(sandbox, name, to, trust, request, false)
}

/// [`https`]; with `half_close`, the guest sends close_notify and FIN right after the request
/// and only then reads the response.
fn https_with(
    sandbox: &mut Sandbox,
    name: &str,
    to: SocketAddrV4,
    trust: &str,
    request: &str,
    half_close: bool,
) -> Outcome {
    sandbox.guest.resolve(name).unwrap();
    let handle = match sandbox.guest.connect(to).unwrap() {
        Connect::Established(handle) => handle,
        Connect::Reset => panic!("connection to {name} was reset"),
    };
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let tls = ClientConnection::new(client_trusting(trust), server_name).unwrap();
    drive(
        &mut sandbox.guest,
        handle,
        tls,
        request.as_bytes(),
        half_close,
    )
}

/// Sends `request` through `tls` and moves TLS bytes between it and the guest socket until the
/// response is complete. The request goes in as rustls takes it (it buffers a limited amount).
fn drive(
    guest: &mut Guest,
    handle: SocketHandle,
    mut tls: ClientConnection,
    mut request: &[u8],
    half_close: bool,
) -> Outcome {
    let mut close_notify_sent = false;
    let mut fin_sent = false;
    let mut outgoing = Vec::new();
    let mut response = Vec::new();
    let outcome = guest.run_until("HTTPS exchange", |guest| {
        let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
        while !request.is_empty() && outgoing.len() < 256 * 1024 {
            match tls.writer().write(request) {
                Ok(0) | Err(_) => break,
                Ok(n) => request = &request[n..],
            }
            while tls.wants_write() {
                tls.write_tls(&mut outgoing).unwrap();
            }
        }
        while tls.wants_write() {
            tls.write_tls(&mut outgoing).unwrap();
        }
        // Before the handshake ends rustls holds the request back, and a close_notify queued
        // then would overtake it.
        if half_close && request.is_empty() && !tls.is_handshaking() && !close_notify_sent {
            tls.send_close_notify();
            close_notify_sent = true;
            while tls.wants_write() {
                tls.write_tls(&mut outgoing).unwrap();
            }
        }
        if !outgoing.is_empty() && socket.can_send() {
            let sent = socket.send_slice(&outgoing).unwrap();
            outgoing.drain(..sent);
        }
        if close_notify_sent && outgoing.is_empty() && !fin_sent {
            socket.close();
            fin_sent = true;
        }
        // rustls takes ciphertext only while its plaintext buffer has room: plaintext is read
        // out after each record, and bytes it did not take stay in the socket.
        let mut failure = None;
        let mut closed = false;
        while socket.can_recv() && failure.is_none() && !closed {
            let taken = socket
                .recv(|data| {
                    let mut input: &[u8] = data;
                    while !input.is_empty() && failure.is_none() && !closed {
                        match tls.read_tls(&mut input) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        if let Err(error) = tls.process_new_packets() {
                            failure = Some(error);
                        }
                        closed = read_plaintext(&mut tls, &mut response);
                    }
                    let taken = data.len() - input.len();
                    (taken, taken)
                })
                .unwrap();
            if taken == 0 {
                break;
            }
        }
        if let Some(error) = failure {
            return Some(Outcome::TlsError(error));
        }
        if closed || read_plaintext(&mut tls, &mut response) {
            return Some(Outcome::Response(
                String::from_utf8_lossy(&response).into_owned(),
            ));
        }
        match socket.state() {
            tcp::State::Closed | tcp::State::CloseWait | tcp::State::TimeWait => Some(
                Outcome::Response(String::from_utf8_lossy(&response).into_owned()),
            ),
            _ => None,
        }
    });
    guest.sockets.get_mut::<tcp::Socket>(handle).close();
    guest
        .run_until("the guest's connection to close", |guest| {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            while socket.can_recv() && socket.recv(|data| (data.len(), ())).is_ok() {}
            matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait).then_some(())
        })
        .unwrap();
    outcome.unwrap()
}

/// Reads the plaintext rustls holds into `response`; true once the server's close_notify came.
fn read_plaintext(tls: &mut ClientConnection, response: &mut Vec<u8>) -> bool {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match tls.reader().read(&mut buffer) {
            Ok(0) => return true,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            Err(_) => return false,
        }
    }
}

fn http_events(audit: &AuditBuffer) -> Vec<Value> {
    audit
        .events()
        .into_iter()
        .filter(|event| event["kind"] == "http")
        .collect()
}

#[test]
fn https_requests_get_the_rules_credential_in_place_of_the_guests() {
    let mut sandbox = sandbox();
    let target = SocketAddrV4::new(TRUSTED_IP, sandbox.trusted.address.port());
    let ca = sandbox.egress.ca_pem();
    let request =
        "GET /v1/models?x=1 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer guessed\r\n\r\n";
    let outcome = https(&mut sandbox, "api.test", target, &ca, request);
    let Outcome::Response(response) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nok"), "{response}");
    let heads = sandbox.trusted.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].contains(&format!("Authorization: Bearer {TOKEN}\r\n")),
        "{}",
        heads[0]
    );
    assert!(!heads[0].contains("guessed"), "{}", heads[0]);

    let text = sandbox.audit.text();
    assert!(!text.contains(TOKEN), "{text}");
    let http = http_events(&sandbox.audit);
    assert_eq!(http.len(), 1, "{http:?}");
    assert_eq!(http[0]["decision"], "allow");
    assert_eq!(http[0]["rule"], "api");
    assert_eq!(http[0]["sni"], "api.test");
    assert_eq!(http[0]["host"], "api.test");
    assert_eq!(http[0]["method"], "GET");
    assert_eq!(http[0]["path"], "/v1/models?x=1");
    let audit = &sandbox.audit;
    let close = sandbox
        .guest
        .run_until("the connection's close event", |_| {
            audit
                .events()
                .into_iter()
                .find(|event| event["kind"] == "close")
        })
        .unwrap();
    assert!(close["bytes_up"].as_u64().unwrap() > request.len() as u64);
    assert!(close["bytes_down"].as_u64().unwrap() > 0);
    assert!(close.get("reason").is_none(), "{close}");
}

#[test]
fn a_host_outside_the_rule_inside_tls_gets_403_and_nothing_reaches_upstream() {
    let mut sandbox = sandbox();
    let target = SocketAddrV4::new(TRUSTED_IP, sandbox.trusted.address.port());
    let ca = sandbox.egress.ca_pem();
    let request = "GET /steal HTTP/1.1\r\nHost: plain.test\r\n\r\n";
    let outcome = https(&mut sandbox, "api.test", target, &ca, request);
    let Outcome::Response(response) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        response.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{response}"
    );
    assert!(
        response.contains("plain.test is not allowed by rule api"),
        "{response}"
    );
    assert!(sandbox.trusted.heads().is_empty());
    let http = http_events(&sandbox.audit);
    assert_eq!(http.len(), 1, "{http:?}");
    assert_eq!(http[0]["decision"], "deny");
    assert_eq!(http[0]["sni"], "api.test");
    assert_eq!(http[0]["host"], "plain.test");
    assert_eq!(http[0]["path"], "/steal");
}

#[test]
fn an_untrusted_upstream_certificate_gives_the_guest_502() {
    let mut sandbox = sandbox();
    let target = SocketAddrV4::new(UNTRUSTED_IP, sandbox.untrusted.address.port());
    let ca = sandbox.egress.ca_pem();
    let request = "GET / HTTP/1.1\r\nHost: untrusted.test\r\n\r\n";
    let outcome = https(&mut sandbox, "untrusted.test", target, &ca, request);
    let Outcome::Response(response) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        response.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{response}"
    );
    assert!(response.contains("certificate"), "{response}");
    assert!(sandbox.untrusted.heads().is_empty());
    let text = sandbox.audit.text();
    assert!(!text.contains(TOKEN), "{text}");
    let http = http_events(&sandbox.audit);
    assert!(
        http.iter().any(|e| e["decision"] == "deny"
            && e["sni"] == "untrusted.test"
            && e["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("certificate")),
        "{http:?}"
    );
}

#[test]
fn rules_without_credentials_are_not_intercepted() {
    let mut sandbox = sandbox();
    let target = SocketAddrV4::new(TRUSTED_IP, sandbox.trusted.address.port());
    // The guest sees the real server's certificate: trusting only the upstream's CA works...
    let upstream_pem = sandbox.upstream_ca.pem.clone();
    let request = "GET /p HTTP/1.1\r\nHost: plain.test\r\nAuthorization: Bearer own\r\n\r\n";
    let outcome = https(&mut sandbox, "plain.test", target, &upstream_pem, request);
    let Outcome::Response(response) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    // ...and the guest's own header arrives untouched.
    let heads = sandbox.trusted.heads();
    assert!(
        heads[0].contains("Authorization: Bearer own\r\n"),
        "{heads:?}"
    );
    // Trusting only the sandbox CA fails: nothing was intercepted.
    let ca = sandbox.egress.ca_pem();
    let outcome = https(&mut sandbox, "plain.test", target, &ca, request);
    assert!(
        matches!(
            outcome,
            Outcome::TlsError(rustls::Error::InvalidCertificate(_))
        ),
        "{outcome:?}"
    );
}

#[test]
fn the_gateway_serves_the_sandbox_ca_and_nothing_else() {
    let mut sandbox = sandbox();
    let endpoint = SocketAddrV4::new(GATEWAY_ADDR, 80);
    let Connect::Established(handle) = sandbox.guest.connect(endpoint).unwrap() else {
        panic!("the CA endpoint refused the connection")
    };
    let request = b"GET /agentvm/egress-ca.pem HTTP/1.1\r\nHost: 10.0.2.2\r\n\r\n";
    let (answer, fin) = sandbox.guest.exchange(handle, request).unwrap();
    assert!(fin);
    let answer = String::from_utf8(answer).unwrap();
    let ca = sandbox.egress.ca_pem();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(&format!("\r\n\r\n{ca}")), "{answer}");
    // The served certificate is the one intercepted servers are signed by.
    let target = SocketAddrV4::new(TRUSTED_IP, sandbox.trusted.address.port());
    let body = answer.split("\r\n\r\n").nth(1).unwrap().to_owned();
    let outcome = https(
        &mut sandbox,
        "api.test",
        target,
        &body,
        "GET / HTTP/1.1\r\nHost: api.test\r\n\r\n",
    );
    assert!(
        matches!(outcome, Outcome::Response(ref r) if r.starts_with("HTTP/1.1 200")),
        "{outcome:?}"
    );

    let Connect::Established(handle) = sandbox.guest.connect(endpoint).unwrap() else {
        panic!("the CA endpoint refused the connection")
    };
    let (answer, _) = sandbox
        .guest
        .exchange(
            handle,
            b"GET /etc/passwd HTTP/1.1\r\nHost: 10.0.2.2\r\n\r\n",
        )
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    // Other gateway ports stay refused.
    assert_eq!(
        sandbox
            .guest
            .connect(SocketAddrV4::new(GATEWAY_ADDR, 8080))
            .unwrap(),
        Connect::Reset
    );
    let events = sandbox.audit.events();
    let ca_events: Vec<&Value> = events.iter().filter(|e| e["kind"] == "ca").collect();
    assert_eq!(ca_events.len(), 2, "{ca_events:?}");
    assert_eq!(ca_events[0]["decision"], "allow");
    assert_eq!(ca_events[0]["path"], "/agentvm/egress-ca.pem");
    assert_eq!(ca_events[1]["decision"], "deny");
    assert_eq!(ca_events[1]["path"], "/etc/passwd");
}

#[test]
fn a_large_upload_and_its_echo_cross_the_interception_intact() {
    let mut sandbox = sandbox();
    let target = SocketAddrV4::new(TRUSTED_IP, sandbox.trusted.address.port());
    let ca = sandbox.egress.ca_pem();
    // Letters whose every position differs from its neighbours', so a shifted, dropped or
    // duplicated chunk changes the comparison; 4 MiB is far past every buffer on the way.
    let body: String = (0..4u64 << 20)
        .map(|n| (b'a' + ((n.wrapping_mul(2_654_435_761) >> 13) % 26) as u8) as char)
        .collect();
    let request = format!(
        "POST /echo HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let outcome = https(&mut sandbox, "api.test", target, &ca, &request);
    let Outcome::Response(response) = outcome else {
        panic!("{outcome:?}")
    };
    let (head, echoed) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        echoed == body,
        "the echo differs ({} of {} bytes)",
        echoed.len(),
        body.len()
    );
    let heads = sandbox.trusted.heads();
    assert!(heads[0].contains(&format!("Authorization: Bearer {TOKEN}\r\n")));
}

#[test]
fn a_guest_that_closes_its_side_after_the_request_still_gets_the_response() {
    let mut sandbox = sandbox();
    let target = SocketAddrV4::new(TRUSTED_IP, sandbox.trusted.address.port());
    let ca = sandbox.egress.ca_pem();
    let request = "GET /half HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let outcome = https_with(&mut sandbox, "api.test", target, &ca, request, true);
    let Outcome::Response(response) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nok"), "{response}");
    let heads = sandbox.trusted.heads();
    assert!(heads[0].starts_with("GET /half HTTP/1.1\r\n"), "{heads:?}");
}
