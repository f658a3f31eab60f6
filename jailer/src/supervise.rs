//! The jailer's parent side: create the jail directory and cgroup, start the child in a new PID
//! namespace, supervise it (signals, lifetime), and clean up on every path.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupHost, SandboxCgroup};
use crate::child;
use crate::config::JailConfig;
use crate::error::{JailerError, Result};
use crate::jail_dir::JailDir;
use crate::outcome::{self, Circumstances, Outcome};
use crate::sys::{self, ChildExit, Forked};

/// Signals the jailer passes on to the VMM.
const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// Passed on too, but they ask for no end (SIGUSR1: agentvm's state dump), so no grace starts.
/// Safe to send early: PID 1 of a namespace ignores signals it has no handler for.
const PASSED_ON_ONLY: [libc::c_int; 1] = [libc::SIGUSR1];
/// After forwarding a signal, how long the VMM has to end before it is killed. The VMM handles
/// SIGINT/SIGTERM/SIGHUP; a program without a handler ignores them as PID 1 of its namespace.
pub const FORWARD_GRACE: Duration = Duration::from_secs(10);
/// How long the child may take to build the jail and exec the VMM.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of one wait for a signal, so deadlines are re-checked.
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// Runs the VMM described by `config` in its jail until it ends, then removes everything.
pub fn run(config: &JailConfig) -> Result<Outcome> {
    if sys::geteuid() != 0 {
        return Err(JailerError::Usage(
            "agentvm-jailer must run as root (it creates namespaces, mounts, device nodes and \
             cgroups)"
                .into(),
        ));
    }
    let mut cgroup_host = CgroupHost::read()?;
    if let Some(parent) = &config.parent_cgroup {
        cgroup_host.reparent(parent)?;
    }
    // Guards: dropped in reverse order on every return path, which removes the cgroup and then
    // the jail directory.
    let jail = JailDir::create(&config.id, &config.id_dir(), config.uid, config.gid)?;
    let cgroup = SandboxCgroup::create(
        &cgroup_host,
        config.cgroup_version,
        &config.id,
        &config.cgroup_limits,
    )?;

    // Blocked before the fork, so none can arrive unnoticed; the child unblocks them.
    let mut waited: Vec<libc::c_int> = FORWARDED.to_vec();
    waited.extend(PASSED_ON_ONLY);
    waited.push(libc::SIGCHLD);
    let waited = sys::sigset(&waited);
    sys::set_signal_mask(libc::SIG_BLOCK, &waited)?;

    let (go_read, go_write) = sys::pipe()?;
    let (report_read, report_write) = sys::pipe()?;
    // The next child becomes PID 1 of a new PID namespace.
    sys::unshare(libc::CLONE_NEWPID)?;
    let pid = match sys::fork()? {
        Forked::Child => {
            drop(go_write);
            drop(report_read);
            // Never returns: the guards above are the parent's to drop.
            child::run(config, &jail, go_read, report_write)
        }
        Forked::Parent(pid) => pid,
    };
    drop(go_read);
    drop(report_write);
    let mut sandbox = Sandbox { pid, reaped: None };

    if let Some(cgroup) = &cgroup {
        cgroup.add_process(pid)?;
    }
    fs::File::from(go_write)
        .write_all(b"g")
        .map_err(|e| JailerError::Syscall {
            call: "write to the jail setup pipe",
            source: e,
        })?;
    wait_for_exec(report_read)?;
    tracing::debug!(pid, "the VMM is running in its jail");

    let mut seen = Circumstances::default();
    let exit = sandbox
        .supervise(config.lifetime, &waited, &mut seen)
        .map_err(|e| JailerError::Supervise(Box::new(e)))?;
    if let Some(cgroup) = &cgroup {
        seen.limit_hits = cgroup.limit_hits();
    }
    Ok(outcome::describe(exit, &seen, &config.cgroup_limits))
}

/// Reads the child's setup report: EOF with nothing written means the VMM was executed.
fn wait_for_exec(report: OwnedFd) -> Result<()> {
    let timeout_ms = i32::try_from(SETUP_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    if !sys::poll_readable(&report, timeout_ms)? {
        return Err(JailerError::SetupTimeout(SETUP_TIMEOUT.as_secs()));
    }
    let mut message = String::new();
    fs::File::from(report)
        .read_to_string(&mut message)
        .map_err(|e| JailerError::Syscall {
            call: "read from the jail setup pipe",
            source: e,
        })?;
    if message.is_empty() {
        Ok(())
    } else {
        Err(JailerError::ChildSetup(message))
    }
}

/// The sandbox's PID 1. Dropping it unreaped kills and reaps it, which ends every process of
/// the sandbox, so error paths leave nothing running.
struct Sandbox {
    pid: libc::pid_t,
    reaped: Option<ChildExit>,
}

impl Sandbox {
    fn try_reap(&mut self) -> Result<Option<ChildExit>> {
        if self.reaped.is_none() {
            self.reaped = sys::try_wait(self.pid)?;
        }
        Ok(self.reaped)
    }

    fn kill(&self) {
        if self.reaped.is_none() {
            // ESRCH cannot happen for an unreaped child; nothing else to do on error.
            let _ = sys::kill(self.pid, libc::SIGKILL);
        }
    }

    /// Waits for the VMM to end, forwarding signals and enforcing `lifetime`.
    fn supervise(
        &mut self,
        lifetime: Option<Duration>,
        waited: &libc::sigset_t,
        seen: &mut Circumstances,
    ) -> Result<ChildExit> {
        let started = Instant::now();
        let mut kill_at = lifetime.map(|l| started + l);
        loop {
            if let Some(exit) = self.try_reap()? {
                return Ok(exit);
            }
            let now = Instant::now();
            if let Some(deadline) = kill_at {
                if now >= deadline {
                    if seen.forwarded.is_none() {
                        seen.lifetime_exceeded = lifetime;
                    }
                    self.kill();
                    kill_at = None;
                }
            }
            let slice = kill_at.map_or(WAIT_SLICE, |d| {
                d.saturating_duration_since(now).min(WAIT_SLICE)
            });
            match sys::sigtimedwait(waited, slice)? {
                Some(signal) if FORWARDED.contains(&signal) => {
                    tracing::debug!("forwarding {} to the VMM", sys::signal_name(signal));
                    if self.reaped.is_none() {
                        sys::kill(self.pid, signal)?;
                    }
                    if seen.forwarded.is_none() {
                        seen.forwarded = Some(signal);
                        let grace = Instant::now() + FORWARD_GRACE;
                        kill_at = Some(kill_at.map_or(grace, |k| k.min(grace)));
                    }
                }
                Some(signal) if PASSED_ON_ONLY.contains(&signal) && self.reaped.is_none() => {
                    sys::kill(self.pid, signal)?;
                }
                _ => {}
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        self.kill();
        let deadline = Instant::now() + SETUP_TIMEOUT;
        while Instant::now() < deadline {
            match sys::try_wait(self.pid) {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                _ => return,
            }
        }
        tracing::warn!("sandbox PID 1 ({}) did not die after SIGKILL", self.pid);
    }
}
