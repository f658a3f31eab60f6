//! The JSON timing report of one run (`--report-timings FILE`), read by `agentvm bench`.

use std::path::Path;
use std::sync::OnceLock;

use serde::Serialize;
use vmm::process_stats::{self, monotonic_ns, Rss};
use vmm::vmm::BootTimings;

static PROCESS_START_NS: OnceLock<u64> = OnceLock::new();

/// Called first thing in `main`: the closest the process can get to its own exec time.
pub fn mark_process_start() {
    let _ = PROCESS_START_NS.set(monotonic_ns());
}

/// What the guest agent reported, as host-side arrival times (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestMilestones {
    pub agent_ready_ns: Option<u64>,
    pub result_ns: Option<u64>,
    /// The agent's own CLOCK_BOOTTIME at ready: guest kernel boot + agent start, seen from inside.
    pub agent_ready_guest_boottime_ns: Option<u64>,
}

#[derive(Serialize)]
struct Report<'a> {
    process_start_ns: u64,
    vmm: &'a BootTimings,
    guest: Option<GuestMilestones>,
    end_ns: u64,
    rss_end: Rss,
}

pub fn write_report(
    path: &Path,
    vmm: &BootTimings,
    guest: Option<GuestMilestones>,
) -> Result<(), String> {
    let report = Report {
        process_start_ns: PROCESS_START_NS
            .get()
            .copied()
            .unwrap_or(vmm.build_start_ns),
        vmm,
        guest,
        end_ns: monotonic_ns(),
        rss_end: process_stats::rss(),
    };
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| format!("cannot encode the timing report: {e}"))?;
    std::fs::write(path, json)
        .map_err(|e| format!("cannot write the timing report {}: {e}", path.display()))
}
