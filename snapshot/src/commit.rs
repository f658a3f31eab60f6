//! Putting a snapshot's two files in place so that a crash at any point never leaves a state
//! file beside a memory file it was not written with.
//!
//! The files are renamed one at a time, memory first. Overwriting an existing snapshot, a crash
//! between the two renames would pair the new memory file with the old state file: both pass
//! their own checks (the state file's checksum, the memory file's length), and a restore would
//! run the old vCPUs over the new memory. So the old state file is removed (and the removal made
//! durable) before the new memory file goes in: after a crash there is either the complete new
//! pair, or a memory file with no state file, which a restore refuses by name.

use std::path::Path;

use crate::atomic_write::sync_parent_dir;
use crate::{AtomicFile, SnapshotError};

/// Commits a snapshot written as `memory` and `state` (both prepared, neither committed).
pub fn commit_snapshot(memory: AtomicFile, state: AtomicFile) -> Result<(), SnapshotError> {
    retire_state_file(state.target())?;
    memory.commit()?;
    state.commit()
}

/// Removes the state file at `path`, if any, durably.
pub fn retire_state_file(path: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SnapshotError::io(path)(e)),
    }
    sync_parent_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{prepare_state_file, read_state_file};
    use std::io::Write;

    fn prepared(path: &Path, contents: &[u8]) -> AtomicFile {
        let f = AtomicFile::create(path).unwrap();
        f.file().write_all(contents).unwrap();
        f
    }

    #[test]
    fn a_commit_replaces_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, snap) = (dir.path().join("mem"), dir.path().join("snap"));
        for generation in [1u32, 2] {
            let (state, _) = prepare_state_file(&snap, &generation).unwrap();
            commit_snapshot(prepared(&mem, &generation.to_le_bytes()), state).unwrap();
            assert_eq!(read_state_file::<u32>(&snap).unwrap(), generation);
            assert_eq!(std::fs::read(&mem).unwrap(), generation.to_le_bytes());
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }

    /// A crash after the memory file went in and before the state file did (the state file's
    /// `AtomicFile` dropped uncommitted, as a killed process leaves it): the old state file is
    /// gone, so the new memory cannot be restored with the old vCPU state.
    #[test]
    fn a_crash_between_the_renames_leaves_no_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, snap) = (dir.path().join("mem"), dir.path().join("snap"));
        let (old_state, _) = prepare_state_file(&snap, &1u32).unwrap();
        commit_snapshot(prepared(&mem, b"old"), old_state).unwrap();

        let new_memory = prepared(&mem, b"new");
        let (new_state, _) = prepare_state_file(&snap, &2u32).unwrap();
        retire_state_file(new_state.target()).unwrap();
        new_memory.commit().unwrap();
        drop(new_state);

        assert_eq!(std::fs::read(&mem).unwrap(), b"new");
        assert!(!snap.exists(), "the old state file must not survive");
        let err = read_state_file::<u32>(&snap).unwrap_err().to_string();
        assert!(err.contains("snap"), "{err}");
    }
}
