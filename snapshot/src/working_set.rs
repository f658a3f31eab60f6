//! The working-set file: which pages of a memory file a restored guest touched first, in the
//! order it touched them. A userfaultfd restore writes it beside the memory file
//! (`<mem file>.ws`) on the first restore and, on later restores, copies those pages in one
//! batched pass before the vCPUs run (the rest stay lazy).
//!
//! ```text
//! offset  size  field
//! 0       8     magic "AGVMWSET"
//! 8       4     format version (u32 little-endian)
//! 12      8     length of the memory file it was recorded from (u64 little-endian)
//! 20      8     that memory file's mtime in ns since the epoch (u64 little-endian)
//! 28      8     page count n (u64 little-endian)
//! 36      32    SHA-256 of the page list
//! 68      8n    page indexes in the memory file (u64 little-endian each), in fault order
//! ```
//! The memory file's length and mtime tie the set to one memory file: a set left over from an
//! earlier snapshot under the same name is recognised as stale (see [`WorkingSet::matches`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::atomic_write::AtomicFile;
use crate::SnapshotError;

pub const WS_MAGIC: [u8; 8] = *b"AGVMWSET";
pub const WS_FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 8 + 32;
const PAGE: u64 = 4096;

/// Pages recorded from one memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    pub mem_file_len: u64,
    pub mem_file_mtime_ns: u64,
    /// Page indexes (file offset / 4096), in the order the guest first touched them.
    pub pages: Vec<u64>,
}

/// Where the working set of `mem_file` lives.
pub fn working_set_path(mem_file: &Path) -> PathBuf {
    let mut name = mem_file.as_os_str().to_os_string();
    name.push(".ws");
    PathBuf::from(name)
}

/// The (length, mtime ns) identity of an open memory file.
pub fn memory_file_identity(
    path: &Path,
    file: &std::fs::File,
) -> Result<(u64, u64), SnapshotError> {
    let meta = file.metadata().map_err(SnapshotError::io(path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Ok((meta.len(), mtime))
}

impl WorkingSet {
    /// Whether the set was recorded from a memory file of this identity.
    pub fn matches(&self, identity: (u64, u64)) -> bool {
        (self.mem_file_len, self.mem_file_mtime_ns) == identity
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut list = Vec::with_capacity(self.pages.len() * 8);
        for page in &self.pages {
            list.extend_from_slice(&page.to_le_bytes());
        }
        let mut out = Vec::with_capacity(HEADER_LEN + list.len());
        out.extend_from_slice(&WS_MAGIC);
        out.extend_from_slice(&WS_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.mem_file_len.to_le_bytes());
        out.extend_from_slice(&self.mem_file_mtime_ns.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&list));
        out.extend_from_slice(&list);
        out
    }

    /// Checks every header field and each page index (inside the memory file it names).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let bad = |reason: String| SnapshotError::WorkingSet {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < WS_MAGIC.len() || bytes[..WS_MAGIC.len()] != WS_MAGIC {
            return Err(bad("not an agentvm working-set file (bad magic)".into()));
        }
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!(
                "truncated ({} bytes, the header alone is {HEADER_LEN})",
                bytes.len()
            )));
        }
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let mut version = [0u8; 4];
        version.copy_from_slice(&bytes[8..12]);
        let version = u32::from_le_bytes(version);
        if version != WS_FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} is not supported (this agentvm reads version \
                 {WS_FORMAT_VERSION})"
            )));
        }
        let mem_file_len = u64_at(12);
        let mem_file_mtime_ns = u64_at(20);
        let count = u64_at(28);
        let expected = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(HEADER_LEN as u64));
        if expected != Some(bytes.len() as u64) {
            return Err(bad(format!(
                "{} bytes, but the header says {count} pages ({} bytes)",
                bytes.len(),
                expected.map_or("too many".into(), |n| n.to_string())
            )));
        }
        let list = &bytes[HEADER_LEN..];
        if Sha256::digest(list).as_slice() != &bytes[36..HEADER_LEN] {
            return Err(bad("checksum mismatch (the file is corrupt)".into()));
        }
        let pages: Vec<u64> = list
            .chunks_exact(8)
            .map(|c| {
                let mut field = [0u8; 8];
                field.copy_from_slice(c);
                u64::from_le_bytes(field)
            })
            .collect();
        let file_pages = mem_file_len / PAGE;
        if let Some(page) = pages.iter().find(|&&p| p >= file_pages) {
            return Err(bad(format!(
                "page {page} is past the end of its {mem_file_len}-byte memory file"
            )));
        }
        Ok(Self {
            mem_file_len,
            mem_file_mtime_ns,
            pages,
        })
    }
}

/// Writes `set` to `path` atomically (temporary file, fsync, rename).
pub fn write_working_set(path: &Path, set: &WorkingSet) -> Result<(), SnapshotError> {
    let file = AtomicFile::create(path)?;
    file.file()
        .write_all(&set.encode())
        .map_err(SnapshotError::io(file.temp_path()))?;
    file.commit()
}

/// Reads and checks the working set at `path`; `Ok(None)` when there is none.
pub fn read_working_set(path: &Path) -> Result<Option<WorkingSet>, SnapshotError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapshotError::io(path)(e)),
    };
    // A set names at most every page of a memory file; this bounds a hostile length field
    // before anything is read (64 MiB of indexes = 32 GiB of guest RAM).
    const MAX: u64 = 64 << 20;
    let mut bytes = Vec::new();
    file.take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(SnapshotError::io(path))?;
    if bytes.len() as u64 > MAX {
        return Err(SnapshotError::WorkingSet {
            path: path.to_path_buf(),
            reason: format!("more than {MAX} bytes: not a working-set file"),
        });
    }
    WorkingSet::decode(path, &bytes).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            mem_file_len: 64 << 12,
            mem_file_mtime_ns: 1_700_000_000_123_456_789,
            pages: vec![5, 1, 2, 63, 0],
        }
    }

    fn reason(bytes: &[u8]) -> String {
        WorkingSet::decode(Path::new("x.ws"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = working_set_path(&dir.path().join("vm.mem"));
        assert_eq!(path, dir.path().join("vm.mem.ws"));
        assert_eq!(read_working_set(&path).unwrap(), None);
        write_working_set(&path, &sample()).unwrap();
        let back = read_working_set(&path).unwrap().unwrap();
        assert_eq!(back, sample());
        assert!(back.matches((64 << 12, 1_700_000_000_123_456_789)));
        assert!(!back.matches((64 << 12, 1)));
    }

    #[test]
    fn each_corruption_has_its_own_error() {
        let good = sample().encode();
        assert!(reason(b"AGVMSNAP").contains("bad magic"));
        assert!(reason(&good[..20]).contains("truncated"));
        let mut version = good.clone();
        version[8] = 9;
        assert!(reason(&version).contains("version 9"));
        assert!(reason(&good[..good.len() - 3]).contains("header says 5 pages"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(reason(&longer).contains("header says 5 pages"));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(reason(&flipped).contains("checksum"));
        let mut huge_count = good.clone();
        huge_count[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(reason(&huge_count).contains("too many"));
        let past_end = WorkingSet {
            pages: vec![64],
            ..sample()
        };
        assert!(reason(&past_end.encode()).contains("past the end"));
    }
}
