//! Reading what a child VMM measured: its timing report (`--report-timings FILE`, written by
//! `cli/timings.rs`) and its memory from /proc.

use std::path::Path;

use serde::Deserialize;

pub use vmm::process_stats::{rss_of, Rss as RssKib};

/// The VMM's own milestones (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct VmmTimings {
    pub build_start_ns: u64,
    pub kvm_ready_ns: u64,
    pub kernel_loaded_ns: u64,
    pub first_kvm_run_ns: Option<u64>,
    pub rss_before_guest: RssKib,
}

/// Host-side times (CLOCK_MONOTONIC ns) of `agentvm run`: its client connected to the guest agent,
/// and the command's exit status arrived.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct GuestMilestones {
    pub agent_ready_ns: Option<u64>,
    pub result_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct TimingReport {
    pub process_start_ns: u64,
    pub vmm: VmmTimings,
    pub guest: Option<GuestMilestones>,
    /// VMM memory when the report was written, after the VM was torn down.
    pub rss_end: RssKib,
}

pub fn read_report(path: &Path) -> Result<TimingReport, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the timing report {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("the timing report {} is malformed: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_fieldwise() {
        let a = RssKib {
            total_kib: 10,
            anon_kib: 1,
            file_kib: 5,
            shmem_kib: 0,
        };
        let b = RssKib {
            total_kib: 8,
            anon_kib: 4,
            file_kib: 2,
            shmem_kib: 3,
        };
        assert_eq!(
            a.max(b),
            RssKib {
                total_kib: 10,
                anon_kib: 4,
                file_kib: 5,
                shmem_kib: 3
            }
        );
    }

    #[test]
    fn reads_the_report_cli_timings_writes() {
        use vmm::process_stats::Rss;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let rss = Rss {
            total_kib: 9,
            anon_kib: 3,
            file_kib: 5,
            shmem_kib: 1,
        };
        let timings = vmm::vmm::BootTimings {
            build_start_ns: 11,
            kvm_ready_ns: 12,
            kernel_loaded_ns: 13,
            vcpus_started_ns: 14,
            first_kvm_run_ns: Some(15),
            rss_before_guest: Some(rss),
        };
        let guest = crate::cli::timings::GuestMilestones {
            agent_ready_ns: Some(20),
            result_ns: Some(21),
            agent_ready_guest_boottime_ns: Some(5),
        };
        crate::cli::timings::write_report(&path, &timings, Some(guest)).unwrap();
        let r = read_report(&path).unwrap();
        assert!(r.process_start_ns > 0);
        assert_eq!(r.vmm.kvm_ready_ns, 12);
        assert_eq!(r.vmm.first_kvm_run_ns, Some(15));
        assert_eq!(r.vmm.rss_before_guest.anon_kib, 3);
        assert_eq!(r.vmm.rss_before_guest.shmem_kib, 1);
        let g = r.guest.unwrap();
        assert_eq!((g.agent_ready_ns, g.result_ns), (Some(20), Some(21)));
        assert!(r.rss_end.total_kib > 0);

        std::fs::write(&path, "{}").unwrap();
        assert!(read_report(&path).unwrap_err().contains("malformed"));
        let err = read_report(&dir.path().join("none.json")).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }
}
