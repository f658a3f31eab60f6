//! `AfterRestore`: a restored snapshot wakes up with the wall clock and the RNG state of the
//! moment it was taken. The host sends its time and fresh entropy; the agent sets
//! `CLOCK_REALTIME` and mixes the entropy into the kernel pool with `RNDADDENTROPY`, crediting
//! it, then forces the CRNG to reseed from the pool with `RNDRESEEDCRNG`: adding entropy alone
//! changes nothing `getrandom` returns until the kernel's periodic reseed (up to a minute), so
//! two clones of one snapshot would read the same bytes until then.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use agentvm_protocol::ErrorCode;

use super::service_error::{os_reason, ServiceError};

/// Where the entropy goes; writing to either random device feeds the same pool.
pub const RANDOM_DEVICE: &str = "/dev/urandom";

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` from `<linux/random.h>` (the libc crate does not
/// define it): direction write (1 << 30), argument size 8 (<< 16), type 'R' (<< 8), number 3.
const RNDADDENTROPY: u32 = (1 << 30) | (8 << 16) | ((b'R' as u32) << 8) | 0x03;

/// `RNDRESEEDCRNG` = `_IO('R', 0x07)` from `<linux/random.h>` (Linux 4.17+; not in the libc
/// crate): no argument, type 'R' (<< 8), number 7.
const RNDRESEEDCRNG: u32 = ((b'R' as u32) << 8) | 0x07;

/// The `struct rand_pool_info` the ioctl takes: `int entropy_count` (bits credited), `int
/// buf_size` (bytes), then the bytes, in native byte order.
pub fn rand_pool_info(entropy: &[u8]) -> Result<Vec<u8>, ServiceError> {
    let too_much = || {
        ServiceError::invalid(format!(
            "cannot add entropy: {} bytes is more than the kernel takes at once",
            entropy.len()
        ))
    };
    let size = i32::try_from(entropy.len()).map_err(|_| too_much())?;
    let bits = size.checked_mul(8).ok_or_else(too_much)?;
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&size.to_ne_bytes());
    info.extend_from_slice(entropy);
    Ok(info)
}

/// Mixes `entropy` into the pool behind `device`, crediting all of its bits.
pub fn add_entropy(device: &Path, entropy: &[u8]) -> Result<(), ServiceError> {
    let fail = |e: &io::Error| {
        ServiceError::new(
            ErrorCode::from_io(e),
            format!(
                "cannot add entropy to {} (RNDADDENTROPY): {}",
                device.display(),
                os_reason(e)
            ),
        )
    };
    let info = rand_pool_info(entropy)?;
    let file = OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(|e| fail(&e))?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints then `buf_size` bytes, exactly what
    // `info` holds; the kernel does not keep the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        return Err(fail(&io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(ServiceError::new(
            ErrorCode::from_io(&e),
            format!(
                "cannot reseed the kernel's CRNG through {} (RNDRESEEDCRNG): {}",
                device.display(),
                os_reason(&e)
            ),
        ));
    }
    Ok(())
}

/// The `timespec` for `realtime_ns` nanoseconds since the Unix epoch. Times before the epoch are
/// refused: no host clock is there, so it is a bug on the host side.
pub fn realtime_timespec(realtime_ns: i64) -> Result<libc::timespec, ServiceError> {
    if realtime_ns < 0 {
        return Err(ServiceError::invalid(format!(
            "cannot set the guest clock to {realtime_ns} ns: before the Unix epoch"
        )));
    }
    Ok(libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
    })
}

/// Sets `CLOCK_REALTIME`.
pub fn set_realtime(realtime_ns: i64) -> Result<(), ServiceError> {
    let ts = realtime_timespec(realtime_ns)?;
    // SAFETY: clock_settime reads the timespec it is given.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        let e = io::Error::last_os_error();
        return Err(ServiceError::new(
            ErrorCode::from_io(&e),
            format!(
                "cannot set the guest clock (CLOCK_REALTIME) to {realtime_ns} ns: {}",
                os_reason(&e)
            ),
        ));
    }
    Ok(())
}

/// The whole request: entropy first (a clone's random numbers matter more than its clock), then
/// the clock. Empty entropy adds nothing.
pub fn after_restore(realtime_ns: i64, entropy: &[u8], device: &Path) -> Result<(), ServiceError> {
    realtime_timespec(realtime_ns)?;
    if !entropy.is_empty() {
        add_entropy(device, entropy)?;
    }
    set_realtime(realtime_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_the_kernel_header() {
        // <linux/random.h>: #define RNDADDENTROPY _IOW('R', 0x03, int [2]) == 0x40085203 on x86.
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        // #define RNDRESEEDCRNG _IO('R', 0x07) == 0x5207.
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn pool_info_credits_every_bit() {
        let info = rand_pool_info(&[0xaa, 0xbb, 0xcc]).unwrap();
        assert_eq!(&info[0..4], &24i32.to_ne_bytes());
        assert_eq!(&info[4..8], &3i32.to_ne_bytes());
        assert_eq!(&info[8..], &[0xaa, 0xbb, 0xcc]);
        assert_eq!(rand_pool_info(&[]).unwrap(), [0; 8]);
    }

    #[test]
    fn timespec_splits_seconds_and_nanoseconds() {
        let ts = realtime_timespec(1_700_000_000_123_456_789).unwrap();
        assert_eq!((ts.tv_sec, ts.tv_nsec), (1_700_000_000, 123_456_789));
        let err = realtime_timespec(-1).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(err.message.contains("-1 ns"), "{}", err.message);
        // Refused before touching anything, entropy included.
        let err = after_restore(-5, b"x", Path::new("/nonexistent")).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn entropy_errors_name_the_step_and_the_device() {
        // A regular file takes writes but not the random ioctl.
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = add_entropy(file.path(), b"0123456789abcdef").unwrap_err();
        assert_eq!(
            err.message,
            format!(
                "cannot add entropy to {} (RNDADDENTROPY): Inappropriate ioctl for device",
                file.path().display()
            )
        );
        let err = after_restore(0, b"x", Path::new("/nonexistent/random")).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err
            .message
            .starts_with("cannot add entropy to /nonexistent/random"));
    }

    /// Run by `clock_refusal_names_the_step` as an unprivileged child: never as root, so the
    /// host clock cannot change (and the time set is the current one anyway).
    #[test]
    #[ignore = "helper run as an unprivileged child process by clock_refusal_names_the_step"]
    fn unprivileged_child_sets_clock() {
        // SAFETY: geteuid has no arguments and cannot fail.
        assert_ne!(unsafe { libc::geteuid() }, 0, "must not run as root");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let err = set_realtime(now).unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied);
        assert!(
            err.message
                .starts_with("cannot set the guest clock (CLOCK_REALTIME) to "),
            "{}",
            err.message
        );
        assert!(
            err.message.ends_with("Operation not permitted"),
            "{}",
            err.message
        );
    }

    #[test]
    fn clock_refusal_names_the_step() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        // A copy nobody can reach: the checkout may sit under a directory only root may enter
        // (e.g. a `mktemp -d` clone).
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = dir.path().join("after-restore-test");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut child = std::process::Command::new(&exe);
        child.args([
            "--exact",
            "services::after_restore::tests::unprivileged_child_sets_clock",
            "--ignored",
            "--test-threads=1",
        ]);
        // SAFETY: only async-signal-safe calls between fork and exec. As root, drop to nobody
        // (the child refuses to run if this did not work); as non-root the child is already
        // unprivileged.
        unsafe {
            child.pre_exec(|| {
                if libc::geteuid() == 0
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(65534) != 0
                        || libc::setuid(65534) != 0)
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        assert!(stdout.contains("1 passed"), "{stdout}");
    }
}
