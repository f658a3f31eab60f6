//! tls-get: the HTTPS client agent-e2e copies into the guest (whose busybox has no TLS client)
//! to show credential injection through the egress filter's TLS interception. It trusts exactly
//! the guest's system bundle, `/etc/ssl/certs/ca-certificates.crt`, where the guest agent put the
//! sandbox CA.
//!
//! `tls-get HOST PORT PATH [HEADER]...`: one GET, the response body on stdout; exit 0 on a 2xx,
//! 1 with the status line on stderr otherwise, 2 on a connection or TLS failure.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("tls-get: {e}");
            std::process::exit(2);
        }
    }
}

fn run(args: &[String]) -> Result<i32, String> {
    let [host, port, path, headers @ ..] = args else {
        return Err("usage: tls-get HOST PORT PATH [HEADER]...".into());
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(BUNDLE).map_err(|e| format!("{BUNDLE}: {e}"))? {
        roots
            .add(cert.map_err(|e| format!("{BUNDLE}: {e}"))?)
            .map_err(|e| format!("{BUNDLE}: {e}"))?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let connection =
        ClientConnection::new(Arc::new(config), name).map_err(|e| format!("TLS: {e}"))?;
    let socket = TcpStream::connect((
        host.as_str(),
        port.parse::<u16>().map_err(|e| format!("port: {e}"))?,
    ))
    .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(connection, socket);
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes())
        .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A server that closes without close_notify still sent the whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(format!("reading from {host}:{port}: {e}")),
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    print!("{body}");
    if status
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'))
    {
        Ok(0)
    } else {
        eprintln!("tls-get: {status}");
        Ok(1)
    }
}
