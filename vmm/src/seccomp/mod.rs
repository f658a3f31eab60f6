//! Seccomp: every VMM thread runs under a filter that allows only the syscalls its job needs.
//!
//! The filters are defined, one per [`ThreadKind`], in `vmm/seccomp/<target>.json` (seccompiler's
//! JSON format; ioctls are allowed only for the request numbers named there), compiled to BPF by
//! build.rs and decoded by [`filters`]. A thread installs its own filter with [`install`] once it
//! has finished setting itself up; threads it spawns afterwards inherit that filter, so a thread
//! installs its filter only after spawning what it needs. A forbidden syscall is trapped and
//! reported by [`violation`], and the process dies by SIGSYS. See `vmm/seccomp/README.md`.

pub mod filters;
pub mod violation;

/// Whether threads install their filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompLevel {
    /// Every VMM thread runs under its filter.
    #[default]
    Enforce,
    /// No filters (`--no-seccomp`): only for debugging.
    Off,
}

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ThreadKind {
    /// vCPU threads: KVM_RUN and the device exits they serve.
    Vcpu,
    /// The device event loop: virtio queues, vsock host sockets.
    Devices,
    /// The main thread of `agentvm boot` once the VM runs, and its signal thread.
    Vmm,
    /// The API thread of `agentvm serve`: HTTP over its Unix socket (tokio + hyper).
    Api,
    /// `agentvm serve`'s guest agent jobs (`/sandbox/...` requests): the agent client over the
    /// VM's vsock Unix socket, on threads of their own.
    AgentJobs,
    /// The userfaultfd handler of a uffd restore: serves guest page faults from the memory file.
    UffdHandler,
    /// `agentvm isolate run`'s main thread once its isolate is booted: runs the job.
    Isolate,
    /// The egress filter of a VM with a NIC: the userspace network stack, upstream TCP
    /// connections and DNS queries.
    Egress,
    /// An isolate's fetcher (`vmm::isolate::FetchThread`): blocking upstream HTTP(S)
    /// connections and DNS queries on behalf of the job, which itself has no network syscalls.
    IsolateFetch,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::AgentJobs,
        ThreadKind::UffdHandler,
        ThreadKind::Isolate,
        ThreadKind::Egress,
        ThreadKind::IsolateFetch,
    ];

    /// The filter's name in the JSON file.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::AgentJobs => "agent_jobs",
            ThreadKind::UffdHandler => "uffd_handler",
            ThreadKind::Isolate => "isolate",
            ThreadKind::Egress => "egress",
            ThreadKind::IsolateFetch => "isolate_fetch",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error(transparent)]
    Decode(#[from] filters::DecodeError),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Apply {
        kind: &'static str,
        source: seccompiler::Error,
    },
}

/// Puts the calling thread under the filter for `kind` (nothing when `level` is Off).
pub fn install(kind: ThreadKind, level: SeccompLevel) -> Result<(), SeccompError> {
    if level == SeccompLevel::Off {
        return Ok(());
    }
    let program = filters::compiled()?.get(kind);
    fix_malloc_arena_limit();
    violation::install_handler().map_err(SeccompError::Handler)?;
    violation::label_current_thread(kind);
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply {
        kind: kind.as_str(),
        source,
    })
}

/// Sets glibc malloc's arena limit to its own default (8 per online CPU) while the calling thread
/// can still count CPUs. Otherwise glibc counts them the first time some thread needs an arena of
/// its own, by opening /sys/devices/system/cpu/online, which no filter allows: a thread started
/// under a filter (a guest agent job) would die by SIGSYS on its first allocation.
///
/// It also keeps glibc from ever shrinking a thread's own heap: the first shrink opens
/// /proc/sys/vm/overcommit_memory (glibc's check_may_shrink_heap), so a filtered thread that
/// frees enough at once, or exits (its arena is freed then), would die by SIGSYS. A thread heap
/// is at most 64 MiB, so a trim threshold of that size means its top is never trimmed; the main
/// arena keeps at most that much free memory at its top instead of returning it.
fn fix_malloc_arena_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sysconf only reads system information.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let arenas = 8 * online.clamp(1, 1024) as libc::c_int;
        // SAFETY: mallopt changes a malloc tunable; M_ARENA_MAX takes any positive count.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        // SAFETY: as above; M_TRIM_THRESHOLD takes any byte count.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, THREAD_HEAP_TRIM_THRESHOLD) };
    });
}

/// glibc's largest per-thread heap (HEAP_MAX_SIZE on 64-bit: twice the 32 MiB mmap threshold cap).
const THREAD_HEAP_TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// What one thread does about seccomp as it starts its work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadSeccomp {
    pub level: SeccompLevel,
    /// Test-only: make a forbidden syscall right after the filter is on.
    pub test_violation: bool,
}

impl ThreadSeccomp {
    /// Installs `kind`'s filter on the calling thread (then runs the test hook if asked).
    pub fn enter(self, kind: ThreadKind) -> Result<(), SeccompError> {
        install(kind, self.level)?;
        if self.test_violation {
            make_forbidden_syscall();
        }
        Ok(())
    }
}

/// Test-only hook (`agentvm boot --seccomp-test-violation`): makes a syscall that no filter
/// allows, harmless when it runs (prctl PR_GET_DUMPABLE).
pub fn make_forbidden_syscall() {
    // SAFETY: prctl(PR_GET_DUMPABLE) only reads a flag of this process and touches no memory.
    unsafe {
        libc::syscall(libc::SYS_prctl, libc::PR_GET_DUMPABLE, 0, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests;
