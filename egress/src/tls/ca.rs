//! The per-sandbox certificate authority. Each sandbox gets a fresh key and a self-signed CA
//! certificate that only its own guest trusts, so a leaked CA key opens no other sandbox; the
//! VMM mints a leaf certificate per server name it intercepts.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::ServerConfig;
use time::{Duration, OffsetDateTime};

use super::{crypto_provider, TlsError, ALPN_HTTP1};

/// How long a sandbox CA (and so every leaf it signs) stays valid: sandboxes are short-lived,
/// and a short life limits what a copied CA key is worth.
const CA_VALIDITY: Duration = Duration::days(30);
/// Certificates start this far in the past, so a guest whose clock lags the host's a little
/// still accepts them.
const CLOCK_SKEW: Duration = Duration::hours(1);
/// Leaf configurations kept per sandbox; past this the cache starts over (a guest cycling
/// through names must not grow the VMM's memory without bound).
const MAX_CACHED_LEAVES: usize = 1024;
/// Sandbox ids are cut to this length in the CA's common name (X.509 caps a CN at 64).
const MAX_ID_IN_NAME: usize = 32;

/// A sandbox's egress CA: its certificate goes into the guest's trust store; its key stays in
/// the VMM and signs the leaf certificates the guest sees for intercepted servers.
pub struct SandboxCa {
    sandbox: String,
    cert: Certificate,
    key: KeyPair,
    /// One key for every leaf of this sandbox: minting a leaf then costs one signature.
    leaf_key: KeyPair,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl fmt::Debug for SandboxCa {
    // The keys must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("sandbox", &self.sandbox)
            .field("keys", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// A fresh CA key and self-signed CA certificate named "agentvm sandbox <id> egress CA",
    /// valid for 30 days, allowed to sign end-entity certificates only (path length 0).
    pub fn generate(sandbox: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let id: String = sandbox.chars().take(MAX_ID_IN_NAME).collect();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("agentvm sandbox {id} egress CA"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "agentvm");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            sandbox: sandbox.to_owned(),
            cert,
            key,
            leaf_key,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate in PEM, for the guest's trust store.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        self.cert.der()
    }

    /// The TLS server configuration the guest sees for `sni`: a leaf certificate for that name
    /// signed by this CA (minted once, then cached), offering only HTTP/1.1 by ALPN.
    pub fn server_config(&self, sni: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let name = sni.to_ascii_lowercase();
        let mut leaves = self
            .leaves
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(config) = leaves.get(&name) {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(self.mint_server_config(&name)?);
        if leaves.len() >= MAX_CACHED_LEAVES {
            leaves.clear();
        }
        leaves.insert(name, Arc::clone(&config));
        Ok(config)
    }

    fn mint_server_config(&self, name: &str) -> Result<ServerConfig, TlsError> {
        match ServerName::try_from(name) {
            Ok(ServerName::DnsName(_)) => {}
            _ => return Err(TlsError::BadServerName(name.to_owned())),
        }
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::now_utc() - CLOCK_SKEW;
        params.not_after = self.cert.params().not_after;
        let leaf = params.signed_by(&self.leaf_key, &self.cert, &self.key)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.cert.der().clone()], key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(config)
    }
}
