//! Sans-IO inspection of what a guest sends on a new connection: which TLS server name it asks
//! for, or which HTTP request it makes, so the policy can check the name (SNI / Host) and the
//! proxy can inject credentials. Nothing here touches a socket.

pub mod http;
pub mod sni;

pub use http::{
    error_response, host_name, is_valid_header, HttpError, RequestHead, RequestRewriter,
};

/// After this many bytes without a complete ClientHello or request head, the connection is
/// treated as some other protocol rather than waited on further.
pub const PEEK_LIMIT: usize = 16 * 1024;

/// What the first bytes a guest sent on a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet to tell: call again with more.
    NeedMore,
    /// A TLS ClientHello; `sni` is its server name (lowercased), if it sent one.
    Tls { sni: Option<String> },
    /// An HTTP/1.x request head.
    Http {
        method: String,
        path: String,
        host: Option<String>,
    },
    /// Anything else, including a malformed ClientHello or request head.
    Other,
}

/// Classifies the first bytes a guest sent on a connection (everything received so far, from
/// the start of the stream).
pub fn peek(first: &[u8]) -> Peek {
    let verdict = match first.first() {
        None => Peek::NeedMore,
        Some(&0x16) => match sni::parse_client_hello(first) {
            sni::ClientHello::NeedMore => Peek::NeedMore,
            sni::ClientHello::Complete { sni } => Peek::Tls { sni },
            sni::ClientHello::NotClientHello => Peek::Other,
        },
        Some(_) => match http::parse_head(first) {
            Ok(None) => Peek::NeedMore,
            Ok(Some((head, _))) => Peek::Http {
                method: head.method,
                path: head.path,
                host: head.host,
            },
            Err(_) => Peek::Other,
        },
    };
    if verdict == Peek::NeedMore && first.len() >= PEEK_LIMIT {
        return Peek::Other;
    }
    verdict
}
