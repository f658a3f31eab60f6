//! Clock and memory readings of the VMM process itself, for boot-path timings and benchmarks.

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host (an `Instant` is not),
/// so a benchmark can measure from before it spawns the VMM to a milestone inside it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid, exclusively borrowed location.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Resident memory of a process in KiB, split the way /proc reports it. Guest RAM is a memfd, so
/// the pages the VMM touched show up as `shmem`; kernel and initrd pages are private file
/// mappings (`file`, `anon` once the guest writes them); the rest of `anon` is the VMM's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rss {
    pub total_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

impl Rss {
    /// Field-wise maximum: the peak of each figure over a series of samples.
    pub fn max(self, other: Rss) -> Rss {
        Rss {
            total_kib: self.total_kib.max(other.total_kib),
            anon_kib: self.anon_kib.max(other.anon_kib),
            file_kib: self.file_kib.max(other.file_kib),
            shmem_kib: self.shmem_kib.max(other.shmem_kib),
        }
    }
}

/// Where this process's memory figures are.
pub const SELF_STATUS: &str = "/proc/self/status";

/// This process's memory.
pub fn rss() -> Rss {
    let status = std::fs::read_to_string(SELF_STATUS).unwrap_or_default();
    parse_rss(&status).unwrap_or_default()
}

/// This process's memory, read again from an already open [`SELF_STATUS`] (for threads whose
/// seccomp filter allows no open).
pub fn rss_from(status: &mut std::fs::File) -> Rss {
    use std::io::{Read, Seek, SeekFrom};
    if status.seek(SeekFrom::Start(0)).is_err() {
        return Rss::default();
    }
    // Plain reads: File::read_to_string first asks statx for the size, which the `vmm` seccomp
    // filter does not allow (and /proc files report 0 anyway).
    let mut text = Vec::with_capacity(4096);
    let mut chunk = [0u8; 1024];
    loop {
        match status.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Rss::default(),
        }
    }
    parse_rss(&String::from_utf8_lossy(&text)).unwrap_or_default()
}

/// The memory of process `pid`; `None` once it is gone (or /proc cannot be read).
pub fn rss_of(pid: u32) -> Option<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss(&status)
}

/// One field of `/proc/<pid>/smaps_rollup` (`Pss`, `Private_Dirty`, ...) in KiB; `pid` None is
/// this process.
pub fn smaps_rollup_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/smaps_rollup"),
        None => "/proc/self/smaps_rollup".to_string(),
    };
    let rollup = std::fs::read_to_string(path).ok()?;
    rollup.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|v| v.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

fn parse_rss(status: &str) -> Option<Rss> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    // A zombie has no memory lines left: that is "gone", not "zero".
    Some(Rss {
        total_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
        shmem_kib: field("RssShmem:").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let s = "Name:\tagentvm\nVmRSS:\t  5000 kB\nRssAnon:\t  3000 kB\nRssFile:\t  1500 kB\nRssShmem:\t   500 kB\n";
        assert_eq!(
            parse_rss(s).unwrap(),
            Rss {
                total_kib: 5000,
                anon_kib: 3000,
                file_kib: 1500,
                shmem_kib: 500
            }
        );
        assert_eq!(parse_rss("Name:\tzombie\nState:\tZ (zombie)\n"), None);
        let me = rss();
        assert!(me.total_kib > 0 && me.anon_kib > 0);
        let mut status = std::fs::File::open(SELF_STATUS).unwrap();
        for _ in 0..2 {
            assert!(
                rss_from(&mut status).total_kib > 0,
                "read again after a seek"
            );
        }
        assert_eq!(rss_of(u32::MAX), None);
    }

    #[test]
    fn monotonic_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
