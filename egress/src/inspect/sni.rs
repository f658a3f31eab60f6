//! Reads the server name out of a TLS ClientHello without terminating TLS, so the filter can
//! check SNI against the policy before it decides whether to connect upstream at all. rustls
//! only parses a ClientHello inside a full server handshake (`Acceptor` would also start
//! answering it), so this small parser reads just the fields the decision needs.

/// What the first bytes of a connection say about a TLS ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    /// Consistent with a ClientHello so far, but it has not all arrived.
    NeedMore,
    /// A complete ClientHello; `sni` is its `server_name` host name, lowercased and without a
    /// trailing dot, or `None` when the client sent none.
    Complete { sni: Option<String> },
    /// Not a ClientHello (another protocol, or a malformed one).
    NotClientHello,
}

const RECORD_HANDSHAKE: u8 = 0x16;
const RECORD_HEADER_LEN: usize = 5;
/// TLSPlaintext.length may not exceed 2^14 (RFC 8446 5.1).
const MAX_RECORD_LEN: usize = 1 << 14;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_HEADER_LEN: usize = 4;
const EXTENSION_SERVER_NAME: u16 = 0;
const SERVER_NAME_TYPE_HOST_NAME: u8 = 0;
/// A DNS name is at most 253 characters (plus the trailing dot some clients send).
const MAX_HOST_NAME_LEN: usize = 254;

/// Parses the ClientHello at the start of `input` (the first bytes a client sent), reassembling
/// a handshake message that spans several records.
pub fn parse_client_hello(input: &[u8]) -> ClientHello {
    let mut message: Vec<u8> = Vec::new();
    let mut rest = input;
    loop {
        if rest.len() < RECORD_HEADER_LEN {
            return check_partial(&message, rest);
        }
        let (content_type, major, length) = (rest[0], rest[1], be16(&rest[3..5]) as usize);
        if content_type != RECORD_HANDSHAKE || major != 3 || length == 0 || length > MAX_RECORD_LEN
        {
            return ClientHello::NotClientHello;
        }
        let available = rest.len() - RECORD_HEADER_LEN;
        let take = length.min(available);
        message.extend_from_slice(&rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + take]);
        if let Some(verdict) = check_message(&message) {
            return verdict;
        }
        if take < length {
            return ClientHello::NeedMore;
        }
        rest = &rest[RECORD_HEADER_LEN + length..];
    }
}

/// A partial record header (fewer than 5 bytes) after `message`: still a ClientHello only if
/// the bytes seen agree with a handshake record header.
fn check_partial(message: &[u8], header: &[u8]) -> ClientHello {
    if let Some(verdict) = check_message(message) {
        return verdict;
    }
    let plausible = match header {
        [] => true,
        [t] => *t == RECORD_HANDSHAKE,
        [t, major, ..] => *t == RECORD_HANDSHAKE && *major == 3,
    };
    if plausible {
        ClientHello::NeedMore
    } else {
        ClientHello::NotClientHello
    }
}

/// `None` while more handshake bytes are needed; otherwise the verdict on the whole message.
fn check_message(message: &[u8]) -> Option<ClientHello> {
    if message.is_empty() {
        return None;
    }
    if message[0] != HANDSHAKE_CLIENT_HELLO {
        return Some(ClientHello::NotClientHello);
    }
    if message.len() < HANDSHAKE_HEADER_LEN {
        return None;
    }
    let body_len = be24(&message[1..4]);
    if message.len() < HANDSHAKE_HEADER_LEN + body_len {
        return None;
    }
    let body = &message[HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + body_len];
    Some(match client_hello_sni(body) {
        Some(sni) => ClientHello::Complete { sni },
        None => ClientHello::NotClientHello,
    })
}

/// The server name of a complete ClientHello body: `None` when malformed, `Some(None)` when it
/// names no server.
fn client_hello_sni(body: &[u8]) -> Option<Option<String>> {
    let mut reader = Reader::new(body);
    let legacy_version = reader.u16()?;
    if legacy_version >> 8 != 3 {
        return None;
    }
    reader.skip(32)?; // random
    let session_id_len = reader.u8()? as usize;
    if session_id_len > 32 {
        return None;
    }
    reader.skip(session_id_len)?;
    let cipher_suites_len = reader.u16()? as usize;
    if cipher_suites_len < 2 || cipher_suites_len & 1 == 1 {
        return None;
    }
    reader.skip(cipher_suites_len)?;
    let compression_len = reader.u8()? as usize;
    if compression_len == 0 {
        return None;
    }
    reader.skip(compression_len)?;
    if reader.is_empty() {
        // An SSLv3-era hello with no extensions at all.
        return Some(None);
    }
    let extensions_len = reader.u16()? as usize;
    let mut extensions = Reader::new(reader.take(extensions_len)?);
    if !reader.is_empty() {
        return None;
    }
    let mut sni = None;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let len = extensions.u16()? as usize;
        let data = extensions.take(len)?;
        if kind == EXTENSION_SERVER_NAME {
            if sni.is_some() {
                return None; // a repeated extension is illegal (RFC 8446 4.2)
            }
            sni = Some(server_name_extension(data)?);
        }
    }
    Some(sni.flatten())
}

fn server_name_extension(data: &[u8]) -> Option<Option<String>> {
    let mut reader = Reader::new(data);
    let list_len = reader.u16()? as usize;
    let mut list = Reader::new(reader.take(list_len)?);
    if !reader.is_empty() {
        return None;
    }
    let mut host_name = None;
    while !list.is_empty() {
        let name_type = list.u8()?;
        let len = list.u16()? as usize;
        let name = list.take(len)?;
        if name_type == SERVER_NAME_TYPE_HOST_NAME {
            if host_name.is_some() {
                return None; // RFC 6066 3: at most one name of each type
            }
            host_name = Some(normalize_host_name(name)?);
        }
    }
    Some(host_name)
}

/// A host name the policy can match: letters, digits, '-', '_' and '.', lowercased, without a
/// trailing dot. Anything else (NUL bytes, spaces, non-ASCII) makes the hello malformed, so a
/// crafted name cannot slip past a suffix match.
fn normalize_host_name(name: &[u8]) -> Option<String> {
    if name.is_empty() || name.len() > MAX_HOST_NAME_LEN {
        return None;
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    let valid = !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with(b".")
        && !name.windows(2).any(|pair| pair == b"..");
    if !valid {
        return None;
    }
    Some(String::from_utf8_lossy(name).to_ascii_lowercase())
}

fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn be24(bytes: &[u8]) -> usize {
    (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2])
}

/// A bounds-checked cursor: every read returns `None` past the end instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < len {
            return None;
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Some(head)
    }

    fn skip(&mut self, len: usize) -> Option<()> {
        self.take(len).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
}
