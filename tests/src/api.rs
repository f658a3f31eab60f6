//! A minimal HTTP/1.1 client for `agentvm serve`'s API socket, for tests: each request is raw
//! request text on a new Unix-socket connection with `Connection: close`, and the answer is read to
//! EOF. Only responses with a Content-Length (what the server sends) are understood.

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
    ApiResponse {
        status,
        body: body.to_string(),
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
