//! What happens when a thread makes a syscall its filter does not allow (seccomp's Trap action):
//! a SIGSYS handler writes one line naming the thread, its filter and the syscall, then lets SIGSYS
//! kill the process, so whoever started the VMM sees it die by SIGSYS.
//!
//! The handler runs with the filter in force, so it only uses what every filter allows (write,
//! getpid, gettid, tgkill with SIGSYS, rt_sigreturn) and nothing that allocates or locks.

use std::cell::Cell;
use std::sync::Once;

use super::ThreadKind;

/// Longest thread name Linux keeps (15 bytes and the NUL).
const NAME_LEN: usize = 16;

/// The running thread as the report names it, recorded when its filter goes on.
#[derive(Clone, Copy)]
struct ThreadLabel {
    name: [u8; NAME_LEN],
    name_len: usize,
    kind: &'static str,
}

impl ThreadLabel {
    const UNKNOWN: Self = Self {
        name: *b"?\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        name_len: 1,
        // A thread that did not install its filter itself inherited it from the thread that
        // started it (the agent client's reader threads, for instance).
        kind: "an inherited",
    };
}

thread_local! {
    // Const-initialised and without a destructor: reading it is a plain TLS load, which is
    // async-signal-safe (no lazy initialisation inside the handler).
    static LABEL: Cell<ThreadLabel> = const { Cell::new(ThreadLabel::UNKNOWN) };
}

/// Records what the report will call the calling thread.
pub fn label_current_thread(kind: ThreadKind) {
    let thread = std::thread::current();
    let full = thread.name().unwrap_or("unnamed").as_bytes();
    let name_len = full.len().min(NAME_LEN);
    let mut name = [0u8; NAME_LEN];
    name[..name_len].copy_from_slice(&full[..name_len]);
    LABEL.with(|l| {
        l.set(ThreadLabel {
            name,
            name_len,
            kind: kind.as_str(),
        })
    });
}

/// Installs the SIGSYS handler (once per process). SA_RESETHAND puts SIGSYS back to its default
/// action as the handler starts, so the re-raised signal kills without another rt_sigaction.
pub fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is valid (empty mask, no flags) before the fields are set.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (see the module
        // doc); the old action is not asked for.
        let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// The `_sigsys` member of siginfo_t's union (the libc crate has no accessor for it).
#[repr(C)]
struct SigsysInfo {
    si_signo: libc::c_int,
    si_errno: libc::c_int,
    si_code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; for SIGSYS raised by seccomp
    // its union holds `_sigsys`, whose layout SigsysInfo mirrors (x86_64: the union starts at 16).
    let nr = if info.is_null() {
        -1
    } else {
        unsafe { (*info.cast::<SigsysInfo>()).syscall }
    };
    let label = LABEL.with(Cell::get);
    let mut line = Line::new();
    line.push(b"agentvm: seccomp: thread ");
    line.push(&label.name[..label.name_len]);
    line.push(b" (");
    line.push(label.kind.as_bytes());
    line.push(b" filter) made forbidden syscall ");
    line.push_number(nr as i64);
    line.push(b" (");
    line.push(syscall_name(nr as i64).unwrap_or("unknown").as_bytes());
    line.push(b"); the VMM is stopping\n");
    // SAFETY: write(2) and the raw getpid/gettid/tgkill syscalls are async-signal-safe and take
    // no pointers but the line's own buffer, valid for its length.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        let pid = libc::syscall(libc::SYS_getpid);
        let tid = libc::syscall(libc::SYS_gettid);
        // SIGSYS is blocked until this handler returns; SA_RESETHAND made its action the
        // default, so it kills the process as soon as the handler is done.
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS);
    }
}

/// A fixed buffer the handler formats into (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

macro_rules! syscall_names {
    ($($name:ident),* $(,)?) => {
        /// The syscalls a report is likely to name: everything some filter allows, and the usual
        /// suspects an exploited VMM would try.
        const SYSCALL_NAMES: &[(i64, &str)] = &[$((libc::$name, stringify!($name))),*];
    };
}

syscall_names![
    SYS_read,
    SYS_write,
    SYS_open,
    SYS_close,
    SYS_stat,
    SYS_fstat,
    SYS_lstat,
    SYS_poll,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_access,
    SYS_pipe,
    SYS_select,
    SYS_sched_yield,
    SYS_mremap,
    SYS_msync,
    SYS_madvise,
    SYS_dup,
    SYS_dup2,
    SYS_nanosleep,
    SYS_getpid,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_exit,
    SYS_wait4,
    SYS_kill,
    SYS_uname,
    SYS_fcntl,
    SYS_flock,
    SYS_fsync,
    SYS_truncate,
    SYS_ftruncate,
    SYS_getdents64,
    SYS_getcwd,
    SYS_chdir,
    SYS_rename,
    SYS_mkdir,
    SYS_rmdir,
    SYS_link,
    SYS_unlink,
    SYS_symlink,
    SYS_readlink,
    SYS_chmod,
    SYS_chown,
    SYS_umask,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_sysinfo,
    SYS_ptrace,
    SYS_getuid,
    SYS_getgid,
    SYS_setuid,
    SYS_setgid,
    SYS_geteuid,
    SYS_getegid,
    SYS_setsid,
    SYS_getppid,
    SYS_setgroups,
    SYS_capget,
    SYS_capset,
    SYS_sigaltstack,
    SYS_personality,
    SYS_prctl,
    SYS_arch_prctl,
    SYS_setrlimit,
    SYS_chroot,
    SYS_mount,
    SYS_umount2,
    SYS_swapon,
    SYS_reboot,
    SYS_sethostname,
    SYS_init_module,
    SYS_delete_module,
    SYS_gettid,
    SYS_tkill,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_epoll_create,
    SYS_getdents,
    SYS_set_tid_address,
    SYS_restart_syscall,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_epoll_wait,
    SYS_epoll_ctl,
    SYS_tgkill,
    SYS_openat,
    SYS_mkdirat,
    SYS_newfstatat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_linkat,
    SYS_symlinkat,
    SYS_readlinkat,
    SYS_fchmodat,
    SYS_faccessat,
    SYS_unshare,
    SYS_set_robust_list,
    SYS_splice,
    SYS_epoll_pwait,
    SYS_timerfd_create,
    SYS_eventfd,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
    SYS_accept4,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_dup3,
    SYS_pipe2,
    SYS_prlimit64,
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
    SYS_setns,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_finit_module,
    SYS_sched_setattr,
    SYS_renameat2,
    SYS_seccomp,
    SYS_getrandom,
    SYS_memfd_create,
    SYS_kexec_file_load,
    SYS_bpf,
    SYS_execveat,
    SYS_userfaultfd,
    SYS_membarrier,
    SYS_statx,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_pidfd_open,
    SYS_clone3,
    SYS_openat2,
    SYS_pidfd_getfd,
    SYS_faccessat2,
    SYS_rseq,
];

/// The name of syscall `nr`, for the ones worth naming (see [`SYSCALL_NAMES`]).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscalls_are_named() {
        assert_eq!(syscall_name(157), Some("prctl"));
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn numbers_format_without_allocation() {
        for (n, text) in [
            (0, "0"),
            (157, "157"),
            (-1, "-1"),
            (i64::MIN, "-9223372036854775808"),
        ] {
            let mut line = Line::new();
            line.push_number(n);
            assert_eq!(&line.buf[..line.len], text.as_bytes());
        }
    }
}
