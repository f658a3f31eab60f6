//! TLS interception for credential injection: a per-sandbox CA whose certificate the guest
//! trusts, leaf certificates minted per server name, and a sans-IO session that terminates the
//! guest's TLS, rewrites its HTTP requests and re-encrypts them to the real server, verifying
//! that server's certificate.

pub mod ca;
pub mod mitm;
pub mod upstream;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use ca::SandboxCa;
pub use mitm::MitmSession;
pub use upstream::upstream_client_config;

use crate::inspect::HttpError;

/// The only application protocol offered on either side, so the request rewriter always sees
/// HTTP/1.1 (it does not speak HTTP/2).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a CA, a TLS configuration or an intercepted session failed. No variant carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{0:?} is not a valid TLS server name")]
    BadServerName(String),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("cannot load root certificates from {path}: {reason}")]
    Roots { path: String, reason: String },
    #[error("the guest's TLS failed: {0}")]
    Guest(rustls::Error),
    #[error("the upstream server's certificate was rejected: {0}")]
    UpstreamCertificate(rustls::CertificateError),
    #[error("the upstream server's TLS failed: {0}")]
    Upstream(rustls::Error),
    #[error("the guest sent a bad HTTP request: {0}")]
    BadRequest(#[from] HttpError),
}

/// The ring provider, named explicitly: rustls' process-wide default would depend on which
/// crypto features other crates in the build happen to enable.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
