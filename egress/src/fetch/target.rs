//! What a fetch asks for: the URL taken apart (`url` crate) and the request's own headers
//! checked, before anything is resolved or connected.

use std::net::IpAddr;

use url::{Host, Url};

use super::{FetchError, FetchRequest};

/// Headers the fetcher writes itself. A request that sets one is refused (BadRequest) rather
/// than silently corrected: a Host naming another server than the URL would bypass the policy
/// check done on the URL's host, and framing headers (Content-Length, Transfer-Encoding,
/// Connection) that disagree with the body the fetcher sends would smuggle a second request.
const RESERVED_HEADERS: [&str; 4] = ["host", "content-length", "connection", "transfer-encoding"];

/// Methods a fetch may use: the request line is written as given, so it must be an HTTP token.
const MAX_METHOD_LEN: usize = 32;

/// The URL's parts the fetcher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Whether the connection is TLS.
    pub https: bool,
    /// The host as written (lowercase name, or the literal's text without brackets).
    pub host: String,
    /// Set when the host is an address literal.
    pub literal: Option<IpAddr>,
    /// The port (the scheme's default when the URL has none).
    pub port: u16,
    /// Path and query, as the request line carries them.
    pub path: String,
    /// The `Host` header's value (with the port when it is not the default).
    pub host_header: String,
}

/// Parses and checks `request`'s URL and method.
pub fn parse(request: &FetchRequest) -> Result<Target, FetchError> {
    let bad = |text: String| FetchError::BadRequest(text);
    if request.method.is_empty()
        || request.method.len() > MAX_METHOD_LEN
        || !request.method.bytes().all(is_token_byte)
    {
        return Err(bad(format!(
            "{:?} is not an HTTP method",
            truncate(&request.method)
        )));
    }
    let url = Url::parse(&request.url)
        .map_err(|e| bad(format!("{:?} is not a URL: {e}", truncate(&request.url))))?;
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        other => {
            return Err(bad(format!(
                "only http and https URLs can be fetched, not {other}:"
            )))
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "a URL with user information (user:password@) is refused; send credentials in a header, or let the egress policy inject them".into(),
        ));
    }
    let (host, literal) = match url.host() {
        Some(Host::Domain(name)) => (name.trim_end_matches('.').to_ascii_lowercase(), None),
        Some(Host::Ipv4(ip)) => (ip.to_string(), Some(IpAddr::V4(ip))),
        Some(Host::Ipv6(ip)) => (ip.to_string(), Some(IpAddr::V6(ip))),
        None => return Err(bad(format!("{:?} names no host", truncate(&request.url)))),
    };
    let port = url
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    let mut path = url.path().to_string();
    if let Some(query) = url.query() {
        path.push('?');
        path.push_str(query);
    }
    // `host_str` keeps an IPv6 literal's brackets, as the Host header needs them.
    let host_str = url.host_str().unwrap_or_default();
    let host_header = match url.port() {
        Some(port) => format!("{host_str}:{port}"),
        None => host_str.to_string(),
    };
    for (name, value) in &request.headers {
        check_header(name, value)?;
    }
    Ok(Target {
        https,
        host,
        literal,
        port,
        path,
        host_header,
    })
}

fn check_header(name: &str, value: &str) -> Result<(), FetchError> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(FetchError::BadRequest(format!(
            "{:?} is not a valid header name",
            truncate(name)
        )));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(FetchError::BadRequest(format!(
            "the value of header {name} holds a line break or NUL"
        )));
    }
    if RESERVED_HEADERS
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
    {
        return Err(FetchError::BadRequest(format!(
            "header {name} is set by the fetcher itself and may not be given"
        )));
    }
    Ok(())
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// At most 200 characters of untrusted text, for an error message.
fn truncate(text: &str) -> &str {
    match text.char_indices().nth(200) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> FetchRequest {
        FetchRequest {
            method: method.into(),
            url: url.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        }
    }

    fn error(method: &str, url: &str, headers: &[(&str, &str)]) -> String {
        match parse(&request(method, url, headers)) {
            Err(FetchError::BadRequest(text)) => text,
            other => panic!("{method} {url}: {other:?}"),
        }
    }

    #[test]
    fn urls_give_host_port_path_and_host_header() {
        let t = parse(&request("GET", "https://API.example.com/a/b?x=1#frag", &[])).unwrap();
        assert_eq!(
            t,
            Target {
                https: true,
                host: "api.example.com".into(),
                literal: None,
                port: 443,
                path: "/a/b?x=1".into(),
                host_header: "api.example.com".into(),
            }
        );
        let t = parse(&request("POST", "http://127.0.0.1:8080", &[])).unwrap();
        assert_eq!(t.port, 8080);
        assert_eq!(t.path, "/");
        assert_eq!(t.literal, Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(t.host_header, "127.0.0.1:8080");
        let t = parse(&request("GET", "http://[::1]:81/", &[])).unwrap();
        assert_eq!(t.literal, Some("::1".parse().unwrap()));
        assert_eq!(t.host_header, "[::1]:81");
    }

    #[test]
    fn bad_requests_are_named() {
        assert!(error("GET", "ftp://a.com/", &[]).contains("not ftp:"));
        assert!(error("GET", "http://u:p@a.com/", &[]).contains("user information"));
        assert!(error("GET", "not a url", &[]).contains("is not a URL"));
        assert!(error("GE T", "http://a.com/", &[]).contains("not an HTTP method"));
        assert!(error("GET", "http://a.com/", &[("Host", "b.com")]).contains("Host is set by"));
        assert!(
            error("GET", "http://a.com/", &[("transfer-encoding", "chunked")])
                .contains("transfer-encoding is set by")
        );
        assert!(error("GET", "http://a.com/", &[("X-A", "1\r\nX-B: 2")]).contains("line break"));
        assert!(error("GET", "http://a.com/", &[("X A", "1")]).contains("not a valid header"));
    }
}
