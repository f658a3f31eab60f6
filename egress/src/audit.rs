//! The audit log: one JSON line per DNS answer, connection decision, HTTP request and closed
//! connection. Written by the egress thread only; a write error is reported once and the log
//! goes on trying (the sandbox keeps running: losing audit lines is reported, never silent).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tracing::warn;

/// One audited event. Secrets (injected header values) are never part of it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// RFC 3339 UTC with milliseconds; filled in by [`AuditLog::record`] when empty.
    pub time: String,
    /// The sandbox's id.
    pub sandbox: String,
    /// "dns", "connect", "http", "ca" (the guest fetched the sandbox CA), "close", or "fetch"
    /// (an isolate's fetch host call, made by the VMM).
    pub kind: &'static str,
    /// "tcp" / "udp".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// Destination address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_ip: Option<IpAddr>,
    /// Destination port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_port: Option<u16>,
    /// The name looked up (dns) or the names the resolver gave for the address (connect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// TLS server name the guest sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// HTTP Host header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP request target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Guest → upstream bytes.
    pub bytes_up: u64,
    /// Upstream → guest bytes.
    pub bytes_down: u64,
    /// "allow" or "deny".
    pub decision: &'static str,
    /// The rule that allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why it was denied or ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

struct Sink {
    writer: Box<dyn Write + Send>,
    failed: bool,
}

/// Where audit lines go. Cloning shares the destination.
#[derive(Clone, Default)]
pub struct AuditLog {
    sink: Option<Arc<Mutex<Sink>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.sink.is_some() {
            "AuditLog(on)"
        } else {
            "AuditLog(off)"
        })
    }
}

impl AuditLog {
    /// Appends to `path` (created 0600 if missing).
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("audit log {}: {e}", path.display())))?;
        Ok(Self::to_writer(Box::new(file)))
    }

    /// Writes lines to `writer` (tests, the VMM's stderr).
    pub fn to_writer(writer: Box<dyn Write + Send>) -> Self {
        Self {
            sink: Some(Arc::new(Mutex::new(Sink {
                writer,
                failed: false,
            }))),
        }
    }

    /// Records nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Writes `event` as one line (one `write` call, so concurrent readers never see half a line).
    pub fn record(&self, event: &AuditEvent) {
        let Some(sink) = &self.sink else { return };
        let mut line = if event.time.is_empty() {
            let mut stamped = event.clone();
            stamped.time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            serde_json::to_vec(&stamped)
        } else {
            serde_json::to_vec(event)
        }
        .unwrap_or_default();
        line.push(b'\n');
        let mut sink = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = sink
            .writer
            .write_all(&line)
            .and_then(|()| sink.writer.flush());
        match result {
            Err(e) if !sink.failed => {
                sink.failed = true;
                warn!("egress audit log: write failed, lines are being lost: {e}");
            }
            Err(_) => {}
            Ok(()) if sink.failed => {
                sink.failed = false;
                warn!("egress audit log: writing again");
            }
            Ok(()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_json_line_per_event_with_a_time() {
        let shared = Shared::default();
        let log = AuditLog::to_writer(Box::new(shared.clone()));
        log.record(&AuditEvent {
            sandbox: "sb1".into(),
            kind: "connect",
            protocol: Some("tcp"),
            dest_ip: Some("1.2.3.4".parse().unwrap()),
            dest_port: Some(443),
            decision: "deny",
            reason: Some("no egress rule allows this destination".into()),
            ..Default::default()
        });
        log.record(&AuditEvent {
            kind: "dns",
            decision: "allow",
            domain: Some("a.com".into()),
            ..Default::default()
        });
        let text = String::from_utf8(shared.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["dest_ip"], "1.2.3.4");
        assert_eq!(lines[0]["decision"], "deny");
        assert!(lines[0].get("sni").is_none());
        humantime::parse_rfc3339(lines[1]["time"].as_str().unwrap()).unwrap();
    }

    #[test]
    fn file_log_appends() {
        let path = std::env::temp_dir().join(format!("egress-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        for _ in 0..2 {
            AuditLog::open(&path).unwrap().record(&AuditEvent {
                kind: "dns",
                decision: "allow",
                ..Default::default()
            });
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        std::fs::remove_file(&path).unwrap();
        assert!(AuditLog::open(Path::new("/nonexistent/a.jsonl"))
            .unwrap_err()
            .to_string()
            .contains("audit log /nonexistent"));
    }
}
