//! The state directory: what survives a daemon restart.
//!
//! ```text
//! <state>/daemon.lock                  flock'd by the running daemon
//! <state>/templates/<name>.json        PUT /templates/{name}
//! <state>/sandboxes/<id>/sandbox.json  the sandbox's record (written to a temp file, fsync'd, renamed)
//! <state>/sandboxes/<id>/vmm.log       the VMM's (and jailer's) stdout and stderr
//! <state>/sandboxes/<id>/...           api.sock, vsock.sock, console.log when not jailed
//! <state>/sandboxes/<id>/module.wasm   an isolate sandbox's module (mounted read-only in its jail)
//! <state>/jail/agentvm/<id>/run/...    api.sock, vsock.sock, console.log when jailed
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{SandboxInfo, Template};

/// A sandbox's record: what the API shows, plus what the daemon needs to recognise its VMM
/// process after a restart (a PID alone may have been reused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    #[serde(flatten)]
    pub info: SandboxInfo,
    /// The VMM process's start time (field 22 of /proc/<pid>/stat).
    #[serde(default)]
    pub pid_start_ticks: Option<u64>,
    /// InstanceStart was sent: the guest may have run.
    #[serde(default)]
    pub booted: bool,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Creates the layout under `root` (mode 0700: records name the sockets of every sandbox).
    pub fn open(root: &Path) -> Result<Self, String> {
        for dir in [
            root.to_path_buf(),
            root.join("templates"),
            root.join("sandboxes"),
        ] {
            fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", root.display()))?;
        let root = root
            .canonicalize()
            .map_err(|e| format!("state directory {}: {e}", root.display()))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the state directory's lock for the life of the returned file: two daemons on one
    /// state directory would fight over every sandbox.
    pub fn lock(&self) -> Result<File, String> {
        let path = self.root.join("daemon.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!(
                    "another agentvm daemon is using the state directory {}",
                    self.root.display()
                )
            } else {
                format!("cannot lock {}: {e}", path.display())
            });
        }
        Ok(file)
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.root.join("sandboxes").join(id)
    }

    /// Where the jailer builds the jail of sandbox `id` (its `--chroot-base-dir`).
    pub fn jail_base(&self) -> PathBuf {
        self.root.join("jail")
    }

    pub fn save_sandbox(&self, record: &SandboxRecord) -> Result<(), String> {
        let dir = self.sandbox_dir(&record.info.id);
        write_atomically(&dir.join("sandbox.json"), &to_json(record)?)
    }

    pub fn remove_sandbox(&self, id: &str) -> Result<(), String> {
        let dir = self.sandbox_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
        }
    }

    /// Every sandbox record; unreadable ones are returned as errors naming their file, so that
    /// the daemon reports them instead of silently forgetting a sandbox.
    pub fn load_sandboxes(&self) -> Vec<Result<SandboxRecord, String>> {
        let dir = self.root.join("sandboxes");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => return vec![Err(format!("cannot list {}: {e}", dir.display()))],
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join("sandbox.json");
            if !path.exists() {
                // A create that died before its first record: nothing to recover.
                continue;
            }
            records.push(
                fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|bytes| {
                        serde_json::from_slice(&bytes)
                            .map_err(|e| format!("{} is not a sandbox record: {e}", path.display()))
                    }),
            );
        }
        records
    }

    fn template_path(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(format!("{name}.json"))
    }

    pub fn save_template(&self, name: &str, template: &Template) -> Result<(), String> {
        write_atomically(&self.template_path(name), &to_json(template)?)
    }

    pub fn load_template(&self, name: &str) -> Result<Option<Template>, String> {
        let path = self.template_path(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is not a template: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn remove_template(&self, name: &str) -> Result<bool, String> {
        let path = self.template_path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
        }
    }

    pub fn template_names(&self) -> Result<Vec<String>, String> {
        let dir = self.root.join("templates");
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        Ok(names)
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec_pretty(value).map_err(|e| format!("cannot encode a record: {e}"))
}

/// Temp file, fsync, rename: a crash leaves the old record or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SandboxState;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            info: SandboxInfo {
                id: id.into(),
                tier: crate::model::Tier::Microvm,
                template: "t".into(),
                state: SandboxState::Running,
                created_at_ms: 1,
                vcpu_count: 1,
                mem_size_mib: 64,
                agent: false,
                jailed: false,
                pid: Some(42),
                api_sock: "/x/api.sock".into(),
                vsock_uds: "/x/v.sock".into(),
                isolate: None,
                ended: None,
            },
            pid_start_ticks: Some(7),
            booted: true,
        }
    }

    #[test]
    fn records_and_templates_round_trip_and_bad_records_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        store.save_sandbox(&record("a")).unwrap();
        store.save_sandbox(&record("b")).unwrap();
        std::fs::create_dir_all(store.sandbox_dir("c")).unwrap();
        std::fs::write(store.sandbox_dir("c").join("sandbox.json"), b"{").unwrap();
        let mut loaded = store.load_sandboxes();
        loaded.sort_by_key(|r| format!("{r:?}"));
        let ok: Vec<_> = loaded.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok.len(), 2);
        assert!(ok.contains(&&record("a")));
        let bad: Vec<_> = loaded.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].contains("c/sandbox.json is not a sandbox record"),
            "{bad:?}"
        );

        store.remove_sandbox("a").unwrap();
        store.remove_sandbox("a").unwrap();
        assert!(!store.sandbox_dir("a").exists());

        let template = Template {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: None,
            vcpu_count: 1,
            mem_size_mib: 64,
            agent: false,
        };
        store.save_template("probe", &template).unwrap();
        assert_eq!(store.load_template("probe").unwrap(), Some(template));
        assert_eq!(store.load_template("nope").unwrap(), None);
        assert_eq!(store.template_names().unwrap(), vec!["probe".to_string()]);
        assert!(store.remove_template("probe").unwrap());
        assert!(!store.remove_template("probe").unwrap());
    }

    #[test]
    fn a_second_daemon_cannot_lock_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _held = store.lock().unwrap();
        let err = store.lock().unwrap_err();
        assert!(err.contains("another agentvm daemon"), "{err}");
    }
}
