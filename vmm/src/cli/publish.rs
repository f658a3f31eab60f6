//! `--publish` specs: which host endpoint forwards to which guest TCP port.
//!
//! Forms (as `docker run -p`, plus Unix sockets):
//! - `GUEST` — host 127.0.0.1:GUEST
//! - `HOST:GUEST` — host 127.0.0.1:HOST (HOST 0 = any free port, printed at start)
//! - `ADDR:HOST:GUEST` — host ADDR:HOST (ADDR an IPv4 address, or `[v6]`)
//! - `unix:PATH:GUEST` — a Unix socket at PATH (must not exist; removed at exit)

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEndpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for HostEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostEndpoint::Tcp(addr) => write!(f, "{addr}"),
            HostEndpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub host: HostEndpoint,
    pub guest_port: u16,
}

fn port(text: &str, what: &str, allow_zero: bool) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) if !allow_zero => Err(format!("{what} port must be 1..=65535, got 0")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!(
            "{what} port must be a number 0..=65535, got {text:?}"
        )),
    }
}

impl FromStr for Publish {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!(
                "bad --publish {spec:?}: {why} (forms: GUEST, HOST:GUEST, ADDR:HOST:GUEST, \
                 unix:PATH:GUEST)"
            )
        };
        if let Some(rest) = spec.strip_prefix("unix:") {
            let (path, guest) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("no guest port after the socket path".into()))?;
            if path.is_empty() {
                return Err(bad("empty socket path".into()));
            }
            return Ok(Publish {
                host: HostEndpoint::Unix(PathBuf::from(path)),
                guest_port: port(guest, "guest", false).map_err(bad)?,
            });
        }
        let (head, guest) = match spec.rsplit_once(':') {
            Some((head, guest)) => (Some(head), guest),
            None => (None, spec),
        };
        let guest_port = port(guest, "guest", false).map_err(bad)?;
        let host = match head {
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), guest_port),
            Some(head) => match head.rsplit_once(':') {
                None => SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port(head, "host", true).map_err(bad)?,
                ),
                Some((addr, host_port)) => {
                    let addr = addr
                        .strip_prefix('[')
                        .and_then(|a| a.strip_suffix(']'))
                        .unwrap_or(addr);
                    let ip: IpAddr = addr
                        .parse()
                        .map_err(|_| bad(format!("{addr:?} is not an IP address")))?;
                    SocketAddr::new(ip, port(host_port, "host", true).map_err(bad)?)
                }
            },
        };
        Ok(Publish {
            host: HostEndpoint::Tcp(host),
            guest_port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(s: &str) -> HostEndpoint {
        HostEndpoint::Tcp(s.parse().unwrap())
    }

    #[test]
    fn forms() {
        let p: Publish = "3000".parse().unwrap();
        assert_eq!((p.host, p.guest_port), (tcp("127.0.0.1:3000"), 3000));
        let p: Publish = "8080:3000".parse().unwrap();
        assert_eq!((p.host, p.guest_port), (tcp("127.0.0.1:8080"), 3000));
        let p: Publish = "0:3000".parse().unwrap();
        assert_eq!(p.host, tcp("127.0.0.1:0"));
        let p: Publish = "0.0.0.0:8080:80".parse().unwrap();
        assert_eq!((p.host, p.guest_port), (tcp("0.0.0.0:8080"), 80));
        let p: Publish = "[::1]:8080:80".parse().unwrap();
        assert_eq!(p.host, tcp("[::1]:8080"));
        let p: Publish = "unix:/tmp/a:b.sock:80".parse().unwrap();
        assert_eq!(
            (p.host, p.guest_port),
            (HostEndpoint::Unix("/tmp/a:b.sock".into()), 80)
        );
    }

    #[test]
    fn bad_specs_say_why() {
        for (spec, needle) in [
            ("", "guest port must be a number"),
            ("0", "guest port must be 1..=65535"),
            ("8080:70000", "guest port must be a number"),
            ("x:80", "host port must be a number"),
            ("nothost:1:80", "is not an IP address"),
            ("unix::80", "empty socket path"),
            ("unix:/tmp/s", "no guest port"),
        ] {
            let err = spec.parse::<Publish>().unwrap_err();
            assert!(err.contains(needle), "{spec:?}: {err}");
            assert!(err.contains("forms:"), "{err}");
        }
    }
}
