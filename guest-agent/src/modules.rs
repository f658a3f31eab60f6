//! Loading the initramfs's kernel modules in dependency order with finit_module(2).
//!
//! kernels/prepare.sh writes `/lib/modules/load-order` (one file name per line, dependencies
//! first) beside the `.ko` files. A module that fails to load is reported and skipped: the command
//! may well not need it, and a guest that boots is easier to debug than one that stops.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::cmdline::{normalize_module_name, KernelCmdline};

/// Where the initramfs keeps the modules.
pub const MODULE_DIR: &str = "/lib/modules";
/// The name of the load-order file inside [`MODULE_DIR`].
pub const LOAD_ORDER: &str = "load-order";

#[derive(Debug)]
pub enum LoadOrderError {
    Read { path: PathBuf, source: io::Error },
    BadEntry { line: usize, entry: String },
}

impl fmt::Display for LoadOrderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Self::BadEntry { line, entry } => write!(
                f,
                "load-order line {line}: '{entry}' is not a plain .ko file name"
            ),
        }
    }
}

impl std::error::Error for LoadOrderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::BadEntry { .. } => None,
        }
    }
}

/// Parses a load-order file: one `.ko` file name per line; blank lines and `#` comments are
/// ignored. Names must stay inside the module directory.
pub fn parse_load_order(text: &str) -> Result<Vec<String>, LoadOrderError> {
    let mut files = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let entry = raw.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let plain = !entry.contains('/') && entry.len() > 3 && entry.ends_with(".ko");
        if !plain {
            return Err(LoadOrderError::BadEntry {
                line: index + 1,
                entry: entry.to_string(),
            });
        }
        files.push(entry.to_string());
    }
    Ok(files)
}

/// The kernel's name for a module file: `virtio-rng.ko` is module `virtio_rng`.
pub fn module_name(file: &str) -> String {
    normalize_module_name(file.strip_suffix(".ko").unwrap_or(file))
}

/// What actually inserts a module; the real one is [`FinitModule`], tests use a fake.
pub trait ModuleLoader {
    fn load(&mut self, file: &File, params: &CString) -> io::Result<()>;
}

/// finit_module(2) on an open file. Needs CAP_SYS_MODULE (PID 1 in the guest has it).
pub struct FinitModule;

impl ModuleLoader for FinitModule {
    fn load(&mut self, file: &File, params: &CString) -> io::Result<()> {
        // SAFETY: finit_module reads the module from a valid open fd and the NUL-terminated param
        // string, which both outlive the call; flags 0 asks for no special behaviour.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                params.as_ptr(),
                0 as libc::c_int,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleOutcome {
    Loaded,
    /// EEXIST: already present (loaded earlier or built into the kernel).
    AlreadyLoaded,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleResult {
    pub name: String,
    pub params: String,
    pub outcome: ModuleOutcome,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub modules: Vec<ModuleResult>,
}

impl LoadReport {
    pub fn failures(&self) -> impl Iterator<Item = &ModuleResult> {
        self.modules
            .iter()
            .filter(|m| matches!(m.outcome, ModuleOutcome::Failed(_)))
    }

    pub fn loaded_count(&self) -> usize {
        self.modules
            .iter()
            .filter(|m| m.outcome == ModuleOutcome::Loaded)
            .count()
    }
}

/// Loads every module listed in `dir/load-order`, in order, with the parameters the command line
/// gives for it. Only an unreadable or malformed load-order file is an error; individual module
/// failures are recorded in the report and loading goes on.
pub fn load_modules(
    dir: &Path,
    cmdline: &KernelCmdline,
    loader: &mut impl ModuleLoader,
) -> Result<LoadReport, LoadOrderError> {
    let order_path = dir.join(LOAD_ORDER);
    let text = std::fs::read_to_string(&order_path).map_err(|source| LoadOrderError::Read {
        path: order_path.clone(),
        source,
    })?;
    let mut report = LoadReport::default();
    for file_name in parse_load_order(&text)? {
        let name = module_name(&file_name);
        let params = cmdline.module_params(&name);
        let outcome = load_one(&dir.join(&file_name), &params, loader);
        report.modules.push(ModuleResult {
            name,
            params,
            outcome,
        });
    }
    Ok(report)
}

fn load_one(path: &Path, params: &str, loader: &mut impl ModuleLoader) -> ModuleOutcome {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) => return ModuleOutcome::Failed(format!("cannot open {}: {e}", path.display())),
    };
    let Ok(params) = CString::new(params) else {
        return ModuleOutcome::Failed("parameters contain a NUL byte".to_string());
    };
    match loader.load(&file, &params) {
        Ok(()) => ModuleOutcome::Loaded,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => ModuleOutcome::AlreadyLoaded,
        Err(e) => ModuleOutcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Read;

    #[test]
    fn load_order_parsing() {
        let text = "# deps first\nvirtio_ring.ko\n\n  virtio.ko  \nvirtio-rng.ko\n";
        assert_eq!(
            parse_load_order(text).unwrap(),
            vec!["virtio_ring.ko", "virtio.ko", "virtio-rng.ko"]
        );
        assert!(parse_load_order("").unwrap().is_empty());
        for bad in ["../evil.ko", "/lib/x.ko", "sub/dir.ko", "README", ".ko"] {
            match parse_load_order(&format!("ok.ko\n{bad}\n")) {
                Err(LoadOrderError::BadEntry { line: 2, entry }) => assert_eq!(entry, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("virtio-rng.ko"), "virtio_rng");
        assert_eq!(
            module_name("vmw_vsock_virtio_transport.ko"),
            "vmw_vsock_virtio_transport"
        );
    }

    /// Records what it was asked to load (by file content) and fails on request.
    struct FakeLoader {
        calls: Vec<(String, String)>,
        fail: Vec<(String, i32)>,
    }

    impl ModuleLoader for FakeLoader {
        fn load(&mut self, mut file: &File, params: &CString) -> io::Result<()> {
            let mut content = String::new();
            file.read_to_string(&mut content)?;
            let params = params.to_str().unwrap_or("<non-utf8>").to_string();
            self.calls.push((content.clone(), params));
            match self.fail.iter().find(|(name, _)| *name == content) {
                Some((_, errno)) => Err(io::Error::from_raw_os_error(*errno)),
                None => Ok(()),
            }
        }
    }

    fn module_dir(tag: &str, files: &[&str], order: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("agentvm-modules-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for f in files {
            fs::write(dir.join(f), f.trim_end_matches(".ko")).unwrap();
        }
        fs::write(dir.join(LOAD_ORDER), order).unwrap();
        dir
    }

    #[test]
    fn loads_in_order_with_params_and_survives_failures() {
        let dir = module_dir(
            "order",
            &[
                "virtio_ring.ko",
                "virtio.ko",
                "virtio_mmio.ko",
                "virtio-rng.ko",
            ],
            "virtio_ring.ko\nvirtio.ko\nmissing.ko\nvirtio_mmio.ko\nvirtio-rng.ko\n",
        );
        let cmdline = KernelCmdline::parse(
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_rng.x=1 agentvm.debug=1",
        );
        let mut loader = FakeLoader {
            calls: Vec::new(),
            fail: vec![
                ("virtio".into(), libc::ENOEXEC),
                ("virtio-rng".into(), libc::EEXIST),
            ],
        };
        let report = load_modules(&dir, &cmdline, &mut loader).unwrap();
        assert_eq!(
            loader.calls,
            vec![
                ("virtio_ring".into(), "".into()),
                ("virtio".into(), "".into()),
                ("virtio_mmio".into(), "device=4K@0xd0000000:5".into()),
                ("virtio-rng".into(), "x=1".into()),
            ]
        );
        let outcomes: Vec<_> = report
            .modules
            .iter()
            .map(|m| (m.name.as_str(), &m.outcome))
            .collect();
        assert_eq!(outcomes[0], ("virtio_ring", &ModuleOutcome::Loaded));
        assert!(
            matches!(outcomes[1], ("virtio", ModuleOutcome::Failed(e)) if e.contains("Exec format"))
        );
        assert!(
            matches!(outcomes[2], ("missing", ModuleOutcome::Failed(e)) if e.contains("cannot open"))
        );
        assert_eq!(outcomes[3], ("virtio_mmio", &ModuleOutcome::Loaded));
        assert_eq!(outcomes[4], ("virtio_rng", &ModuleOutcome::AlreadyLoaded));
        assert_eq!(report.failures().count(), 2);
        assert_eq!(report.loaded_count(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_bad_load_order_is_an_error() {
        let dir = module_dir("bad", &[], "../x.ko\n");
        let mut loader = FakeLoader {
            calls: Vec::new(),
            fail: Vec::new(),
        };
        let cmdline = KernelCmdline::default();
        assert!(matches!(
            load_modules(&dir, &cmdline, &mut loader),
            Err(LoadOrderError::BadEntry { .. })
        ));
        fs::remove_file(dir.join(LOAD_ORDER)).unwrap();
        let err = load_modules(&dir, &cmdline, &mut loader).unwrap_err();
        assert!(matches!(err, LoadOrderError::Read { .. }));
        assert!(err.to_string().contains("load-order"));
        assert!(loader.calls.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
