//! The exec audit log: one JSON line per `/sandbox/exec` (who asked, what ran, how it ended),
//! appended to a file opened before the VM starts (`serve --audit-log`, the config file's
//! "audit-log" section or `PUT /audit-log`). Job threads write to it; their seccomp filter allows
//! `write` but not opening files, so the file is opened on the VMM thread beforehand.
//!
//! Never logged: stdin, stdout or stderr contents, and env values (they often hold secrets):
//! only their sizes and the env names.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// The API client that sent a request, from SO_PEERCRED of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Peer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub struct ExecRecord<'a> {
    /// RFC 3339, UTC, when the exec ended.
    pub time: String,
    /// `serve --id`.
    pub sandbox_id: &'a str,
    pub argv: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    pub env_keys: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin_bytes: Option<usize>,
    /// [`super::exec_metrics::ExecOutcome::as_str`].
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the request's arrival to its end.
    pub duration_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
}

/// `time` for a record made now.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// An append-only audit file.
pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    /// `file` must be open for appending (O_APPEND), so each line lands whole at the end even if
    /// another process appends too.
    pub fn new(file: File) -> Self {
        Self {
            file: Mutex::new(file),
        }
    }

    /// Appends `record` as one line. A failure is logged, not returned: the exec itself is done
    /// and its client has its answer.
    pub fn append(&self, record: &ExecRecord) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("cannot encode an exec audit record: {e}");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // One write(2) per line: with O_APPEND the line is never interleaved with another.
        if let Err(e) = file.write_all(&line) {
            tracing::error!("cannot write the exec audit log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_single_json_lines_without_empty_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap()
        };
        let argv = vec!["sh".to_string(), "-c".into(), "echo \"hi\"\nexit 3".into()];
        let record = ExecRecord {
            time: now_rfc3339(),
            sandbox_id: "sbx-1",
            argv: &argv,
            cwd: None,
            user: None,
            env_keys: vec!["TOKEN"],
            stdin_bytes: Some(5),
            outcome: "exited_nonzero",
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            error: None,
            duration_ms: 12,
            stdout_bytes: 3,
            stderr_bytes: 0,
            peer: Some(Peer {
                pid: Some(42),
                uid: 0,
                gid: 0,
            }),
        };
        AuditLog::new(open()).append(&record);
        AuditLog::new(open()).append(&record);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let value: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(value["argv"][2], "echo \"hi\"\nexit 3");
        assert_eq!(value["exit_code"], 3);
        assert_eq!(value["peer"]["pid"], 42);
        assert!(value.get("signal").is_none() && value.get("cwd").is_none());
        let time = value["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.len() == 24, "{time}");
        humantime::parse_rfc3339(time).unwrap();
    }
}
