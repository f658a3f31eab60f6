//! The TLS client configuration the VMM uses to reach the real server after intercepting a
//! guest's connection. The roots are webpki-roots (Mozilla's list compiled into the binary),
//! not the host's trust store read at run time: the VMM may run chrooted by the jailer where
//! no /etc/ssl exists, its threads may not open files under seccomp, and a static binary then
//! verifies servers the same way on every host, offline. Hosts that need their own roots (a
//! corporate proxy CA, a test server's CA) pass them as extra PEM files.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::{crypto_provider, TlsError, ALPN_HTTP1};

/// Mozilla's roots plus every certificate in the PEM files `extra_roots`, offering HTTP/1.1
/// by ALPN. Each file must hold at least one certificate.
pub fn upstream_client_config(extra_roots: &[PathBuf]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for path in extra_roots {
        let roots_error = |reason: String| TlsError::Roots {
            path: path.display().to_string(),
            reason,
        };
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| roots_error(e.to_string()))? {
            let cert = cert.map_err(|e| roots_error(e.to_string()))?;
            roots.add(cert).map_err(|e| roots_error(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(roots_error("the file holds no PEM certificate".to_owned()));
        }
    }
    client_config_with_roots(roots)
}

/// A client configuration trusting exactly `roots` (tests use it to trust only a test CA).
pub fn client_config_with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}
