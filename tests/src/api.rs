//! A minimal HTTP/1.1 client for `agentvm serve`'s API socket, for tests: each request is raw
//! request text on a new Unix-socket connection with `Connection: close`, and the answer is read to
//! EOF. Bodies with a Content-Length and chunked ones (`/sandbox/exec`, `GET /sandbox/files`) are
//! understood.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Hang detector for one request (InstanceStart boots a VM; still far below this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }

    /// The `fault_message` of an error response (panics if there is none).
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {self:?}"))
            .to_string()
    }
}

/// Sends `method path` with an optional JSON body.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> ApiResponse {
    let body = body.unwrap_or("");
    let text = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw(sock, text.as_bytes())
}

/// Sends `method path` with `body` of `content_type` (e.g. a file upload).
pub fn request_bytes(
    sock: &Path,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> ApiResponse {
    let mut text = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    text.extend_from_slice(body);
    raw(sock, &text)
}

/// Sends `bytes` as they are and reads the answer to EOF.
pub fn raw(sock: &Path, bytes: &[u8]) -> ApiResponse {
    let mut stream = connect(sock);
    stream
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("cannot send to {}: {e}", sock.display()));
    read_response(&mut stream)
}

pub fn connect(sock: &Path) -> UnixStream {
    let stream = UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", sock.display()));
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("setting a read timeout");
    stream
}

pub fn read_response(stream: &mut UnixStream) -> ApiResponse {
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer) {
        // The server may close after answering without reading the whole request (413).
        if answer.is_empty() {
            panic!("no answer from the API: {e}");
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body).unwrap_or_else(|| panic!("malformed chunked body: {body:?}"))
    } else {
        body.to_string()
    };
    ApiResponse { status, body }
}

/// The data of a chunked body; `None` when it is malformed or lacks its last (empty) chunk.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut data = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(data);
        }
        data.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Waits until `path` exists (the server has bound its socket).
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Waits until the file at `path` contains `needle`; returns its content, or None on timeout.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Some(text);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunked_bodies_are_joined_and_truncated_ones_refused() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(),
            Some("abcde")
        );
        assert_eq!(dechunk("3\r\nabc\r\n"), None);
        assert_eq!(dechunk("z\r\n"), None);
    }
}
