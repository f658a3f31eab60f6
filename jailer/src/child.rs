//! The jailer's child: PID 1 of the sandbox's new PID namespace. It builds the jail around
//! itself and becomes the VMM; it never returns.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{JailConfig, NetNs};
use crate::error::{JailerError, Result};
use crate::jail_dir::JailDir;
use crate::mounts::MountSpec;
use crate::{devices, exit_code, fds, mounts, privileges, sys};

/// How long the child waits for the parent to place it in the cgroup; the parent does it at
/// once, so only a wedged parent makes this expire.
const GO_TIMEOUT_MS: i32 = 60_000;

/// Runs in the forked child. `go` is read until the parent says the child is in its cgroup;
/// `report` (close-on-exec) carries a setup error back to the parent, and reaches EOF unwritten
/// when the exec succeeds.
pub fn run(config: &JailConfig, jail: &JailDir, go: OwnedFd, report: OwnedFd) -> ! {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        jail_and_exec(config, jail, go, &report)
    }));
    let message = match result {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(never)) => match never {},
        Err(_) => "the jail setup panicked".to_string(),
    };
    let mut report = fs::File::from(report);
    // Nothing more can be done if the parent is gone.
    let _ = report.write_all(message.as_bytes());
    sys::exit_now(i32::from(exit_code::SETUP))
}

fn jail_and_exec(
    config: &JailConfig,
    jail: &JailDir,
    go: OwnedFd,
    report: &OwnedFd,
) -> Result<std::convert::Infallible> {
    // If the jailer dies, so does the sandbox (PID 1's death ends the whole PID namespace).
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)?;
    wait_for_go(go)?;

    let netns = match &config.netns {
        NetNs::Join(path) => {
            Some(fs::File::open(path).map_err(|e| JailerError::io("cannot open netns", path, e))?)
        }
        NetNs::Host | NetNs::New => None,
    };
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if config.netns == NetNs::New {
        flags |= libc::CLONE_NEWNET;
    }
    sys::unshare(flags)?;
    if let Some(netns) = netns {
        sys::setns(&netns, libc::CLONE_NEWNET)?;
    }
    sys::sethostname(&config.id)?;

    let root = jail.root();
    build_jail(config, &root, &jail.run_dir())?;
    mounts::enter_jail_root(&root)?;

    config.resource_limits.apply()?;
    privileges::drop_to(config.uid, config.gid)?;
    // Changing credentials cleared the parent-death signal.
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)?;
    // Neither the VMM nor anything it could exec may gain privileges; seccomp filters installed
    // by the VMM need this too.
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1)?;
    fds::close_inherited(report.as_fd())?;
    sys::set_signal_mask(libc::SIG_SETMASK, &sys::sigset(&[]))?;

    let exec_path = &config.exec_mount().dst;
    // The environment passes through (e.g. AGENTVM_LOG), except the temporary directory: a host
    // path means nothing in the jail, which has its own /tmp.
    let error = Command::new(exec_path)
        .args(&config.vmm_args)
        .env("TMPDIR", "/tmp")
        .exec();
    Err(JailerError::io(
        "cannot execute the VMM at",
        exec_path,
        error,
    ))
}

fn wait_for_go(go: OwnedFd) -> Result<()> {
    if !sys::poll_readable(&go, GO_TIMEOUT_MS)? {
        return Err(JailerError::ChildSetup(
            "the jailer did not place the sandbox in its cgroup in time".into(),
        ));
    }
    let mut byte = [0u8; 1];
    let n = fs::File::from(go)
        .read(&mut byte)
        .map_err(|e| JailerError::Syscall {
            call: "read",
            source: e,
        })?;
    if n == 0 {
        // The parent gave up on us (or died): end without touching anything.
        sys::exit_now(i32::from(exit_code::SETUP));
    }
    Ok(())
}

/// Builds the jail under `root`, in the child's own mount namespace: a tmpfs root holding /dev,
/// /proc, the bind mounts, /run (the host's `run_dir`) and a private /tmp, then read-only.
fn build_jail(config: &JailConfig, root: &Path, run_dir: &Path) -> Result<()> {
    mounts::make_mounts_private()?;
    mounts::mount_jail_tmpfs(root)?;
    devices::populate_dev(root, &config.devices, config.uid, config.gid)?;
    let run = MountSpec {
        src: run_dir.to_path_buf(),
        dst: PathBuf::from("/run"),
        writable: true,
    };
    mounts::bind_into_jail(root, &run)?;
    mounts::mount_private_tmp(root, config.uid, config.gid)?;
    for spec in &config.mounts {
        mounts::bind_into_jail(root, spec)?;
    }
    mounts::mount_proc(root)?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
        .map_err(|e| JailerError::io("cannot chmod", root, e))?;
    // Nothing in the jail's root tmpfs needs to change any more.
    sys::mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
}
