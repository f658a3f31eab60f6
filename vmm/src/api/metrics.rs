//! The VM's counters as FlushMetrics' JSON line and as `GET /metrics` Prometheus text.
//!
//! The text format (exposition format 0.0.4) is written here by hand: it is a few lines per
//! family, and the counters already live where they are counted (vCPU exit atomics, the vsock
//! device's atomics, the exec histogram), so a metrics crate's registry would only copy them into
//! its own types at each scrape; `prometheus-client` would also answer OpenMetrics rather than
//! the plain text Firecracker-era scrapers expect.

use std::fmt::Write;

use devices::virtio::vsock::VsockCounts;

use super::after_restore::AfterRestoreCounts;
use super::exec_metrics::ExecCounts;
use super::net_metrics::{self, NetSnapshot};
use super::request_counts::RequestCount;
use crate::uffd::UffdTotals;
use crate::vstate::exit_counts::ExitReason;

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    pub id: String,
    /// As GET / reports it.
    pub state: String,
    /// API requests answered, by method, route and status.
    pub requests: Vec<RequestCount>,
    /// From the start of VM building to the first KVM_RUN.
    pub boot_time_us: Option<u64>,
    /// From the start of VM building to the VM created with guest memory registered (a
    /// snapshot load: state file read and checked, memory mapped, uffd working set prefetched).
    pub boot_kvm_ready_us: Option<u64>,
    /// From the start of VM building to the guest loaded (kernel and boot tables in memory, or
    /// the snapshot's device, VM and vCPU state restored); the rest to the first KVM_RUN is
    /// starting the vCPU threads.
    pub boot_loaded_us: Option<u64>,
    /// From the VMM process's start to InstanceStart done (the VM running).
    pub start_to_running_us: Option<u64>,
    /// From the VMM process's start to the first `/sandbox/exec` exit status.
    pub start_to_first_exec_us: Option<u64>,
    pub uptime_ms: Option<u64>,
    pub vcpu_exits: Vec<(ExitReason, u64)>,
    /// None: the VM has no vsock device (or is not running).
    pub vsock: Option<VsockCounts>,
    /// None: guest memory is not served by a userfaultfd handler.
    pub uffd: Option<UffdTotals>,
    /// None: the VM has no NIC (or is not running).
    pub net: Option<NetSnapshot>,
    pub exec: ExecCounts,
    /// How the after-restore steps of `PUT /snapshot/load` ended.
    pub after_restore: AfterRestoreCounts,
}

const STATES: [&str; 4] = ["Not started", "Running", "Paused", "Stopped"];

impl MetricsSnapshot {
    /// One line of JSON, newline-terminated (Firecracker's metrics file holds one per flush).
    pub fn json_line(&self, utc_timestamp_ms: u64) -> String {
        let exits: serde_json::Map<String, serde_json::Value> = self
            .vcpu_exits
            .iter()
            .map(|(reason, count)| (reason.as_str().to_string(), (*count).into()))
            .collect();
        let requests: Vec<_> = self
            .requests
            .iter()
            .map(|r| {
                serde_json::json!({
                    "method": r.method, "route": r.route, "status": r.status, "count": r.count,
                })
            })
            .collect();
        let outcomes: serde_json::Map<String, serde_json::Value> = self
            .exec
            .outcomes
            .iter()
            .map(|(outcome, count)| (outcome.as_str().to_string(), (*count).into()))
            .collect();
        let buckets: serde_json::Map<String, serde_json::Value> = self
            .exec
            .latency_buckets
            .iter()
            .map(|(le, count)| (bound(*le), (*count).into()))
            .collect();
        let vsock = self.vsock.map(|v| {
            serde_json::json!({
                "tx_packets": v.tx_packets, "tx_bytes": v.tx_bytes,
                "rx_packets": v.rx_packets, "rx_bytes": v.rx_bytes,
                "tx_dropped_malformed": v.tx_dropped_malformed,
            })
        });
        let uffd = self.uffd.map(|u| {
            serde_json::json!({
                "faults": u.faults, "zero_pages": u.zero_pages, "prefetched_pages": u.prefetched,
                "fault_service_seconds": u.serve_seconds, "prefetch_seconds": u.prefetch_seconds,
            })
        });
        let after_restore: serde_json::Map<String, serde_json::Value> = self
            .after_restore
            .outcomes
            .iter()
            .map(|(outcome, count)| (outcome.as_str().to_string(), (*count).into()))
            .collect();
        let mut line = serde_json::json!({
            "utc_timestamp_ms": utc_timestamp_ms,
            "id": self.id,
            "state": self.state,
            "api_requests": self.requests.iter().map(|r| r.count).sum::<u64>(),
            "api_requests_by_route": requests,
            "boot_time_us": self.boot_time_us,
            "boot_kvm_ready_us": self.boot_kvm_ready_us,
            "boot_loaded_us": self.boot_loaded_us,
            "start_to_running_us": self.start_to_running_us,
            "start_to_first_exec_us": self.start_to_first_exec_us,
            "uptime_ms": self.uptime_ms,
            "vcpu_exits": exits,
            "vsock": vsock,
            "uffd": uffd,
            "net": self.net.as_ref().map(net_metrics::json),
            "exec": {
                "outcomes": outcomes,
                "count": self.exec.count,
                "latency_sum_seconds": self.exec.latency_sum_seconds,
                "latency_buckets": buckets,
            },
            "after_restore": {
                "outcomes": after_restore,
                "last_duration_seconds": self.after_restore.last_duration_seconds,
            },
        })
        .to_string();
        line.push('\n');
        line
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut text = Text::new(&self.id);
        text.family(
            "agentvm_api_requests_total",
            "counter",
            "API requests answered, by method, route template and status.",
        );
        for r in &self.requests {
            text.sample(
                "agentvm_api_requests_total",
                &[
                    ("method", r.method.into()),
                    ("route", r.route.into()),
                    ("status", r.status.to_string()),
                ],
                r.count,
            );
        }
        text.family("agentvm_vm_state", "gauge", "1 for the VM's current state.");
        for state in STATES {
            let current = u8::from(self.state == state);
            text.sample("agentvm_vm_state", &[("state", state.into())], current);
        }
        let seconds = |us: u64| format!("{:.6}", us as f64 / 1e6);
        let gauges = [
            (
                "agentvm_boot_time_seconds",
                "From the start of VM building to the first guest entry.",
                self.boot_time_us,
            ),
            (
                "agentvm_boot_kvm_ready_seconds",
                "From the start of VM building to the VM created with guest memory registered.",
                self.boot_kvm_ready_us,
            ),
            (
                "agentvm_boot_loaded_seconds",
                "From the start of VM building to the guest (kernel or snapshot state) loaded.",
                self.boot_loaded_us,
            ),
            (
                "agentvm_start_to_running_seconds",
                "From the VMM process's start to InstanceStart done.",
                self.start_to_running_us,
            ),
            (
                "agentvm_start_to_first_exec_seconds",
                "From the VMM process's start to the first /sandbox/exec exit status.",
                self.start_to_first_exec_us,
            ),
            (
                "agentvm_uptime_seconds",
                "Since InstanceStart.",
                self.uptime_ms.map(|ms| ms * 1000),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(us) = value {
                text.family(name, "gauge", help);
                text.sample(name, &[], seconds(us));
            }
        }
        text.family(
            "agentvm_vcpu_exits_total",
            "counter",
            "vCPU exits to the VMM, by reason.",
        );
        for (reason, count) in &self.vcpu_exits {
            let labels = [("reason", reason.as_str().into())];
            text.sample("agentvm_vcpu_exits_total", &labels, count);
        }
        if let Some(v) = self.vsock {
            let families = [
                (
                    "agentvm_device_packets_total",
                    "Packets through a device: tx guest to host, rx host to guest.",
                    v.tx_packets,
                    v.rx_packets,
                ),
                (
                    "agentvm_device_bytes_total",
                    "Payload bytes through a device: tx guest to host, rx host to guest.",
                    v.tx_bytes,
                    v.rx_bytes,
                ),
            ];
            for (name, help, tx, rx) in families {
                text.family(name, "counter", help);
                for (direction, n) in [("tx", tx), ("rx", rx)] {
                    let labels = [("device", "vsock".into()), ("direction", direction.into())];
                    text.sample(name, &labels, n);
                }
            }
            const DROPPED: &str = "agentvm_vsock_dropped_packets_total";
            text.family(
                DROPPED,
                "counter",
                "Packets the vsock device refused, by cause and direction: tx malformed is a \
                 guest packet with a bad header, addressing or length, or a chain it cannot read.",
            );
            let labels = [("cause", "malformed".into()), ("direction", "tx".into())];
            text.sample(DROPPED, &labels, v.tx_dropped_malformed);
        }
        if let Some(net) = &self.net {
            net_metrics::prometheus(&mut text, net);
        }
        if let Some(u) = self.uffd {
            let counters = [
                (
                    "agentvm_uffd_faults_total",
                    "Guest page faults served by the userfaultfd handler (uffd restore).",
                    u.faults.to_string(),
                ),
                (
                    "agentvm_uffd_zero_pages_total",
                    "Of those, pages mapped as the zero page (holes in the memory file).",
                    u.zero_pages.to_string(),
                ),
                (
                    "agentvm_uffd_prefetched_pages_total",
                    "Pages copied in from the recorded working set before the vCPUs ran.",
                    u.prefetched.to_string(),
                ),
                (
                    "agentvm_uffd_fault_service_seconds_total",
                    "Time spent serving faults; faults_total / this = faults served per second.",
                    format!("{:.6}", u.serve_seconds),
                ),
                (
                    "agentvm_uffd_prefetch_seconds_total",
                    "Time spent prefetching the working set.",
                    format!("{:.6}", u.prefetch_seconds),
                ),
            ];
            for (name, help, value) in counters {
                text.family(name, "counter", help);
                text.sample(name, &[], value);
            }
        }
        text.family(
            "agentvm_exec_total",
            "counter",
            "/sandbox/exec calls ended, by outcome.",
        );
        for (outcome, count) in &self.exec.outcomes {
            let labels = [("outcome", outcome.as_str().into())];
            text.sample("agentvm_exec_total", &labels, count);
        }
        const LATENCY: &str = "agentvm_exec_duration_seconds";
        text.family(
            LATENCY,
            "histogram",
            "/sandbox/exec from request to end (exit, error or abandonment).",
        );
        for (le, count) in &self.exec.latency_buckets {
            let labels = [("le", bound(*le))];
            text.sample(&format!("{LATENCY}_bucket"), &labels, count);
        }
        text.sample(
            &format!("{LATENCY}_sum"),
            &[],
            format!("{:.6}", self.exec.latency_sum_seconds),
        );
        text.sample(&format!("{LATENCY}_count"), &[], self.exec.count);
        text.family(
            "agentvm_after_restore_total",
            "counter",
            "After-restore steps (guest clock and entropy refresh after PUT /snapshot/load) \
             ended, by outcome: done, skipped (no guest agent can be there), failed.",
        );
        for (outcome, count) in &self.after_restore.outcomes {
            let labels = [("outcome", outcome.as_str().into())];
            text.sample("agentvm_after_restore_total", &labels, count);
        }
        if let Some(seconds) = self.after_restore.last_duration_seconds {
            const DURATION: &str = "agentvm_after_restore_duration_seconds";
            text.family(
                DURATION,
                "gauge",
                "The last after-restore step, from the restored VM running to its end.",
            );
            text.sample(DURATION, &[], format!("{seconds:.6}"));
        }
        text.out
    }
}

/// A histogram bucket's upper bound as Prometheus writes it.
fn bound(le: f64) -> String {
    if le.is_infinite() {
        "+Inf".into()
    } else {
        le.to_string()
    }
}

/// Text being written, every sample labelled with the instance ID first.
pub(super) struct Text {
    id: String,
    out: String,
}

impl Text {
    fn new(id: &str) -> Self {
        Self {
            id: escape_label(id),
            out: String::new(),
        }
    }

    pub(super) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub(super) fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, String)],
        value: impl std::fmt::Display,
    ) {
        let _ = write!(self.out, "{name}{{id=\"{}\"", self.id);
        for (key, value) in labels {
            let _ = write!(self.out, ",{key}=\"{}\"", escape_label(value));
        }
        let _ = writeln!(self.out, "}} {value}");
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
    use crate::api::after_restore::{AfterRestoreMetrics, AfterRestoreOutcome};
    use crate::api::exec_metrics::{ExecMetrics, ExecOutcome};
    use std::time::Duration;

    fn snapshot() -> MetricsSnapshot {
        let exec = ExecMetrics::default();
        exec.record(ExecOutcome::ExitedNonZero, Duration::from_millis(20));
        let after_restore = AfterRestoreMetrics::default();
        after_restore.record(AfterRestoreOutcome::Skipped, Duration::from_micros(250));
        MetricsSnapshot {
            id: "a\"b".into(),
            state: "Running".into(),
            requests: vec![RequestCount {
                method: "PUT",
                route: "/actions",
                status: 204,
                count: 7,
            }],
            boot_time_us: Some(1500),
            boot_kvm_ready_us: Some(700),
            boot_loaded_us: Some(1200),
            start_to_running_us: Some(2_500_000),
            start_to_first_exec_us: None,
            uptime_ms: None,
            vcpu_exits: vec![(ExitReason::IoOut, 42), (ExitReason::Fatal, 0)],
            vsock: Some(VsockCounts {
                tx_packets: 3,
                tx_bytes: 100,
                rx_packets: 4,
                rx_bytes: 200,
                tx_dropped_malformed: 5,
            }),
            uffd: Some(UffdTotals {
                faults: 12,
                zero_pages: 2,
                prefetched: 30,
                serve_seconds: 0.003,
                prefetch_seconds: 0.001,
            }),
            net: Some((
                devices::virtio::net::NetCounts {
                    tx_frames: 5,
                    rx_bytes: 900,
                    rx_dropped_runt: 1,
                    ..Default::default()
                },
                egress::EgressStats {
                    connections_denied: 2,
                    dns_queries: 3,
                    ..Default::default()
                },
            )),
            exec: exec.snapshot(),
            after_restore: after_restore.snapshot(),
        }
    }

    #[test]
    fn prometheus_text_has_types_labels_and_values() {
        let text = snapshot().prometheus();
        let has = |line: &str| assert!(text.contains(line), "{line:?} missing from:\n{text}");
        has("# TYPE agentvm_vcpu_exits_total counter\n");
        has("agentvm_vcpu_exits_total{id=\"a\\\"b\",reason=\"io_out\"} 42\n");
        has("agentvm_vm_state{id=\"a\\\"b\",state=\"Running\"} 1\n");
        has("agentvm_vm_state{id=\"a\\\"b\",state=\"Paused\"} 0\n");
        has("agentvm_boot_time_seconds{id=\"a\\\"b\"} 0.001500\n");
        has("agentvm_boot_kvm_ready_seconds{id=\"a\\\"b\"} 0.000700\n");
        has("agentvm_boot_loaded_seconds{id=\"a\\\"b\"} 0.001200\n");
        has("agentvm_start_to_running_seconds{id=\"a\\\"b\"} 2.500000\n");
        has("agentvm_api_requests_total{id=\"a\\\"b\",method=\"PUT\",route=\"/actions\",status=\"204\"} 7\n");
        has("agentvm_device_bytes_total{id=\"a\\\"b\",device=\"vsock\",direction=\"rx\"} 200\n");
        has("agentvm_vsock_dropped_packets_total{id=\"a\\\"b\",cause=\"malformed\",direction=\"tx\"} 5\n");
        has("agentvm_exec_total{id=\"a\\\"b\",outcome=\"exited_nonzero\"} 1\n");
        has("agentvm_net_frames_total{id=\"a\\\"b\",direction=\"tx\"} 5\n");
        has("agentvm_net_bytes_total{id=\"a\\\"b\",direction=\"rx\"} 900\n");
        has("agentvm_net_dropped_frames_total{id=\"a\\\"b\",cause=\"runt\",direction=\"rx\"} 1\n");
        has("agentvm_egress_connections_total{id=\"a\\\"b\",decision=\"denied\"} 2\n");
        has("agentvm_egress_dns_queries_total{id=\"a\\\"b\"} 3\n");
        has("# TYPE agentvm_exec_duration_seconds histogram\n");
        has("agentvm_uffd_faults_total{id=\"a\\\"b\"} 12\n");
        has("agentvm_uffd_prefetched_pages_total{id=\"a\\\"b\"} 30\n");
        has("agentvm_uffd_fault_service_seconds_total{id=\"a\\\"b\"} 0.003000\n");
        has("agentvm_exec_duration_seconds_bucket{id=\"a\\\"b\",le=\"0.01\"} 0\n");
        has("agentvm_exec_duration_seconds_bucket{id=\"a\\\"b\",le=\"0.025\"} 1\n");
        has("agentvm_exec_duration_seconds_bucket{id=\"a\\\"b\",le=\"+Inf\"} 1\n");
        has("agentvm_exec_duration_seconds_count{id=\"a\\\"b\"} 1\n");
        has("agentvm_exec_duration_seconds_sum{id=\"a\\\"b\"} 0.020000\n");
        has("agentvm_after_restore_total{id=\"a\\\"b\",outcome=\"skipped\"} 1\n");
        has("agentvm_after_restore_total{id=\"a\\\"b\",outcome=\"done\"} 0\n");
        has("agentvm_after_restore_duration_seconds{id=\"a\\\"b\"} 0.000250\n");
        assert!(!text.contains("agentvm_uptime_seconds"), "{text}");
        assert!(!text.contains("agentvm_start_to_first_exec"), "{text}");
    }

    #[test]
    fn json_line_is_one_line_of_json() {
        let line = snapshot().json_line(5);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["vcpu_exits"]["io_out"], 42);
        assert_eq!(value["utc_timestamp_ms"], 5);
        assert_eq!(value["api_requests"], 7);
        assert_eq!(value["api_requests_by_route"][0]["route"], "/actions");
        assert_eq!(value["vsock"]["tx_bytes"], 100);
        assert_eq!(value["net"]["rx_bytes"], 900);
        assert_eq!(value["net"]["egress"]["connections_denied"], 2);
        assert_eq!(value["exec"]["outcomes"]["exited_nonzero"], 1);
        assert_eq!(value["exec"]["latency_buckets"]["+Inf"], 1);
        assert!(value["uptime_ms"].is_null());
        assert_eq!(value["after_restore"]["outcomes"]["skipped"], 1);
        assert_eq!(value["after_restore"]["last_duration_seconds"], 0.00025);
    }
}
