//! Why a VM stopped, in words a user can act on.

use std::fmt;

/// Events that end (or may end) the VM; all of them arrive on one channel the VMM waits on.
#[derive(Debug)]
pub enum VmmEvent {
    /// The guest pulsed the reset line (i8042 0xFE): Linux `reboot`/`poweroff` with `reboot=k`, a
    /// panic with `panic=-1`, or a test guest ending itself.
    GuestReset,
    VcpuStopped {
        index: u8,
        outcome: VcpuStop,
    },
    /// SIGINT/SIGTERM to the VMM process.
    Signal(i32),
    /// A vCPU entered KVM_RUN for the first time (sent once per VM).
    FirstKvmRun,
    /// The host is done with the VM (e.g. `agentvm run` after its command ended).
    Stop,
    /// Pause or resume the vCPUs (the API's `PATCH /vm`); served by the thread waiting on the VM.
    Control(ControlRequest),
    /// Write a snapshot of the paused VM (the API's `PUT /snapshot/create`); served by the thread
    /// waiting on the VM.
    CreateSnapshot(SnapshotRequest),
    /// Replace the NIC's egress policy (the API's `PUT /egress/policy` after InstanceStart);
    /// served by the thread waiting on the VM.
    SetEgressPolicy(EgressPolicyRequest),
    /// The userfaultfd handler could not serve a page of guest memory (a uffd restore): the VM
    /// cannot go on.
    MemoryBackendFailed(String),
    /// The restored guest's first exec result is in: a uffd restore that records its working set
    /// writes it now, so that the next restores of the snapshot (forks of a running sandbox
    /// included) prefetch it; served by the thread waiting on the VM (the one that may write
    /// files).
    WorkingSetComplete,
}

/// A new egress policy and where the answer goes: true when the VM has a NIC and took it.
pub struct EgressPolicyRequest {
    pub policy: egress::policy::Policy,
    pub reply: Box<dyn FnOnce(bool) + Send>,
}

impl fmt::Debug for EgressPolicyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EgressPolicyRequest({} rules)",
            self.policy.rules().len()
        )
    }
}

/// Where to write a snapshot and where its answer goes (a callback, as for [`ControlRequest`]).
pub struct SnapshotRequest {
    pub snapshot_path: std::path::PathBuf,
    pub mem_file_path: std::path::PathBuf,
    /// Only the pages dirtied since the previous snapshot (`snapshot_type: "Diff"`).
    pub diff: bool,
    pub reply: Box<dyn FnOnce(Result<(), String>) + Send>,
}

impl fmt::Debug for SnapshotRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SnapshotRequest({} + {})",
            self.snapshot_path.display(),
            self.mem_file_path.display()
        )
    }
}

/// What [`VmmEvent::Control`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuControl {
    /// Kick every vCPU out of KVM_RUN and park it until resumed.
    Pause,
    Resume,
}

/// A pause/resume request and where its answer goes. The answer is a callback so that the
/// requester may wait however it likes (the API thread awaits it asynchronously).
pub struct ControlRequest {
    pub action: VcpuControl,
    pub reply: Box<dyn FnOnce(Result<(), String>) + Send>,
}

impl fmt::Debug for ControlRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlRequest({:?})", self.action)
    }
}

/// Why one vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// Teardown asked it to.
    Requested,
    Shutdown {
        rip: Option<u64>,
    },
    Halted {
        rip: Option<u64>,
    },
    FailEntry {
        reason: u64,
        rip: Option<u64>,
    },
    InternalError {
        suberror: u32,
        rip: Option<u64>,
    },
    SystemEvent {
        kind: u32,
        rip: Option<u64>,
    },
    Unexpected {
        exit: String,
        rip: Option<u64>,
    },
    RunFailed {
        error: String,
        rip: Option<u64>,
    },
    /// The vCPU thread could not put itself under its seccomp filter (it never ran the guest).
    Seccomp(String),
}

struct Rip(Option<u64>);

impl fmt::Display for Rip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(rip) => write!(f, "guest RIP {rip:#x}"),
            None => f.write_str("guest RIP unknown"),
        }
    }
}

impl fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuStop::Requested => f.write_str("stopped by the VMM"),
            VcpuStop::Shutdown { rip } => write!(
                f,
                "guest triple fault / shutdown (KVM_EXIT_SHUTDOWN) at {}",
                Rip(*rip)
            ),
            VcpuStop::Halted { rip } => write!(f, "guest halted (KVM_EXIT_HLT) at {}", Rip(*rip)),
            VcpuStop::FailEntry { reason, rip } => write!(
                f,
                "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}) at {}",
                Rip(*rip)
            ),
            VcpuStop::InternalError { suberror, rip } => {
                let what = match suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failure",
                    _ => "internal error",
                };
                write!(
                    f,
                    "KVM {what} (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}) at {}",
                    Rip(*rip)
                )
            }
            VcpuStop::SystemEvent { kind, rip } => {
                let what = match kind {
                    1 => "shutdown",
                    2 => "reset",
                    3 => "crash",
                    _ => "event",
                };
                write!(
                    f,
                    "guest system {what} (KVM_EXIT_SYSTEM_EVENT type {kind}) at {}",
                    Rip(*rip)
                )
            }
            VcpuStop::Unexpected { exit, rip } => {
                write!(f, "unhandled KVM exit {exit} at {}", Rip(*rip))
            }
            VcpuStop::RunFailed { error, rip } => {
                write!(f, "KVM_RUN failed: {error} at {}", Rip(*rip))
            }
            VcpuStop::Seccomp(error) => f.write_str(error),
        }
    }
}

/// How a whole VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset itself through the keyboard controller: the normal way a guest ends.
    GuestReset,
    /// The VMM was asked to stop by a signal.
    Signalled(i32),
    /// The run's wall-clock limit passed.
    TimedOut(std::time::Duration),
    /// The caller asked to stop as soon as the guest was entered (boot-path benchmark).
    StoppedAtFirstRun,
    /// A vCPU hit something the VMM cannot handle.
    VcpuFailed { index: u8, stop: VcpuStop },
    /// The host asked for the VM to end ([`VmmEvent::Stop`]).
    Stopped,
    /// Guest memory could not be served (see [`VmmEvent::MemoryBackendFailed`]).
    MemoryBackendFailed(String),
}

impl VmOutcome {
    pub fn is_clean(&self) -> bool {
        matches!(self, VmOutcome::GuestReset | VmOutcome::Stopped)
    }
}

impl fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmOutcome::GuestReset => f.write_str("guest reset the VM (reboot/poweroff)"),
            VmOutcome::Stopped => f.write_str("stopped by the host"),
            VmOutcome::Signalled(sig) => write!(f, "stopped by signal {}", signal_name(*sig)),
            VmOutcome::StoppedAtFirstRun => {
                f.write_str("stopped at the first guest entry, as asked")
            }
            VmOutcome::TimedOut(limit) => {
                write!(
                    f,
                    "stopped: the {:.1} s time limit passed",
                    limit.as_secs_f64()
                )
            }
            VmOutcome::VcpuFailed { index, stop } => write!(f, "vCPU {index}: {stop}"),
            VmOutcome::MemoryBackendFailed(why) => write!(f, "guest memory: {why}"),
        }
    }
}

pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGKILL => "SIGKILL".into(),
        other => format!("{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_exit_and_rip() {
        let msg = VmOutcome::VcpuFailed {
            index: 0,
            stop: VcpuStop::Shutdown {
                rip: Some(0x20_0123),
            },
        }
        .to_string();
        assert!(msg.contains("triple fault"), "{msg}");
        assert!(msg.contains("0x200123"), "{msg}");
        let emu = VcpuStop::InternalError {
            suberror: 1,
            rip: Some(0xffff_ffff_8100_0000),
        }
        .to_string();
        assert!(emu.contains("emulation failure") && emu.contains("0xffffffff81000000"));
        assert_eq!(
            VmOutcome::Signalled(libc::SIGTERM).to_string(),
            "stopped by signal SIGTERM"
        );
    }
}
