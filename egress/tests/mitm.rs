//! TLS interception end to end in memory: a rustls client (the guest, trusting the sandbox CA)
//! <-> MitmSession <-> a rustls server for "api.test" with a test CA's certificate, the
//! session's upstream configuration trusting that test CA.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use egress::inspect::RequestRewriter;
use egress::tls::upstream::client_config_with_roots;
use egress::tls::{upstream_client_config, MitmSession, SandboxCa, TlsError};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const SECRET: &str = "sk-live-test-secret-value-42";
const UPSTREAM_NAME: &str = "api.test";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The real server's side: a test CA and a server configuration for "api.test" it signed.
struct TestUpstream {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    config: Arc<ServerConfig>,
}

fn test_upstream() -> TestUpstream {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "upstream test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![UPSTREAM_NAME.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestUpstream {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        config: Arc::new(config),
    }
}

/// A PEM file removed when dropped.
struct TempPem(PathBuf);

impl TempPem {
    fn new(contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "egress-mitm-test-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempPem {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The guest's TLS client, trusting only the sandbox CA and offering h2 before http/1.1 (as
/// curl does).
fn guest_client(ca: &SandboxCa) -> ClientConnection {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(UPSTREAM_NAME).unwrap(),
    )
    .unwrap()
}

fn injecting_rewriter() -> RequestRewriter {
    RequestRewriter::new(vec![("Authorization".into(), format!("Bearer {SECRET}"))])
}

/// Everything a pump saw: plaintext at each end and the session's first error.
#[derive(Default)]
struct Seen {
    at_upstream: Vec<u8>,
    at_guest: Vec<u8>,
    guest_got_close: bool,
    upstream_got_close: bool,
    error: Option<String>,
}

fn read_plaintext(reader: &mut rustls::Reader<'_>, into: &mut Vec<u8>) -> bool {
    let mut buffer = [0u8; 4096];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return true,
            Ok(n) => into.extend_from_slice(&buffer[..n]),
            Err(_) => return false,
        }
    }
}

/// Moves bytes guest <-> session <-> upstream until nothing moves (at most 50 rounds).
fn pump(
    guest: &mut ClientConnection,
    session: &mut MitmSession,
    upstream: &mut ServerConnection,
    seen: &mut Seen,
) {
    for _ in 0..50 {
        let mut moved = false;
        let mut wire = Vec::new();
        while guest.wants_write() {
            guest.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            moved = true;
            if let Err(error) = session.from_guest(&wire) {
                seen.error.get_or_insert(error.to_string());
            }
        }
        let mut wire = Vec::new();
        session.to_upstream(&mut wire);
        if !wire.is_empty() {
            moved = true;
            let mut input = &wire[..];
            while !input.is_empty() {
                if upstream.read_tls(&mut input).unwrap() == 0
                    || upstream.process_new_packets().is_err()
                {
                    break;
                }
            }
            seen.upstream_got_close |=
                read_plaintext(&mut upstream.reader(), &mut seen.at_upstream);
        }
        let mut wire = Vec::new();
        while upstream.wants_write() {
            upstream.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            moved = true;
            if let Err(error) = session.from_upstream(&wire) {
                seen.error.get_or_insert(error.to_string());
            }
        }
        let mut wire = Vec::new();
        session.to_guest(&mut wire);
        if !wire.is_empty() {
            moved = true;
            let mut input = &wire[..];
            while !input.is_empty() {
                if guest.read_tls(&mut input).unwrap() == 0 || guest.process_new_packets().is_err()
                {
                    break;
                }
            }
            seen.guest_got_close |= read_plaintext(&mut guest.reader(), &mut seen.at_guest);
        }
        if !moved {
            return;
        }
    }
    panic!("the connection was still moving bytes after 50 rounds");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn injects_the_header_and_relays_the_response_both_ways() {
    let upstream_side = test_upstream();
    let ca_file = TempPem::new(&upstream_side.ca_pem);
    let upstream_config = upstream_client_config(std::slice::from_ref(&ca_file.0)).unwrap();
    let ca = SandboxCa::generate("sbx-42").unwrap();
    let mut session =
        MitmSession::new(&ca, UPSTREAM_NAME, upstream_config, injecting_rewriter()).unwrap();
    let mut guest = guest_client(&ca);
    let mut upstream = ServerConnection::new(Arc::clone(&upstream_side.config)).unwrap();
    let mut seen = Seen::default();

    guest
        .writer()
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer guest-placeholder\r\n\r\n")
        .unwrap();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);

    assert_eq!(seen.error, None);
    let request = String::from_utf8(seen.at_upstream.clone()).unwrap();
    assert_eq!(
        request,
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
        )
    );
    let heads = session.heads();
    assert_eq!(heads.len(), 1);
    assert_eq!(
        (heads[0].method.as_str(), heads[0].path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(heads[0].host.as_deref(), Some(UPSTREAM_NAME));
    // Both legs negotiated HTTP/1.1, although both ends also offered h2.
    assert_eq!(guest.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(upstream.alpn_protocol(), Some(&b"http/1.1"[..]));
    // The guest saw the sandbox CA's leaf, not the real server's certificate.
    let chain = guest.peer_certificates().unwrap();
    assert_eq!(chain.last().unwrap(), ca.cert_der());

    upstream.writer().write_all(RESPONSE).unwrap();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);
    assert_eq!(seen.at_guest, RESPONSE);
    assert!(!contains(&seen.at_guest, SECRET.as_bytes()));

    // A second request on the same connection is rewritten too.
    guest
        .writer()
        .write_all(b"POST /v1/chat HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);
    let second = &seen.at_upstream[request.len()..];
    assert!(second.starts_with(b"POST /v1/chat HTTP/1.1\r\n"));
    assert!(second.ends_with(format!("Authorization: Bearer {SECRET}\r\n\r\n{{}}").as_bytes()));
    assert_eq!(session.heads().len(), 1);

    // close_notify travels guest -> upstream, and the server's travels back.
    assert!(!session.is_done());
    guest.send_close_notify();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);
    assert!(session.guest_closed());
    assert!(seen.upstream_got_close);
    upstream.send_close_notify();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);
    assert!(session.upstream_closed());
    assert!(seen.guest_got_close);
    assert!(session.is_done());

    let debug = format!("{session:?} {ca:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(!debug.contains("PRIVATE"), "{debug}");
}

#[test]
fn an_untrusted_upstream_certificate_fails_with_a_reason() {
    let upstream_side = test_upstream();
    // Mozilla's roots only: the test CA is not among them.
    let upstream_config = upstream_client_config(&[]).unwrap();
    let ca = SandboxCa::generate("sbx-untrusted").unwrap();
    let mut session =
        MitmSession::new(&ca, UPSTREAM_NAME, upstream_config, injecting_rewriter()).unwrap();
    let mut guest = guest_client(&ca);
    let mut upstream = ServerConnection::new(Arc::clone(&upstream_side.config)).unwrap();
    let mut seen = Seen::default();
    guest
        .writer()
        .write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .unwrap();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);

    let error = seen
        .error
        .expect("the upstream certificate must be refused");
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert!(!error.contains(SECRET));
    assert!(
        seen.at_upstream.is_empty(),
        "nothing reached the untrusted server"
    );
    let answer = String::from_utf8(seen.at_guest).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    assert!(answer.contains("UnknownIssuer"), "{answer}");
    assert!(seen.guest_got_close);
    assert!(session.is_rejected());
}

#[test]
fn the_error_variant_names_the_certificate_problem() {
    let upstream_side = test_upstream();
    let ca = SandboxCa::generate("sbx-variant").unwrap();
    let mut session = MitmSession::new(
        &ca,
        UPSTREAM_NAME,
        upstream_client_config(&[]).unwrap(),
        injecting_rewriter(),
    )
    .unwrap();
    let mut upstream = ServerConnection::new(Arc::clone(&upstream_side.config)).unwrap();
    // Drive only the upstream leg by hand.
    let mut result = Ok(());
    for _ in 0..10 {
        let mut wire = Vec::new();
        session.to_upstream(&mut wire);
        let mut input = &wire[..];
        while !input.is_empty() {
            upstream.read_tls(&mut input).unwrap();
            upstream.process_new_packets().unwrap();
        }
        let mut back = Vec::new();
        while upstream.wants_write() {
            upstream.write_tls(&mut back).unwrap();
        }
        result = session.from_upstream(&back);
        if result.is_err() {
            break;
        }
    }
    assert!(
        matches!(
            result,
            Err(TlsError::UpstreamCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ),
        "{result:?}"
    );
}

#[test]
fn a_rejected_request_never_reaches_upstream() {
    let upstream_side = test_upstream();
    let mut roots = RootCertStore::empty();
    roots.add(upstream_side.ca_der.clone()).unwrap();
    let ca = SandboxCa::generate("sbx-reject").unwrap();
    let mut session = MitmSession::new(
        &ca,
        UPSTREAM_NAME,
        client_config_with_roots(roots).unwrap(),
        injecting_rewriter(),
    )
    .unwrap();
    let mut guest = guest_client(&ca);
    let mut upstream = ServerConnection::new(Arc::clone(&upstream_side.config)).unwrap();
    let mut seen = Seen::default();

    // Finish both handshakes first.
    pump(&mut guest, &mut session, &mut upstream, &mut seen);
    assert!(!guest.is_handshaking() && !upstream.is_handshaking());

    // The caller's Host check runs between from_guest and to_upstream.
    guest
        .writer()
        .write_all(b"GET /steal HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        .unwrap();
    let mut wire = Vec::new();
    while guest.wants_write() {
        guest.write_tls(&mut wire).unwrap();
    }
    session.from_guest(&wire).unwrap();
    let heads = session.heads();
    assert_eq!(heads[0].host.as_deref(), Some("evil.test"));
    session.reject(403, "host evil.test does not match the rule for api.test");
    pump(&mut guest, &mut session, &mut upstream, &mut seen);

    assert!(
        seen.at_upstream.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&seen.at_upstream)
    );
    let answer = String::from_utf8(seen.at_guest).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(answer.contains("does not match the rule"), "{answer}");
    assert!(seen.guest_got_close && seen.upstream_got_close);
    assert!(session.is_done());
}

#[test]
fn a_malformed_request_gets_a_400_inside_tls() {
    let upstream_side = test_upstream();
    let mut roots = RootCertStore::empty();
    roots.add(upstream_side.ca_der.clone()).unwrap();
    let ca = SandboxCa::generate("sbx-bad").unwrap();
    let mut session = MitmSession::new(
        &ca,
        UPSTREAM_NAME,
        client_config_with_roots(roots).unwrap(),
        injecting_rewriter(),
    )
    .unwrap();
    let mut guest = guest_client(&ca);
    let mut upstream = ServerConnection::new(Arc::clone(&upstream_side.config)).unwrap();
    let mut seen = Seen::default();
    guest
        .writer()
        .write_all(b"\x00\x01 not http\r\n\r\n")
        .unwrap();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);

    let error = seen.error.expect("a malformed request is an error");
    assert!(error.contains("bad HTTP request"), "{error}");
    assert!(seen.at_upstream.is_empty());
    let answer = String::from_utf8(seen.at_guest).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
}

#[test]
fn a_guest_that_does_not_trust_the_ca_fails_its_handshake() {
    let upstream_side = test_upstream();
    let ca = SandboxCa::generate("sbx-a").unwrap();
    let other_ca = SandboxCa::generate("sbx-b").unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(upstream_side.ca_der.clone()).unwrap();
    let mut session = MitmSession::new(
        &ca,
        UPSTREAM_NAME,
        client_config_with_roots(roots).unwrap(),
        injecting_rewriter(),
    )
    .unwrap();
    // This guest trusts another sandbox's CA: one sandbox's CA opens no other sandbox.
    let mut guest = guest_client(&other_ca);
    let mut upstream = ServerConnection::new(Arc::clone(&upstream_side.config)).unwrap();
    let mut seen = Seen::default();
    pump(&mut guest, &mut session, &mut upstream, &mut seen);
    assert!(guest.is_handshaking());
    let error = seen.error.expect("the guest's alert fails the session");
    assert!(error.contains("guest"), "{error}");
}

#[test]
fn sandbox_ca_certificate_and_leaf_cache() {
    let ca = SandboxCa::generate("sbx-7").unwrap();
    let pem = ca.cert_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert!(contains(ca.cert_der(), b"agentvm sandbox sbx-7 egress CA"));
    let first = ca.server_config("API.test").unwrap();
    let again = ca.server_config("api.test").unwrap();
    assert!(Arc::ptr_eq(&first, &again), "a name's leaf is minted once");
    assert_eq!(first.alpn_protocols, vec![b"http/1.1".to_vec()]);
    for bad in ["", "192.0.2.1", "bad name", "a..b"] {
        let error = ca.server_config(bad).unwrap_err();
        assert!(
            matches!(error, TlsError::BadServerName(_)),
            "{bad:?}: {error}"
        );
    }
    let other = SandboxCa::generate("sbx-7").unwrap();
    assert_ne!(other.cert_der(), ca.cert_der(), "every CA has a fresh key");
    let long_id = "x".repeat(200);
    assert!(SandboxCa::generate(&long_id).is_ok());
}

#[test]
fn upstream_roots_files_are_checked() {
    let missing = PathBuf::from("/nonexistent/egress-roots.pem");
    let error = upstream_client_config(&[missing]).unwrap_err().to_string();
    assert!(error.contains("/nonexistent/egress-roots.pem"), "{error}");
    let empty = TempPem::new("no certificate here\n");
    let error = upstream_client_config(std::slice::from_ref(&empty.0))
        .unwrap_err()
        .to_string();
    assert!(error.contains("no PEM certificate"), "{error}");
}

#[test]
fn the_ca_is_shared_across_threads_and_sessions_move() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<SandboxCa>();
    send::<MitmSession>();
    send::<TlsError>();
}
