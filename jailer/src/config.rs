//! The command line, and its validation into a [`JailConfig`]: every bad value is reported here,
//! before anything is created on the host.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::cgroup::{CgroupLimits, CgroupVersion};
use crate::devices::Device;
use crate::error::{JailerError, Result};
use crate::mounts::MountSpec;
use crate::rlimits::ResourceLimits;

pub const DEFAULT_CHROOT_BASE: &str = "/srv/agentvm-jailer";
const MAX_ID_LEN: usize = 64;
/// One CPU is 100 %; the kernel caps a CFS quota at ~1,000,000 CPUs' worth, far beyond any host.
const MAX_CPU_QUOTA_PERCENT: u32 = 100 * 4096;

/// Runs a VMM in a jail: its own namespaces, a minimal root, a non-root uid/gid, cgroup limits,
/// rlimits and a wall-clock lifetime.
///
/// Exit status: the VMM's own when it exits by itself; 100 bad arguments, 101 jail setup failed,
/// 102 supervision failed, 110 lifetime exceeded, 111 memory limit reached, 112 pids limit
/// reached; 128+n when signal n killed the VMM (159 = SIGSYS, a seccomp violation).
#[derive(Debug, Parser)]
#[command(name = "agentvm-jailer", version)]
pub struct Args {
    /// Sandbox id: 1-64 characters of [A-Za-z0-9-]; also the jail's hostname.
    #[arg(long)]
    pub id: String,
    /// The VMM binary; bind-mounted read-only at /<file name> in the jail and executed there.
    #[arg(long)]
    pub exec_file: PathBuf,
    /// User id the VMM runs as (need not exist in /etc/passwd).
    #[arg(long)]
    pub uid: u32,
    /// Group id the VMM runs as (supplementary groups are cleared).
    #[arg(long)]
    pub gid: u32,
    /// The jail is built at <DIR>/<exec file name>/<id>/root.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CHROOT_BASE)]
    pub chroot_base_dir: PathBuf,
    /// A host file or directory to bind-mount into the jail, read-only unless `:rw` is given.
    /// DST defaults to /<file name of SRC>. Paths containing ':' are not supported.
    #[arg(long = "mount", value_name = "SRC[:DST][:rw]")]
    pub mounts: Vec<String>,
    /// A device node to create in the jail besides /dev/kvm (always there): kvm, userfaultfd, tun.
    #[arg(long = "device", value_name = "kvm|userfaultfd|tun")]
    pub devices: Vec<String>,
    /// Run the VMM in a new, empty network namespace.
    #[arg(long, conflicts_with = "netns")]
    pub new_netns: bool,
    /// Run the VMM in the network namespace at PATH (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Allow uid or gid 0 (the VMM then keeps root's power over the jail).
    #[arg(long)]
    pub allow_root: bool,
    /// Which cgroup hierarchy to use: v2 when it has the controllers needed, else v1.
    #[arg(long, value_name = "auto|1|2", default_value = "auto")]
    pub cgroup_version: String,
    /// Create the sandbox cgroup under this cgroup path (e.g. /agentvm.slice, which must exist in
    /// each hierarchy used) instead of under the jailer's own cgroup.
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<PathBuf>,
    /// CPU time the VMM may use, in percent of one CPU (e.g. 50, or 200 for two CPUs).
    #[arg(long, value_name = "PERCENT_OF_ONE_CPU")]
    pub cpu_quota: Option<u32>,
    /// Memory the VMM's cgroup may use (guest RAM it touched included); over it the kernel kills
    /// the VMM.
    #[arg(long, value_name = "N")]
    pub memory_limit_mib: Option<u64>,
    /// Maximum number of processes and threads in the sandbox.
    #[arg(long, value_name = "N")]
    pub pids_max: Option<u64>,
    /// An rlimit for the VMM: no-file=N (open fds, default 2048) or fsize=BYTES (largest file it
    /// may write, default unlimited).
    #[arg(long = "resource-limit", value_name = "NAME=VALUE")]
    pub resource_limits: Vec<String>,
    /// Wall-clock lifetime of the sandbox in seconds; then the VMM is killed.
    #[arg(long, value_name = "SECS")]
    pub lifetime: Option<u64>,
    /// The VMM's arguments (after `--`).
    #[arg(last = true, value_name = "VMM_ARGS")]
    pub vmm_args: Vec<OsString>,
}

/// A validated jail request.
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub id: String,
    /// Absolute, symlinks resolved.
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base_dir: PathBuf,
    /// The exec file first (at /<its name>), then every `--mount`.
    pub mounts: Vec<MountSpec>,
    pub devices: Vec<Device>,
    pub netns: NetNs,
    pub cgroup_version: CgroupVersion,
    pub parent_cgroup: Option<PathBuf>,
    pub cgroup_limits: CgroupLimits,
    pub resource_limits: ResourceLimits,
    pub lifetime: Option<Duration>,
    pub vmm_args: Vec<OsString>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNs {
    /// Stay in the jailer's network namespace (egress is handled in the VMM).
    Host,
    New,
    Join(PathBuf),
}

impl JailConfig {
    /// `<base>/<exec file name>/<id>`: everything the jail puts on the host lives under it.
    pub fn id_dir(&self) -> PathBuf {
        let exec_name = self
            .exec_mount()
            .dst
            .strip_prefix("/")
            .unwrap_or(Path::new(""));
        self.chroot_base_dir.join(exec_name).join(&self.id)
    }

    /// The jail's root directory (a mount point for the jail's tmpfs).
    pub fn root_dir(&self) -> PathBuf {
        self.id_dir().join("root")
    }

    /// The mount of the VMM binary; its `dst` is the path executed inside the jail.
    pub fn exec_mount(&self) -> &MountSpec {
        &self.mounts[0]
    }

    pub fn from_args(args: Args) -> Result<Self> {
        validate_id(&args.id)?;
        if !args.allow_root {
            if args.uid == 0 {
                return Err(usage(
                    "--uid 0 would run the VMM as root: pass --allow-root if that is really meant",
                ));
            }
            if args.gid == 0 {
                return Err(usage(
                    "--gid 0 would run the VMM in the root group: pass --allow-root if that is \
                     really meant",
                ));
            }
        }
        let exec_file = canonical_source("--exec-file", &args.exec_file)?;
        if !exec_file.is_file() {
            return Err(usage(format!(
                "--exec-file {} is not a regular file",
                args.exec_file.display()
            )));
        }
        // The name as given, not the symlink target's: `--exec-file /usr/bin/agentvm` stays
        // `agentvm` in the jail and in the jail's path even if it links to a versioned file.
        let exec_name = args
            .exec_file
            .file_name()
            .ok_or_else(|| usage("--exec-file has no file name"))?;
        let mut mounts = vec![MountSpec {
            src: exec_file.clone(),
            dst: Path::new("/").join(exec_name),
            writable: false,
        }];
        for spec in &args.mounts {
            let mount = MountSpec::parse(spec)?;
            let src = canonical_source("--mount source", &mount.src)?;
            mounts.push(MountSpec { src, ..mount });
        }
        check_mount_destinations(&mounts)?;

        let mut devices = vec![Device::Kvm];
        for name in &args.devices {
            let device = Device::parse(name)?;
            if !devices.contains(&device) {
                devices.push(device);
            }
        }
        for device in &devices {
            let host = device.host_path();
            let meta = std::fs::metadata(host).map_err(|e| {
                usage(format!(
                    "device {} ({}) is not available on this host: {e}",
                    device.name(),
                    host.display()
                ))
            })?;
            if !meta.file_type().is_char_device() {
                return Err(usage(format!(
                    "{} is not a character device",
                    host.display()
                )));
            }
        }

        let netns = match (args.new_netns, args.netns) {
            (true, _) => NetNs::New,
            (false, Some(path)) => {
                std::fs::metadata(&path)
                    .map_err(|e| usage(format!("--netns {}: {e}", path.display())))?;
                NetNs::Join(path)
            }
            (false, None) => NetNs::Host,
        };

        let base = &args.chroot_base_dir;
        if !base.is_absolute() {
            return Err(usage(format!(
                "--chroot-base-dir {} must be an absolute path",
                base.display()
            )));
        }
        if let Some(existing) = base.ancestors().find(|p| p.exists()) {
            if !existing.is_dir() {
                return Err(usage(format!(
                    "--chroot-base-dir {}: {} is not a directory",
                    base.display(),
                    existing.display()
                )));
            }
        }

        let cgroup_version = CgroupVersion::parse(&args.cgroup_version)?;
        let cgroup_limits = CgroupLimits {
            cpu_quota_percent: args.cpu_quota,
            memory_limit_mib: args.memory_limit_mib,
            pids_max: args.pids_max,
        };
        validate_cgroup_limits(&cgroup_limits)?;
        let mut resource_limits = ResourceLimits::default();
        for spec in &args.resource_limits {
            resource_limits.apply_spec(spec)?;
        }
        let lifetime = match args.lifetime {
            Some(0) => return Err(usage("--lifetime must be at least 1 second")),
            Some(secs) => Some(Duration::from_secs(secs)),
            None => None,
        };

        let config = Self {
            id: args.id,
            exec_file,
            uid: args.uid,
            gid: args.gid,
            chroot_base_dir: args.chroot_base_dir,
            mounts,
            devices,
            netns,
            cgroup_version,
            parent_cgroup: args.parent_cgroup,
            cgroup_limits,
            resource_limits,
            lifetime,
            vmm_args: args.vmm_args,
        };
        let id_dir = config.id_dir();
        if id_dir.symlink_metadata().is_ok() {
            return Err(JailerError::JailExists {
                id: config.id.clone(),
                path: id_dir,
            });
        }
        Ok(config)
    }
}

pub fn usage(message: impl Into<String>) -> JailerError {
    JailerError::Usage(message.into())
}

fn validate_id(id: &str) -> Result<()> {
    let valid_chars = id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if id.is_empty() || id.len() > MAX_ID_LEN || !valid_chars {
        return Err(usage(format!(
            "--id {id:?} is not a valid sandbox id: use 1-{MAX_ID_LEN} characters of A-Z, a-z, \
             0-9 and '-'"
        )));
    }
    Ok(())
}

fn canonical_source(what: &str, path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| usage(format!("{what} {}: {e}", path.display())))
}

/// Destinations must be distinct, absolute, free of `..`, and clear of what the jail itself
/// creates (/dev, /proc, /run, /tmp).
fn check_mount_destinations(mounts: &[MountSpec]) -> Result<()> {
    const RESERVED: [&str; 4] = ["/dev", "/proc", "/run", "/tmp"];
    for (i, mount) in mounts.iter().enumerate() {
        let dst = &mount.dst;
        let plain = dst.is_absolute()
            && dst.components().count() > 1
            && dst
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !plain {
            return Err(usage(format!(
                "mount destination {} must be an absolute path below / without '..'",
                dst.display()
            )));
        }
        if let Some(reserved) = RESERVED.iter().find(|r| dst.starts_with(r)) {
            return Err(usage(format!(
                "mount destination {} is inside {reserved}, which the jail creates itself",
                dst.display()
            )));
        }
        if let Some(other) = mounts[..i]
            .iter()
            .find(|m| m.dst.starts_with(dst) || dst.starts_with(&m.dst))
        {
            return Err(usage(format!(
                "mount destinations {} ({}) and {} ({}) overlap",
                other.dst.display(),
                other.src.display(),
                dst.display(),
                mount.src.display()
            )));
        }
    }
    Ok(())
}

fn validate_cgroup_limits(limits: &CgroupLimits) -> Result<()> {
    if let Some(quota) = limits.cpu_quota_percent {
        if quota == 0 || quota > MAX_CPU_QUOTA_PERCENT {
            return Err(usage(format!(
                "--cpu-quota {quota} is out of range: give 1-{MAX_CPU_QUOTA_PERCENT} percent of \
                 one CPU"
            )));
        }
    }
    if let Some(mib) = limits.memory_limit_mib {
        if mib == 0 || mib.checked_mul(1 << 20).is_none() {
            return Err(usage(format!(
                "--memory-limit-mib {mib} is out of range: give at least 1 MiB"
            )));
        }
    }
    if limits.pids_max == Some(0) {
        return Err(usage("--pids-max must be at least 1 (the VMM itself)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec![
            "agentvm-jailer",
            "--id",
            "sb-1",
            "--exec-file",
            "/bin/sh",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--chroot-base-dir",
            "/nonexistent-agentvm-jailer-base",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn error(extra: &[&str]) -> String {
        JailConfig::from_args(args(extra)).unwrap_err().to_string()
    }

    #[test]
    fn accepts_a_plain_request() {
        let config =
            JailConfig::from_args(args(&["--mount", "/etc:/host-etc:rw", "--", "x"])).unwrap();
        assert_eq!(config.mounts.len(), 2);
        assert!(!config.mounts[0].writable);
        assert_eq!(config.mounts[1].dst, Path::new("/host-etc"));
        assert!(config.mounts[1].writable);
        assert_eq!(config.devices, vec![Device::Kvm]);
        assert_eq!(config.vmm_args, vec![OsString::from("x")]);
        assert_eq!(
            config.id_dir(),
            Path::new("/nonexistent-agentvm-jailer-base/sh/sb-1")
        );
        assert_eq!(config.exec_mount().dst, Path::new("/sh"));
    }

    #[test]
    fn rejects_bad_ids() {
        let long = "a".repeat(65);
        for id in ["", "a/b", "..", "a b", long.as_str()] {
            let mut a = args(&[]);
            a.id = id.to_string();
            let err = JailConfig::from_args(a).unwrap_err().to_string();
            assert!(err.contains("not a valid sandbox id"), "{id}: {err}");
        }
    }

    #[test]
    fn refuses_root_without_allow_root() {
        let mut a = args(&[]);
        a.uid = 0;
        let err = JailConfig::from_args(a).unwrap_err().to_string();
        assert!(
            err.contains("--uid 0") && err.contains("--allow-root"),
            "{err}"
        );
        let mut a = args(&["--allow-root"]);
        a.gid = 0;
        a.uid = 0;
        assert!(JailConfig::from_args(a).is_ok());
    }

    #[test]
    fn names_missing_files() {
        let mut a = args(&[]);
        a.exec_file = PathBuf::from("/nonexistent/agentvm");
        let err = JailConfig::from_args(a).unwrap_err().to_string();
        assert!(err.contains("--exec-file /nonexistent/agentvm"), "{err}");
        let err = error(&["--mount", "/nonexistent/kernel"]);
        assert!(err.contains("--mount source /nonexistent/kernel"), "{err}");
    }

    #[test]
    fn rejects_bad_mount_destinations() {
        assert!(error(&["--mount", "/etc:/dev/etc"]).contains("inside /dev"));
        assert!(error(&["--mount", "/etc:relative"]).contains("absolute"));
        assert!(error(&["--mount", "/etc:/a/../b"]).contains("absolute"));
        assert!(error(&["--mount", "/etc:/sh"]).contains("overlap"));
        assert!(error(&["--mount", "/etc", "--mount", "/usr:/etc"]).contains("overlap"));
    }

    #[test]
    fn rejects_bad_limits() {
        assert!(error(&["--cpu-quota", "0"]).contains("--cpu-quota 0"));
        assert!(error(&["--memory-limit-mib", "0"]).contains("--memory-limit-mib 0"));
        assert!(error(&["--pids-max", "0"]).contains("--pids-max"));
        assert!(error(&["--lifetime", "0"]).contains("--lifetime"));
        assert!(error(&["--resource-limit", "no-file=x"]).contains("no-file=x"));
        assert!(error(&["--resource-limit", "stack=1"]).contains("stack"));
        assert!(error(&["--cgroup-version", "3"]).contains("--cgroup-version 3"));
        assert!(error(&["--device", "gpu"]).contains("gpu"));
    }

    #[test]
    fn relative_base_dir_is_refused() {
        let mut a = args(&[]);
        a.chroot_base_dir = PathBuf::from("jails");
        assert!(JailConfig::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("absolute"));
    }
}
