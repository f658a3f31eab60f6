//! The isolate tier's fetcher against local servers on 127.0.0.1 (opened by a CIDR rule, as
//! loopback is otherwise always denied): round trips, credential headers, denials, framing,
//! limits, the deadline, and HTTPS with a test CA given as an extra root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use egress::audit::AuditLog;
use egress::fetch::{FetchError, FetchRequest, Fetcher, FetcherConfig};
use egress::policy::Policy;
use egress::ResolverConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

const SECRET: &str = "fetch-test-secret-7f3a";

/// Reads one request (head and Content-Length body) off `stream`.
fn read_request(stream: &mut impl Read) -> Vec<u8> {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return request;
        }
        request.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&request).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    request.extend_from_slice(&body);
    request
}

/// A server answering one connection with `response`; join it for the request it saw.
fn serve_once(response: Vec<u8>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let request = read_request(&mut stream);
        let _ = stream.write_all(&response);
        request
    });
    (address, handle)
}

struct SharedLog(Arc<Mutex<Vec<u8>>>);

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Harness {
    fetcher: Fetcher,
    audit: Arc<Mutex<Vec<u8>>>,
}

impl Harness {
    fn new(policy_json: &str, hosts: &[(&str, [u8; 4])], roots: Vec<PathBuf>) -> Self {
        let audit = Arc::new(Mutex::new(Vec::new()));
        let fetcher = Fetcher::new(FetcherConfig {
            policy: Policy::from_json_str(policy_json).unwrap(),
            resolver: ResolverConfig {
                nameservers: Vec::new(),
                hosts: hosts
                    .iter()
                    .map(|(name, ip)| (name.to_string(), (*ip).into()))
                    .collect(),
                timeout: Duration::from_secs(2),
            },
            extra_upstream_roots: roots,
            audit: AuditLog::to_writer(Box::new(SharedLog(audit.clone()))),
            sandbox: "sb-fetch".into(),
            max_response_bytes: 1000,
        })
        .unwrap();
        Self { fetcher, audit }
    }

    fn loopback() -> Self {
        Self::new(
            r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32"}]}"#,
            &[],
            Vec::new(),
        )
    }

    fn fetch(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<egress::fetch::FetchResponse, FetchError> {
        let request = FetchRequest {
            method: method.into(),
            url: url.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        };
        self.fetcher
            .fetch(&request, Instant::now() + Duration::from_secs(10))
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.audit.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn denied(result: Result<egress::fetch::FetchResponse, FetchError>) -> String {
    match result {
        Err(FetchError::Denied(text)) => text,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn an_allowed_get_round_trips_and_is_audited() {
    let (address, server) = serve_once(
        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 2\r\n\r\nhi".to_vec(),
    );
    let mut h = Harness::loopback();
    let response = h
        .fetch(
            "GET",
            &format!("http://{address}/a?b=1"),
            &[("X-Trace", "t1")],
            b"",
        )
        .unwrap();
    assert_eq!(response.status, 302, "redirects are not followed");
    assert_eq!(response.body, b"hi");
    assert!(response
        .headers
        .contains(&("Location".to_string(), "/elsewhere".to_string())));
    let request = String::from_utf8(server.join().unwrap()).unwrap();
    assert!(request.starts_with("GET /a?b=1 HTTP/1.1\r\n"), "{request}");
    assert!(
        request.contains(&format!("Host: {address}\r\n")),
        "{request}"
    );
    assert!(
        request.contains("X-Trace: t1\r\nConnection: close\r\n\r\n"),
        "{request}"
    );
    let lines = h.audit_lines();
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    assert_eq!(line["kind"], "fetch");
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["rule"], "lo");
    assert_eq!(line["sandbox"], "sb-fetch");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/a?b=1");
    assert_eq!(line["dest_ip"], "127.0.0.1");
    assert!(line["bytes_down"].as_u64().unwrap() > 2);
}

#[test]
fn a_post_carries_its_body() {
    let (address, server) =
        serve_once(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n".to_vec());
    let mut h = Harness::loopback();
    let response = h
        .fetch(
            "POST",
            &format!("http://{address}/items"),
            &[],
            b"{\"n\":1}",
        )
        .unwrap();
    assert_eq!(response.status, 201);
    let request = String::from_utf8(server.join().unwrap()).unwrap();
    assert!(
        request.contains("Content-Length: 7\r\n") && request.ends_with("\r\n\r\n{\"n\":1}"),
        "{request}"
    );
}

#[test]
fn credential_headers_replace_the_callers_and_stay_out_of_the_audit_log() {
    std::env::set_var("EGRESS_FETCH_TEST_TOKEN", SECRET);
    let (address, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec());
    // Credentials go only to a named server: a domain rule, with loopback opened by a CIDR rule.
    let mut h = Harness::new(
        r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32","ports":[1]},
            {"id":"api","domain":"api.test","inject_headers":[
            {"name":"Authorization","prefix":"Bearer ","from_env":"EGRESS_FETCH_TEST_TOKEN"}]}]}"#,
        &[("api.test", [127, 0, 0, 1])],
        Vec::new(),
    );
    h.fetch(
        "GET",
        &format!("http://api.test:{}/", address.port()),
        &[("authorization", "Bearer guessed"), ("X-Other", "kept")],
        b"",
    )
    .unwrap();
    let request = String::from_utf8(server.join().unwrap()).unwrap();
    assert!(
        request.contains(&format!("Authorization: Bearer {SECRET}\r\n")),
        "{request}"
    );
    assert!(!request.contains("guessed"), "{request}");
    assert!(request.contains("X-Other: kept\r\n"), "{request}");
    let audit = String::from_utf8(h.audit.lock().unwrap().clone()).unwrap();
    assert!(audit.contains("\"rule\":\"api\""), "{audit}");
    assert!(!audit.contains(SECRET), "{audit}");
}

#[test]
fn denials_name_the_missing_rule_or_the_range() {
    let mut h = Harness::new(
        r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32"},{"id":"ex","domain":"inside.test","ports":[80]}]}"#,
        &[("inside.test", [10, 1, 2, 3])],
        Vec::new(),
    );
    let text = denied(h.fetch("GET", "https://example.org/", &[], b""));
    assert_eq!(text, "no rule allows example.org:443");
    let text = denied(h.fetch("GET", "http://169.254.169.254/latest/meta-data/", &[], b""));
    assert!(
        text.starts_with("169.254.169.254 is always denied (metadata)"),
        "{text}"
    );
    let text = denied(h.fetch("GET", "http://10.9.8.7/", &[], b""));
    assert!(
        text.starts_with("10.9.8.7 is always denied (private)"),
        "{text}"
    );
    let text = denied(h.fetch("GET", "http://inside.test/", &[], b""));
    assert!(
        text.starts_with("inside.test resolves to 10.1.2.3, which"),
        "{text}"
    );
    let text = denied(h.fetch("GET", "http://8.8.8.8/", &[], b""));
    assert!(text.contains("no rule allows 8.8.8.8:80"), "{text}");
    let lines = h.audit_lines();
    assert_eq!(lines.len(), 5);
    assert!(lines
        .iter()
        .all(|l| l["decision"] == "deny" && l["reason"].is_string()));
    assert_eq!(lines[1]["dest_ip"], "169.254.169.254");
}

#[test]
fn rate_limits_and_byte_caps_hold_across_fetches() {
    let (address, _server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec());
    let mut h = Harness::new(
        r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32","rate_limit":{"connections":1,"per_seconds":3600}}]}"#,
        &[],
        Vec::new(),
    );
    let url = format!("http://{address}/");
    h.fetch("GET", &url, &[], b"").unwrap();
    let text = denied(h.fetch("GET", &url, &[], b""));
    assert_eq!(text, "rule lo: the rule's connection rate limit is reached");

    let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n".to_vec();
    big.extend([b'x'; 200]);
    let (address, _server) = serve_once(big);
    let mut h = Harness::new(
        r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32","byte_cap":150}]}"#,
        &[],
        Vec::new(),
    );
    let text = denied(h.fetch("GET", &format!("http://{address}/"), &[], b""));
    assert_eq!(text, "rule lo: the rule's byte cap is reached");
    let text = denied(h.fetch("GET", &format!("http://{address}/"), &[], b""));
    assert_eq!(
        text, "rule lo: the rule's byte cap is reached",
        "the cap was used up"
    );
}

#[test]
fn a_chunked_response_is_reassembled() {
    let (address, _server) = serve_once(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            .to_vec(),
    );
    let response = Harness::loopback()
        .fetch("GET", &format!("http://{address}/"), &[], b"")
        .unwrap();
    assert_eq!(response.body, b"hello world");
}

#[test]
fn a_response_beyond_the_limit_is_too_large() {
    let mut body = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'x', 1001));
    let (address, _server) = serve_once(body);
    let result = Harness::loopback().fetch("GET", &format!("http://{address}/"), &[], b"");
    assert!(matches!(result, Err(FetchError::TooLarge(_))), "{result:?}");
}

#[test]
fn a_silent_server_times_out_at_the_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (_stream, _) = listener.accept().unwrap();
        let _ = wait.recv();
    });
    let mut h = Harness::loopback();
    let request = FetchRequest {
        method: "GET".into(),
        url: format!("http://{address}/"),
        ..FetchRequest::default()
    };
    let deadline = Instant::now() + Duration::from_millis(300);
    let result = h.fetcher.fetch(&request, deadline);
    assert!(Instant::now() >= deadline);
    assert!(
        matches!(&result, Err(FetchError::Timeout(what)) if what.contains("reading the response")),
        "{result:?}"
    );
    release.send(()).unwrap();
    server.join().unwrap();
}

/// A PEM file removed when dropped.
struct TempPem(PathBuf);

impl TempPem {
    fn new(contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "egress-fetch-test-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
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

/// A test CA's PEM and a TLS server configuration for `name` it signed.
fn test_tls(name: &str) -> (String, Arc<ServerConfig>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "fetch test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
    (ca.pem(), Arc::new(config))
}

#[test]
fn https_with_a_test_ca_given_as_an_extra_root() {
    let (ca_pem, config) = test_tls("api.test");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (socket, _): (TcpStream, _) = listener.accept().unwrap();
        let mut tls = StreamOwned::new(ServerConnection::new(config).unwrap(), socket);
        let request = read_request(&mut tls);
        tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
            .unwrap();
        tls.conn.send_close_notify();
        let _ = tls.flush();
        request
    });
    let ca = TempPem::new(&ca_pem);
    let mut h = Harness::new(
        r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32","ports":[1]},{"id":"api","domain":"api.test"}]}"#,
        &[("api.test", [127, 0, 0, 1])],
        vec![ca.0.clone()],
    );
    let response = h
        .fetch("GET", &format!("https://api.test:{port}/s"), &[], b"")
        .unwrap();
    assert_eq!((response.status, &response.body[..]), (200, &b"secure"[..]));
    let request = String::from_utf8(server.join().unwrap()).unwrap();
    assert!(
        request.contains(&format!("Host: api.test:{port}\r\n")),
        "{request}"
    );
    assert_eq!(h.audit_lines()[0]["rule"], "api");

    // Without the extra root the same server is not trusted.
    let (_, config) = test_tls("api.test");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        let mut tls = StreamOwned::new(ServerConnection::new(config).unwrap(), socket);
        let _ = read_request(&mut tls);
    });
    let mut h = Harness::new(
        r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32","ports":[1]},{"id":"api","domain":"api.test"}]}"#,
        &[("api.test", [127, 0, 0, 1])],
        Vec::new(),
    );
    let result = h.fetch("GET", &format!("https://api.test:{port}/"), &[], b"");
    assert!(
        matches!(&result, Err(FetchError::Network(text)) if text.contains("certificate")),
        "{result:?}"
    );
}
