//! The jailer's syscall boundary: thin wrappers over libc that turn -1 into an error naming the
//! call. Every `unsafe` block of the crate lives here. Calls std and libc already wrap safely
//! (chown, chdir, exec) are used from std directly.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{JailerError, Result};

fn check(call: &'static str, rc: libc::c_int) -> Result<libc::c_int> {
    if rc == -1 {
        Err(JailerError::last_os(call))
    } else {
        Ok(rc)
    }
}

fn check_long(call: &'static str, rc: libc::c_long) -> Result<libc::c_long> {
    if rc == -1 {
        Err(JailerError::last_os(call))
    } else {
        Ok(rc)
    }
}

pub fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailerError::Usage(format!("path {} contains a NUL byte", path.display())))
}

fn c_str(text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| JailerError::Usage(format!("{text:?} contains a NUL byte")))
}

/// mount(2). `source`/`fstype`/`data` may be absent (bind and propagation changes need none).
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let source = source.map(c_path).transpose()?;
    let target = c_path(target)?;
    let fstype = fstype.map(c_str).transpose()?;
    let data = data.map(c_str).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check("mount", rc).map(drop)
}

pub fn umount_detach(target: &Path) -> Result<()> {
    let target = c_path(target)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    check("umount2", unsafe {
        libc::umount2(target.as_ptr(), libc::MNT_DETACH)
    })
    .map(drop)
}

pub fn pivot_root(new_root: &Path, put_old: &Path) -> Result<()> {
    let new_root = c_path(new_root)?;
    let put_old = c_path(put_old)?;
    // SAFETY: pivot_root(2) has no libc wrapper; both arguments are NUL-terminated paths that
    // outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check_long("pivot_root", rc).map(drop)
}

pub fn chroot(path: &Path) -> Result<()> {
    let path = c_path(path)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    check("chroot", unsafe { libc::chroot(path.as_ptr()) }).map(drop)
}

pub fn unshare(flags: libc::c_int) -> Result<()> {
    // SAFETY: unshare(2) takes flags only.
    check("unshare", unsafe { libc::unshare(flags) }).map(drop)
}

pub fn setns(fd: &impl AsRawFd, nstype: libc::c_int) -> Result<()> {
    // SAFETY: the fd is open for the duration of the call (borrowed).
    check("setns", unsafe { libc::setns(fd.as_raw_fd(), nstype) }).map(drop)
}

pub fn sethostname(name: &str) -> Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    check("sethostname", unsafe {
        libc::sethostname(name.as_ptr().cast(), name.len())
    })
    .map(drop)
}

pub fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> Result<()> {
    let c = c_path(path)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    if rc == -1 {
        return Err(JailerError::io(
            "cannot create device node",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

pub fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit that outlives the call.
    check("setrlimit", unsafe { libc::setrlimit(resource, &limit) }).map(drop)
}

pub fn clear_supplementary_groups() -> Result<()> {
    // SAFETY: a zero-length list; the null pointer is never read.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) }).map(drop)
}

pub fn setresgid(gid: u32) -> Result<()> {
    // SAFETY: integers only.
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) }).map(drop)
}

pub fn setresuid(uid: u32) -> Result<()> {
    // SAFETY: integers only.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// (real, effective, saved) user ids.
pub fn getresuid() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers; getresuid cannot fail with valid pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// (real, effective, saved) group ids.
pub fn getresgid() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers; getresgid cannot fail with valid pointers.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

pub fn prctl(option: libc::c_int, arg: libc::c_ulong) -> Result<()> {
    // SAFETY: the options used here (PDEATHSIG, NO_NEW_PRIVS) take integer arguments only.
    check("prctl", unsafe { libc::prctl(option, arg, 0, 0, 0) }).map(drop)
}

/// close_range(2): closes `first..=last`.
pub fn close_range(first: u32, last: u32) -> Result<()> {
    // SAFETY: closes fds only; the caller owns none of them any more (they are inherited ones).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    check_long("close_range", rc).map(drop)
}

/// A pipe whose ends are closed on exec.
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    check("pipe2", unsafe {
        libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC)
    })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits up to `timeout_ms` for `fd` to become readable (or hung up). Returns false on timeout.
pub fn poll_readable(fd: &impl AsRawFd, timeout_ms: i32) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd that outlives the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return check("poll", rc).map(|n| n > 0);
    }
}

pub enum Forked {
    Child,
    Parent(libc::pid_t),
}

/// fork(2). The jailer is single-threaded when it forks (it starts no threads), so the child may
/// allocate and use std freely.
pub fn fork() -> Result<Forked> {
    // SAFETY: no other threads exist, so no lock can be held across the fork.
    let pid = check("fork", unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid)
    })
}

pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> Result<()> {
    // SAFETY: integers only. `pid` is our unreaped child, so it cannot have been reused.
    check("kill", unsafe { libc::kill(pid, signal) }).map(drop)
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Code(i32),
    Signal(i32),
}

/// waitpid(pid, WNOHANG): `None` while the child runs.
pub fn try_wait(pid: libc::pid_t) -> Result<Option<ChildExit>> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let rc = check("waitpid", unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG)
    })?;
    if rc == 0 {
        return Ok(None);
    }
    if libc::WIFEXITED(status) {
        Ok(Some(ChildExit::Code(libc::WEXITSTATUS(status))))
    } else if libc::WIFSIGNALED(status) {
        Ok(Some(ChildExit::Signal(libc::WTERMSIG(status))))
    } else {
        Ok(None)
    }
}

/// A signal set built from a list.
pub fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset only writes into it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Replaces the signal mask (of the only thread).
pub fn set_signal_mask(how: libc::c_int, set: &libc::sigset_t) -> Result<()> {
    // SAFETY: `set` is initialised; the old mask is not requested.
    let rc = unsafe { libc::sigprocmask(how, set, std::ptr::null_mut()) };
    check("sigprocmask", rc).map(drop)
}

/// Takes one pending signal of `set` (which must be blocked), waiting up to `timeout`.
/// `None` on timeout.
pub fn sigtimedwait(
    set: &libc::sigset_t,
    timeout: std::time::Duration,
) -> Result<Option<libc::c_int>> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are initialised; siginfo is not requested.
    let rc = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    if rc == -1 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(JailerError::Syscall {
                call: "sigtimedwait",
                source: err,
            }),
        };
    }
    Ok(Some(rc))
}

/// Ends the (forked) process at once: no atexit handlers, no flushing of buffers the parent
/// also holds.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no memory.
    unsafe { libc::_exit(code) }
}

/// The name of a signal, e.g. "SIGSYS".
pub fn signal_name(signal: libc::c_int) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        other => return format!("signal {other}"),
    };
    name.to_string()
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}
