//! The jailer's own exit statuses. The VMM's statuses pass through unchanged (`agentvm boot` uses
//! 0, 125 and 128+n; `agentvm run` passes the guest command's status on), so the jailer keeps to
//! 100–119, and its stderr line (`agentvm-jailer: ...`) says which of the two spoke.

/// The command line was invalid (bad value, missing file, id in use, uid 0 without
/// `--allow-root`); nothing was created.
pub const USAGE: u8 = 100;
/// Building the jail or the cgroup failed; everything created so far was removed.
pub const SETUP: u8 = 101;
/// Supervising the VMM failed (waitpid or signal handling errors).
pub const SUPERVISE: u8 = 102;
/// `--lifetime` passed and the jailer killed the sandbox.
pub const LIFETIME: u8 = 110;
/// The cgroup memory limit was reached and the kernel killed the VMM.
pub const MEMORY_LIMIT: u8 = 111;
/// The cgroup pids limit refused a fork or thread in the sandbox and the VMM then failed.
pub const PIDS_LIMIT: u8 = 112;

/// Shell convention for "killed by signal n".
pub fn signalled(signal: i32) -> u8 {
    u8::try_from(128 + signal.clamp(1, 127)).unwrap_or(u8::MAX)
}
