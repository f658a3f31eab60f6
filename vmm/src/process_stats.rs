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

/// Resident memory of this process, split the way /proc reports it. Guest RAM is a memfd, so the
/// pages the VMM or guest touched show up as `shmem`; `anon` is the VMM's own heap and stacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rss {
    pub total_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

pub fn rss() -> Rss {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    parse_rss(&status)
}

fn parse_rss(status: &str) -> Rss {
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Rss {
        total_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
        shmem_kib: field("RssShmem:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let s = "Name:\tagentvm\nVmRSS:\t  5000 kB\nRssAnon:\t  3000 kB\nRssFile:\t  1500 kB\nRssShmem:\t   500 kB\n";
        assert_eq!(
            parse_rss(s),
            Rss {
                total_kib: 5000,
                anon_kib: 3000,
                file_kib: 1500,
                shmem_kib: 500
            }
        );
        let me = rss();
        assert!(me.total_kib > 0 && me.anon_kib > 0);
    }

    #[test]
    fn monotonic_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
