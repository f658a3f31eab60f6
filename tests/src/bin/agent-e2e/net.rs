//! The guest's network through the egress filter, end to end: the "main" guest boots with
//! `--egress-policy`; upstream HTTP servers run in this process on an address added to the nested
//! host's loopback (so it is one of the host's own addresses, which the policy must name), and
//! the guest reaches them by names from the nested host's /etc/hosts, through the VMM's resolver.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_client::{AgentClient, ExitStatus, ProcessSpec, ProcessSpecExt};
use sha2::{Digest, Sha256};

use crate::timed;

type Check = Result<String, String>;

/// The upstream servers' address: TEST-NET-2, added to the nested host's `lo`.
pub const UPSTREAM_ADDR: &str = "198.51.100.10";
pub const WEB_PORT: u16 = 18080;
const API_PORT: u16 = 18081;
const LIMITED_PORT: u16 = 18083;
/// The HTTPS upstream (a certificate for secure.test from a test CA the VMM is told to trust).
const SECURE_PORT: u16 = 18443;
/// tls-get in the nested host, copied into the guest for the HTTPS check.
const TLS_GET: &str = "/bin/tls-get";
/// Bytes of the download whose checksum the guest computes.
const BLOB_BYTES: usize = 100 << 20;
/// The environment variable the policy reads the credential from.
const TOKEN_VAR: &str = "AGENT_E2E_EGRESS_TOKEN";

/// What the guest boot needs (policy, audit log, the credential in the VMM's environment) and
/// what the checks look at (what the upstream servers saw).
pub struct NetFixture {
    pub policy: PathBuf,
    pub audit: PathBuf,
    pub token: String,
    authorizations: Arc<Mutex<Vec<String>>>,
    /// What the HTTPS upstream received in Authorization headers.
    https_authorizations: Arc<Mutex<Vec<String>>>,
    /// The test CA of the HTTPS upstream, for `--egress-upstream-ca`.
    upstream_ca: PathBuf,
}

impl NetFixture {
    /// Adds the upstream address, the names and the servers, and writes the policy.
    pub fn prepare(work_dir: &Path) -> Result<NetFixture, String> {
        let status = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{UPSTREAM_ADDR}/32"), "dev", "lo"])
            .status()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !status.success() {
            return Err(format!(
                "ip addr add {UPSTREAM_ADDR}/32 dev lo failed: {status}"
            ));
        }
        let mut hosts = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open("/etc/hosts")
            .map_err(|e| format!("/etc/hosts: {e}"))?;
        writeln!(
            hosts,
            "{UPSTREAM_ADDR} allowed.test api.test limited.test denied.test secure.test"
        )
        .map_err(|e| format!("/etc/hosts: {e}"))?;

        let token = format!("tok-{:016x}-{:08x}", random_u64(), std::process::id());
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        for port in [WEB_PORT, API_PORT, LIMITED_PORT] {
            let listener = TcpListener::bind((UPSTREAM_ADDR, port))
                .map_err(|e| format!("bind {UPSTREAM_ADDR}:{port}: {e}"))?;
            let seen = authorizations.clone();
            let expected = format!("Bearer {token}");
            std::thread::spawn(move || serve(listener, &expected, &seen));
        }

        let https_authorizations = Arc::new(Mutex::new(Vec::new()));
        let upstream_ca = work_dir.join("upstream-ca.pem");
        let tls = tls_upstream_config(&upstream_ca)?;
        let listener = TcpListener::bind((UPSTREAM_ADDR, SECURE_PORT))
            .map_err(|e| format!("bind {UPSTREAM_ADDR}:{SECURE_PORT}: {e}"))?;
        {
            let seen = https_authorizations.clone();
            let expected = format!("Bearer {token}");
            std::thread::spawn(move || serve_tls(listener, tls, &expected, &seen));
        }

        let policy = work_dir.join("egress-policy.json");
        let audit = work_dir.join("egress-audit.jsonl");
        let text = serde_json::json!({
            "version": 1,
            "rules": [
                { "id": "web", "domain": "allowed.test", "ports": [WEB_PORT] },
                { "id": "api", "domain": "api.test", "ports": [API_PORT],
                  "inject_headers": [ { "name": "Authorization", "prefix": "Bearer ", "from_env": TOKEN_VAR } ] },
                { "id": "secure", "domain": "secure.test", "ports": [SECURE_PORT],
                  "inject_headers": [ { "name": "Authorization", "prefix": "Bearer ", "from_env": TOKEN_VAR } ] },
                { "id": "limited", "domain": "limited.test", "ports": [LIMITED_PORT],
                  "rate_limit": { "connections": 2, "per_seconds": 3600 } },
                // Names the host address (so names resolving to it are handed out) and opens
                // only the discard port on it by address.
                { "id": "upstream-host", "cidr": format!("{UPSTREAM_ADDR}/32"), "ports": [9] }
            ]
        });
        std::fs::write(&policy, text.to_string())
            .map_err(|e| format!("{}: {e}", policy.display()))?;
        Ok(NetFixture {
            policy,
            audit,
            token,
            authorizations,
            https_authorizations,
            upstream_ca,
        })
    }

    /// `agentvm boot` arguments.
    pub fn boot_args(&self) -> Vec<String> {
        vec![
            "--egress-policy".into(),
            self.policy.display().to_string(),
            "--egress-audit".into(),
            self.audit.display().to_string(),
            "--egress-upstream-ca".into(),
            self.upstream_ca.display().to_string(),
        ]
    }

    /// The VMM's environment.
    pub fn boot_env(&self) -> Vec<(String, String)> {
        vec![(TOKEN_VAR.into(), self.token.clone())]
    }
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = urandom.read_exact(&mut bytes);
    }
    u64::from_le_bytes(bytes) | 1
}

/// Deterministic bytes of the download (a xorshift stream), the same on both ends.
fn blob() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(BLOB_BYTES);
    while out.len() < BLOB_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(BLOB_BYTES);
    out
}

/// A test CA (its certificate written to `ca_path`) and a server config for secure.test signed
/// by it.
fn tls_upstream_config(ca_path: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let fail = |e: &dyn std::fmt::Display| format!("test CA: {e}");
    let ca_key = KeyPair::generate().map_err(|e| fail(&e))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "agent-e2e upstream CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).map_err(|e| fail(&e))?;
    std::fs::write(ca_path, ca.pem()).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let leaf_key = KeyPair::generate().map_err(|e| fail(&e))?;
    let leaf = CertificateParams::new(vec!["secure.test".to_string()])
        .map_err(|e| fail(&e))?
        .signed_by(&leaf_key, &ca, &ca_key)
        .map_err(|e| fail(&e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| fail(&e))?
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .map_err(|e| fail(&e))?;
    Ok(Arc::new(config))
}

fn serve_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    expected: &str,
    seen: &Mutex<Vec<String>>,
) {
    for stream in listener.incoming().flatten() {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
            continue;
        };
        let mut tls = rustls::StreamOwned::new(connection, stream);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
            match tls.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&head);
        let authorization = text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
            .map(|(_, value)| value.trim().to_string())
            .unwrap_or_default();
        let ok = authorization == expected;
        seen.lock().unwrap().push(authorization);
        let (status, body) = if ok {
            ("200 OK", "authorized\n")
        } else {
            ("401 Unauthorized", "unauthorized\n")
        };
        let _ = write!(
            tls,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }
}

fn serve(listener: TcpListener, expected_authorization: &str, seen: &Mutex<Vec<String>>) {
    for stream in listener.incoming().flatten() {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = handle(stream, expected_authorization, seen);
    }
}

fn handle(stream: TcpStream, expected: &str, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    let mut host = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim().to_string();
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value);
            } else if name.eq_ignore_ascii_case("host") {
                host = value;
            }
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let (status, body): (&str, Vec<u8>) = match path.as_str() {
        "/hello" => (
            "200 OK",
            format!("hello from upstream, host {host}\n").into_bytes(),
        ),
        "/secret" => {
            let value = authorization.unwrap_or_default();
            let ok = value == expected;
            seen.lock().unwrap().push(value);
            if ok {
                ("200 OK", b"authorized\n".to_vec())
            } else {
                ("401 Unauthorized", b"unauthorized\n".to_vec())
            }
        }
        "/blob" => ("200 OK", blob()),
        _ => ("404 Not Found", b"no such path\n".to_vec()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

fn shell(client: &AgentClient, script: &str) -> Result<(i32, String, String), String> {
    let out = client
        .exec_output(ProcessSpec::shell(script))
        .map_err(|e| format!("{script}: {e}"))?;
    let code = match out.status {
        ExitStatus::Code(code) => code,
        ExitStatus::Signal(signal) => 128 + signal,
    };
    Ok((
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `wget` in the guest, bounded by `timeout` (busybox-static's `wget -T` segfaults); (exit
/// code, stdout, stderr).
fn wget(client: &AgentClient, extra: &str, url: &str) -> Result<(i32, String, String), String> {
    shell(client, &format!("timeout 60 wget -q -O - {extra} {url}"))
}

fn refused(client: &AgentClient, url: &str) -> Check {
    let (code, out, err) = wget(client, "", url)?;
    if code != 0 && err.to_lowercase().contains("refused") {
        Ok(format!("{url}: {}", err.trim()))
    } else {
        Err(format!(
            "{url}: want a refused connection, got exit {code}, stdout {out:?}, stderr {err:?}"
        ))
    }
}

pub fn checks(client: &AgentClient, fixture: &NetFixture, vmm_pid: u32, mem_mib: u32) {
    timed("net_configured", || {
        let (code, out, err) = shell(
            client,
            "ip -4 addr show dev eth0; ip -4 route; cat /etc/resolv.conf",
        )?;
        if code == 0
            && out.contains("10.0.2.15/24")
            && out.contains("default via 10.0.2.2")
            && out.contains("nameserver 10.0.2.3")
        {
            Ok("eth0 10.0.2.15/24, default via 10.0.2.2, resolver 10.0.2.3".into())
        } else {
            Err(format!("exit {code}: {out}{err}"))
        }
    });
    timed("net_egress_ca_installed", || egress_ca_installed(client));
    timed("net_allowed_domain", || {
        let (code, out, err) = wget(client, "", &format!("http://allowed.test:{WEB_PORT}/hello"))?;
        if code == 0 && out.contains("hello from upstream, host allowed.test") {
            Ok(out.trim().to_string())
        } else {
            Err(format!("exit {code}, stdout {out:?}, stderr {err:?}"))
        }
    });
    timed("net_denied_domain", || {
        let (code, out, err) = wget(client, "", &format!("http://denied.test:{WEB_PORT}/hello"))?;
        if code != 0 && !out.contains("hello") && err.contains("bad address") {
            Ok(err.trim().to_string())
        } else {
            Err(format!(
                "want an unresolvable name, got exit {code}, stdout {out:?}, stderr {err:?}"
            ))
        }
    });
    // The upstream's address was handed out for allowed.test above, so the connection itself
    // passes; the request names the address, not a host the rule allows: 403.
    timed("net_ip_literal_refused", || {
        let url = format!("http://{UPSTREAM_ADDR}:{WEB_PORT}/hello");
        let (code, out, err) = wget(client, "", &url)?;
        if code != 0 && err.contains("403") && !out.contains("hello") {
            Ok(format!("{url}: {}", err.trim()))
        } else {
            Err(format!(
                "{url}: want 403, got exit {code}, stdout {out:?}, stderr {err:?}"
            ))
        }
    });
    timed("net_unlisted_address_refused", || {
        refused(client, "http://203.0.113.9:80/")
    });
    timed("net_metadata_refused", || {
        refused(client, "http://169.254.169.254/latest/meta-data/")
    });
    timed("net_private_refused", || {
        refused(client, "http://10.0.2.2:22/")
    });
    timed("net_host_header_checked", || {
        let (code, out, err) = wget(
            client,
            "--header 'Host: evil.test'",
            &format!("http://allowed.test:{WEB_PORT}/hello"),
        )?;
        if code != 0 && err.contains("403") {
            Ok(err.trim().to_string())
        } else {
            Err(format!("want 403 for a Host the rule does not allow, got exit {code}, stdout {out:?}, stderr {err:?}"))
        }
    });
    timed("net_credential_injection", || {
        credential_injection(client, fixture, vmm_pid, mem_mib)
    });
    timed("net_https_credential_injection", || {
        https_credential_injection(client, fixture, vmm_pid, mem_mib)
    });
    timed("net_download_100mib", || {
        let want: String = Sha256::digest(blob())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let (code, out, err) = shell(
            client,
            &format!("timeout 900 wget -q -O - http://allowed.test:{WEB_PORT}/blob | sha256sum"),
        )?;
        if code == 0 && out.starts_with(&want) {
            Ok(format!("sha256 {want}"))
        } else {
            Err(format!(
                "want sha256 {want}, got exit {code}, stdout {out:?}, stderr {err:?}"
            ))
        }
    });
    timed("net_rate_limit", || {
        let url = format!("http://limited.test:{LIMITED_PORT}/hello");
        for attempt in 1..=2 {
            let (code, out, err) = wget(client, "", &url)?;
            if code != 0 || !out.contains("hello") {
                return Err(format!("attempt {attempt} within the limit: exit {code}, stdout {out:?}, stderr {err:?}"));
            }
        }
        refused(client, &url).map(|third| format!("2 connections allowed, the third: {third}"))
    });
    timed("net_audit_log", || audit_log(fixture));
}

/// The agent fetched the sandbox CA from the filter at boot and installed it; the filter serves
/// the same certificate to anyone in the guest who asks.
fn egress_ca_installed(client: &AgentClient) -> Check {
    let (code, out, err) = shell(
        client,
        "cat /etc/ssl/certs/agentvm-egress-ca.pem && echo '==bundle' && \
         grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt && \
         grep -qF \"$(sed -n 2p /etc/ssl/certs/agentvm-egress-ca.pem)\" /etc/ssl/certs/ca-certificates.crt && \
         echo '==served' && timeout 30 wget -q -O - http://10.0.2.2/agentvm/egress-ca.pem",
    )?;
    let failed = || format!("exit {code}, stdout {out:?}, stderr {err:?}");
    if code != 0 {
        return Err(failed());
    }
    let (installed, rest) = out.split_once("==bundle").ok_or_else(failed)?;
    let (_, served) = rest.split_once("==served").ok_or_else(failed)?;
    if installed.trim().starts_with("-----BEGIN CERTIFICATE-----")
        && installed.trim() == served.trim()
    {
        Ok("/etc/ssl/certs/agentvm-egress-ca.pem matches the served CA and is in ca-certificates.crt".into())
    } else {
        Err(failed())
    }
}

/// The same through TLS: the guest's own HTTPS client (trusting only its system bundle, where
/// the agent installed the sandbox CA) talks to secure.test; the filter terminates that TLS,
/// injects the credential and opens TLS to the real server, verified against its test CA.
fn https_credential_injection(
    client: &AgentClient,
    fixture: &NetFixture,
    vmm_pid: u32,
    mem_mib: u32,
) -> Check {
    let binary = std::fs::read(TLS_GET).map_err(|e| format!("{TLS_GET}: {e}"))?;
    client
        .write_file(
            "/tmp/tls-get",
            &mut binary.as_slice(),
            agentvm_client::WriteOptions {
                mode: Some(0o755),
                create_parents: true,
                atomic: true,
            },
        )
        .map_err(|e| format!("copy tls-get into the guest: {e}"))?;
    let target = format!("/tmp/tls-get secure.test {SECURE_PORT} /secret");
    authorized_with_and_without_a_header(|header| {
        let header = header.map(|h| format!(" '{h}'")).unwrap_or_default();
        shell(client, &format!("timeout 120 {target}{header}"))
    })?;
    only_the_injected_token_upstream(&fixture.https_authorizations, &fixture.token)?;
    token_absent_from_guest_ram(client, fixture, vmm_pid, mem_mib)?;
    Ok("the guest's HTTPS client trusted the sandbox CA; the real server saw the injected token on both requests; not in guest RAM".into())
}

fn credential_injection(
    client: &AgentClient,
    fixture: &NetFixture,
    vmm_pid: u32,
    mem_mib: u32,
) -> Check {
    let url = format!("http://api.test:{API_PORT}/secret");
    authorized_with_and_without_a_header(|header| {
        let header = header
            .map(|h| format!("--header '{h}'"))
            .unwrap_or_default();
        wget(client, &header, &url)
    })?;
    only_the_injected_token_upstream(&fixture.authorizations, &fixture.token)?;
    // The token is never sent to the guest to look for: the host reads every process's
    // environment, then the whole guest RAM (files in its tmpfs included).
    let (code, environ, _) = shell(client, "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'")?;
    if code != 0 || environ.contains(&fixture.token) || !environ.contains("PATH=") {
        return Err(format!(
            "guest environment check: exit {code}, token present: {}",
            environ.contains(&fixture.token)
        ));
    }
    token_absent_from_guest_ram(client, fixture, vmm_pid, mem_mib)?;
    Ok("upstream saw the injected token on both requests (the guest's own header replaced); not in guest env, files or RAM".into())
}

/// `fetch(None)` and `fetch(Some(a guessed Authorization header))` both answer "authorized":
/// the filter's credential reached the upstream, replacing the guest's own.
fn authorized_with_and_without_a_header(
    fetch: impl Fn(Option<&str>) -> Result<(i32, String, String), String>,
) -> Result<(), String> {
    for header in [None, Some("Authorization: Bearer guessed")] {
        let (code, out, err) = fetch(header)?;
        if code != 0 || out.trim() != "authorized" {
            return Err(format!(
                "header {header:?}: exit {code}, stdout {out:?}, stderr {err:?}"
            ));
        }
    }
    Ok(())
}

/// The upstream received exactly the two requests, each with the injected credential.
fn only_the_injected_token_upstream(seen: &Mutex<Vec<String>>, token: &str) -> Result<(), String> {
    let seen = seen.lock().unwrap().clone();
    let want = format!("Bearer {token}");
    if seen.len() != 2 || seen.iter().any(|value| *value != want) {
        return Err(format!(
            "upstream saw {} requests with other Authorization values than the injected one",
            seen.len()
        ));
    }
    Ok(())
}

/// The whole guest RAM, read from the host, holds no trace of the token; a marker the guest
/// writes first must be found, or the scan proves nothing.
fn token_absent_from_guest_ram(
    client: &AgentClient,
    fixture: &NetFixture,
    vmm_pid: u32,
    mem_mib: u32,
) -> Result<(), String> {
    let marker = format!("e2e-marker-{:016x}", random_u64());
    shell(client, &format!("echo {marker} > /tmp/marker-{marker}"))?;
    let (marker_found, token_found) = scan_guest_ram(
        vmm_pid,
        mem_mib,
        &[marker.as_bytes(), fixture.token.as_bytes()],
    )?;
    if !marker_found {
        return Err(
            "the RAM scan did not find a marker the guest wrote, so it proves nothing".into(),
        );
    }
    if token_found {
        return Err("the token is in guest RAM".into());
    }
    Ok(())
}

/// Reads the VMM's guest RAM (every mapping inside the `agentvm-guest-ram` memfd's span of
/// `mem_mib` MiB: the memfd itself and what is mapped over parts of it, such as the kernel image)
/// and reports which of the first two needles occur in it.
fn scan_guest_ram(pid: u32, mem_mib: u32, needles: &[&[u8]]) -> Result<(bool, bool), String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("maps of {pid}: {e}"))?;
    let size = u64::from(mem_mib) << 20;
    let parse = |line: &str| -> Option<(u64, u64, u64)> {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let offset = u64::from_str_radix(fields.nth(1)?, 16).ok()?;
        Some((
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
            offset,
        ))
    };
    let base = maps
        .lines()
        .filter(|line| line.contains("agentvm-guest-ram"))
        .filter_map(parse)
        .map(|(start, _, offset)| start - offset)
        .min()
        .ok_or_else(|| format!("no agentvm-guest-ram mapping in the VMM (pid {pid})"))?;
    let regions: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(parse)
        .filter(|(start, end, _)| *end > base && *start < base + size)
        .map(|(start, end, _)| (start.max(base), end.min(base + size)))
        .collect();
    let covered: u64 = regions.iter().map(|(start, end)| end - start).sum();
    if covered * 10 < size * 9 {
        return Err(format!(
            "guest RAM mappings cover {} of {mem_mib} MiB",
            covered >> 20
        ));
    }
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("mem of {pid}: {e}"))?;
    use std::io::{Seek, SeekFrom};
    let mut found = vec![false; needles.len()];
    let overlap = needles.iter().map(|n| n.len()).max().unwrap_or(0);
    let mut buffer = vec![0u8; 8 << 20];
    for (start, end) in regions {
        let mut carry: Vec<u8> = Vec::new();
        let mut at = start;
        while at < end {
            let chunk = (buffer.len() as u64).min(end - at) as usize;
            mem.seek(SeekFrom::Start(at))
                .map_err(|e| format!("seek: {e}"))?;
            mem.read_exact(&mut buffer[..chunk])
                .map_err(|e| format!("read guest RAM at {:#x}: {e}", at - base))?;
            carry.extend_from_slice(&buffer[..chunk]);
            for (i, needle) in needles.iter().enumerate() {
                if !found[i] && contains(&carry, needle) {
                    found[i] = true;
                }
            }
            let keep = carry.len().saturating_sub(overlap);
            carry.drain(..keep);
            at += chunk as u64;
        }
    }
    Ok((found[0], found.get(1).copied().unwrap_or(false)))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut from = 0;
    while let Some(pos) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + pos;
        if haystack[at + 1..].starts_with(rest) {
            return true;
        }
        from = at + 1;
    }
    false
}

fn audit_log(fixture: &NetFixture) -> Check {
    let text = std::fs::read_to_string(&fixture.audit)
        .map_err(|e| format!("{}: {e}", fixture.audit.display()))?;
    if text.contains(&fixture.token) {
        return Err("the audit log holds the token".into());
    }
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("not JSON: {line}: {e}")))
        .collect::<Result<_, _>>()?;
    let has = |want: &dyn Fn(&serde_json::Value) -> bool, what: &str| {
        if events.iter().any(want) {
            Ok(())
        } else {
            Err(format!(
                "no audit line for {what} among {} lines",
                events.len()
            ))
        }
    };
    has(
        &|e| e["kind"] == "ca" && e["path"] == "/agentvm/egress-ca.pem" && e["decision"] == "allow",
        "the agent fetching the egress CA",
    )?;
    has(
        &|e| e["kind"] == "dns" && e["domain"] == "allowed.test" && e["decision"] == "allow",
        "the allowed name's DNS answer",
    )?;
    has(
        &|e| e["kind"] == "dns" && e["domain"] == "denied.test" && e["decision"] == "deny",
        "the denied name",
    )?;
    has(
        &|e| {
            e["kind"] == "connect"
                && e["dest_ip"] == "169.254.169.254"
                && e["decision"] == "deny"
                && e["reason"].as_str().unwrap_or("").contains("metadata")
        },
        "the metadata address",
    )?;
    has(
        &|e| e["kind"] == "connect" && e["rule"] == "api" && e["decision"] == "allow",
        "the api connection",
    )?;
    has(
        &|e| {
            e["rule"] == "limited"
                && e["decision"] == "deny"
                && e["reason"].as_str().unwrap_or("").contains("rate limit")
        },
        "the rate-limited connection",
    )?;
    has(
        &|e| {
            e["kind"] == "http"
                && e["sni"] == "secure.test"
                && e["rule"] == "secure"
                && e["decision"] == "allow"
        },
        "the intercepted HTTPS request",
    )?;
    has(
        &|e| {
            e["kind"] == "http"
                && e["host"].as_str().unwrap_or("").starts_with("api.test")
                && e["path"] == "/secret"
                && e["decision"] == "allow"
        },
        "the api request",
    )?;
    Ok(format!(
        "{} lines, each expected kind present, no secret",
        events.len()
    ))
}
