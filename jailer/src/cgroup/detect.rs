//! Where the cgroup hierarchies are mounted and where the jailer sits in each, from
//! /proc/self/mountinfo and /proc/self/cgroup.

use std::fs;
use std::path::{Path, PathBuf};

use super::SANDBOXES_DIR;
use crate::error::{JailerError, Result};

/// The cgroup hierarchies of this host as the jailer sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupHost {
    /// The jailer's own cgroup directory in the unified (v2) hierarchy, if one is mounted.
    pub v2_own_dir: Option<PathBuf>,
    /// The jailer's own cgroup directory in each mounted v1 hierarchy, with its controllers.
    pub v1_own_dirs: Vec<(Vec<String>, PathBuf)>,
    /// Where each of the above hierarchies is mounted, in the same order (v2 first if present).
    mount_points: Vec<PathBuf>,
}

struct CgroupMount {
    /// The hierarchy's path that is mounted (not "/" inside some containers).
    root: String,
    mount_point: PathBuf,
    /// "cgroup2", or the v1 controllers of the hierarchy.
    v1_controllers: Option<Vec<String>>,
}

impl CgroupHost {
    pub fn read() -> Result<Self> {
        let read = |path: &str| {
            fs::read_to_string(path).map_err(|e| JailerError::io("cannot read", path, e))
        };
        Ok(Self::parse(
            &read("/proc/self/mountinfo")?,
            &read("/proc/self/cgroup")?,
        ))
    }

    pub fn parse(mountinfo: &str, proc_cgroup: &str) -> Self {
        let mounts: Vec<CgroupMount> = mountinfo.lines().filter_map(parse_mount).collect();
        let mut host = Self::default();
        for line in proc_cgroup.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(own)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if controllers.is_empty() {
                let v2 = mounts.iter().find(|m| m.v1_controllers.is_none());
                if let Some((m, dir)) = v2.and_then(|m| Some((m, own_dir(m, own)?))) {
                    host.v2_own_dir = Some(dir);
                    host.mount_points.insert(0, m.mount_point.clone());
                }
                continue;
            }
            let names: Vec<String> = controllers.split(',').map(str::to_string).collect();
            let mount = mounts.iter().find(|m| {
                m.v1_controllers
                    .as_ref()
                    .is_some_and(|c| names.iter().all(|n| c.contains(n)))
            });
            if let Some((m, dir)) = mount.and_then(|m| Some((m, own_dir(m, own)?))) {
                host.v1_own_dirs.push((names, dir));
                host.mount_points.push(m.mount_point.clone());
            }
        }
        host
    }

    /// Puts sandbox cgroups under `parent` (a cgroup path such as `/agentvm.slice`, the same in
    /// every hierarchy) instead of under the jailer's own cgroup. On a cgroup v2 host whose
    /// jailer runs in a non-root cgroup with processes (a login session), controllers cannot be
    /// delegated below the jailer's own cgroup, but can below a parent made for sandboxes.
    pub fn reparent(&mut self, parent: &Path) -> Result<()> {
        let relative = parent.strip_prefix("/").map_err(|_| {
            JailerError::Usage(format!(
                "--parent-cgroup {} must be an absolute cgroup path",
                parent.display()
            ))
        })?;
        let mut mounts = self.mount_points.iter();
        let mut next_dir = || -> Result<PathBuf> {
            mounts
                .next()
                .map(|m| m.join(relative))
                .ok_or_else(|| JailerError::Cgroup("cgroup mount list out of step".into()))
        };
        if let Some(own) = self.v2_own_dir.as_mut() {
            *own = next_dir()?;
        }
        for (_, own) in &mut self.v1_own_dirs {
            *own = next_dir()?;
        }
        Ok(())
    }

    /// Ok when the v2 hierarchy offers every controller in `needed` to the jailer's cgroup;
    /// otherwise an error naming what is missing.
    pub fn v2_missing(&self, needed: &[&str]) -> Result<()> {
        let own = self.v2_own_dir.as_ref().ok_or_else(|| {
            JailerError::Cgroup("no cgroup v2 (unified) hierarchy is mounted".into())
        })?;
        let path = own.join("cgroup.controllers");
        let available = fs::read_to_string(&path)
            .map_err(|e| JailerError::Cgroup(format!("cannot read {}: {e}", path.display())))?;
        let available: Vec<&str> = available.split_whitespace().collect();
        let missing: Vec<&str> = needed
            .iter()
            .copied()
            .filter(|c| !available.contains(c))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(JailerError::Cgroup(format!(
                "cgroup v2 at {} lacks the {} controller(s) (available: {})",
                own.display(),
                missing.join(", "),
                if available.is_empty() {
                    "none".to_string()
                } else {
                    available.join(" ")
                }
            )))
        }
    }

    /// The jailer's own cgroup directory (or the `--parent-cgroup` one after [`Self::reparent`])
    /// in the v1 hierarchy holding `controller`.
    pub fn v1_own_dir(&self, controller: &str) -> Option<&Path> {
        self.v1_own_dirs
            .iter()
            .find(|(names, _)| names.iter().any(|n| n == controller))
            .map(|(_, dir)| dir.as_path())
    }

    /// `<own v2 cgroup>/agentvm`.
    pub fn v2_sandboxes_dir(&self) -> Result<PathBuf> {
        let own = self.v2_own_dir.as_ref().ok_or_else(|| {
            JailerError::Cgroup("no cgroup v2 (unified) hierarchy is mounted".into())
        })?;
        sandboxes_dir(own)
    }

    /// `<own cgroup in the v1 hierarchy of controller>/agentvm`.
    pub fn v1_sandboxes_dir(&self, controller: &str) -> Result<PathBuf> {
        let own = self.v1_own_dir(controller).ok_or_else(|| {
            JailerError::Cgroup(format!(
                "no cgroup v1 hierarchy with the {controller} controller is mounted, and cgroup \
                 v2 cannot be used either"
            ))
        })?;
        sandboxes_dir(own)
    }
}

/// `<own>/agentvm`, provided `own` exists (it may not after `--parent-cgroup`): sandbox
/// cgroups are created below existing cgroups only.
fn sandboxes_dir(own: &Path) -> Result<PathBuf> {
    if !own.is_dir() {
        return Err(JailerError::Cgroup(format!(
            "the parent cgroup {} does not exist",
            own.display()
        )));
    }
    Ok(own.join(SANDBOXES_DIR))
}

/// Parses one mountinfo line if it is a cgroup (v1 or v2) mount.
fn parse_mount(line: &str) -> Option<CgroupMount> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let root = unescape(fields.get(3)?);
    let mount_point = PathBuf::from(unescape(fields.get(4)?));
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let options = after.next().unwrap_or_default();
    let v1_controllers = match fstype {
        "cgroup2" => None,
        "cgroup" => Some(
            options
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                .map(str::to_string)
                .collect(),
        ),
        _ => return None,
    };
    Some(CgroupMount {
        root,
        mount_point,
        v1_controllers,
    })
}

/// The directory of cgroup `own` in the mounted hierarchy, if the mount shows it.
fn own_dir(mount: &CgroupMount, own: &str) -> Option<PathBuf> {
    let relative = Path::new(own).strip_prefix(&mount.root).ok()?;
    Some(mount.mount_point.join(relative))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids\\040x rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PROC_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
1:cpu:/
0::/
";

    #[test]
    fn finds_own_dirs_in_every_hierarchy() {
        let host = CgroupHost::parse(MOUNTINFO, PROC_CGROUP);
        assert_eq!(
            host.v2_own_dir.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/"))
        );
        assert_eq!(
            host.v1_own_dir("memory"),
            Some(Path::new("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            host.v1_own_dir("pids"),
            Some(Path::new("/sys/fs/cgroup/pids x"))
        );
        assert_eq!(
            host.v1_own_dir("cpu"),
            Some(Path::new("/sys/fs/cgroup/cpu"))
        );
        let err = host.v1_sandboxes_dir("blkio").unwrap_err().to_string();
        assert!(err.contains("blkio"), "{err}");
    }

    #[test]
    fn handles_comounted_and_nested_mounts() {
        let mountinfo =
            "1 0 0:1 /ns /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             2 0 0:2 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let proc_cgroup = "3:cpu,cpuacct:/ns/job\n0::/user.slice\n";
        let host = CgroupHost::parse(mountinfo, proc_cgroup);
        assert_eq!(
            host.v1_own_dir("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/job"))
        );
        assert_eq!(
            host.v2_own_dir.as_deref(),
            Some(Path::new("/sys/fs/cgroup/user.slice"))
        );
    }

    #[test]
    fn a_missing_parent_cgroup_is_named() {
        let host = CgroupHost {
            v2_own_dir: Some(PathBuf::from("/nonexistent/cgroup")),
            ..CgroupHost::default()
        };
        let err = host.v2_sandboxes_dir().unwrap_err().to_string();
        assert!(
            err.contains("the parent cgroup /nonexistent/cgroup does not exist"),
            "{err}"
        );
    }

    #[test]
    fn reparents_into_an_existing_parent_cgroup() {
        let fake = tempfile::tempdir().unwrap();
        let root = fake.path();
        for dir in [
            "unified/user/1",
            "memory/user/1",
            "unified/sandboxes",
            "memory/sandboxes",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let mountinfo = format!(
            "1 0 0:1 / {r}/unified rw - cgroup2 cgroup2 rw\n\
             2 0 0:2 / {r}/memory rw - cgroup cgroup rw,memory\n\
             3 0 0:3 / {r}/cpu rw - cgroup cgroup rw,cpu\n",
            r = root.display()
        );
        let proc_cgroup = "2:memory:/user/1\n3:cpu:/user/1\n0::/user/1\n";
        let mut host = CgroupHost::parse(&mountinfo, proc_cgroup);
        assert_eq!(
            host.v1_sandboxes_dir("memory").unwrap(),
            root.join("memory/user/1/agentvm")
        );
        host.reparent(Path::new("/sandboxes")).unwrap();
        let err = host.v1_sandboxes_dir("cpu").unwrap_err().to_string();
        assert!(err.contains("cpu/sandboxes does not exist"), "{err}");
        fs::create_dir_all(root.join("cpu/sandboxes")).unwrap();
        assert_eq!(
            host.v2_sandboxes_dir().unwrap(),
            root.join("unified/sandboxes/agentvm")
        );
        assert_eq!(
            host.v1_sandboxes_dir("memory").unwrap(),
            root.join("memory/sandboxes/agentvm")
        );
        assert_eq!(
            host.v1_sandboxes_dir("cpu").unwrap(),
            root.join("cpu/sandboxes/agentvm")
        );
        assert!(host.reparent(Path::new("relative")).is_err());
    }

    #[test]
    fn reports_missing_v2_controllers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpu hugetlb\n").unwrap();
        let host = CgroupHost {
            v2_own_dir: Some(dir.path().to_path_buf()),
            ..CgroupHost::default()
        };
        assert!(host.v2_missing(&["cpu"]).is_ok());
        let err = host
            .v2_missing(&["cpu", "memory", "pids"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("memory, pids") && err.contains("cpu hugetlb"),
            "{err}"
        );
        let none = CgroupHost::default();
        assert!(none
            .v2_missing(&["cpu"])
            .unwrap_err()
            .to_string()
            .contains("no cgroup v2"));
    }
}
