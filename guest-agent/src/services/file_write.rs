//! `WriteFile`: the host's upload, copied from a `Read` (the request's stdin stream, which ends at
//! the host's `Eof` and fails if the host closes the request or hangs up first) into the file.
//!
//! Atomic writes go to a temporary file in the target's directory that is synced and renamed over
//! the target only once the whole upload arrived; any failure before that removes the temporary
//! file (it is a `tempfile::NamedTempFile`, deleted on drop) and leaves the old file untouched.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use agentvm_protocol::{WriteFile, MAX_CHUNK};

use super::file_ops::{check_mode, DEFAULT_DIR_MODE, MODE_MASK};
use super::service_error::{os_reason, require_absolute, ServiceError};

/// Mode of a new file when the request names none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// Performs `request` with the contents read from `input` until its end; returns the number of
/// bytes written.
pub fn write_file(request: &WriteFile, input: &mut impl Read) -> Result<u64, ServiceError> {
    let requested = require_absolute(&request.path, "write")?;
    let fail = |p: &Path, e: &io::Error| ServiceError::io("write", p, e);
    if requested.file_name().is_none() {
        return Err(ServiceError::invalid(format!(
            "cannot write {}: the path names no file",
            requested.display()
        )));
    }
    if let Some(mode) = request.mode {
        check_mode(mode, &request.path)?;
    }
    // Writing through a symlink updates its target (an atomic rename over the link itself would
    // replace the link with a plain file).
    let target = match fs::canonicalize(requested) {
        Ok(resolved) => resolved,
        Err(_) => requested.to_path_buf(),
    };
    let dir = target.parent().unwrap_or(Path::new("/")).to_path_buf();
    if request.create_parents {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DEFAULT_DIR_MODE)
            .create(&dir)
            .map_err(|e| fail(requested, &e))?;
    }
    let existing = match fs::metadata(&target) {
        Ok(meta) if meta.is_dir() => {
            return Err(fail(requested, &io::Error::from_raw_os_error(libc::EISDIR)))
        }
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(fail(requested, &e)),
    };
    let mode = request
        .mode
        .or(existing.as_ref().map(|m| m.mode() & MODE_MASK))
        .unwrap_or(DEFAULT_FILE_MODE);
    if request.atomic {
        write_atomic(requested, &target, &dir, existing.as_ref(), mode, input)
    } else {
        write_in_place(requested, &target, request.mode, mode, input)
    }
}

fn write_atomic(
    requested: &Path,
    target: &Path,
    dir: &Path,
    existing: Option<&fs::Metadata>,
    mode: u32,
    input: &mut impl Read,
) -> Result<u64, ServiceError> {
    let fail = |e: &io::Error| ServiceError::io("write", requested, e);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".agentvm-tmp")
        .tempfile_in(dir)
        .map_err(|e| fail(&e))?;
    let bytes = copy_upload(requested, input, temp.as_file_mut())?;
    let file = temp.as_file();
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| fail(&e))?;
    if let Some(old) = existing {
        keep_owner(file, old).map_err(|e| fail(&e))?;
    }
    file.sync_all().map_err(|e| fail(&e))?;
    temp.persist(target).map_err(|e| fail(&e.error))?;
    // The rename is durable only once the directory is synced; the data is already safe.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail(&e))?;
    Ok(bytes)
}

/// A replaced file keeps its owner: the agent runs as root, and a user's file silently turning
/// into root's would lock the user out of it.
fn keep_owner(file: &File, old: &fs::Metadata) -> io::Result<()> {
    let meta = file.metadata()?;
    if (meta.uid(), meta.gid()) == (old.uid(), old.gid()) {
        return Ok(());
    }
    match std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid())) {
        // Not root: the file simply belongs to whoever runs the agent.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

fn write_in_place(
    requested: &Path,
    target: &Path,
    explicit_mode: Option<u32>,
    mode: u32,
    input: &mut impl Read,
) -> Result<u64, ServiceError> {
    let fail = |e: &io::Error| ServiceError::io("write", requested, e);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(target)
        .map_err(|e| fail(&e))?;
    if explicit_mode.is_some() || file.metadata().map_err(|e| fail(&e))?.mode() & MODE_MASK != mode
    {
        // `open`'s mode only applies to a new file, and the umask reduces it.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| fail(&e))?;
    }
    copy_upload(requested, input, &mut file)
}

/// Copies the upload; a failing `input` means the upload ended without its `Eof`.
fn copy_upload(path: &Path, input: &mut impl Read, out: &mut File) -> Result<u64, ServiceError> {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // A close or hang-up is `Io`; an idle upload that timed out is `TimedOut`.
                return Err(ServiceError::new(
                    agentvm_protocol::ErrorCode::from_io(&e),
                    format!(
                        "cannot write {}: the upload ended before its Eof ({})",
                        path.display(),
                        os_reason(&e)
                    ),
                ));
            }
        };
        out.write_all(&buf[..n])
            .map_err(|e| ServiceError::io("write", path, &e))?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::ErrorCode;
    use std::path::PathBuf;

    /// Temporary files an atomic write to `path` could have left behind.
    fn temp_files_for(path: &Path) -> Vec<PathBuf> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Vec::new();
        };
        let prefix = format!(".{}.", name.to_string_lossy());
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().is_some_and(|n| {
                            let n = n.to_string_lossy();
                            n.starts_with(&prefix) && n.ends_with(".agentvm-tmp")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn request(path: &Path, atomic: bool) -> WriteFile {
        WriteFile {
            id: 1,
            path: path.to_str().unwrap().to_string(),
            mode: None,
            create_parents: false,
            atomic,
        }
    }

    /// An upload that delivers some bytes, then fails like a host that closed the request.
    struct BrokenUpload {
        sent: bool,
    }

    impl Read for BrokenUpload {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.sent {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "request closed by the host",
                ));
            }
            self.sent = true;
            buf[..7].copy_from_slice(b"partial");
            Ok(7)
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn atomic_and_in_place_writes_create_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        for atomic in [true, false] {
            let path = dir.path().join(format!("f-{atomic}"));
            let n = write_file(&request(&path, atomic), &mut &b"first"[..]).unwrap();
            assert_eq!(n, 5);
            assert_eq!(fs::read(&path).unwrap(), b"first");
            assert_eq!(mode_of(&path), DEFAULT_FILE_MODE);

            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            write_file(&request(&path, atomic), &mut &b"2nd"[..]).unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"2nd");
            assert_eq!(mode_of(&path), 0o600, "replacing keeps the old mode");

            let mut explicit = request(&path, atomic);
            explicit.mode = Some(0o751);
            write_file(&explicit, &mut &b""[..]).unwrap();
            assert_eq!(mode_of(&path), 0o751, "an explicit mode is exact");
            assert_eq!(fs::read(&path).unwrap(), b"");
            assert!(temp_files_for(&path).is_empty());
        }
    }

    #[test]
    fn atomic_write_through_a_symlink_updates_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("target", &link).unwrap();
        write_file(&request(&link, true), &mut &b"new"[..]).unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn interrupted_atomic_upload_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep");
        fs::write(&path, b"old contents").unwrap();
        let err = write_file(&request(&path, true), &mut BrokenUpload { sent: false }).unwrap_err();
        assert_eq!(err.code, ErrorCode::Io);
        assert_eq!(
            err.message,
            format!(
                "cannot write {}: the upload ended before its Eof (request closed by the host)",
                path.display()
            )
        );
        assert_eq!(fs::read(&path).unwrap(), b"old contents");
        assert!(temp_files_for(&path).is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        // Same for a file that did not exist: nothing appears.
        let fresh = dir.path().join("fresh");
        write_file(&request(&fresh, true), &mut BrokenUpload { sent: false }).unwrap_err();
        assert!(!fresh.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    struct IdleUpload;

    impl Read for IdleUpload {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::TimedOut, "no input in time"))
        }
    }

    #[test]
    fn an_idle_upload_times_out_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idle");
        let err = write_file(&request(&path, true), &mut IdleUpload).unwrap_err();
        assert_eq!(err.code, ErrorCode::TimedOut);
        assert!(
            err.message.ends_with("(no input in time)"),
            "{}",
            err.message
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn writing_over_a_directory_is_refused_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        fs::create_dir(&path).unwrap();
        let err = write_file(&request(&path, true), &mut &b"x"[..]).unwrap_err();
        assert_eq!(
            err.message,
            format!("cannot write {}: Is a directory", path.display())
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn parents_are_created_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/file");
        let err = write_file(&request(&path, true), &mut &b"x"[..]).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err
            .message
            .starts_with(&format!("cannot write {}:", path.display())));
        let mut req = request(&path, true);
        req.create_parents = true;
        write_file(&req, &mut &b"x"[..]).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad_mode = request(&dir.path().join("m"), true);
        bad_mode.mode = Some(0o170000);
        let err = write_file(&bad_mode, &mut &b""[..]).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        let mut relative = request(Path::new("/x"), true);
        relative.path = "rel".into();
        assert_eq!(
            write_file(&relative, &mut &b""[..]).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        relative.path = "/".into();
        assert_eq!(
            write_file(&relative, &mut &b""[..]).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }
}
