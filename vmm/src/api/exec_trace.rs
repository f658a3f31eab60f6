//! One `/sandbox/exec` followed from its request to its end, on its job thread: output sizes are
//! counted as events pass, and the end goes to the exec metrics and the audit log exactly once
//! (a job that ends any other way, e.g. its HTTP client went away, is recorded as abandoned when
//! the trace is dropped).

use std::sync::Arc;
use std::time::Instant;

use agentvm_client::ExecEvent;
use agentvm_protocol::ExitStatus;

use super::audit::{now_rfc3339, AuditLog, ExecRecord, Peer};
use super::exec_metrics::{ExecMetrics, ExecOutcome};
use super::models::SandboxExec;

/// Where exec ends are reported; handed out by the controller.
#[derive(Clone)]
pub struct ExecObserver {
    pub sandbox_id: String,
    pub metrics: ExecMetrics,
    pub audit: Option<Arc<AuditLog>>,
}

/// How an exec ended, as its job saw it.
pub enum ExecEnd {
    Exited { status: ExitStatus, timed_out: bool },
    Failed(String),
}

pub struct ExecTrace {
    observer: ExecObserver,
    began: Instant,
    argv: Vec<String>,
    cwd: Option<String>,
    user: Option<String>,
    env_keys: Vec<String>,
    stdin_bytes: Option<usize>,
    peer: Option<Peer>,
    stdout_bytes: u64,
    stderr_bytes: u64,
    ended: bool,
}

impl ExecTrace {
    /// `began`: when the request arrived. Keeps the request's names and sizes, never its stdin
    /// or env values.
    pub fn new(
        observer: ExecObserver,
        request: &SandboxExec,
        user: Option<&str>,
        peer: Option<Peer>,
        began: Instant,
    ) -> Self {
        Self {
            observer,
            began,
            argv: request.cmd.clone(),
            cwd: request.cwd.clone(),
            user: user.map(str::to_owned),
            env_keys: request
                .env
                .iter()
                .flatten()
                .map(|(k, _)| k.clone())
                .collect(),
            stdin_bytes: request.stdin.as_ref().map(String::len),
            peer,
            stdout_bytes: 0,
            stderr_bytes: 0,
            ended: false,
        }
    }

    /// Counts an output event's bytes.
    pub fn saw(&mut self, event: &ExecEvent) {
        match event {
            ExecEvent::Stdout(bytes) => self.stdout_bytes += bytes.len() as u64,
            ExecEvent::Stderr(bytes) => self.stderr_bytes += bytes.len() as u64,
            ExecEvent::Exited { .. } => {}
        }
    }

    pub fn end(mut self, end: ExecEnd) {
        self.record(Some(end));
    }

    fn record(&mut self, end: Option<ExecEnd>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let duration = self.began.elapsed();
        let (outcome, exit_code, signal, timed_out, error) = match end {
            Some(ExecEnd::Exited { status, timed_out }) => {
                let (code, signal) = match status {
                    ExitStatus::Code(code) => (Some(code), None),
                    ExitStatus::Signal(signal) => (None, Some(signal)),
                };
                let outcome = match (timed_out, code) {
                    (true, _) => ExecOutcome::TimedOut,
                    (false, Some(0)) => ExecOutcome::ExitedZero,
                    (false, Some(_)) => ExecOutcome::ExitedNonZero,
                    (false, None) => ExecOutcome::Signalled,
                };
                (outcome, code, signal, timed_out, None)
            }
            Some(ExecEnd::Failed(error)) => (ExecOutcome::Error, None, None, false, Some(error)),
            None => (ExecOutcome::Abandoned, None, None, false, None),
        };
        self.observer.metrics.record(outcome, duration);
        if let Some(audit) = &self.observer.audit {
            audit.append(&ExecRecord {
                time: now_rfc3339(),
                sandbox_id: &self.observer.sandbox_id,
                argv: &self.argv,
                cwd: self.cwd.as_deref(),
                user: self.user.as_deref(),
                env_keys: self.env_keys.iter().map(String::as_str).collect(),
                stdin_bytes: self.stdin_bytes,
                outcome: outcome.as_str(),
                exit_code,
                signal,
                timed_out,
                error,
                duration_ms: duration.as_millis() as u64,
                stdout_bytes: self.stdout_bytes,
                stderr_bytes: self.stderr_bytes,
                peer: self.peer,
            });
        }
    }
}

impl Drop for ExecTrace {
    fn drop(&mut self) {
        self.record(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::parse_body;

    #[test]
    fn ends_are_recorded_once_with_sizes_but_no_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let observer = ExecObserver {
            sandbox_id: "s1".into(),
            metrics: ExecMetrics::default(),
            audit: Some(Arc::new(AuditLog::new(file))),
        };
        let request: SandboxExec = parse_body(
            "x",
            br#"{"cmd":["cat"],"env":{"API_KEY":"hunter2"},"stdin":"top secret"}"#,
        )
        .unwrap();
        let mut trace = ExecTrace::new(observer.clone(), &request, None, None, Instant::now());
        trace.saw(&ExecEvent::Stdout(b"top secret".to_vec()));
        trace.saw(&ExecEvent::Stderr(b"!".to_vec()));
        trace.end(ExecEnd::Exited {
            status: ExitStatus::Signal(9),
            timed_out: true,
        });
        drop(ExecTrace::new(
            observer.clone(),
            &request,
            None,
            None,
            Instant::now(),
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("top secret"),
            "{text}"
        );
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["outcome"], "timed_out");
        assert_eq!(lines[0]["signal"], 9);
        assert_eq!(lines[0]["env_keys"], serde_json::json!(["API_KEY"]));
        assert_eq!(lines[0]["stdin_bytes"], 10);
        assert_eq!(
            (&lines[0]["stdout_bytes"], &lines[0]["stderr_bytes"]),
            (&10.into(), &1.into())
        );
        assert_eq!(lines[1]["outcome"], "abandoned");
        let counts = observer.metrics.snapshot();
        assert!(counts.outcomes.contains(&(ExecOutcome::TimedOut, 1)));
        assert!(counts.outcomes.contains(&(ExecOutcome::Abandoned, 1)));
    }
}
