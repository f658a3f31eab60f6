//! The text forms of `agentvm.fetch`: the request a module writes
//! (`METHOD URL\r\nName: value\r\n...\r\n\r\nBODY`, an HTTP/1.1 request head with the absolute URL
//! in the request line, the blank line optional without a body) and the response it reads back
//! (`STATUS\r\nname: value\r\n...\r\n\r\nBODY`). Parsed here by hand: the guest is no_std, and
//! httparse wants a request target, not a URL, and its own version token.

/// A request as the module wrote it, borrowing its memory.
pub struct TextRequest<'a> {
    pub method: &'a [u8],
    pub url: &'a [u8],
    header_section: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> TextRequest<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<TextRequest<'a>, &'static str> {
        let (line, rest) = split_line(bytes);
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let method = words.next().ok_or("the request line is empty")?;
        let url = words
            .next()
            .ok_or("the request line has no URL (expected `METHOD URL`)")?;
        // An `HTTP/1.1` after the URL is tolerated; anything else is a mistake.
        match words.next() {
            None => {}
            Some(version) if version.starts_with(b"HTTP/") && words.next().is_none() => {}
            Some(_) => return Err("the request line has more than `METHOD URL [HTTP/1.1]`"),
        }
        let (header_section, body) = match find(rest, b"\r\n\r\n") {
            Some(end) => (&rest[..end + 2], &rest[end + 4..]),
            None if rest.starts_with(b"\r\n") => (&rest[..0], &rest[2..]),
            None => (rest, &rest[rest.len()..]),
        };
        let request = TextRequest {
            method,
            url,
            header_section,
            body,
        };
        for header in request.headers() {
            header?;
        }
        Ok(request)
    }

    /// Each `Name: value` line (the value without surrounding blanks).
    pub fn headers(&self) -> impl Iterator<Item = Result<(&'a [u8], &'a [u8]), &'static str>> {
        let mut rest = self.header_section;
        core::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let (line, next) = split_line(rest);
            rest = next;
            if line.is_empty() {
                return Some(Err("an empty line inside the headers"));
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Some(Err("a header line without ':'"));
            };
            Some(Ok((&line[..colon], trim(&line[colon + 1..]))))
        })
    }

    pub fn header_count(&self) -> u32 {
        self.headers().count() as u32
    }
}

/// The line up to CRLF (or the end) and what follows it.
fn split_line(bytes: &[u8]) -> (&[u8], &[u8]) {
    match find(bytes, b"\r\n") {
        Some(end) => (&bytes[..end], &bytes[end + 2..]),
        None => (bytes, &bytes[bytes.len()..]),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// Writes the first `cap` bytes of a text into `out` and counts all of it: the module learns the
/// full length even when its buffer is smaller.
pub struct CappedOutput<'a> {
    out: &'a mut [u8],
    total: usize,
}

impl<'a> CappedOutput<'a> {
    pub fn new(out: &'a mut [u8]) -> Self {
        CappedOutput { out, total: 0 }
    }

    pub fn put(&mut self, bytes: &[u8]) {
        if self.total < self.out.len() {
            let n = bytes.len().min(self.out.len() - self.total);
            self.out[self.total..self.total + n].copy_from_slice(&bytes[..n]);
        }
        self.total += bytes.len();
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// Writes `STATUS\r\nname: value\r\n...\r\n\r\nBODY`.
pub fn write_response<'h>(
    out: &mut CappedOutput<'_>,
    status: u16,
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    body: &[u8],
) {
    let mut digits = [0u8; 5];
    let mut n = status;
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put(&digits[start..]);
    out.put(b"\r\n");
    for (name, value) in headers {
        out.put(name);
        out.put(b": ");
        out.put(value);
        out.put(b"\r\n");
    }
    out.put(b"\r\n");
    out.put(body);
}
