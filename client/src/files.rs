//! File transfer and filesystem operations. Transfers are streamed in chunks under the stream
//! windows, so host memory stays bounded whatever the file size.

use std::io::{self, Read, Write};
use std::time::Instant;

use agentvm_protocol::{
    DirEntry, Eof, FileMetadata, ListDir, MakeDir, Message, ReadFile, RemovePath, StatPath, Stream,
    WriteFile, MAX_CHUNK,
};

use crate::client::AgentClient;
use crate::connection::{Call, Ended, SendError};
use crate::error::{ClientError, Result};

/// How [`AgentClient::write_file`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOptions {
    /// Permission bits; the replaced file's, or 0o644 for a new file, when `None`.
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub create_parents: bool,
    /// Write a temporary file and rename it over the path, so readers never see a partial file.
    pub atomic: bool,
}

impl AgentClient {
    /// Streams `len` bytes (to the end when `None`) of guest file `path` from `offset` into `out`;
    /// returns the file's metadata. Each wait for the next chunk is bounded by the call timeout.
    pub fn read_file(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<FileMetadata> {
        let mut call = self.start(|id| {
            Message::ReadFile(ReadFile {
                id,
                path: path.to_string(),
                offset,
                len,
            })
        })?;
        let what = format!("the contents of {path}");
        let metadata = match self.next(&mut call, &what)? {
            Message::Metadata(m) => m.metadata,
            other => return Err(call.unexpected(&other, &what)),
        };
        loop {
            match self.next(&mut call, &what)? {
                Message::Data(data) if data.stream == Stream::Stdout => {
                    out.write_all(&data.data).map_err(|e| {
                        ClientError::Io(io::Error::new(
                            e.kind(),
                            format!("writing the contents of guest file {path} failed: {e}"),
                        ))
                    })?;
                    call.link().consumed(Stream::Stdout, data.data.len())?;
                }
                Message::Eof(eof) if eof.stream == Stream::Stdout => {}
                Message::Done(_) => return Ok(metadata),
                other => return Err(call.unexpected(&other, &what)),
            }
        }
    }

    /// The whole guest file `path`.
    pub fn read_to_vec(&self, path: &str) -> Result<Vec<u8>> {
        let mut contents = Vec::new();
        self.read_file(path, 0, None, &mut contents)?;
        Ok(contents)
    }

    /// Writes everything `src` yields to guest file `path`; returns the bytes the agent wrote.
    /// Each wait for window credit is bounded by the call timeout.
    pub fn write_file(&self, path: &str, src: &mut dyn Read, options: WriteOptions) -> Result<u64> {
        let mut call = self.start(|id| {
            Message::WriteFile(WriteFile {
                id,
                path: path.to_string(),
                mode: options.mode,
                create_parents: options.create_parents,
                atomic: options.atomic,
            })
        })?;
        let what = format!("the guest to write {path}");
        let mut chunk = vec![0u8; MAX_CHUNK];
        let mut refused = false;
        'upload: loop {
            let n = match src.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Dropping `call` sends Close: the agent discards the partial upload.
                    return Err(ClientError::Io(io::Error::new(
                        e.kind(),
                        format!("reading the data for guest file {path} failed: {e}"),
                    )));
                }
            };
            let mut rest = &chunk[..n];
            while !rest.is_empty() {
                let deadline = Instant::now() + self.call_timeout;
                match call.link().send_data(Stream::Stdin, rest, Some(deadline)) {
                    Ok(sent) => rest = &rest[sent..],
                    // The agent answered early, which can only be an error: read it below.
                    Err(SendError::Ended(Ended::Finished)) => {
                        refused = true;
                        break 'upload;
                    }
                    Err(SendError::Ended(Ended::Failed(failure))) => return Err(failure.to_error()),
                    Err(SendError::TimedOut) => {
                        return Err(ClientError::TimedOut {
                            what: format!("the guest to accept more data for {path}"),
                            after: self.call_timeout,
                        })
                    }
                    Err(SendError::Failed(e)) => return Err(e),
                }
            }
        }
        if !refused {
            call.link().send_control(&Message::Eof(Eof {
                id: call.id(),
                stream: Stream::Stdin,
            }))?;
        }
        match self.next(&mut call, &what)? {
            Message::Written(written) => Ok(written.bytes),
            other => Err(call.unexpected(&other, &what)),
        }
    }

    /// The entries of guest directory `path` (symlinks not followed).
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        let mut call = self.start(|id| {
            Message::ListDir(ListDir {
                id,
                path: path.to_string(),
            })
        })?;
        let what = format!("the entries of {path}");
        let mut entries = Vec::new();
        loop {
            match self.next(&mut call, &what)? {
                Message::DirEntries(batch) => entries.extend(batch.entries),
                Message::Done(_) => return Ok(entries),
                other => return Err(call.unexpected(&other, &what)),
            }
        }
    }

    /// Metadata of guest `path`; of the link itself unless `follow_symlinks`.
    pub fn stat(&self, path: &str, follow_symlinks: bool) -> Result<FileMetadata> {
        let mut call = self.conn.start_call(true, |id| {
            Message::StatPath(StatPath {
                id,
                path: path.to_string(),
                follow_symlinks,
            })
        })?;
        let what = format!("the metadata of {path}");
        match self.next(&mut call, &what)? {
            Message::Metadata(m) => Ok(m.metadata),
            other => Err(call.unexpected(&other, &what)),
        }
    }

    /// Creates guest directory `path` (`mode` defaults to 0o755), with its parents if `parents`.
    pub fn mkdir(&self, path: &str, parents: bool, mode: Option<u32>) -> Result<()> {
        let mut call = self.start(|id| {
            Message::MakeDir(MakeDir {
                id,
                path: path.to_string(),
                parents,
                mode,
            })
        })?;
        self.expect_done(&mut call, &format!("the guest to create {path}"))
    }

    /// Removes a guest file, symlink or empty directory; with `recursive`, a whole tree.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let mut call: Call = self.start(|id| {
            Message::RemovePath(RemovePath {
                id,
                path: path.to_string(),
                recursive,
            })
        })?;
        self.expect_done(&mut call, &format!("the guest to remove {path}"))
    }
}
