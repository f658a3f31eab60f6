//! HTTP/1.x request heads: parsing (with `httparse`) and the streaming rewriter that injects the
//! policy's headers into every request the guest sends on a connection. httparse parses one
//! head from a buffer; the framing around it (finding where a body ends by Content-Length or
//! chunked encoding, so the next head on a keep-alive connection is found) is written here
//! because no well-kept crate offers a sans-IO request-stream rewriter.

use std::fmt;

/// Longest request head (request line plus headers) accepted.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// Most header fields accepted in one request head.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) or trailer section accepted in a chunked body.
const MAX_CHUNK_LINE_LEN: usize = 4 * 1024;
const MAX_TRAILERS_LEN: usize = 64 * 1024;

/// What an audit line and the Host check need from one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent (origin form `/a?b`, or absolute form `http://h/a`).
    pub path: String,
    /// The authority the request names: the absolute-form target's, else the Host header's,
    /// as sent (it may carry a port: see [`host_name`]).
    pub host: Option<String>,
}

/// Why a guest's request stream cannot be forwarded. The caller answers 400 and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP request head: {0}")]
    Malformed(&'static str),
    #[error("HTTP request head is longer than {MAX_HEAD_LEN} bytes")]
    HeadTooLarge,
    #[error("HTTP request has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("HTTP request has conflicting {0} headers")]
    Conflicting(&'static str),
    #[error("HTTP request has an unsupported Transfer-Encoding (only chunked is understood)")]
    UnsupportedTransferEncoding,
    #[error("malformed chunked request body: {0}")]
    BadChunk(&'static str),
}

/// Whether `input` starts with a complete request head: `Ok(None)` while it is incomplete (but
/// valid so far), `Ok(Some((head, head_len)))` once complete.
pub fn parse_head(input: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    Ok(parse_full_head(input)?.map(|parsed| (parsed.head, parsed.len)))
}

/// The host part of an authority (`API.test:8443` -> `api.test`, `[::1]:80` -> `::1`),
/// lowercased and without a trailing dot, for matching against domain rules.
pub fn host_name(authority: &str) -> String {
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or(bracketed)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        }
    };
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Whether `name: value` can be written into a request head as one header field: the name a
/// token, the value free of CR, LF and NUL (which would split the request). A policy loader
/// should refuse an injected header for which this is false.
pub fn is_valid_header(name: &str, value: &str) -> bool {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !name.is_empty()
        && name.bytes().all(token)
        && !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// A complete HTTP/1.1 response with a JSON `fault_message` body, for answering a guest request
/// the filter refuses (403, 404, 405) or cannot parse (400). The connection is closed after it.
pub fn error_response(status: u16, fault_message: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let body = serde_json::json!({ "fault_message": fault_message }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct ParsedHead {
    head: RequestHead,
    len: usize,
    body: BodyFraming,
    /// After this request the connection stops being HTTP (CONNECT, or an Upgrade such as a
    /// WebSocket): the rest of the stream is passed through unparsed.
    switches_protocol: bool,
    /// Each header field: (name, value), in order.
    fields: Vec<(String, Vec<u8>)>,
    minor_version: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

fn parse_full_head(input: &[u8]) -> Result<Option<ParsedHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if input.len() > MAX_HEAD_LEN {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(error) => return Err(HttpError::Malformed(httparse_reason(error))),
    };
    if len > MAX_HEAD_LEN {
        return Err(HttpError::HeadTooLarge);
    }
    let method = request.method.unwrap_or_default().to_owned();
    let path = request.path.unwrap_or_default().to_owned();
    let mut host_header: Option<String> = None;
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding: Option<String> = None;
    let mut upgrade = false;
    let mut fields = Vec::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map(str::trim)
            .map_err(|_| HttpError::Malformed("a header value is not UTF-8"));
        if header.name.eq_ignore_ascii_case("host") {
            if host_header.is_some() {
                return Err(HttpError::Conflicting("Host"));
            }
            host_header = Some(value?.to_owned());
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = parse_content_length(value?)?;
            if content_length.is_some_and(|seen| seen != parsed) {
                return Err(HttpError::Conflicting("Content-Length"));
            }
            content_length = Some(parsed);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = value?.to_ascii_lowercase();
            transfer_encoding = Some(match transfer_encoding {
                Some(seen) => format!("{seen}, {value}"),
                None => value,
            });
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
        fields.push((header.name.to_owned(), header.value.to_vec()));
    }
    let body = match (transfer_encoding, content_length) {
        // Both at once is how request smuggling works (RFC 9112 6.3): refuse rather than guess.
        (Some(_), Some(_)) => {
            return Err(HttpError::Conflicting(
                "Transfer-Encoding and Content-Length",
            ))
        }
        (Some(encodings), None) => {
            let last = encodings.rsplit(',').next().unwrap_or_default().trim();
            if last != "chunked" {
                return Err(HttpError::UnsupportedTransferEncoding);
            }
            BodyFraming::Chunked
        }
        (None, Some(0)) | (None, None) => BodyFraming::None,
        (None, Some(length)) => BodyFraming::Length(length),
    };
    let authority = absolute_form_authority(&path);
    let host = authority.or(host_header).filter(|h| !h.is_empty());
    Ok(Some(ParsedHead {
        switches_protocol: upgrade || method.eq_ignore_ascii_case("CONNECT"),
        head: RequestHead { method, path, host },
        len,
        body,
        fields,
        minor_version: request.version.unwrap_or(1),
    }))
}

fn parse_content_length(value: &str) -> Result<u64, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed("Content-Length is not a number"));
    }
    value
        .parse()
        .map_err(|_| HttpError::Malformed("Content-Length is too large"))
}

/// `http://user@host:80/x` -> `host:80`.
fn absolute_form_authority(target: &str) -> Option<String> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    Some(authority.to_owned())
}

fn httparse_reason(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in the request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// Where the rewriter is in the guest's request stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Collecting the next request head in `RequestRewriter::head`.
    Head,
    /// Passing through this many more bytes of a Content-Length body.
    Body(u64),
    /// Collecting a chunk-size line in `RequestRewriter::line`.
    ChunkSize,
    /// Passing through this many more bytes of chunk data, then its CRLF.
    ChunkData(u64),
    /// Expecting the CRLF that ends a chunk's data (collected in `line`).
    ChunkDataEnd,
    /// Collecting trailer lines after the last chunk, until an empty line.
    Trailers { total: usize },
    /// The connection switched protocols: everything passes through untouched.
    Opaque,
}

/// Streams the guest -> upstream bytes of one HTTP/1.x connection, finding every request head
/// (keep-alive), dropping guest-supplied headers whose names the policy injects and adding the
/// policy's values. Bodies pass through untouched.
pub struct RequestRewriter {
    inject: Vec<(String, String)>,
    state: State,
    head: Vec<u8>,
    line: Vec<u8>,
}

impl fmt::Debug for RequestRewriter {
    // The injected values are credentials: only their names may be printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.inject.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("RequestRewriter")
            .field("inject", &names)
            .field("state", &self.state)
            .field("buffered", &(self.head.len() + self.line.len()))
            .finish()
    }
}

impl RequestRewriter {
    /// `inject`: (header name, value) pairs added to every request; an empty list rewrites
    /// nothing but still finds each head (for the audit log and the Host check). A pair that
    /// fails [`is_valid_header`] is left out, so no policy value can split a request.
    pub fn new(inject: Vec<(String, String)>) -> Self {
        Self {
            inject: inject
                .into_iter()
                .filter(|(name, value)| is_valid_header(name, value))
                .collect(),
            state: State::Head,
            head: Vec::new(),
            line: Vec::new(),
        }
    }

    /// Feeds the next bytes the guest sent; appends what to send upstream to `out` and returns
    /// the request heads completed in `input`. Bytes of an incomplete head are held back until
    /// the rest arrives. After an error the stream cannot continue.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Vec<RequestHead>, HttpError> {
        let mut heads = Vec::new();
        while !input.is_empty() {
            input = match self.state {
                State::Head => {
                    let (rest, head) = self.feed_head(input, out)?;
                    heads.extend(head);
                    rest
                }
                State::Body(remaining) => {
                    let take = clamp(remaining, input.len());
                    out.extend_from_slice(&input[..take]);
                    self.state = if remaining == take as u64 {
                        State::Head
                    } else {
                        State::Body(remaining - take as u64)
                    };
                    &input[take..]
                }
                State::ChunkData(remaining) => {
                    let take = clamp(remaining, input.len());
                    out.extend_from_slice(&input[..take]);
                    self.state = if remaining == take as u64 {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(remaining - take as u64)
                    };
                    &input[take..]
                }
                State::ChunkSize | State::ChunkDataEnd | State::Trailers { .. } => {
                    self.feed_chunk_line(input, out)?
                }
                State::Opaque => {
                    out.extend_from_slice(input);
                    &[]
                }
            };
        }
        Ok(heads)
    }

    /// Whether the stream is between requests (no partial head, body or chunk pending): a
    /// connection closed now ended cleanly.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Head | State::Opaque) && self.head.is_empty()
    }

    fn feed_head<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<(&'a [u8], Option<RequestHead>), HttpError> {
        let before = self.head.len();
        let room = (MAX_HEAD_LEN + 1).saturating_sub(before);
        self.head.extend_from_slice(&input[..input.len().min(room)]);
        // Parse only once a blank line may have arrived, looking just at the new bytes (and the
        // 2 before them): a head trickling in byte by byte must not be re-parsed on every byte.
        let new_bytes = &self.head[before.saturating_sub(2)..];
        let may_be_complete = new_bytes.windows(2).any(|w| w == b"\n\n")
            || new_bytes.windows(3).any(|w| w == b"\n\r\n");
        if !may_be_complete {
            if self.head.len() > MAX_HEAD_LEN {
                return Err(HttpError::HeadTooLarge);
            }
            if before == 0 {
                // Validate the start of each head so garbage fails now, not after 64 KiB.
                parse_full_head(&self.head)?;
            }
            return Ok((&[], None));
        }
        let Some(parsed) = parse_full_head(&self.head)? else {
            return Ok((&[], None));
        };
        let consumed_from_input = parsed.len - before;
        self.write_head(&parsed, out);
        self.state = if parsed.switches_protocol {
            State::Opaque
        } else {
            match parsed.body {
                BodyFraming::None => State::Head,
                BodyFraming::Length(length) => State::Body(length),
                BodyFraming::Chunked => State::ChunkSize,
            }
        };
        self.head.clear();
        Ok((&input[consumed_from_input..], Some(parsed.head)))
    }

    fn write_head(&self, parsed: &ParsedHead, out: &mut Vec<u8>) {
        // Rebuilt rather than copied: httparse skips blank lines before the request line.
        let request_line = format!(
            "{} {} HTTP/1.{}\r\n",
            parsed.head.method, parsed.head.path, parsed.minor_version
        );
        out.extend_from_slice(request_line.as_bytes());
        for (name, value) in &parsed.fields {
            let injected = self
                .inject
                .iter()
                .any(|(inject, _)| inject.eq_ignore_ascii_case(name));
            if injected {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in &self.inject {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Collects one line of chunked framing (size line, data CRLF, or trailer) and acts on it.
    fn feed_chunk_line<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<&'a [u8], HttpError> {
        let (line_part, rest, complete) = match input.iter().position(|&b| b == b'\n') {
            Some(end) => (&input[..=end], &input[end + 1..], true),
            None => (input, &[][..], false),
        };
        self.line.extend_from_slice(line_part);
        out.extend_from_slice(line_part);
        let limit = match self.state {
            State::Trailers { total } => MAX_TRAILERS_LEN.saturating_sub(total),
            _ => MAX_CHUNK_LINE_LEN,
        };
        if self.line.len() > limit {
            return Err(HttpError::BadChunk(
                "a chunk-size line or the trailers are too long",
            ));
        }
        if !complete {
            return Ok(rest);
        }
        let line = std::mem::take(&mut self.line);
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        self.state = match self.state {
            State::ChunkSize => match parse_chunk_size(content)? {
                0 => State::Trailers { total: 0 },
                size => State::ChunkData(size),
            },
            State::ChunkDataEnd if content.is_empty() => State::ChunkSize,
            State::ChunkDataEnd => {
                return Err(HttpError::BadChunk("chunk data is longer than its size"))
            }
            State::Trailers { .. } if content.is_empty() => State::Head,
            State::Trailers { total } => State::Trailers {
                total: total + line.len(),
            },
            other => other,
        };
        Ok(rest)
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = size.trim_ascii();
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(HttpError::BadChunk(
            "chunk size is not a hexadecimal number",
        ));
    }
    let text =
        std::str::from_utf8(size).map_err(|_| HttpError::BadChunk("chunk size is not ASCII"))?;
    u64::from_str_radix(text, 16).map_err(|_| HttpError::BadChunk("chunk size is too large"))
}

fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |remaining| remaining.min(available))
}
