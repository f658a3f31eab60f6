//! Why the sandbox ended, in words naming the limit, and the jailer's exit status for it.

use std::time::Duration;

use crate::cgroup::{CgroupLimits, LimitHits};
use crate::exit_code;
use crate::sys::{signal_name, ChildExit};

/// What the supervisor saw besides the VMM's own exit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Circumstances {
    /// The jailer killed the sandbox because `--lifetime` passed.
    pub lifetime_exceeded: Option<Duration>,
    /// The signal the jailer forwarded to the VMM (from whoever signalled the jailer).
    pub forwarded: Option<i32>,
    pub limit_hits: LimitHits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// None for a VMM that exited by itself: its status speaks.
    pub message: Option<String>,
    pub exit_code: u8,
}

pub fn describe(exit: ChildExit, seen: &Circumstances, limits: &CgroupLimits) -> Outcome {
    let outcome = |message: String, exit_code| Outcome {
        message: Some(message),
        exit_code,
    };
    if let Some(lifetime) = seen.lifetime_exceeded {
        return outcome(
            format!(
                "sandbox lifetime of {} s exceeded: the VMM was killed",
                lifetime.as_secs()
            ),
            exit_code::LIFETIME,
        );
    }
    let failed = exit != ChildExit::Code(0);
    if failed && seen.limit_hits.oom_kills > 0 {
        let mib = limits.memory_limit_mib.unwrap_or_default();
        return outcome(
            format!("VMM killed: memory limit of {mib} MiB reached"),
            exit_code::MEMORY_LIMIT,
        );
    }
    if failed && seen.limit_hits.pids_refused > 0 {
        let max = limits.pids_max.unwrap_or_default();
        return outcome(
            format!(
                "pids limit of {max} reached ({} fork(s) refused); then the VMM {}",
                seen.limit_hits.pids_refused,
                ended(exit)
            ),
            exit_code::PIDS_LIMIT,
        );
    }
    match exit {
        ChildExit::Signal(libc::SIGSYS) => outcome(
            "VMM killed by signal SIGSYS (seccomp violation)".into(),
            exit_code::signalled(libc::SIGSYS),
        ),
        ChildExit::Signal(signal) => {
            let after = match seen.forwarded {
                Some(fwd) if fwd != signal => format!(
                    " (it had not ended {} s after the forwarded {})",
                    crate::supervise::FORWARD_GRACE.as_secs(),
                    signal_name(fwd)
                ),
                _ => String::new(),
            };
            outcome(
                format!("VMM killed by signal {}{after}", signal_name(signal)),
                exit_code::signalled(signal),
            )
        }
        ChildExit::Code(code) => Outcome {
            message: None,
            exit_code: u8::try_from(code).unwrap_or(u8::MAX),
        },
    }
}

fn ended(exit: ChildExit) -> String {
    match exit {
        ChildExit::Code(code) => format!("exited with status {code}"),
        ChildExit::Signal(signal) => format!("was killed by {}", signal_name(signal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CgroupLimits = CgroupLimits {
        cpu_quota_percent: None,
        memory_limit_mib: Some(64),
        pids_max: Some(8),
    };

    fn hits(oom_kills: u64, pids_refused: u64) -> Circumstances {
        Circumstances {
            limit_hits: LimitHits {
                oom_kills,
                pids_refused,
            },
            ..Circumstances::default()
        }
    }

    #[test]
    fn names_the_limit_that_ended_the_vmm() {
        let kill = ChildExit::Signal(libc::SIGKILL);
        let lifetime = Circumstances {
            lifetime_exceeded: Some(Duration::from_secs(5)),
            ..hits(1, 1)
        };
        let out = describe(kill, &lifetime, &LIMITS);
        assert_eq!(out.exit_code, exit_code::LIFETIME);
        assert!(out
            .message
            .unwrap()
            .contains("sandbox lifetime of 5 s exceeded"));

        let out = describe(kill, &hits(1, 0), &LIMITS);
        assert_eq!(
            out.message.as_deref(),
            Some("VMM killed: memory limit of 64 MiB reached")
        );
        assert_eq!(out.exit_code, exit_code::MEMORY_LIMIT);

        let out = describe(ChildExit::Code(125), &hits(0, 3), &LIMITS);
        assert_eq!(out.exit_code, exit_code::PIDS_LIMIT);
        assert!(out.message.unwrap().starts_with("pids limit of 8 reached"));
    }

    #[test]
    fn reports_signals_and_passes_exit_codes_through() {
        let out = describe(ChildExit::Signal(libc::SIGSYS), &hits(0, 0), &LIMITS);
        assert_eq!(
            out.message.as_deref(),
            Some("VMM killed by signal SIGSYS (seccomp violation)")
        );
        assert_eq!(out.exit_code, 159);
        let out = describe(ChildExit::Signal(libc::SIGSEGV), &hits(0, 0), &LIMITS);
        assert_eq!(out.message.as_deref(), Some("VMM killed by signal SIGSEGV"));
        assert_eq!(
            describe(ChildExit::Code(3), &hits(0, 0), &LIMITS),
            Outcome {
                message: None,
                exit_code: 3
            }
        );
        // A limit hit that the VMM survived is not why it ended.
        assert_eq!(
            describe(ChildExit::Code(0), &hits(2, 2), &LIMITS).exit_code,
            0
        );
    }
}
