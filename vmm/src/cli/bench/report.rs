//! Reading what a child VMM measured: its timing report (`--report-timings FILE`, written by
//! `cli/timings.rs`) and its memory from /proc.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Resident memory in KiB, split as /proc/<pid>/status reports it. For agentvm, guest RAM is a
/// memfd and shows up as `shmem`, so `anon` is the VMM's own memory; QEMU's guest RAM is
/// anonymous and shows up in `anon`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssKib {
    pub total_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

impl RssKib {
    /// Field-wise maximum: the peak of each figure over a series of samples.
    pub fn max(self, other: RssKib) -> RssKib {
        RssKib {
            total_kib: self.total_kib.max(other.total_kib),
            anon_kib: self.anon_kib.max(other.anon_kib),
            file_kib: self.file_kib.max(other.file_kib),
            shmem_kib: self.shmem_kib.max(other.shmem_kib),
        }
    }
}

/// The memory of process `pid`; `None` once it is gone (or /proc cannot be read).
pub fn rss_of(pid: u32) -> Option<RssKib> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&status)
}

fn parse_status(status: &str) -> Option<RssKib> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    // A zombie has no memory lines left: that is "gone", not "zero".
    Some(RssKib {
        total_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
        shmem_kib: field("RssShmem:").unwrap_or(0),
    })
}

/// The VMM's own milestones (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct VmmTimings {
    pub build_start_ns: u64,
    pub kvm_ready_ns: u64,
    pub kernel_loaded_ns: u64,
    pub first_kvm_run_ns: Option<u64>,
    pub rss_before_guest: RssKib,
}

/// Host-side arrival times of the guest agent's markers (CLOCK_MONOTONIC ns).
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
    fn parses_proc_status_and_treats_zombies_as_gone() {
        let s = "Name:\tqemu\nVmRSS:\t  5000 kB\nRssAnon:\t  3000 kB\nRssFile:\t  1500 kB\nRssShmem:\t   500 kB\n";
        assert_eq!(
            parse_status(s),
            Some(RssKib {
                total_kib: 5000,
                anon_kib: 3000,
                file_kib: 1500,
                shmem_kib: 500
            })
        );
        assert_eq!(parse_status("Name:\tx\nState:\tZ (zombie)\n"), None);
        let me = rss_of(std::process::id()).unwrap();
        assert!(me.total_kib > 0);
    }

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
            rss_before_guest: rss,
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
