//! HTTP/1.1 on one connection: the request written whole, the response read back with its body
//! framed by Content-Length, chunked transfer coding, or the connection's end. One request per
//! connection (`Connection: close`), so there is no pipelining or keep-alive state to get wrong.

use std::io::{Read, Write};

use super::stream::io_error;
use super::FetchError;

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Most headers a response may have.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;

/// The response as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Writes `METHOD path HTTP/1.1`, `headers` in order (the caller has put Host first), and
/// `Content-Length` when there is a body or the method usually carries one.
pub fn write_request(
    connection: &mut impl Write,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), FetchError> {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    connection
        .write_all(&bytes)
        .and_then(|()| connection.flush())
        .map_err(|e| io_error("sending the request", e))
}

/// Buffered reading with a byte budget for the body.
struct Input<'a, R: Read> {
    connection: &'a mut R,
    buf: Vec<u8>,
    start: usize,
    closed: bool,
}

impl<R: Read> Input<'_, R> {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads more; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, FetchError> {
        if self.closed {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let mut chunk = [0u8; 16 << 10];
        let n = match self.connection.read(&mut chunk) {
            Ok(n) => n,
            // A server that closes without TLS close_notify ends the body as well.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(io_error("reading the response", e)),
        };
        if n == 0 {
            self.closed = true;
            return Ok(false);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// A line ending in CRLF (without it), at most `max` bytes long.
    fn line(&mut self, max: usize) -> Result<Vec<u8>, FetchError> {
        loop {
            if let Some(end) = self.pending().windows(2).position(|w| w == b"\r\n") {
                let line = self.pending()[..end].to_vec();
                self.consume(end + 2);
                return Ok(line);
            }
            if self.pending().len() > max {
                return Err(FetchError::Network(
                    "the server sent a malformed chunked body (overlong line)".into(),
                ));
            }
            if !self.fill()? {
                return Err(FetchError::Network(
                    "the server closed the connection inside a chunked body".into(),
                ));
            }
        }
    }

    /// Exactly `n` more bytes appended to `body`.
    fn exact(&mut self, n: usize, body: &mut Vec<u8>) -> Result<(), FetchError> {
        let mut left = n;
        while left > 0 {
            if self.pending().is_empty() && !self.fill()? {
                return Err(FetchError::Network(format!(
                    "the server closed the connection {left} bytes before the end of the body"
                )));
            }
            let take = left.min(self.pending().len());
            body.extend_from_slice(&self.pending()[..take]);
            self.consume(take);
            left -= take;
        }
        Ok(())
    }
}

/// Reads one response to a `method` request; a body beyond `max_body` bytes is TooLarge.
/// Interim 1xx responses are skipped.
pub fn read_response(
    connection: &mut impl Read,
    method: &str,
    max_body: usize,
) -> Result<Response, FetchError> {
    let mut input = Input {
        connection,
        buf: Vec::new(),
        start: 0,
        closed: false,
    };
    loop {
        let (status, headers, head_len) = read_head(&mut input)?;
        input.consume(head_len);
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = read_body(&mut input, method, status, &headers, max_body)?;
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
}

type Head = (u16, Vec<(String, String)>, usize);

fn read_head<R: Read>(input: &mut Input<'_, R>) -> Result<Head, FetchError> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(input.pending()) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or_default();
                let headers = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                return Ok((status, headers, len));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(FetchError::Network(format!(
                    "the server's response is not HTTP/1.x: {e}"
                )))
            }
        }
        if input.pending().len() > MAX_HEAD {
            return Err(FetchError::TooLarge(format!(
                "the response head exceeds {MAX_HEAD} bytes"
            )));
        }
        if !input.fill()? {
            return Err(FetchError::Network(if input.pending().is_empty() {
                "the server closed the connection without a response".into()
            } else {
                "the server closed the connection inside the response head".into()
            }));
        }
    }
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn too_large(max_body: usize) -> FetchError {
    FetchError::TooLarge(format!("the response body exceeds {max_body} bytes"))
}

fn read_body<R: Read>(
    input: &mut Input<'_, R>,
    method: &str,
    status: u16,
    headers: &[(String, String)],
    max_body: usize,
) -> Result<Vec<u8>, FetchError> {
    if method == "HEAD" || status == 204 || status == 304 {
        return Ok(Vec::new());
    }
    let mut body = Vec::new();
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"));
    if chunked {
        loop {
            let line = input.line(MAX_CHUNK_LINE)?;
            let text = String::from_utf8_lossy(&line);
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| {
                FetchError::Network(format!("the server sent a bad chunk size {size_text:?}"))
            })?;
            if size == 0 {
                // Trailers, up to the empty line; nothing in them is kept.
                while !input.line(MAX_HEAD)?.is_empty() {}
                return Ok(body);
            }
            if body.len().saturating_add(size) > max_body {
                return Err(too_large(max_body));
            }
            input.exact(size, &mut body)?;
            if !input.line(2)?.is_empty() {
                return Err(FetchError::Network(
                    "the server sent a chunk longer than its size".into(),
                ));
            }
        }
    }
    if let Some(length) = header(headers, "content-length") {
        let length: usize = length.parse().map_err(|_| {
            FetchError::Network(format!("the server sent a bad Content-Length {length:?}"))
        })?;
        if length > max_body {
            return Err(too_large(max_body));
        }
        input.exact(length, &mut body)?;
        return Ok(body);
    }
    loop {
        let pending = input.pending().len();
        if body.len() + pending > max_body {
            return Err(too_large(max_body));
        }
        body.extend_from_slice(input.pending());
        input.consume(pending);
        if !input.fill()? {
            return Ok(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], max: usize) -> Result<Response, FetchError> {
        read_response(&mut &bytes[..], "GET", max)
    }

    #[test]
    fn bodies_by_length_chunks_and_close() {
        let r = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabcdef",
            10,
        )
        .unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"abc"[..]));
        assert_eq!(r.headers[1], ("X-A".to_string(), "b".to_string()));
        let r = read(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
            10,
        )
        .unwrap();
        assert_eq!((r.status, &r.body[..]), (201, &b"abcde"[..]));
        let r = read(b"HTTP/1.0 404 Not Found\r\n\r\nuntil close", 20).unwrap();
        assert_eq!((r.status, &r.body[..]), (404, &b"until close"[..]));
    }

    #[test]
    fn limits_and_malformed_responses() {
        let err = read(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", 10).unwrap_err();
        assert!(matches!(err, FetchError::TooLarge(_)), "{err:?}");
        let err = read(b"HTTP/1.1 200 OK\r\n\r\n01234567890", 10).unwrap_err();
        assert!(matches!(err, FetchError::TooLarge(_)), "{err:?}");
        let err = read(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n",
            10,
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::TooLarge(_)), "{err:?}");
        let err = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", 10).unwrap_err();
        assert!(err.to_string().contains("3 bytes before the end"), "{err}");
        let err = read(b"SSH-2.0-x\r\n\r\n", 10).unwrap_err();
        assert!(err.to_string().contains("not HTTP"), "{err}");
        let err = read(b"", 10).unwrap_err();
        assert!(err.to_string().contains("without a response"), "{err}");
    }

    #[test]
    fn requests_carry_length_and_close() {
        let mut out = Vec::new();
        let headers = vec![("Host".to_string(), "a.com".to_string())];
        write_request(&mut out, "POST", "/p?q", &headers, b"xy").unwrap();
        assert_eq!(
            out,
            b"POST /p?q HTTP/1.1\r\nHost: a.com\r\nContent-Length: 2\r\nConnection: close\r\n\r\nxy"
        );
    }
}
