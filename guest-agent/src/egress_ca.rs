//! The egress filter's CA in the guest's trust store. HTTPS to hosts whose policy rule carries
//! credential headers is intercepted by the VMM with a per-sandbox CA; the filter serves that
//! CA's certificate on the gateway (`http://10.0.2.2/agentvm/egress-ca.pem`, answered by the VMM
//! itself, never the network). The agent fetches it once the NIC is up and adds it where common
//! TLS clients look (OpenSSL, curl, Python's certifi via SSL_CERT_FILE-style bundles, Go).
//!
//! The fetch is a plain HTTP/1.0 GET on a std TcpStream: the answer is one small fixed file from
//! the VMM on a private link, so an HTTP client crate would add size to PID 1 for nothing.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentvm_protocol::net::{EGRESS_CA_PATH, EGRESS_CA_PORT, GATEWAY_ADDR};

/// The CA certificate on its own, for tools that take a single file.
pub const CA_FILE: &str = "/etc/ssl/certs/agentvm-egress-ca.pem";
/// The bundle Debian/Alpine-style systems (and most TLS clients' defaults) read.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Connect, write and read each give up after this long.
const TIMEOUT: Duration = Duration::from_secs(1);
/// The link may still be settling right after eth0 comes up.
const ATTEMPTS: usize = 3;
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// A CA certificate is about a kilobyte; anything much larger is not one.
const MAX_RESPONSE: u64 = 64 * 1024;
const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const PEM_END: &str = "-----END CERTIFICATE-----";

/// Where the certificate goes.
#[derive(Debug, Clone)]
pub struct TrustStore {
    /// The certificate alone (overwritten).
    pub ca_file: PathBuf,
    /// The system bundle it is appended to (created if absent).
    pub bundle: PathBuf,
}

impl TrustStore {
    /// The guest's real trust store: [`CA_FILE`] and [`CA_BUNDLE`].
    pub fn system() -> Self {
        Self {
            ca_file: PathBuf::from(CA_FILE),
            bundle: PathBuf::from(CA_BUNDLE),
        }
    }
}

/// Where the egress filter serves the CA.
pub fn gateway_endpoint() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(GATEWAY_ADDR, EGRESS_CA_PORT))
}

/// Fetches the CA from `server` (normally [`gateway_endpoint`]), retrying a few times, and
/// installs it into `store`. Running it again with the same CA changes nothing.
pub fn install_egress_ca(server: SocketAddr, store: &TrustStore) -> io::Result<()> {
    let mut last_error = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(RETRY_DELAY);
        }
        match fetch_ca(server) {
            Ok(pem) => return install(&pem, store),
            Err(error) => last_error = Some(error),
        }
    }
    let error = last_error.unwrap_or_else(|| io::Error::other("no attempt was made"));
    Err(io::Error::new(
        error.kind(),
        format!(
            "cannot fetch the egress CA from http://{server}{EGRESS_CA_PATH} ({ATTEMPTS} attempts): {error}"
        ),
    ))
}

/// One GET; the certificate PEM on a 200 whose body is one.
fn fetch_ca(server: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&server, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let request = format!(
        "GET {EGRESS_CA_PATH} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.ip()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut response)?;
    let response =
        String::from_utf8(response).map_err(|_| invalid("the response is not text".to_owned()))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("the response has no complete head".to_owned()))?;
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1);
    if !status.starts_with("HTTP/1.") || code != Some("200") {
        return Err(invalid(format!("the server answered {status:?}")));
    }
    let pem = body.trim();
    if !pem.starts_with(PEM_BEGIN) || !pem.ends_with(PEM_END) {
        return Err(invalid("the body is not a PEM certificate".to_owned()));
    }
    Ok(format!("{pem}\n"))
}

/// Writes `pem` as the CA file and into the bundle, replacing the CA an earlier install put there
/// (a snapshot restored behind a new egress filter gets a new CA; the old one must not stay
/// trusted).
fn install(pem: &str, store: &TrustStore) -> io::Result<()> {
    for path in [&store.ca_file, &store.bundle] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| path_error("create the directory of", path, e))?;
        }
    }
    let previous = read_if_present(&store.ca_file)?.unwrap_or_default();
    let existing = read_if_present(&store.bundle)?.unwrap_or_default();
    let mut bundle = existing.clone();
    let previous = previous.trim();
    if !previous.is_empty() && previous != pem.trim() {
        bundle = bundle.replacen(&format!("{previous}\n"), "", 1);
        bundle = bundle.replacen(previous, "", 1);
    }
    if !bundle.contains(pem.trim()) {
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(pem);
    }
    if bundle != existing {
        std::fs::write(&store.bundle, bundle).map_err(|e| path_error("write", &store.bundle, e))?;
    }
    std::fs::write(&store.ca_file, pem).map_err(|e| path_error("write", &store.ca_file, e))
}

/// The file's text, or None if it does not exist.
fn read_if_present(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(path_error("read", path, error)),
    }
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

fn path_error(step: &str, path: &Path, error: io::Error) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("cannot {step} {}: {error}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::thread::JoinHandle;

    use super::*;

    const PEM: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBdjCCARygAwIBAgIUKq\n-----END CERTIFICATE-----";

    /// A server on 127.0.0.1 that answers each of `answers` to one connection in turn (None:
    /// close without answering), and returns the requests it read.
    fn serve(answers: Vec<Option<String>>) -> (SocketAddr, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for answer in answers {
                let (mut stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                    request.push(byte[0]);
                }
                requests.push(String::from_utf8(request).unwrap());
                if let Some(answer) = answer {
                    stream.write_all(answer.as_bytes()).unwrap();
                }
            }
            requests
        });
        (address, thread)
    }

    fn ok(body: &str) -> Option<String> {
        Some(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    fn store(dir: &Path) -> TrustStore {
        TrustStore {
            ca_file: dir.join("etc/ssl/certs/agentvm-egress-ca.pem"),
            bundle: dir.join("etc/ssl/certs/ca-certificates.crt"),
        }
    }

    #[test]
    fn fetches_and_installs_into_a_fresh_trust_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (server, requests) = serve(vec![ok(PEM), ok(PEM)]);
        install_egress_ca(server, &store).unwrap();
        install_egress_ca(server, &store).unwrap();
        let requests = requests.join().unwrap();
        assert!(
            requests[0].starts_with("GET /agentvm/egress-ca.pem HTTP/1.0\r\n"),
            "{requests:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&store.ca_file).unwrap(),
            format!("{PEM}\n")
        );
        // Installed twice, present once.
        assert_eq!(
            std::fs::read_to_string(&store.bundle).unwrap(),
            format!("{PEM}\n")
        );
    }

    #[test]
    fn appends_to_an_existing_bundle_keeping_its_roots() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        std::fs::create_dir_all(store.bundle.parent().unwrap()).unwrap();
        let other = "-----BEGIN CERTIFICATE-----\nOTHER\n-----END CERTIFICATE-----";
        std::fs::write(&store.bundle, other).unwrap();
        let (server, requests) = serve(vec![ok(&format!("{PEM}\r\n"))]);
        install_egress_ca(server, &store).unwrap();
        requests.join().unwrap();
        assert_eq!(
            std::fs::read_to_string(&store.bundle).unwrap(),
            format!("{other}\n{PEM}\n")
        );
    }

    #[test]
    fn a_new_ca_replaces_the_previous_one_and_keeps_other_roots() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        std::fs::create_dir_all(store.bundle.parent().unwrap()).unwrap();
        let other = "-----BEGIN CERTIFICATE-----\nOTHER\n-----END CERTIFICATE-----\n";
        std::fs::write(&store.bundle, other).unwrap();
        let renewed = "-----BEGIN CERTIFICATE-----\nMIIBrenewed\n-----END CERTIFICATE-----";
        let (server, requests) = serve(vec![ok(PEM), ok(renewed)]);
        install_egress_ca(server, &store).unwrap();
        install_egress_ca(server, &store).unwrap();
        requests.join().unwrap();
        assert_eq!(
            std::fs::read_to_string(&store.bundle).unwrap(),
            format!("{other}{renewed}\n")
        );
        assert_eq!(
            std::fs::read_to_string(&store.ca_file).unwrap(),
            format!("{renewed}\n")
        );
    }

    #[test]
    fn a_dropped_first_attempt_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (server, requests) = serve(vec![None, ok(PEM)]);
        install_egress_ca(server, &store).unwrap();
        assert_eq!(requests.join().unwrap().len(), 2);
        assert!(store.ca_file.is_file());
    }

    #[test]
    fn an_error_status_or_a_body_that_is_no_certificate_installs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let not_found = Some("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned());
        let (server, requests) = serve(vec![not_found.clone(), not_found.clone(), not_found]);
        let error = install_egress_ca(server, &store).unwrap_err();
        requests.join().unwrap();
        assert!(error.to_string().contains("404 Not Found"), "{error}");
        assert!(
            error.to_string().contains("/agentvm/egress-ca.pem"),
            "{error}"
        );
        assert!(!store.ca_file.exists() && !store.bundle.exists());

        let (server, requests) = serve(vec![ok("<html>"), ok("<html>"), ok("<html>")]);
        let error = install_egress_ca(server, &store).unwrap_err();
        requests.join().unwrap();
        assert!(
            error.to_string().contains("not a PEM certificate"),
            "{error}"
        );
        assert!(!store.bundle.exists());
    }

    #[test]
    fn nothing_listening_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        // Bound, then closed: connecting is refused.
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let error = install_egress_ca(server, &store(dir.path())).unwrap_err();
        assert!(error.to_string().contains("3 attempts"), "{error}");
    }
}
