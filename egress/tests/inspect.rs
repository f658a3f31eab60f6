//! The first-bytes classifier and the header-injecting request rewriter, fed real ClientHellos
//! (from rustls, in process), HTTP heads, every prefix of them, and garbage.

use std::sync::Arc;

use egress::inspect::{
    error_response, host_name, is_valid_header, peek, HttpError, Peek, RequestHead,
    RequestRewriter, PEEK_LIMIT,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

const SECRET: &str = "sk-test-0123456789-secret";

/// The first flight a rustls client sends for `server_name` (a DNS name, or an IP for which it
/// sends no SNI).
fn client_hello(server_name: &str) -> Vec<u8> {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
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

/// The same ClientHello with its handshake message split across two TLS records at `at`.
fn split_into_two_records(hello: &[u8], at: usize) -> Vec<u8> {
    let message = &hello[5..];
    let mut out = Vec::new();
    for part in [&message[..at], &message[at..]] {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// A deterministic xorshift generator: the garbage tests must be reproducible, and this is all
/// they need from a random source.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn tls(sni: Option<&str>) -> Peek {
    Peek::Tls {
        sni: sni.map(str::to_owned),
    }
}

#[test]
fn peek_reads_the_sni_of_a_real_client_hello() {
    let hello = client_hello("api.example.test");
    assert_eq!(peek(&hello), tls(Some("api.example.test")));
    // Bytes after the ClientHello (a second flight) do not change the verdict.
    let mut more = hello.clone();
    more.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0xff]);
    assert_eq!(peek(&more), tls(Some("api.example.test")));
}

#[test]
fn peek_lowercases_the_sni() {
    assert_eq!(
        peek(&client_hello("API.Example.TEST")),
        tls(Some("api.example.test"))
    );
}

#[test]
fn peek_reports_a_client_hello_without_sni() {
    // rustls sends no server_name extension when connecting to an IP address.
    assert_eq!(peek(&client_hello("192.0.2.7")), tls(None));
}

#[test]
fn peek_needs_more_for_every_proper_prefix_of_a_client_hello() {
    let hello = client_hello("api.test");
    for len in 0..hello.len() {
        assert_eq!(peek(&hello[..len]), Peek::NeedMore, "prefix of {len} bytes");
    }
    assert_eq!(peek(&hello), tls(Some("api.test")));
}

#[test]
fn peek_reassembles_a_client_hello_split_across_records() {
    let hello = client_hello("split.test");
    for at in [1, 3, 4, 40, hello.len() - 6] {
        let split = split_into_two_records(&hello, at);
        for len in 0..split.len() {
            assert_eq!(
                peek(&split[..len]),
                Peek::NeedMore,
                "split at {at}, prefix {len}"
            );
        }
        assert_eq!(peek(&split), tls(Some("split.test")), "split at {at}");
    }
}

#[test]
fn peek_never_panics_on_garbage_or_corrupted_hellos() {
    let mut random = Xorshift(0x9e37_79b9_7f4a_7c15);
    for round in 0..3000 {
        let len = (random.next() % 600) as usize;
        let mut bytes = random.bytes(len);
        if round % 2 == 0 && len >= 3 {
            bytes[0] = 0x16; // make it look like a handshake record, to reach the parser
            bytes[1] = 0x03;
        }
        let _ = peek(&bytes);
    }
    let hello = client_hello("fuzz.test");
    for round in 0..3000 {
        let mut corrupted = hello.clone();
        for _ in 0..1 + round % 4 {
            let at = (random.next() as usize) % corrupted.len();
            corrupted[at] = random.next() as u8;
        }
        let cut = (random.next() as usize) % (corrupted.len() + 1);
        // Whatever a corrupted hello yields, a name it reports is one a domain rule can match.
        if let Peek::Tls { sni: Some(name) } = peek(&corrupted[..cut]) {
            let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
            assert!(name.bytes().all(plain) && !name.is_empty(), "{name:?}");
        }
    }
}

#[test]
fn peek_calls_other_protocols_other() {
    assert_eq!(peek(b"SSH-2.0-OpenSSH_9.6\r\n"), Peek::Other);
    assert_eq!(peek(&[0x16, 0x02]), Peek::Other, "not TLS record version 3");
    assert_eq!(
        peek(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0, 0, 1, 0]),
        Peek::Other,
        "a ServerHello"
    );
    assert_eq!(peek(&[0x00, 0x01, 0x02, 0xff]), Peek::Other);
}

#[test]
fn peek_gives_up_after_the_limit_without_a_complete_hello() {
    // A handshake message claiming 16 MiB never completes: Other once 16 KiB have arrived.
    let mut bytes = Vec::new();
    while bytes.len() < PEEK_LIMIT + 100 {
        let mut record = vec![0x16, 0x03, 0x01, 0x10, 0x00];
        let mut body = vec![0u8; 0x1000];
        if bytes.is_empty() {
            body[..4].copy_from_slice(&[0x01, 0xff, 0xff, 0xff]);
        }
        record.extend_from_slice(&body);
        bytes.extend_from_slice(&record);
    }
    assert_eq!(peek(&bytes[..PEEK_LIMIT - 1]), Peek::NeedMore);
    assert_eq!(peek(&bytes[..PEEK_LIMIT]), Peek::Other);

    let mut long_head = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
    long_head.resize(PEEK_LIMIT + 10, b'a');
    assert_eq!(peek(&long_head[..PEEK_LIMIT - 1]), Peek::NeedMore);
    assert_eq!(peek(&long_head), Peek::Other);
}

#[test]
fn peek_reads_an_http_request_head() {
    let head = b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: API.test:8080\r\nContent-Length: 2\r\n\r\n{}";
    let expected = Peek::Http {
        method: "POST".into(),
        path: "/v1/chat?x=1".into(),
        host: Some("API.test:8080".into()),
    };
    assert_eq!(peek(head), expected);
    let head_len = head.len() - 2;
    for len in 0..head_len {
        assert_eq!(peek(&head[..len]), Peek::NeedMore, "prefix of {len} bytes");
    }
    assert_eq!(
        peek(b"GET http://proxy.test/x HTTP/1.1\r\nHost: other.test\r\n\r\n"),
        Peek::Http {
            method: "GET".into(),
            path: "http://proxy.test/x".into(),
            host: Some("proxy.test".into())
        },
        "an absolute-form target names the host"
    );
    assert_eq!(
        peek(b"GET / HTTP/1.0\r\n\r\n"),
        Peek::Http {
            method: "GET".into(),
            path: "/".into(),
            host: None
        }
    );
    assert_eq!(
        peek(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        Peek::Other,
        "two Host headers"
    );
}

#[test]
fn host_name_strips_the_port_and_trailing_dot() {
    assert_eq!(host_name("API.Test:8443"), "api.test");
    assert_eq!(host_name("api.test."), "api.test");
    assert_eq!(host_name("[::1]:80"), "::1");
    assert_eq!(host_name("api.test"), "api.test");
}

fn rewriter() -> RequestRewriter {
    RequestRewriter::new(vec![("Authorization".into(), format!("Bearer {SECRET}"))])
}

fn head(method: &str, path: &str, host: &str) -> RequestHead {
    RequestHead {
        method: method.into(),
        path: path.into(),
        host: Some(host.into()),
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn rewriter_injects_the_header_into_a_request() {
    let mut out = Vec::new();
    let heads = rewriter()
        .feed(
            b"GET /v1/models HTTP/1.1\r\nHost: api.test\r\nAccept: */*\r\n\r\n",
            &mut out,
        )
        .unwrap();
    assert_eq!(heads, vec![head("GET", "/v1/models", "api.test")]);
    let expected = format!(
        "GET /v1/models HTTP/1.1\r\nHost: api.test\r\nAccept: */*\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
    );
    assert_eq!(String::from_utf8(out).unwrap(), expected);
}

#[test]
fn rewriter_replaces_a_guest_supplied_header_of_an_injected_name() {
    let mut out = Vec::new();
    rewriter()
        .feed(
            b"GET / HTTP/1.1\r\nauthorization: Bearer guest-token\r\nHost: api.test\r\nAUTHORIZATION: Basic Zm9v\r\n\r\n",
            &mut out,
        )
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(count(text.as_bytes(), b"uthorization"), 1, "{text}");
    assert!(
        !text.contains("guest-token") && !text.contains("Zm9v"),
        "{text}"
    );
    assert!(
        text.contains(&format!("Authorization: Bearer {SECRET}\r\n")),
        "{text}"
    );
}

/// Three requests on one keep-alive connection: a Content-Length body that itself looks like a
/// request head, a chunked body with an extension and trailers, and a plain GET.
fn keep_alive_stream() -> (Vec<u8>, Vec<u8>) {
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    let mut input = format!(
        "POST /upload HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let chunked_body =
        "5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n";
    input += &format!("PUT /stream HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}");
    input += "GET /last HTTP/1.1\r\nHost: api.test\r\nAuthorization: guest\r\n\r\n";
    let auth = format!("Authorization: Bearer {SECRET}\r\n");
    let expected = format!(
        "POST /upload HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n{auth}\r\n{smuggled}\
         PUT /stream HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n{auth}\r\n{chunked_body}\
         GET /last HTTP/1.1\r\nHost: api.test\r\n{auth}\r\n",
        smuggled.len()
    );
    (input.into_bytes(), expected.into_bytes())
}

fn keep_alive_heads() -> Vec<RequestHead> {
    vec![
        head("POST", "/upload", "api.test"),
        head("PUT", "/stream", "api.test"),
        head("GET", "/last", "api.test"),
    ]
}

#[test]
fn rewriter_follows_keep_alive_requests_past_their_bodies() {
    let (input, expected) = keep_alive_stream();
    let mut rewriter = rewriter();
    let mut out = Vec::new();
    let heads = rewriter.feed(&input, &mut out).unwrap();
    assert_eq!(heads, keep_alive_heads());
    assert_eq!(
        String::from_utf8(out).unwrap(),
        String::from_utf8(expected).unwrap()
    );
    assert!(rewriter.is_idle());
}

#[test]
fn rewriter_gives_the_same_result_fed_byte_by_byte() {
    let (input, expected) = keep_alive_stream();
    let mut rewriter = rewriter();
    let mut out = Vec::new();
    let mut heads = Vec::new();
    for byte in &input {
        heads.extend(rewriter.feed(std::slice::from_ref(byte), &mut out).unwrap());
        if heads.len() < 3 {
            assert!(!String::from_utf8_lossy(&out).contains("/last"));
        }
    }
    assert_eq!(heads, keep_alive_heads());
    assert_eq!(out, expected);
}

#[test]
fn rewriter_holds_back_an_incomplete_head() {
    let mut rewriter = rewriter();
    let mut out = Vec::new();
    assert!(rewriter
        .feed(b"GET / HTTP/1.1\r\nHost: api.te", &mut out)
        .unwrap()
        .is_empty());
    assert!(
        out.is_empty(),
        "no byte of a head leaves before the whole head is seen"
    );
    assert!(!rewriter.is_idle());
    let heads = rewriter.feed(b"st\r\n\r\n", &mut out).unwrap();
    assert_eq!(heads, vec![head("GET", "/", "api.test")]);
    assert!(out.starts_with(b"GET / HTTP/1.1\r\nHost: api.test\r\n"));
}

#[test]
fn rewriter_passes_an_upgraded_connection_through() {
    let mut out = Vec::new();
    let mut rewriter = rewriter();
    let input = b"GET /ws HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello GET / HTTP/1.1\r\n\r\n";
    let heads = rewriter.feed(input, &mut out).unwrap();
    assert_eq!(heads, vec![head("GET", "/ws", "api.test")]);
    assert!(out.ends_with(b"\r\n\r\n\x81\x05hello GET / HTTP/1.1\r\n\r\n"));
    assert_eq!(
        count(&out, SECRET.as_bytes()),
        1,
        "only the upgrade request is rewritten"
    );
}

#[test]
fn rewriter_rejects_bad_input_with_a_reason() {
    let cases: [(&[u8], HttpError); 6] = [
        (
            b"\x00\x01\x02 garbage\r\n\r\n",
            HttpError::Malformed("invalid token in the request line"),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            HttpError::Conflicting("Transfer-Encoding and Content-Length"),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            HttpError::Conflicting("Content-Length"),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            HttpError::Malformed("Content-Length is not a number"),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            HttpError::UnsupportedTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            HttpError::BadChunk("chunk size is not a hexadecimal number"),
        ),
    ];
    for (input, expected) in cases {
        let result = rewriter().feed(input, &mut Vec::new());
        assert_eq!(result, Err(expected), "{}", String::from_utf8_lossy(input));
    }
    let overlong_chunk = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n";
    assert_eq!(
        rewriter().feed(overlong_chunk, &mut Vec::new()),
        Err(HttpError::BadChunk("chunk data is longer than its size"))
    );
}

#[test]
fn rewriter_bounds_the_head_size_and_header_count() {
    let mut oversize = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    oversize.resize(70 * 1024, b'a');
    assert_eq!(
        rewriter().feed(&oversize, &mut Vec::new()),
        Err(HttpError::HeadTooLarge)
    );
    // The same, trickling in: the bound holds across feeds.
    let mut rewriter_fed_slowly = rewriter();
    let result = oversize
        .chunks(1000)
        .map(|chunk| rewriter_fed_slowly.feed(chunk, &mut Vec::new()))
        .find(Result::is_err);
    assert_eq!(result, Some(Err(HttpError::HeadTooLarge)));

    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(
        rewriter().feed(&many, &mut Vec::new()),
        Err(HttpError::TooManyHeaders)
    );
}

#[test]
fn rewriter_never_panics_on_garbage() {
    let mut random = Xorshift(0x1234_5678_9abc_def1);
    let (valid, _) = keep_alive_stream();
    for round in 0..2000 {
        let mut input = if round % 2 == 0 {
            let len = (random.next() % 400) as usize;
            random.bytes(len)
        } else {
            valid.clone()
        };
        if !input.is_empty() {
            for _ in 0..1 + round % 3 {
                let at = (random.next() as usize) % input.len();
                input[at] = random.next() as u8;
            }
        }
        let mut rewriter = rewriter();
        let mut out = Vec::new();
        for chunk in input.chunks(1 + (random.next() % 64) as usize) {
            if rewriter.feed(chunk, &mut out).is_err() {
                break;
            }
        }
    }
}

#[test]
fn rewriter_debug_output_holds_no_secret() {
    let mut rewriter = rewriter();
    rewriter
        .feed(b"GET / HTTP/1.1\r\nHost: a", &mut Vec::new())
        .unwrap();
    let debug = format!("{rewriter:?}");
    assert!(debug.contains("Authorization"), "{debug}");
    assert!(!debug.contains(SECRET), "{debug}");
}

#[test]
fn error_response_is_a_complete_json_answer() {
    let response = String::from_utf8(error_response(403, "no rule allows evil.test")).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", body.len())),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["fault_message"], "no rule allows evil.test");
}

#[test]
fn an_injected_header_cannot_split_a_request() {
    assert!(is_valid_header("Authorization", "Bearer abc"));
    assert!(!is_valid_header("Authorization", "x\r\nHost: evil.test"));
    assert!(!is_valid_header("Bad Name", "v"));
    assert!(!is_valid_header("", "v"));
    let mut rewriter = RequestRewriter::new(vec![
        ("X-Split".into(), "a\r\nHost: evil.test".into()),
        ("X-Ok".into(), "fine".into()),
    ]);
    let mut out = Vec::new();
    rewriter
        .feed(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n", &mut out)
        .unwrap();
    assert_eq!(
        out,
        b"GET / HTTP/1.1\r\nHost: api.test\r\nX-Ok: fine\r\n\r\n"
    );
}

#[test]
fn the_inspection_types_can_move_between_threads() {
    fn send<T: Send>() {}
    send::<RequestRewriter>();
    send::<RequestHead>();
}
