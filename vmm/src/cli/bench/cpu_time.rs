//! Host CPU time of a VMM process, from /proc: what the host pays per guest request, which does
//! not depend on how fast the guest runs.
//!
//! Each thread's time is the first field of `/proc/<pid>/task/<tid>/schedstat` (ns on the CPU,
//! exact for threads that are not running at the time of the read). vCPU threads are counted
//! apart: their time includes the guest's own execution, the rest is the VMM's device and
//! vsock work. Kernel threads working for the VMM (vhost workers, `vhost-<pid>` before Linux 6.4
//! made them threads of the process) are counted with the rest.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// CPU time in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTime {
    /// vCPU threads (guest execution included).
    pub vcpu_ns: u64,
    /// Every other thread of the VMM, and its vhost workers.
    pub host_ns: u64,
}

impl CpuTime {
    /// The time spent between `earlier` and `self` (zero where a counter went back, which only a
    /// thread that ended can cause).
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            vcpu_ns: self.vcpu_ns.saturating_sub(earlier.vcpu_ns),
            host_ns: self.host_ns.saturating_sub(earlier.host_ns),
        }
    }

    pub fn total_ns(self) -> u64 {
        self.vcpu_ns + self.host_ns
    }
}

/// The CPU time of process `pid`'s threads plus that of the kernel threads `helpers`.
pub fn cpu_time_of(pid: u32, helpers: &[u32]) -> Result<CpuTime, String> {
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    let entries = std::fs::read_dir(&tasks)
        .map_err(|e| format!("cannot list the threads of process {pid}: {e}"))?;
    let mut time = CpuTime::default();
    for entry in entries.flatten() {
        let dir = entry.path();
        // A thread that ended between the listing and the read no longer counts.
        let Some(ns) = thread_ns(&dir) else { continue };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if is_vcpu_thread(comm.trim_end()) {
            time.vcpu_ns += ns;
        } else {
            time.host_ns += ns;
        }
    }
    for helper in helpers {
        if let Some(ns) = thread_ns(&Path::new("/proc").join(helper.to_string())) {
            time.host_ns += ns;
        }
    }
    Ok(time)
}

/// agentvm names its vCPU threads `vcpu<N>`, QEMU `CPU <N>/KVM`.
fn is_vcpu_thread(comm: &str) -> bool {
    let agentvm = comm
        .strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let qemu = comm.starts_with("CPU ") && comm.ends_with("/KVM");
    agentvm || qemu
}

fn thread_ns(dir: &Path) -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string(dir.join("schedstat")) {
        return parse_schedstat(&text);
    }
    // Kernels without CONFIG_SCHED_INFO: utime + stime, in clock ticks.
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    Some(ticks * (1_000_000_000 / clock_ticks_per_second()))
}

fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// utime + stime from /proc/…/stat: fields 14 and 15, counted after the `(comm)` field, which
/// may itself contain spaces and parentheses.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf(3) only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// The vhost worker kernel threads of process `pid` (named `vhost-<pid>`).
pub fn vhost_workers(pid: u32) -> Vec<u32> {
    let name = format!("vhost-{pid}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_of_both_vmms_are_recognised() {
        assert!(is_vcpu_thread("vcpu0"));
        assert!(is_vcpu_thread("vcpu12"));
        assert!(is_vcpu_thread("CPU 0/KVM"));
        assert!(!is_vcpu_thread("vcpu"));
        assert!(!is_vcpu_thread("vcpu-io"));
        assert!(!is_vcpu_thread("devices"));
        assert!(!is_vcpu_thread("qemu-system-x86"));
    }

    #[test]
    fn proc_formats_are_parsed() {
        assert_eq!(parse_schedstat("123456 789 10\n"), Some(123456));
        assert_eq!(parse_schedstat(""), None);
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(12));
        assert_eq!(parse_stat_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn differences_never_go_negative() {
        let a = CpuTime {
            vcpu_ns: 10,
            host_ns: 5,
        };
        let b = CpuTime {
            vcpu_ns: 30,
            host_ns: 4,
        };
        assert_eq!(
            b.since(a),
            CpuTime {
                vcpu_ns: 20,
                host_ns: 0
            }
        );
        assert_eq!(b.total_ns(), 34);
    }

    #[test]
    fn this_process_uses_cpu_time() {
        let me = std::process::id();
        let before = cpu_time_of(me, &[]).unwrap();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        // A running thread's counter is brought up to date when it is switched out.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let after = cpu_time_of(me, &[]).unwrap();
        assert!(after.host_ns > before.host_ns, "{before:?} -> {after:?}");
        assert!(cpu_time_of(u32::MAX, &[])
            .unwrap_err()
            .contains("4294967295"));
        assert!(vhost_workers(me).is_empty());
    }
}
