//! File operations on cgroupfs: writing a control file, reading a `key value` events file, and
//! removing a cgroup directory once its processes are gone.

use std::fs;
use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::cgroup_error;
use crate::error::Result;

pub fn write_file(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    fs::write(&path, value)
        .map_err(|e| cgroup_error(&format!("cannot write {value:?} to"), &path, e))
}

/// The value of `key` in a flat-keyed file such as memory.events (`oom_kill 1`); 0 when the
/// file or key is absent (older kernels lack some counters).
pub fn read_counter(dir: &Path, file: &str, key: &str) -> u64 {
    let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
    parse_counter(&text, key)
}

pub fn parse_counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A cgroup is busy for a moment after its last process was reaped; never waits longer.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);
const REMOVE_RETRY: Duration = Duration::from_millis(20);

/// Removes the cgroup directory `dir`, retrying briefly while the kernel still counts exiting
/// processes in it. Failure is logged, not fatal: cleanup goes on with the rest.
pub fn remove_dir(dir: &Path) {
    let deadline = Instant::now() + REMOVE_PATIENCE;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(REMOVE_RETRY);
            }
            Err(e) => {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
}

/// Removes the shared `agentvm` directory if no other sandbox uses it any more.
pub fn remove_if_unused(dir: &Path) {
    if let Err(e) = fs::remove_dir(dir) {
        let in_use = matches!(
            e.raw_os_error(),
            Some(libc::ENOTEMPTY | libc::EBUSY | libc::ENOENT)
        );
        if !in_use {
            tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
        }
    }
}

/// Whether `dir` is a cgroup with no process in it: what a jailer killed by SIGKILL leaves
/// behind (it could not remove its cgroup). The caller holds the sandbox id's jail directory,
/// which only one jailer can create, so no live jailer of this id is setting the cgroup up.
fn is_stale(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| procs.trim().is_empty())
}

/// Creates `dir` (and the shared parent), retrying if another sandbox's cleanup removed the
/// parent between the two steps; a stale cgroup of the same id (see [`is_stale`]) is replaced.
pub fn create_dir(dir: &Path) -> Result<()> {
    let mut reclaimed = false;
    for _ in 0..3 {
        match fs::create_dir_all(dir.parent().unwrap_or(dir)).and_then(|()| fs::create_dir(dir)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e)
                if e.kind() == io::ErrorKind::AlreadyExists
                    && !reclaimed
                    && is_stale(dir)
                    && fs::remove_dir(dir).is_ok() =>
            {
                tracing::info!("replaced the stale cgroup {}", dir.display());
                reclaimed = true;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(cgroup_error(
                    "a cgroup for this sandbox id already exists at",
                    dir,
                    "another sandbox is using it, or a previous one was not cleaned up",
                ))
            }
            Err(e) => return Err(cgroup_error("cannot create", dir, e)),
        }
    }
    Err(cgroup_error(
        "cannot create",
        dir,
        "its parent kept disappearing",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters() {
        let events = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n";
        assert_eq!(parse_counter(events, "oom_kill"), 1);
        assert_eq!(parse_counter(events, "max"), 3);
        assert_eq!(parse_counter(events, "oom_group_kill"), 0);
        assert_eq!(parse_counter("", "max"), 0);
    }
}
