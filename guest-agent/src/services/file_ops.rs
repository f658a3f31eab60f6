//! Metadata, directory listing, directory creation and removal for the files service.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use agentvm_protocol::{DirEntry, FileMetadata, FileType};

use super::frame_batch::emit_in_batches;
use super::service_error::{require_absolute, ServiceError, StreamFailure};

/// Permission bits a request may set; anything above is not a mode.
pub const MODE_MASK: u32 = 0o7777;

/// Default permissions of a directory created by `MakeDir` (and of parents created on the way).
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// The protocol's view of `meta`, which was taken of `path` (needed to read a symlink's target).
pub fn file_metadata(path: &Path, meta: &fs::Metadata) -> FileMetadata {
    let file_type = meta.file_type();
    let (file_type, symlink_target) = if file_type.is_symlink() {
        let target = fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned());
        (FileType::Symlink, target)
    } else if file_type.is_dir() {
        (FileType::Dir, None)
    } else if file_type.is_file() {
        (FileType::File, None)
    } else {
        (FileType::Other, None)
    };
    FileMetadata {
        file_type,
        size: meta.size(),
        mode: meta.mode() & MODE_MASK,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        symlink_target,
    }
}

/// `StatPath`.
pub fn stat_path(path: &str, follow_symlinks: bool) -> Result<FileMetadata, ServiceError> {
    let path = require_absolute(path, "stat")?;
    let meta = if follow_symlinks {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    }
    .map_err(|e| ServiceError::io("stat", path, &e))?;
    Ok(file_metadata(path, &meta))
}

/// Refuses anything outside the permission bits.
pub fn check_mode(mode: u32, path: &str) -> Result<u32, ServiceError> {
    if mode & !MODE_MASK != 0 {
        return Err(ServiceError::invalid(format!(
            "invalid mode {mode:#o} for {path}: only permission bits (at most 0o7777) may be set"
        )));
    }
    Ok(mode)
}

/// `MakeDir`. The mode is applied exactly (not reduced by the agent's umask), like every mode the
/// host names. With `parents`, an existing directory is success (`mkdir -p`).
pub fn make_dir(path: &str, parents: bool, mode: Option<u32>) -> Result<(), ServiceError> {
    let p = require_absolute(path, "create directory")?;
    let mode = check_mode(mode.unwrap_or(DEFAULT_DIR_MODE), path)?;
    let fail = |e: &std::io::Error| ServiceError::io("create directory", p, e);
    if parents && fs::metadata(p).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(parents)
        .mode(mode)
        .create(p)
        .map_err(|e| fail(&e))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(|e| fail(&e))
}

/// `RemovePath`: a file, symlink (not its target) or empty directory; with `recursive`, a whole
/// tree.
pub fn remove_path(path: &str, recursive: bool) -> Result<(), ServiceError> {
    let p = require_absolute(path, "remove")?;
    // `/`, `/..`, `/a/..`: no entry of a directory is named, so there is nothing to unlink, and
    // a recursive removal would take out a parent the caller did not spell out.
    if p.file_name().is_none() {
        return Err(ServiceError::invalid(format!(
            "refusing to remove {path}: it names no directory entry"
        )));
    }
    let fail = |e: std::io::Error| ServiceError::io("remove", p, &e);
    let meta = fs::symlink_metadata(p).map_err(fail)?;
    if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(p)
        } else {
            fs::remove_dir(p)
        }
    } else {
        fs::remove_file(p)
    }
    .map_err(fail)
}

/// `ListDir`: hands `emit` batches of entries that each fit in one frame, in directory order
/// (nothing is sorted, so a huge directory is never held in memory whole). Entries that vanish
/// while being listed are left out.
pub fn list_dir<E>(
    path: &str,
    mut emit: impl FnMut(Vec<DirEntry>) -> Result<(), E>,
) -> Result<(), StreamFailure<E>> {
    let dir = require_absolute(path, "list")?;
    let entries = fs::read_dir(dir).map_err(|e| ServiceError::io("list", dir, &e))?;
    let items = entries.filter_map(|entry| listed_entry(dir, entry).transpose());
    emit_in_batches(items, &mut emit)
}

/// One entry of `dir` as `ListDir` reports it; `None` when it vanished while being listed.
fn listed_entry<E>(
    dir: &Path,
    entry: std::io::Result<fs::DirEntry>,
) -> Result<Option<DirEntry>, StreamFailure<E>> {
    let entry = entry.map_err(|e| ServiceError::io("list", dir, &e))?;
    let entry_path = entry.path();
    let meta = match entry.metadata() {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ServiceError::io("stat", &entry_path, &e).into()),
    };
    Ok(Some(DirEntry {
        name: entry.file_name().to_string_lossy().into_owned(),
        metadata: file_metadata(&entry_path, &meta),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::ErrorCode;
    use std::os::unix::fs::symlink;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn stat_reports_type_size_mode_and_symlink_target() {
        let dir = tmp();
        let file = dir.path().join("f");
        fs::write(&file, b"hello").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("l");
        symlink("f", &link).unwrap();

        let m = stat_path(s(&file), false).unwrap();
        assert_eq!((m.file_type, m.size, m.mode), (FileType::File, 5, 0o640));
        assert!(m.mtime_ns > 1_600_000_000_000_000_000);
        let l = stat_path(s(&link), false).unwrap();
        assert_eq!(l.file_type, FileType::Symlink);
        assert_eq!(l.symlink_target.as_deref(), Some("f"));
        let followed = stat_path(s(&link), true).unwrap();
        assert_eq!((followed.file_type, followed.size), (FileType::File, 5));
        assert_eq!(
            stat_path(s(dir.path()), true).unwrap().file_type,
            FileType::Dir
        );
        assert_eq!(
            stat_path("/dev/null", true).unwrap().file_type,
            FileType::Other
        );
    }

    #[test]
    fn stat_errors_name_the_path() {
        let dir = tmp();
        let missing = dir.path().join("missing");
        let err = stat_path(s(&missing), true).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(
            err.message,
            format!(
                "cannot stat {}: No such file or directory",
                missing.display()
            )
        );
        assert_eq!(
            stat_path("relative", true).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn make_dir_applies_the_exact_mode_and_parents() {
        let dir = tmp();
        let deep = dir.path().join("a/b/c");
        let err = make_dir(s(&deep), false, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err.message.contains("a/b/c"), "{}", err.message);

        make_dir(s(&deep), true, Some(0o777)).unwrap();
        assert_eq!(stat_path(s(&deep), true).unwrap().mode, 0o777);
        // mkdir -p of an existing directory is fine; plain mkdir is not.
        make_dir(s(&deep), true, None).unwrap();
        let exists = make_dir(s(&deep), false, None).unwrap_err();
        assert_eq!(exists.code, ErrorCode::AlreadyExists);

        let plain = dir.path().join("plain");
        make_dir(s(&plain), false, None).unwrap();
        assert_eq!(stat_path(s(&plain), true).unwrap().mode, 0o755);

        let bad = make_dir(s(&dir.path().join("m")), false, Some(0o10000)).unwrap_err();
        assert_eq!(bad.code, ErrorCode::InvalidArgument);
        assert!(bad.message.contains("0o10000"), "{}", bad.message);

        // A file in the way of -p.
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(make_dir(s(&file), true, None).is_err());
    }

    #[test]
    fn remove_path_handles_files_links_and_trees() {
        let dir = tmp();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("x/y")).unwrap();
        fs::write(tree.join("x/y/f"), b"1").unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link");
        symlink(&target, &link).unwrap();

        remove_path(s(&link), false).unwrap();
        assert!(target.exists(), "removing a symlink keeps its target");

        let err = remove_path(s(&tree), false).unwrap_err();
        assert!(err
            .message
            .starts_with(&format!("cannot remove {}:", tree.display())));
        assert!(tree.exists());
        remove_path(s(&tree), true).unwrap();
        assert!(!tree.exists());

        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        remove_path(s(&empty), false).unwrap();
        remove_path(s(&target), false).unwrap();
        assert_eq!(
            remove_path(s(&target), false).unwrap_err().code,
            ErrorCode::NotFound
        );
        for root in ["/", "/..", "/tmp/.."] {
            let err = remove_path(root, true).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{root}");
            assert_eq!(
                err.message,
                format!("refusing to remove {root}: it names no directory entry")
            );
        }
    }

    #[test]
    fn list_dir_batches_every_entry_by_frame_size() {
        let dir = tmp();
        // Symlinks with 4000-byte targets: 300 of them need more than one 1 MiB frame.
        let count = 300;
        for i in 0..count {
            symlink("t".repeat(4000), dir.path().join(format!("{i:0>200}"))).unwrap();
        }
        fs::create_dir(dir.path().join("sub")).unwrap();
        symlink("nowhere", dir.path().join("dangling")).unwrap();

        let mut batches = Vec::new();
        list_dir::<()>(s(dir.path()), |batch| {
            batches.push(batch);
            Ok(())
        })
        .unwrap();
        assert!(batches.len() >= 2, "{} batches", batches.len());
        let mut names: Vec<_> = batches.concat().into_iter().map(|e| e.name).collect();
        assert_eq!(names.len(), count + 2);
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count + 2);
        let all = batches.concat();
        let dangling = all.iter().find(|e| e.name == "dangling").unwrap();
        assert_eq!(dangling.metadata.file_type, FileType::Symlink);
        assert_eq!(dangling.metadata.symlink_target.as_deref(), Some("nowhere"));
        let sub = all.iter().find(|e| e.name == "sub").unwrap();
        assert_eq!(sub.metadata.file_type, FileType::Dir);
    }

    #[test]
    fn list_dir_errors_and_sink_failures() {
        let dir = tmp();
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        match list_dir::<()>(s(&file), |_| Ok(())) {
            Err(StreamFailure::Request(e)) => {
                assert!(e
                    .message
                    .starts_with(&format!("cannot list {}:", file.display())))
            }
            other => panic!("{other:?}"),
        }
        match list_dir(s(dir.path()), |_| Err("gone")) {
            Err(StreamFailure::Sink("gone")) => {}
            other => panic!("{other:?}"),
        }
    }
}
