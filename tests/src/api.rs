//! A minimal HTTP/1.1 client for `agentvm serve`'s API socket, for tests: each request is raw
//! request text on a new Unix-socket connection with `Connection: close`, and the answer is read to
//! EOF. Bodies with a Content-Length and chunked ones (`/sandbox/exec`, `GET /sandbox/files`) are
//! understood. [`upgrade`] sends an upgrade request (`/sandbox/pty`, `/sandbox/ports/...`) and
//! hands back the raw connection after a 101; [`stream_lines`] reads a never-ending NDJSON answer
//! (`/sandbox/watch`) line by line.

use std::io::{BufRead, BufReader, Read, Write};
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
    parse_response(&answer)
}

fn parse_response(answer: &[u8]) -> ApiResponse {
    let text = String::from_utf8_lossy(answer).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let status = status_of(head);
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

/// The answer to an upgrade request.
pub enum Upgrade {
    /// 101: `head` is the response head, `stream` the raw connection after it.
    Switched {
        head: String,
        stream: UnixStream,
    },
    Refused(ApiResponse),
}

impl Upgrade {
    /// The raw connection and the response head, or a panic naming the refusal.
    pub fn expect_switched(self, what: &str) -> (String, UnixStream) {
        match self {
            Upgrade::Switched { head, stream } => (head, stream),
            Upgrade::Refused(answer) => panic!("{what}: no 101 but {answer:?}"),
        }
    }

    /// The refusal, or a panic if the connection was upgraded.
    pub fn expect_refused(self, what: &str) -> ApiResponse {
        match self {
            Upgrade::Refused(answer) => answer,
            Upgrade::Switched { head, .. } => panic!("{what}: upgraded: {head}"),
        }
    }
}

/// Sends `method path` with `Connection: Upgrade`, `Upgrade: protocol` and an optional JSON
/// body. A refusal keeps the connection open (it was not `Connection: close`), so its body is
/// read by its Content-Length.
pub fn upgrade(
    sock: &Path,
    method: &str,
    path: &str,
    protocol: &str,
    body: Option<&str>,
) -> Upgrade {
    let body = body.unwrap_or("");
    let text = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
         Upgrade: {protocol}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = connect(sock);
    stream
        .write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("cannot send to {}: {e}", sock.display()));
    let head = read_head(&mut stream);
    let status = status_of(&head);
    if status == 101 {
        return Upgrade::Switched { head, stream };
    }
    let len = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    stream
        .read_exact(&mut body)
        .unwrap_or_else(|e| panic!("short answer body after {head:?}: {e}"));
    Upgrade::Refused(ApiResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The value of header `name` (lower case) in a response head.
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// Reads a response head byte by byte, so nothing after it is consumed.
fn read_head(stream: &mut UnixStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "the API closed or failed ({other:?}) inside a response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// A streamed (chunked) answer read line by line as it arrives.
pub struct LineStream {
    reader: BufReader<UnixStream>,
    pending: Vec<u8>,
    ended: bool,
}

impl LineStream {
    /// The next line without its newline; `None` once the answer ended. Panics when nothing
    /// arrives within the request timeout (a hang detector).
    pub fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=at).collect();
                return Some(String::from_utf8_lossy(&line[..at]).into_owned());
            }
            if self.ended {
                return None;
            }
            let mut size_line = String::new();
            self.reader
                .read_line(&mut size_line)
                .unwrap_or_else(|e| panic!("reading a chunk size: {e}"));
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
            let mut chunk = vec![0; size + 2];
            self.reader
                .read_exact(&mut chunk)
                .unwrap_or_else(|e| panic!("reading a chunk: {e}"));
            chunk.truncate(size);
            self.pending.extend(chunk);
            self.ended = size == 0;
        }
    }
}

/// Sends `GET path` and, on a 200, the answer as a [`LineStream`]; otherwise the whole answer.
pub fn stream_lines(sock: &Path, path: &str) -> Result<LineStream, ApiResponse> {
    let mut stream = connect(sock);
    let text = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("cannot send to {}: {e}", sock.display()));
    let head = read_head(&mut stream);
    if status_of(&head) != 200 {
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        let mut whole = head.into_bytes();
        whole.extend(rest);
        return Err(parse_response(&whole));
    }
    Ok(LineStream {
        reader: BufReader::new(stream),
        pending: Vec::new(),
        ended: false,
    })
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

/// Waits until something accepts connections on the Unix socket `sock` (its file appears at
/// bind(), a moment before listen(): a connect in between is refused). False on timeout.
pub fn wait_for_listener(sock: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while UnixStream::connect(sock).is_err() {
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
