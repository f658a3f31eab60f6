//! Finding (or installing) QEMU and owning the running L1 process.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use super::NestedError;

pub(crate) const QEMU_BINARY: &str = "qemu-system-x86_64";
const QEMU_PACKAGE: &str = "qemu-system-x86";

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Returns QEMU's path: `explicit` if given, else `qemu-system-x86_64` from PATH, installing
/// Debian's package with apt-get first when it is missing and `install` allows it.
pub(crate) fn locate(explicit: Option<&Path>, install: bool) -> Result<PathBuf, NestedError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(NestedError::QemuMissing {
                detail: format!("{} does not exist", p.display()),
            })
        };
    }
    if let Some(p) = find_in_path(QEMU_BINARY) {
        return Ok(p);
    }
    if !install {
        return Err(NestedError::QemuMissing {
            detail: format!("not on PATH; install the Debian package {QEMU_PACKAGE}"),
        });
    }
    apt_install()?;
    find_in_path(QEMU_BINARY).ok_or_else(|| NestedError::QemuMissing {
        detail: format!("{QEMU_PACKAGE} was installed but {QEMU_BINARY} is still not on PATH"),
    })
}

fn apt_install() -> Result<(), NestedError> {
    let Some(apt) = find_in_path("apt-get") else {
        return Err(NestedError::QemuMissing {
            detail: format!("not on PATH, and there is no apt-get to install {QEMU_PACKAGE}"),
        });
    };
    let run = |args: &[&str]| -> Result<ExitStatus, NestedError> {
        eprintln!("nested: running apt-get {}", args.join(" "));
        // apt's progress goes to our stderr: stdout may be a test harness's captured output.
        Command::new(&apt)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(std::io::stderr())
            .stderr(std::io::stderr())
            .status()
            .map_err(|e| NestedError::QemuMissing {
                detail: format!("cannot run {}: {e}", apt.display()),
            })
    };
    let install = [
        "install",
        "-y",
        "-q",
        "-o",
        "Dpkg::Use-Pty=0",
        "--no-install-recommends",
        QEMU_PACKAGE,
    ];
    if run(&install)?.success() {
        return Ok(());
    }
    // The package lists may be stale or absent (fresh containers ship none).
    let update = run(&["update", "-q"])?;
    if update.success() && run(&install)?.success() {
        return Ok(());
    }
    Err(NestedError::QemuMissing {
        detail: format!(
            "not on PATH, and 'apt-get install {QEMU_PACKAGE}' failed (needs root and access to \
             Debian's archive)"
        ),
    })
}

/// Escapes a value for QEMU's comma-separated option syntax.
pub(crate) fn opt_escape(path: &Path) -> OsString {
    let s = path.as_os_str().to_string_lossy().replace(',', ",,");
    OsString::from(s)
}

/// A running QEMU. Dropping it kills QEMU and reaps it, whichever way the caller leaves.
pub(crate) struct Qemu {
    child: Child,
}

impl Qemu {
    pub fn spawn(qemu: &Path, args: &[OsString], stderr_log: &Path) -> Result<Self, NestedError> {
        let stderr = File::create(stderr_log)
            .map_err(|e| NestedError::io(format!("creating {}", stderr_log.display()), e))?;
        let mut cmd = Command::new(qemu);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
        // is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If this process dies without running destructors (SIGKILL, abort), QEMU must not
                // outlive it and burn a CPU for the rest of its timeout.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| NestedError::QemuSpawn {
            path: qemu.to_path_buf(),
            source,
        })?;
        Ok(Qemu { child })
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, NestedError> {
        self.child
            .try_wait()
            .map_err(|e| NestedError::io("waiting for QEMU", e))
    }

    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a file that another process keeps appending to, from where the last call stopped.
pub(crate) struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    pub fn new(path: &Path) -> Self {
        Tail {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    pub fn read_new(&mut self) -> Result<Vec<u8>, NestedError> {
        let mut buf = Vec::new();
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            // QEMU creates the file only once it has parsed its options.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(buf),
            Err(e) => {
                return Err(NestedError::io(
                    format!("reading {}", self.path.display()),
                    e,
                ))
            }
        };
        f.seek(SeekFrom::Start(self.offset))
            .and_then(|_| f.read_to_end(&mut buf))
            .map_err(|e| NestedError::io(format!("reading {}", self.path.display()), e))?;
        self.offset += buf.len() as u64;
        Ok(buf)
    }
}

/// The last `lines` lines of a log file, lossily decoded, for error messages. `skip` drops lines
/// that are noise (QEMU's warnings about CPUID bits TCG cannot emulate).
pub(crate) fn log_tail(path: &Path, lines: usize, skip: &dyn Fn(&str) -> bool) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let kept: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !skip(l))
        .collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_reads_only_new_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut tail = Tail::new(&path);
        assert!(tail.read_new().unwrap().is_empty());
        let mut f = File::create(&path).unwrap();
        f.write_all(b"one\n").unwrap();
        assert_eq!(tail.read_new().unwrap(), b"one\n");
        f.write_all(b"two").unwrap();
        assert_eq!(tail.read_new().unwrap(), b"two");
        assert!(tail.read_new().unwrap().is_empty());
    }

    #[test]
    fn log_tail_keeps_last_lines_and_skips_noise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\r\nwarning: x\nb\nc\n").unwrap();
        let tail = log_tail(&path, 2, &|l| l.starts_with("warning"));
        assert_eq!(tail, "b\nc");
        assert_eq!(log_tail(&dir.path().join("none"), 5, &|_| false), "");
    }

    #[test]
    fn commas_are_doubled_for_qemu() {
        assert_eq!(
            opt_escape(Path::new("/tmp/a,b")),
            OsString::from("/tmp/a,,b")
        );
    }

    #[test]
    fn explicit_missing_qemu_is_reported() {
        let err = locate(Some(Path::new("/nonexistent/qemu")), false).unwrap_err();
        assert!(err.is_host_unavailable());
        assert!(err.to_string().contains("/nonexistent/qemu"));
    }
}
