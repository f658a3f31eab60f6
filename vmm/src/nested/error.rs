use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a nested-host run failed. Variants that concern the L1 guest carry the tail of its serial
/// console (and of QEMU's stderr), so the message alone is enough to start debugging.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// `qemu-system-x86_64` is not installed and could not be installed.
    #[error("qemu-system-x86_64 is not available: {detail}")]
    QemuMissing { detail: String },

    /// QEMU could not be started at all.
    #[error("failed to start QEMU ({path}): {source}")]
    QemuSpawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file the nested host needs (L1 kernel, kvm modules, busybox, agentvm, L2 kernel/initrd).
    #[error("nested host input '{what}' is missing or unusable at {path}: {reason}")]
    MissingInput {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// A scenario the caller passed cannot be run as given.
    #[error("invalid scenario '{name}': {reason}")]
    InvalidScenario { name: String, reason: String },

    /// Preparing the work directory or the L1 initramfs, or reading the console logs, failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// L1's init never announced itself (QEMU still running).
    #[error("L1 did not come up within {waited:?}\n{tail}")]
    L1NotUp { waited: Duration, tail: String },

    /// kvm-amd could not be loaded, or /dev/kvm did not appear, inside L1.
    #[error("no usable /dev/kvm inside L1: {detail}\n{tail}")]
    KvmUnavailable { detail: String, tail: String },

    /// The L1 kernel panicked.
    #[error("the L1 kernel panicked while {phase}\n{tail}")]
    L1Panic { phase: String, tail: String },

    /// QEMU exited before L1 reported all results.
    #[error("QEMU exited ({status}) while {phase}\n{tail}")]
    L1Exited {
        status: String,
        phase: String,
        tail: String,
    },

    /// L1 did not report the end of a scenario although its in-guest timeout had long passed:
    /// L1 itself is stuck.
    #[error("scenario '{name}' did not finish within {waited:?} (L1 stuck?)\n{tail}")]
    ScenarioStuck {
        name: String,
        waited: Duration,
        tail: String,
    },

    /// L1 wrote neither its heartbeat nor anything on the results port for `silent` while
    /// scenario `name` ran (its kernel may still print, typically soft lockups): the emulated L1
    /// has stopped running (a fault of the test host, QEMU TCG with nested SVM, not
    /// of what ran in it). `cpus` is where QEMU says L1's CPUs were.
    #[error(
        "L1 wedged while scenario '{name}' ran: no heartbeat from its init and no result for \
         {silent:?}\n--- L1 CPUs (QEMU monitor) ---\n{cpus}\n{tail}"
    )]
    L1Wedged {
        name: String,
        silent: Duration,
        cpus: String,
        tail: String,
    },

    /// The results channel (L1's second serial port) carried something that does not follow the
    /// framing.
    #[error("nested host results framing broken: {detail}\n{tail}")]
    Framing { detail: String, tail: String },
}

impl NestedError {
    /// True when the failure means "this machine cannot provide a nested test host" (no QEMU, no
    /// KVM inside L1), as opposed to a bug in what was run there. Tests use it to decide between
    /// skipping (locally) and failing (in CI).
    pub fn is_host_unavailable(&self) -> bool {
        matches!(
            self,
            NestedError::QemuMissing { .. } | NestedError::KvmUnavailable { .. }
        )
    }

    /// True when L1 itself stopped running ([`NestedError::L1Wedged`]): running the same thing in
    /// a fresh L1 is meaningful, unlike after any other failure.
    pub fn is_l1_wedged(&self) -> bool {
        matches!(self, NestedError::L1Wedged { .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        NestedError::Io {
            context: context.into(),
            source,
        }
    }
}
