//! The VM's counters as FlushMetrics' JSON line and as `GET /metrics` Prometheus text.

use std::fmt::Write;

use crate::vstate::exit_counts::ExitReason;

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub id: String,
    /// As GET / reports it.
    pub state: String,
    pub api_requests: u64,
    /// From the start of VM building to the first KVM_RUN.
    pub boot_time_us: Option<u64>,
    pub uptime_ms: Option<u64>,
    pub vcpu_exits: Vec<(ExitReason, u64)>,
}

impl MetricsSnapshot {
    /// One line of JSON, newline-terminated (Firecracker's metrics file holds one per flush).
    pub fn json_line(&self, utc_timestamp_ms: u64) -> String {
        let exits: serde_json::Map<String, serde_json::Value> = self
            .vcpu_exits
            .iter()
            .map(|(reason, count)| (reason.as_str().to_string(), (*count).into()))
            .collect();
        let mut line = serde_json::json!({
            "utc_timestamp_ms": utc_timestamp_ms,
            "id": self.id,
            "state": self.state,
            "api_requests": self.api_requests,
            "boot_time_us": self.boot_time_us,
            "uptime_ms": self.uptime_ms,
            "vcpu_exits": exits,
        })
        .to_string();
        line.push('\n');
        line
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let id = escape_label(&self.id);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{id=\"{id}\"{labels}}} {value}");
            }
        };
        metric(
            "agentvm_api_requests_total",
            "counter",
            "API requests received.",
            &[(String::new(), self.api_requests.to_string())],
        );
        let states = ["Not started", "Running", "Paused", "Stopped"];
        let state_samples: Vec<_> = states
            .iter()
            .map(|s| {
                (
                    format!(",state=\"{s}\""),
                    u8::from(self.state == *s).to_string(),
                )
            })
            .collect();
        metric(
            "agentvm_vm_state",
            "gauge",
            "1 for the VM's current state.",
            &state_samples,
        );
        if let Some(us) = self.boot_time_us {
            metric(
                "agentvm_boot_time_seconds",
                "gauge",
                "From the start of VM building to the first guest entry.",
                &[(String::new(), format!("{:.6}", us as f64 / 1e6))],
            );
        }
        if let Some(ms) = self.uptime_ms {
            metric(
                "agentvm_uptime_seconds",
                "gauge",
                "Since InstanceStart.",
                &[(String::new(), format!("{:.3}", ms as f64 / 1e3))],
            );
        }
        let exits: Vec<_> = self
            .vcpu_exits
            .iter()
            .map(|(r, n)| (format!(",reason=\"{}\"", r.as_str()), n.to_string()))
            .collect();
        metric(
            "agentvm_vcpu_exits_total",
            "counter",
            "vCPU exits to the VMM, by reason.",
            &exits,
        );
        out
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            id: "a\"b".into(),
            state: "Running".into(),
            api_requests: 7,
            boot_time_us: Some(1500),
            uptime_ms: None,
            vcpu_exits: vec![(ExitReason::IoOut, 42), (ExitReason::Fatal, 0)],
        }
    }

    #[test]
    fn prometheus_text_has_types_labels_and_values() {
        let text = snapshot().prometheus();
        assert!(
            text.contains("# TYPE agentvm_vcpu_exits_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("agentvm_vcpu_exits_total{id=\"a\\\"b\",reason=\"io_out\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("agentvm_vm_state{id=\"a\\\"b\",state=\"Running\"} 1\n"));
        assert!(text.contains("agentvm_vm_state{id=\"a\\\"b\",state=\"Paused\"} 0\n"));
        assert!(text.contains("agentvm_boot_time_seconds{id=\"a\\\"b\"} 0.001500\n"));
        assert!(!text.contains("agentvm_uptime_seconds"), "{text}");
    }

    #[test]
    fn json_line_is_one_line_of_json() {
        let line = snapshot().json_line(5);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["vcpu_exits"]["io_out"], 42);
        assert_eq!(value["utc_timestamp_ms"], 5);
        assert!(value["uptime_ms"].is_null());
    }
}
