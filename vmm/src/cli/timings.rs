//! The JSON timing report of one run (`--report-timings FILE`), read by `agentvm bench`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;
use vmm::process_stats::{self, monotonic_ns, Rss};
use vmm::vmm::BootTimings;

static PROCESS_START_NS: OnceLock<u64> = OnceLock::new();

/// Called first thing in `main`: the closest the process can get to its own exec time.
pub fn mark_process_start() {
    let _ = PROCESS_START_NS.set(monotonic_ns());
}

/// CLOCK_MONOTONIC ns of [`mark_process_start`] (now, if it was not called).
pub fn process_start_ns() -> u64 {
    *PROCESS_START_NS.get_or_init(monotonic_ns)
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
    ReportFile::create(path)?.write(vmm, guest)
}

/// The report's file and the /proc file its end memory is read from, both opened up front: the
/// `vmm` seccomp filter lets the main thread write and read them but not open anything.
pub struct ReportFile {
    path: PathBuf,
    file: File,
    status: File,
}

impl ReportFile {
    pub fn create(path: &Path) -> Result<Self, String> {
        let file = File::create(path)
            .map_err(|e| format!("cannot create the timing report {}: {e}", path.display()))?;
        let status = File::open(process_stats::SELF_STATUS)
            .map_err(|e| format!("cannot open {}: {e}", process_stats::SELF_STATUS))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            status,
        })
    }

    pub fn write(
        mut self,
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
            rss_end: process_stats::rss_from(&mut self.status),
        };
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| format!("cannot encode the timing report: {e}"))?;
        self.file.write_all(json.as_bytes()).map_err(|e| {
            format!(
                "cannot write the timing report {}: {e}",
                self.path.display()
            )
        })
    }
}
