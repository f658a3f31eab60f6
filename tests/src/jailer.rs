//! Running `agentvm-jailer` from tests: its binary, root checks, and where its cgroups live.

use std::path::{Path, PathBuf};

use crate::agentvm::agentvm_bin;

/// `agentvm-jailer`, next to the `agentvm` binary of the same profile.
pub fn jailer_bin() -> PathBuf {
    let bin = agentvm_bin().with_file_name("agentvm-jailer");
    assert!(
        bin.is_file(),
        "agentvm-jailer not found at {}: run `cargo build --release -p jailer` first",
        bin.display()
    );
    bin
}

/// Whether the tests run as root, which the jailer needs. If not, prints why and returns false
/// so the test can return early; with `CI=true` it panics instead (CI runs them as root).
pub fn require_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    if euid == "0" {
        return true;
    }
    let why = format!("the jailer needs root, and the tests run as euid {euid}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why} (CI=true: jailer tests must not be skipped)");
    }
    eprintln!("skipping jailer test: {why}");
    false
}

/// Every directory the jailer could have made for sandbox `id` in this process's cgroups (v2,
/// and v1 for each controller it uses), whether it exists or not.
pub fn possible_cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let host = ::jailer::cgroup::CgroupHost::read().expect("cannot read this process's cgroups");
    let mut dirs: Vec<PathBuf> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter_map(|c| host.v1_sandboxes_dir(c).ok())
        .map(|d| d.join(id))
        .collect();
    if let Ok(dir) = host.v2_sandboxes_dir() {
        dirs.push(dir.join(id));
    }
    dirs
}

/// The directory of sandbox `id` holding `controller`'s files, as the jailer picks it with
/// `--cgroup-version auto` for limits on `needed` controllers.
pub fn cgroup_dir(id: &str, controller: &str, needed: &[&str]) -> PathBuf {
    let host = ::jailer::cgroup::CgroupHost::read().expect("cannot read this process's cgroups");
    let sandboxes = if host.v2_missing(needed).is_ok() {
        host.v2_sandboxes_dir()
    } else {
        host.v1_sandboxes_dir(controller)
    };
    sandboxes
        .unwrap_or_else(|e| panic!("no cgroup for {controller}: {e}"))
        .join(id)
}

/// The entries of `dir`, for "nothing left behind" assertions.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
