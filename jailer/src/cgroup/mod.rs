//! The sandbox's cgroup: CPU quota, memory limit and pids limit for the VMM and everything it
//! starts, on cgroup v2 when the unified hierarchy offers the controllers, else on v1.
//!
//! The sandbox cgroup is `<jailer's own cgroup>/agentvm/<id>` in each hierarchy used (read from
//! /proc/self/cgroup), so it is nested under whatever limits the jailer itself runs with.

pub mod detect;
pub mod fs_ops;
pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};

use crate::config::usage;
use crate::error::{JailerError, Result};

pub use detect::CgroupHost;

/// Name of the directory, in the jailer's own cgroup, under which sandbox cgroups are created.
pub const SANDBOXES_DIR: &str = "agentvm";
/// CFS period: the quota is a share of each 100 ms.
pub const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    Auto,
    V1,
    V2,
}

impl CgroupVersion {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(Self::Auto),
            "1" => Ok(Self::V1),
            "2" => Ok(Self::V2),
            other => Err(usage(format!(
                "--cgroup-version {other} is not one of auto, 1, 2"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Percent of one CPU (200 = two CPUs).
    pub cpu_quota_percent: Option<u32>,
    pub memory_limit_mib: Option<u64>,
    pub pids_max: Option<u64>,
}

impl CgroupLimits {
    /// The controllers these limits need, by their kernel names.
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut needed = Vec::new();
        if self.cpu_quota_percent.is_some() {
            needed.push("cpu");
        }
        if self.memory_limit_mib.is_some() {
            needed.push("memory");
        }
        if self.pids_max.is_some() {
            needed.push("pids");
        }
        needed
    }

    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpu_quota_percent
            .map(|percent| u64::from(percent) * CPU_PERIOD_US / 100)
    }

    pub fn memory_limit_bytes(&self) -> Option<u64> {
        self.memory_limit_mib.map(|mib| mib << 20)
    }
}

/// How often the kernel enforced a limit on the sandbox, read after the VMM ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitHits {
    /// Processes the OOM killer killed because the memory limit was reached.
    pub oom_kills: u64,
    /// Forks or clones refused because the pids limit was reached.
    pub pids_refused: u64,
}

/// The sandbox's cgroup(s) in one hierarchy version. Dropping it removes them.
#[derive(Debug)]
pub enum SandboxCgroup {
    V1(v1::V1Cgroup),
    V2(v2::V2Cgroup),
}

impl SandboxCgroup {
    /// Creates the cgroup for `id` with `limits` applied, or nothing when no limit is asked for.
    pub fn create(
        host: &CgroupHost,
        version: CgroupVersion,
        id: &str,
        limits: &CgroupLimits,
    ) -> Result<Option<Self>> {
        let needed = limits.controllers();
        if needed.is_empty() {
            return Ok(None);
        }
        let use_v2 = match version {
            CgroupVersion::V2 => {
                host.v2_missing(&needed)?;
                true
            }
            CgroupVersion::V1 => false,
            CgroupVersion::Auto => host.v2_missing(&needed).is_ok(),
        };
        let cgroup = if use_v2 {
            let dir = host.v2_sandboxes_dir()?;
            Self::V2(v2::V2Cgroup::create(&dir, id, &needed, limits)?)
        } else {
            let dirs = needed
                .iter()
                .map(|controller| Ok((*controller, host.v1_sandboxes_dir(controller)?)))
                .collect::<Result<Vec<_>>>()?;
            Self::V1(v1::V1Cgroup::create(&dirs, id, limits)?)
        };
        tracing::debug!(?cgroup, "created the sandbox cgroup");
        Ok(Some(cgroup))
    }

    /// Moves process `pid` into the cgroup.
    pub fn add_process(&self, pid: libc::pid_t) -> Result<()> {
        match self {
            Self::V1(c) => c.add_process(pid),
            Self::V2(c) => c.add_process(pid),
        }
    }

    pub fn limit_hits(&self) -> LimitHits {
        match self {
            Self::V1(c) => c.limit_hits(),
            Self::V2(c) => c.limit_hits(),
        }
    }

    /// The cgroup directories (one for v2, one per controller for v1).
    pub fn dirs(&self) -> Vec<PathBuf> {
        match self {
            Self::V1(c) => c.dirs(),
            Self::V2(c) => vec![c.dir().to_path_buf()],
        }
    }
}

fn cgroup_error(what: &str, path: &Path, e: impl std::fmt::Display) -> JailerError {
    JailerError::Cgroup(format!("{what} {}: {e}", path.display()))
}
