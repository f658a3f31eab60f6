//! `ReadFile`: a byte range of a regular file, read chunk by chunk so that the agent never holds
//! more than one chunk of it (the sender blocks on the stream's window between chunks).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use agentvm_protocol::{FileMetadata, FileType};

use super::file_ops::file_metadata;
use super::service_error::{require_absolute, ServiceError, StreamFailure};

/// An open file positioned at the requested offset, with the number of bytes left to send.
#[derive(Debug)]
pub struct RangeReader {
    file: File,
    path: PathBuf,
    metadata: FileMetadata,
    /// `None`: to the end of the file.
    remaining: Option<u64>,
}

impl RangeReader {
    /// Opens `path` (following symlinks) for reading `len` bytes (all when `None`) from
    /// `offset`. Only regular files: a FIFO or a device could block or never end.
    pub fn open(path: &str, offset: u64, len: Option<u64>) -> Result<Self, ServiceError> {
        let p = require_absolute(path, "read")?;
        let fail = |e: &io::Error| ServiceError::io("read", p, e);
        // O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it; reads
        // of regular files ignore the flag.
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .map_err(|e| fail(&e))?;
        let meta = file.metadata().map_err(|e| fail(&e))?;
        let metadata = file_metadata(p, &meta);
        if metadata.file_type != FileType::File {
            let what = if metadata.file_type == FileType::Dir {
                "Is a directory"
            } else {
                "not a regular file"
            };
            return Err(ServiceError::invalid(format!(
                "cannot read {}: {what}",
                p.display()
            )));
        }
        file.seek(SeekFrom::Start(offset)).map_err(|e| {
            ServiceError::invalid(format!(
                "cannot read {} from offset {offset}: {}",
                p.display(),
                super::service_error::os_reason(&e)
            ))
        })?;
        Ok(Self {
            file,
            path: p.to_path_buf(),
            metadata,
            remaining: len,
        })
    }

    /// The file's metadata, sent before its contents.
    pub fn metadata(&self) -> &FileMetadata {
        &self.metadata
    }

    /// Reads the next piece into `buf`; 0 at the end of the range.
    pub fn next_chunk(&mut self, buf: &mut [u8]) -> Result<usize, ServiceError> {
        let want = match self.remaining {
            Some(left) => buf.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            match self.file.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ServiceError::io("read", &self.path, &e)),
            }
        };
        if let Some(left) = &mut self.remaining {
            *left -= n as u64;
        }
        Ok(n)
    }

    /// Feeds the whole range to `sink` in pieces of at most `chunk` bytes.
    pub fn copy_to<E>(
        &mut self,
        chunk: usize,
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, StreamFailure<E>> {
        let mut buf = vec![0u8; chunk];
        let mut total = 0u64;
        loop {
            let n = self.next_chunk(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            sink(&buf[..n]).map_err(StreamFailure::Sink)?;
            total += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::ErrorCode;
    use std::fs;

    fn read_all(path: &str, offset: u64, len: Option<u64>, chunk: usize) -> Vec<u8> {
        let mut reader = RangeReader::open(path, offset, len).unwrap();
        let mut out = Vec::new();
        reader
            .copy_to::<()>(chunk, |piece| {
                assert!(piece.len() <= chunk);
                out.extend_from_slice(piece);
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn reads_ranges_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &data).unwrap();
        let p = path.to_str().unwrap();

        assert_eq!(read_all(p, 0, None, 4096), data);
        assert_eq!(read_all(p, 10, Some(5), 4096), &data[10..15]);
        assert_eq!(read_all(p, 99_990, Some(1000), 3), &data[99_990..]);
        assert_eq!(read_all(p, 200_000, None, 4096), b"");
        assert_eq!(read_all(p, 0, Some(0), 4096), b"");
        let reader = RangeReader::open(p, 0, None).unwrap();
        assert_eq!(reader.metadata().size, 100_000);
    }

    #[test]
    fn refuses_directories_devices_fifos_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let err = RangeReader::open(d, 0, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert_eq!(err.message, format!("cannot read {d}: Is a directory"));

        let err = RangeReader::open("/dev/zero", 0, None).unwrap_err();
        assert_eq!(err.message, "cannot read /dev/zero: not a regular file");

        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path it is given.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = RangeReader::open(fifo.to_str().unwrap(), 0, None).unwrap_err();
        assert!(
            err.message.ends_with("not a regular file"),
            "{}",
            err.message
        );

        let missing = dir.path().join("missing");
        let err = RangeReader::open(missing.to_str().unwrap(), 0, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err.message.contains(missing.to_str().unwrap()));

        let err = RangeReader::open("x", 0, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn a_failing_sink_stops_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        fs::write(&path, vec![1u8; 10_000]).unwrap();
        let mut reader = RangeReader::open(path.to_str().unwrap(), 0, None).unwrap();
        let mut calls = 0;
        let result = reader.copy_to(1000, |_| {
            calls += 1;
            if calls == 3 {
                Err("gone")
            } else {
                Ok(())
            }
        });
        assert!(matches!(result, Err(StreamFailure::Sink("gone"))));
        assert_eq!(calls, 3);
    }
}
