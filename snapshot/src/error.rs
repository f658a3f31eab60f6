//! Every way a snapshot can fail to be written or read, each naming the file and what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an agentvm snapshot state file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error(
        "{path}: snapshot format version {found} is not supported (this agentvm reads version \
         {supported})"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: truncated state file ({found} bytes, the header says {expected})")]
    Truncated {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path}: state file longer than its header says ({found} bytes, expected {expected})")]
    TrailingBytes {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path}: state file checksum mismatch (the file is corrupt)")]
    Checksum { path: PathBuf },
    #[error("{path}: cannot decode the snapshot state: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
    #[error("{path}: memory file is {found} bytes, the snapshot's memory layout needs {expected}")]
    MemoryFileSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path}: {reason}")]
    WorkingSet { path: PathBuf, reason: String },
    #[error("invalid memory layout in the snapshot: {0}")]
    Layout(String),
}

impl SnapshotError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
