//! cgroup v2: one directory, `<own cgroup>/agentvm/<id>`, with the needed controllers enabled in
//! the subtree of the jailer's own cgroup and of `agentvm`.

use std::path::{Path, PathBuf};

use super::fs_ops::{create_dir, read_counter, remove_dir, remove_if_unused, write_file};
use super::{cgroup_error, CgroupLimits, LimitHits, CPU_PERIOD_US};
use crate::error::Result;

#[derive(Debug)]
pub struct V2Cgroup {
    dir: PathBuf,
}

impl V2Cgroup {
    /// Creates `<sandboxes dir>/<id>` with `limits`. The jailer's own cgroup must be the root
    /// or hold no processes for controllers to be enabled below it (cgroup v2's "no internal
    /// processes" rule); the error says so.
    pub fn create(
        sandboxes: &Path,
        id: &str,
        controllers: &[&str],
        limits: &CgroupLimits,
    ) -> Result<Self> {
        let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
        let enable = enable.join(" ");
        let own = sandboxes.parent().unwrap_or(sandboxes);
        write_file(own, "cgroup.subtree_control", &enable).map_err(|e| {
            cgroup_error(
                "cannot enable controllers for sandboxes in",
                own,
                format!(
                    "{e} (a non-root cgroup v2 that holds processes cannot delegate \
                     controllers; run the jailer from the root cgroup or a parent cgroup, or \
                     use --cgroup-version 1)"
                ),
            )
        })?;
        let dir = sandboxes.join(id);
        create_dir(&dir)?;
        let cgroup = Self { dir };
        write_file(sandboxes, "cgroup.subtree_control", &enable)?;
        if let Some(quota) = limits.cpu_quota_us() {
            write_file(&cgroup.dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        if let Some(bytes) = limits.memory_limit_bytes() {
            write_file(&cgroup.dir, "memory.max", &bytes.to_string())?;
        }
        if let Some(max) = limits.pids_max {
            write_file(&cgroup.dir, "pids.max", &max.to_string())?;
        }
        Ok(cgroup)
    }

    pub fn add_process(&self, pid: libc::pid_t) -> Result<()> {
        write_file(&self.dir, "cgroup.procs", &pid.to_string())
    }

    pub fn limit_hits(&self) -> LimitHits {
        LimitHits {
            oom_kills: read_counter(&self.dir, "memory.events", "oom_kill"),
            pids_refused: read_counter(&self.dir, "pids.events", "max"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for V2Cgroup {
    fn drop(&mut self) {
        remove_dir(&self.dir);
        if let Some(sandboxes) = self.dir.parent() {
            remove_if_unused(sandboxes);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn enables_controllers_and_writes_limits() {
        let fake = tempfile::tempdir().unwrap();
        let sandboxes = fake.path().join("agentvm");
        let limits = CgroupLimits {
            cpu_quota_percent: Some(150),
            memory_limit_mib: Some(32),
            pids_max: Some(20),
        };
        let cgroup =
            V2Cgroup::create(&sandboxes, "sb", &["cpu", "memory", "pids"], &limits).unwrap();
        let read = |path: &str| fs::read_to_string(fake.path().join(path)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("agentvm/cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("agentvm/sb/cpu.max"), "150000 100000");
        assert_eq!(read("agentvm/sb/memory.max"), (32u64 << 20).to_string());
        assert_eq!(read("agentvm/sb/pids.max"), "20");
        cgroup.add_process(77).unwrap();
        assert_eq!(read("agentvm/sb/cgroup.procs"), "77");

        fs::write(
            cgroup.dir().join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(cgroup.dir().join("pids.events"), "max 0\n").unwrap();
        assert_eq!(
            cgroup.limit_hits(),
            LimitHits {
                oom_kills: 1,
                pids_refused: 0
            }
        );

        for entry in fs::read_dir(cgroup.dir()).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        fs::remove_file(sandboxes.join("cgroup.subtree_control")).unwrap();
        drop(cgroup);
        assert!(!sandboxes.exists());
    }
}
