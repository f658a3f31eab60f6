//! The default guest artefacts (Debian cloud kernel, guest initramfs with the agent as /init),
//! prepared and cached by `kernels/prepare.sh` in the source tree this binary was built from.
//!
//! The script prints `key=value` lines on stdout (`version`, `kernel`, `initrd`, `vmlinuz`, `pkg`,
//! `busybox`) and its progress on stderr, which is passed through to the user.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Paths of the prepared artefacts, all absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artefacts {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// Guest initramfs (newc cpio, uncompressed) with the agent as /init.
    pub initrd: PathBuf,
    /// The distribution bzImage the vmlinux came from.
    pub vmlinuz: PathBuf,
    /// The whole extracted kernel package (lib/modules/<version>/... incl. the kvm modules).
    pub pkg_dir: PathBuf,
    /// Static busybox.
    pub busybox: PathBuf,
}

/// How much work `prepare.sh` may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrepareMode {
    /// Check the last prepared kernel (the first time: download the current Debian one), rebuild
    /// the guest agent with cargo (a no-op when fresh, but it waits for cargo's build lock) and
    /// repack the initramfs if the agent changed.
    #[default]
    Ensure,
    /// `--print`: use the last prepared artefacts if they are intact (no apt, no cargo); prepare
    /// them only if they are missing or damaged.
    Cached,
    /// `--update`: as `Ensure`, but ask apt for the current Debian kernel first (~1.5 s).
    Update,
    /// `--force`: download and rebuild everything.
    Force,
}

impl PrepareMode {
    fn flag(self) -> Option<&'static str> {
        match self {
            Self::Ensure => None,
            Self::Cached => Some("--print"),
            Self::Update => Some("--update"),
            Self::Force => Some("--force"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtefactError {
    #[error(
        "cannot prepare the default guest kernel: {} does not exist (this agentvm binary was \
         built from a source tree that is no longer there); pass --kernel and --initrd",
        script.display()
    )]
    ScriptMissing { script: PathBuf },
    #[error("cannot run bash for {}: {source}", script.display())]
    Spawn { script: PathBuf, source: io::Error },
    #[error("{} failed ({status}); see its messages above", script.display())]
    ScriptFailed { script: PathBuf, status: ExitStatus },
    #[error("prepare.sh printed an unexpected line on stdout: {0:?}")]
    UnexpectedLine(String),
    #[error("prepare.sh printed {0}= twice")]
    DuplicateKey(String),
    #[error("prepare.sh did not print {0}=")]
    MissingKey(&'static str),
    #[error("prepare.sh printed a relative path for {key}=: {}", path.display())]
    RelativePath { key: &'static str, path: PathBuf },
    #[error("prepare.sh reported {key}={} but it does not exist", path.display())]
    Missing { key: &'static str, path: PathBuf },
}

/// `<repo>/kernels/prepare.sh` of the tree this crate was compiled in.
pub fn default_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("kernels")
        .join("prepare.sh")
}

/// Prepares (or finds in the cache) the default artefacts, keeping them current.
pub fn prepare_default() -> Result<Artefacts, ArtefactError> {
    prepare(PrepareMode::Ensure)
}

pub fn prepare(mode: PrepareMode) -> Result<Artefacts, ArtefactError> {
    prepare_with_script(&default_script(), mode)
}

/// Runs `bash <script> [flag]` with no stdin, stderr inherited, and parses its stdout.
pub fn prepare_with_script(script: &Path, mode: PrepareMode) -> Result<Artefacts, ArtefactError> {
    if !script.is_file() {
        return Err(ArtefactError::ScriptMissing {
            script: script.to_path_buf(),
        });
    }
    let mut command = Command::new("bash");
    command.arg(script);
    if let Some(flag) = mode.flag() {
        command.arg(flag);
    }
    tracing::debug!(script = %script.display(), ?mode, "preparing guest artefacts");
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ArtefactError::Spawn {
            script: script.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(ArtefactError::ScriptFailed {
            script: script.to_path_buf(),
            status: output.status,
        });
    }
    let artefacts = parse_output(&String::from_utf8_lossy(&output.stdout))?;
    for (key, path) in [
        ("kernel", &artefacts.kernel),
        ("initrd", &artefacts.initrd),
        ("vmlinuz", &artefacts.vmlinuz),
        ("pkg", &artefacts.pkg_dir),
        ("busybox", &artefacts.busybox),
    ] {
        if !path.exists() {
            return Err(ArtefactError::Missing {
                key,
                path: path.clone(),
            });
        }
    }
    Ok(artefacts)
}

/// Parses prepare.sh's stdout. Every non-empty line must be `key=value`; unknown keys are ignored
/// so the script can grow, the six known ones are required, paths must be absolute.
pub fn parse_output(stdout: &str) -> Result<Artefacts, ArtefactError> {
    let mut values: HashMap<&str, &str> = HashMap::new();
    for line in stdout.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        let Some((key, value)) = line.split_once('=') else {
            return Err(ArtefactError::UnexpectedLine(line.to_string()));
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(ArtefactError::UnexpectedLine(line.to_string()));
        }
        if values.insert(key, value).is_some() {
            return Err(ArtefactError::DuplicateKey(key.to_string()));
        }
    }
    let text = |key: &'static str| -> Result<&str, ArtefactError> {
        match values.get(key) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ArtefactError::MissingKey(key)),
        }
    };
    let path = |key: &'static str| -> Result<PathBuf, ArtefactError> {
        let path = PathBuf::from(text(key)?);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(ArtefactError::RelativePath { key, path })
        }
    };
    Ok(Artefacts {
        version: text("version")?.to_string(),
        kernel: path("kernel")?,
        initrd: path("initrd")?,
        vmlinuz: path("vmlinuz")?,
        pkg_dir: path("pkg")?,
        busybox: path("busybox")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const GOOD: &str = "version=6.1.0-56-cloud-amd64\n\
        kernel=/c/6.1.0-56-cloud-amd64/vmlinux\n\
        initrd=/c/6.1.0-56-cloud-amd64/initramfs.cpio\n\
        vmlinuz=/c/6.1.0-56-cloud-amd64/vmlinuz\n\
        pkg=/c/6.1.0-56-cloud-amd64/pkg\n\
        busybox=/c/6.1.0-56-cloud-amd64/busybox\n";

    #[test]
    fn parses_the_contract_lines() {
        let a = parse_output(GOOD).unwrap();
        assert_eq!(a.version, "6.1.0-56-cloud-amd64");
        assert_eq!(a.kernel, Path::new("/c/6.1.0-56-cloud-amd64/vmlinux"));
        assert_eq!(
            a.initrd,
            Path::new("/c/6.1.0-56-cloud-amd64/initramfs.cpio")
        );
        assert_eq!(a.vmlinuz, Path::new("/c/6.1.0-56-cloud-amd64/vmlinuz"));
        assert_eq!(a.pkg_dir, Path::new("/c/6.1.0-56-cloud-amd64/pkg"));
        assert_eq!(a.busybox, Path::new("/c/6.1.0-56-cloud-amd64/busybox"));
    }

    #[test]
    fn tolerates_order_blank_lines_and_new_keys() {
        let shuffled: Vec<&str> = GOOD.lines().rev().collect();
        let text = format!("\n{}\nfuture=thing\n\n", shuffled.join("\n"));
        assert_eq!(parse_output(&text).unwrap(), parse_output(GOOD).unwrap());
    }

    #[test]
    fn rejects_bad_output() {
        let without_initrd: String = GOOD
            .lines()
            .filter(|l| !l.starts_with("initrd="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(matches!(
            parse_output(&without_initrd),
            Err(ArtefactError::MissingKey("initrd"))
        ));
        assert!(matches!(
            parse_output(&GOOD.replace("version=6.1.0-56-cloud-amd64", "version=")),
            Err(ArtefactError::MissingKey("version"))
        ));
        assert!(matches!(
            parse_output(&format!("{GOOD}kernel=/other\n")),
            Err(ArtefactError::DuplicateKey(k)) if k == "kernel"
        ));
        assert!(matches!(
            parse_output(&format!("Compiling guest-agent\n{GOOD}")),
            Err(ArtefactError::UnexpectedLine(_))
        ));
        assert!(matches!(
            parse_output(&GOOD.replace("busybox=/c/", "busybox=c/")),
            Err(ArtefactError::RelativePath { key: "busybox", .. })
        ));
        assert!(matches!(
            parse_output(""),
            Err(ArtefactError::MissingKey(_))
        ));
    }

    #[test]
    fn default_script_is_in_the_source_tree() {
        let script = default_script();
        assert!(script.ends_with("kernels/prepare.sh"));
        assert!(script.is_file(), "{}", script.display());
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("agentvm-artefacts-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn missing_script_tells_the_user_what_to_do() {
        let err = prepare_with_script(
            Path::new("/nonexistent/kernels/prepare.sh"),
            PrepareMode::Ensure,
        )
        .unwrap_err();
        assert!(matches!(err, ArtefactError::ScriptMissing { .. }));
        let message = err.to_string();
        assert!(
            message.contains("--kernel") && message.contains("--initrd"),
            "{message}"
        );
    }

    #[test]
    fn runs_a_script_and_checks_the_files() {
        let dir = scratch("run");
        for name in ["vmlinux", "initramfs.cpio", "vmlinuz", "busybox"] {
            fs::write(dir.join(name), name).unwrap();
        }
        fs::create_dir(dir.join("pkg")).unwrap();
        let script = dir.join("prepare.sh");
        let d = dir.display();
        // Prints the contract lines, but only when given --print.
        fs::write(
            &script,
            format!(
                "[ \"$1\" = --print ] || exit 9\n\
                 printf 'version=v1\\nkernel={d}/vmlinux\\ninitrd={d}/initramfs.cpio\\n'\n\
                 printf 'vmlinuz={d}/vmlinuz\\npkg={d}/pkg\\nbusybox={d}/busybox\\n'\n"
            ),
        )
        .unwrap();
        let a = prepare_with_script(&script, PrepareMode::Cached).unwrap();
        assert_eq!(a.version, "v1");
        assert_eq!(a.initrd, dir.join("initramfs.cpio"));

        // The flag is passed: without --print the fake fails with status 9.
        match prepare_with_script(&script, PrepareMode::Force) {
            Err(ArtefactError::ScriptFailed { status, .. }) => assert_eq!(status.code(), Some(9)),
            other => panic!("{other:?}"),
        }

        fs::remove_file(dir.join("busybox")).unwrap();
        assert!(matches!(
            prepare_with_script(&script, PrepareMode::Cached),
            Err(ArtefactError::Missing { key: "busybox", .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
