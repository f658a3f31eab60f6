//! The state file: a fixed header, then a postcard-encoded payload.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "AGVMSNAP"
//! 8       4     format version (u32 little-endian)
//! 12      8     payload length in bytes (u64 little-endian)
//! 20      32    SHA-256 of the payload
//! 52      n     payload
//! ```
//! The header is checked field by field before anything is decoded, so each corruption gets its
//! own error: bad magic, unsupported version, truncated (or overlong) file, checksum mismatch.

use std::io::{Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::atomic_write::AtomicFile;
use crate::SnapshotError;

pub const MAGIC: [u8; 8] = *b"AGVMSNAP";
/// Bumped whenever the payload's types change shape: postcard has no field names or tags, so a
/// reader must know the exact layout the writer used.
pub const FORMAT_VERSION: u32 = 4;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// Byte offset of the version field, for tests that forge other versions.
pub const VERSION_OFFSET: usize = 8;
/// State files hold registers and device state (kilobytes); anything this large is not one, and
/// is refused before it is read into memory.
const MAX_STATE_FILE: u64 = 64 << 20;

/// Encodes `state` with its header: the whole state file's bytes.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_stdvec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the header of `bytes` (read from `path`, named in errors) and decodes the payload.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, SnapshotError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        // A file cut inside the magic is as unrecognisable as one with another magic.
        return Err(SnapshotError::BadMagic { path: path_buf() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path: path_buf(),
            found: bytes.len() as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            path: path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let payload_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let expected = (HEADER_LEN as u64).saturating_add(payload_len);
    let found = bytes.len() as u64;
    if found < expected {
        return Err(SnapshotError::Truncated {
            path: path_buf(),
            found,
            expected,
        });
    }
    if found > expected {
        return Err(SnapshotError::TrailingBytes {
            path: path_buf(),
            found,
            expected,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if Sha256::digest(payload).as_slice() != &bytes[20..HEADER_LEN] {
        return Err(SnapshotError::Checksum { path: path_buf() });
    }
    postcard::from_bytes(payload).map_err(|e| SnapshotError::Decode {
        path: path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `state` to `path` atomically (temporary file, fsync, rename); returns its checksum, which
/// identifies the snapshot (a diff snapshot names its base by it).
pub fn write_state_file<T: Serialize>(path: &Path, state: &T) -> Result<[u8; 32], SnapshotError> {
    let (file, checksum) = prepare_state_file(path, state)?;
    file.commit()?;
    Ok(checksum)
}

/// Writes `state` to a temporary file beside `path`, for the caller to commit once the memory
/// file beside it is in place; returns the file and the payload's checksum.
pub fn prepare_state_file<T: Serialize>(
    path: &Path,
    state: &T,
) -> Result<(AtomicFile, [u8; 32]), SnapshotError> {
    let bytes = encode(state)?;
    let mut checksum = [0u8; 32];
    checksum.copy_from_slice(&bytes[20..HEADER_LEN]);
    let file = AtomicFile::create(path)?;
    file.file()
        .write_all(&bytes)
        .map_err(SnapshotError::io(file.temp_path()))?;
    Ok((file, checksum))
}

/// Reads and checks the state file at `path`.
pub fn read_state_file<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    read_state_file_with_checksum(path).map(|(state, _)| state)
}

/// Reads and checks the state file at `path`; also returns its checksum (the snapshot's identity).
pub fn read_state_file_with_checksum<T: DeserializeOwned>(
    path: &Path,
) -> Result<(T, [u8; 32]), SnapshotError> {
    let file = std::fs::File::open(path).map_err(SnapshotError::io(path))?;
    let len = file.metadata().map_err(SnapshotError::io(path))?.len();
    if len > MAX_STATE_FILE {
        return Err(SnapshotError::Decode {
            path: path.to_path_buf(),
            reason: format!("{len} bytes is more than a state file can be ({MAX_STATE_FILE})"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_STATE_FILE)
        .read_to_end(&mut bytes)
        .map_err(SnapshotError::io(path))?;
    let state = decode(path, &bytes)?;
    let mut checksum = [0u8; 32];
    checksum.copy_from_slice(&bytes[20..HEADER_LEN]);
    Ok((state, checksum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        flag: Option<bool>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            regs: (0..64).map(|i| i * 0x1111).collect(),
            flag: Some(true),
        }
    }

    fn written() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        write_state_file(&path, &sample()).unwrap();
        (dir, path)
    }

    #[test]
    fn round_trips() {
        let (_dir, path) = written();
        assert_eq!(read_state_file::<Sample>(&path).unwrap(), sample());
    }

    #[test]
    fn truncated_file_is_named_truncated() {
        let (_dir, path) = written();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 1, HEADER_LEN + 1, HEADER_LEN - 1, 10] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = read_state_file::<Sample>(&path).unwrap_err();
            assert!(
                matches!(err, SnapshotError::Truncated { .. }),
                "{cut}: {err}"
            );
            assert!(err.to_string().contains("truncated"), "{err}");
        }
        std::fs::write(&path, &bytes[..4]).unwrap();
        let err = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(err, SnapshotError::BadMagic { .. }), "{err}");
    }

    #[test]
    fn any_flipped_payload_byte_fails_the_checksum() {
        let (_dir, path) = written();
        let bytes = std::fs::read(&path).unwrap();
        for at in HEADER_LEN..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let err = decode::<Sample>(&path, &bad).unwrap_err();
            assert!(matches!(err, SnapshotError::Checksum { .. }), "{at}: {err}");
        }
        let mut bad = bytes.clone();
        bad[25] ^= 1; // inside the stored checksum
        let err = decode::<Sample>(&path, &bad).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn header_corruptions_get_their_own_errors() {
        let (_dir, path) = written();
        let bytes = std::fs::read(&path).unwrap();

        let mut bad = bytes.clone();
        bad[0] = b'X';
        let err = decode::<Sample>(&path, &bad).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");

        let mut bad = bytes.clone();
        bad[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&7u32.to_le_bytes());
        let err = decode::<Sample>(&path, &bad).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::UnsupportedVersion {
                    found: 7,
                    supported: FORMAT_VERSION,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("version 7"), "{err}");

        let mut bad = bytes.clone();
        bad.push(0);
        let err = decode::<Sample>(&path, &bad).unwrap_err();
        assert!(matches!(err, SnapshotError::TrailingBytes { .. }), "{err}");
    }

    #[test]
    fn a_valid_file_of_another_shape_is_a_decode_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.snap");
        write_state_file(&path, &(1u8,)).unwrap();
        let err = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(err, SnapshotError::Decode { .. }), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_state_file::<Sample>(Path::new("/nonexistent/vm.snap")).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/vm.snap"), "{err}");
    }
}
