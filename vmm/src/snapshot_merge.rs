//! `agentvm snapshot merge`: a diff snapshot applied onto its base gives a full snapshot of the
//! diff's moment. The two must belong together: the diff's state file names its base (by the
//! base's identity, see `MicrovmState::identity`), and both describe the same memory layout.
//! The output is the diff's machine state marked as full, with the base's memory overlaid by the
//! diff's dirty pages; it may replace the inputs (the inputs are read before anything is renamed).

use std::path::{Path, PathBuf};

use snapshot::MemoryKind;

use crate::persist::{short_id, MicrovmState};

#[derive(Debug, Clone)]
pub struct MergePaths {
    pub base_snapshot: PathBuf,
    pub base_mem: PathBuf,
    pub diff_snapshot: PathBuf,
    pub diff_mem: PathBuf,
    pub out_snapshot: PathBuf,
    pub out_mem: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("{0}: is a diff snapshot itself; merge it onto its own base first")]
    BaseIsDiff(PathBuf),
    #[error("{0}: is a full snapshot, not a diff; there is nothing to merge")]
    NotADiff(PathBuf),
    #[error(
        "{diff}: this diff was taken against snapshot {wanted}, but {base} is snapshot {found}: \
         they do not belong together"
    )]
    WrongBase {
        diff: PathBuf,
        base: PathBuf,
        wanted: String,
        found: String,
    },
    #[error(
        "{diff} and {base} describe different guest memory ({diff_mib} MiB vs {base_mib} MiB, or \
         another region layout)"
    )]
    LayoutMismatch {
        diff: PathBuf,
        base: PathBuf,
        diff_mib: u64,
        base_mib: u64,
    },
    #[error("--out-snapshot and --out-mem must be different files")]
    SameOutput,
}

/// Checks that the diff belongs to the base, then writes the merged snapshot (memory file first,
/// state file last, each atomically).
pub fn merge(paths: &MergePaths) -> Result<(), MergeError> {
    if same_file_name(&paths.out_snapshot, &paths.out_mem) {
        return Err(MergeError::SameOutput);
    }
    let (base, base_checksum): (MicrovmState, _) =
        snapshot::read_state_file_with_checksum(&paths.base_snapshot)?;
    let (diff, diff_checksum): (MicrovmState, _) =
        snapshot::read_state_file_with_checksum(&paths.diff_snapshot)?;
    if let MemoryKind::Diff { .. } = base.memory_kind {
        return Err(MergeError::BaseIsDiff(paths.base_snapshot.clone()));
    }
    let MemoryKind::Diff {
        base: wanted,
        dirty,
    } = &diff.memory_kind
    else {
        return Err(MergeError::NotADiff(paths.diff_snapshot.clone()));
    };
    let found = base.identity(base_checksum);
    if *wanted != found {
        return Err(MergeError::WrongBase {
            diff: paths.diff_snapshot.clone(),
            base: paths.base_snapshot.clone(),
            wanted: short_id(wanted),
            found: short_id(&found),
        });
    }
    if diff.memory != base.memory || diff.mem_mib != base.mem_mib {
        return Err(MergeError::LayoutMismatch {
            diff: paths.diff_snapshot.clone(),
            base: paths.base_snapshot.clone(),
            diff_mib: diff.mem_mib,
            base_mib: base.mem_mib,
        });
    }
    let merged_mem = snapshot::merge_memory_files(
        &paths.base_mem,
        &paths.diff_mem,
        &diff.memory,
        dirty,
        &paths.out_mem,
    )?;
    let merged = MicrovmState {
        memory_kind: MemoryKind::Full,
        merged_from: Some(diff_checksum),
        ..diff
    };
    let (state_file, _) = snapshot::prepare_state_file(&paths.out_snapshot, &merged)?;
    snapshot::commit_snapshot(merged_mem, state_file)?;
    Ok(())
}

fn same_file_name(a: &Path, b: &Path) -> bool {
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
