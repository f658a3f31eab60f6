//! cgroup v1: one directory per controller, each `<own cgroup>/agentvm/<id>` in that controller's
//! hierarchy.

use std::path::{Path, PathBuf};

use super::fs_ops::{create_dir, read_counter, remove_dir, remove_if_unused, write_file};
use super::{CgroupLimits, LimitHits, CPU_PERIOD_US};
use crate::error::Result;

#[derive(Debug)]
pub struct V1Cgroup {
    /// (controller, sandbox cgroup dir), in creation order.
    dirs: Vec<(&'static str, PathBuf)>,
}

impl V1Cgroup {
    /// Creates `<sandboxes dir>/<id>` for each `(controller, sandboxes dir)` and writes the
    /// controller's limit. On error, what was created is removed again (by drop).
    pub fn create(
        sandboxes_dirs: &[(&'static str, PathBuf)],
        id: &str,
        limits: &CgroupLimits,
    ) -> Result<Self> {
        let mut cgroup = Self { dirs: Vec::new() };
        for (controller, sandboxes) in sandboxes_dirs {
            let dir = sandboxes.join(id);
            create_dir(&dir)?;
            cgroup.dirs.push((controller, dir.clone()));
            write_limit(&dir, controller, limits)?;
        }
        Ok(cgroup)
    }

    pub fn add_process(&self, pid: libc::pid_t) -> Result<()> {
        for (_, dir) in &self.dirs {
            write_file(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    pub fn limit_hits(&self) -> LimitHits {
        let mut hits = LimitHits::default();
        for (controller, dir) in &self.dirs {
            match *controller {
                // memory.oom_control counts kills since Linux 4.13.
                "memory" => hits.oom_kills = read_counter(dir, "memory.oom_control", "oom_kill"),
                "pids" => hits.pids_refused = read_counter(dir, "pids.events", "max"),
                _ => {}
            }
        }
        hits
    }

    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, dir)| dir.clone()).collect()
    }
}

fn write_limit(dir: &Path, controller: &str, limits: &CgroupLimits) -> Result<()> {
    match controller {
        "cpu" => {
            if let Some(quota) = limits.cpu_quota_us() {
                write_file(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write_file(dir, "cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        "memory" => {
            if let Some(bytes) = limits.memory_limit_bytes() {
                write_file(dir, "memory.limit_in_bytes", &bytes.to_string())?;
            }
        }
        "pids" => {
            if let Some(max) = limits.pids_max {
                write_file(dir, "pids.max", &max.to_string())?;
            }
        }
        _ => {}
    }
    Ok(())
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        for (_, dir) in self.dirs.iter().rev() {
            remove_dir(dir);
            if let Some(sandboxes) = dir.parent() {
                remove_if_unused(sandboxes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// Real cgroupfs lets rmdir remove a cgroup with its control files; a plain directory
    /// standing in for it needs them deleted first.
    fn empty_dir(dir: &Path) {
        for entry in fs::read_dir(dir).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
    }

    #[test]
    fn writes_limits_per_controller_and_removes_the_dirs() {
        let fake = tempfile::tempdir().unwrap();
        let sandboxes: Vec<(&'static str, PathBuf)> = ["cpu", "memory", "pids"]
            .into_iter()
            .map(|c| (c, fake.path().join(c).join("own/agentvm")))
            .collect();
        let limits = CgroupLimits {
            cpu_quota_percent: Some(50),
            memory_limit_mib: Some(64),
            pids_max: Some(10),
        };
        let cgroup = V1Cgroup::create(&sandboxes, "sb", &limits).unwrap();
        let read = |path: &str| fs::read_to_string(fake.path().join(path)).unwrap();
        assert_eq!(read("cpu/own/agentvm/sb/cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu/own/agentvm/sb/cpu.cfs_quota_us"), "50000");
        assert_eq!(
            read("memory/own/agentvm/sb/memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("pids/own/agentvm/sb/pids.max"), "10");

        cgroup.add_process(4242).unwrap();
        assert_eq!(read("memory/own/agentvm/sb/cgroup.procs"), "4242");
        assert_eq!(read("pids/own/agentvm/sb/cgroup.procs"), "4242");

        assert_eq!(cgroup.limit_hits(), LimitHits::default());
        let memory_dir = fake.path().join("memory/own/agentvm/sb");
        fs::write(
            memory_dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(
            fake.path().join("pids/own/agentvm/sb/pids.events"),
            "max 7\n",
        )
        .unwrap();
        assert_eq!(
            cgroup.limit_hits(),
            LimitHits {
                oom_kills: 2,
                pids_refused: 7
            }
        );

        for dir in cgroup.dirs() {
            empty_dir(&dir);
        }
        drop(cgroup);
        for controller in ["cpu", "memory", "pids"] {
            let own = fake.path().join(controller).join("own");
            assert!(own.is_dir());
            assert!(!own.join("agentvm").exists(), "{controller}");
        }
    }

    #[test]
    fn an_existing_cgroup_is_an_error_and_partial_work_is_undone() {
        let fake = tempfile::tempdir().unwrap();
        fs::create_dir_all(fake.path().join("memory/agentvm/sb")).unwrap();
        let sandboxes = vec![
            ("pids", fake.path().join("pids/agentvm")),
            ("memory", fake.path().join("memory/agentvm")),
        ];
        let limits = CgroupLimits {
            memory_limit_mib: Some(1),
            ..CgroupLimits::default()
        };
        let err = V1Cgroup::create(&sandboxes, "sb", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(!fake.path().join("pids/agentvm").exists());
        assert!(fake.path().join("memory/agentvm/sb").is_dir());
    }

    #[test]
    fn an_existing_cgroup_that_cannot_be_reclaimed_is_reported() {
        let fake = tempfile::tempdir().unwrap();
        let existing = fake.path().join("memory/agentvm/sb");
        fs::create_dir_all(&existing).unwrap();
        // Looks unused, but rmdir fails (a fake cgroup holds a real file): reported, not reused.
        fs::write(existing.join("cgroup.procs"), "").unwrap();
        let sandboxes = vec![("memory", fake.path().join("memory/agentvm"))];
        let limits = CgroupLimits {
            memory_limit_mib: Some(1),
            ..CgroupLimits::default()
        };
        let err = V1Cgroup::create(&sandboxes, "sb", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        // In use: never touched.
        fs::write(existing.join("cgroup.procs"), "4242\n").unwrap();
        let err = V1Cgroup::create(&sandboxes, "sb", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(existing.join("cgroup.procs").is_file());
    }
}
