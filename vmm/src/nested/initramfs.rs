//! Writing the L1 initramfs: an uncompressed newc cpio archive.
//!
//! Uncompressed on purpose: L1 runs under TCG, where the kernel would spend seconds inflating a
//! compressed archive, while QEMU loads the plain one from the page cache in no time.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::NestedError;

const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFCHR: u32 = 0o020_000;

/// Where an entry's content comes from.
#[derive(Debug)]
pub(crate) enum Source {
    Host(PathBuf),
    Inline(Vec<u8>),
}

#[derive(Debug)]
pub(crate) struct FileEntry {
    /// Absolute path inside L1 ("/bin/busybox").
    pub path: String,
    pub mode: u32,
    pub source: Source,
}

impl FileEntry {
    pub fn host(path: &str, mode: u32, host: &Path) -> Self {
        FileEntry {
            path: path.to_string(),
            mode,
            source: Source::Host(host.to_path_buf()),
        }
    }

    pub fn inline(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        FileEntry {
            path: path.to_string(),
            mode,
            source: Source::Inline(data.into()),
        }
    }
}

/// Directories that exist in every L1 root besides the parents of the files.
const BASE_DIRS: [&str; 7] = ["/dev", "/proc", "/sys", "/tmp", "/root", "/etc", "/bin"];

/// Writes the archive to `out` and returns its size in bytes.
pub(crate) fn write(out: &Path, files: &[FileEntry]) -> Result<u64, NestedError> {
    let ctx = |what: &str| format!("writing the L1 initramfs {} ({what})", out.display());
    let file = File::create(out).map_err(|e| NestedError::io(ctx("create"), e))?;
    let mut w = Archive {
        out: CountingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            written: 0,
        },
        next_ino: 1,
    };

    let mut dirs: BTreeSet<String> = BASE_DIRS.iter().map(|d| d.to_string()).collect();
    for f in files {
        let mut parent = Path::new(&f.path).parent();
        while let Some(p) = parent {
            if p != Path::new("/") {
                dirs.insert(p.to_string_lossy().into_owned());
            }
            parent = p.parent();
        }
    }
    // BTreeSet order puts every parent before its children.
    for d in &dirs {
        w.entry(d, S_IFDIR | 0o755, 2, (0, 0), &mut io::empty(), 0)
            .map_err(|e| NestedError::io(ctx(d), e))?;
    }
    // The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    w.entry(
        "/dev/console",
        S_IFCHR | 0o600,
        1,
        (5, 1),
        &mut io::empty(),
        0,
    )
    .map_err(|e| NestedError::io(ctx("/dev/console"), e))?;

    for f in files {
        match &f.source {
            Source::Inline(data) => w
                .entry(
                    &f.path,
                    S_IFREG | f.mode,
                    1,
                    (0, 0),
                    &mut data.as_slice(),
                    data.len() as u64,
                )
                .map_err(|e| NestedError::io(ctx(&f.path), e))?,
            Source::Host(host) => {
                let mut src = File::open(host).map_err(|e| {
                    NestedError::io(format!("{} (reading {})", ctx(&f.path), host.display()), e)
                })?;
                let len = src
                    .metadata()
                    .map_err(|e| NestedError::io(ctx(&f.path), e))?
                    .len();
                w.entry(&f.path, S_IFREG | f.mode, 1, (0, 0), &mut src, len)
                    .map_err(|e| {
                        NestedError::io(format!("{} (from {})", ctx(&f.path), host.display()), e)
                    })?;
            }
        }
    }

    cpio::newc::trailer(&mut w.out).map_err(|e| NestedError::io(ctx("trailer"), e))?;
    w.out
        .flush()
        .map_err(|e| NestedError::io(ctx("flush"), e))?;
    Ok(w.out.written)
}

struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Archive<W: Write> {
    out: CountingWriter<W>,
    next_ino: u32,
}

impl<W: Write> Archive<W> {
    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &mut dyn Read,
        len: u64,
    ) -> io::Result<()> {
        // newc stores sizes in 32 bits.
        let size = u32::try_from(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path} is {len} bytes, more than a newc cpio entry can hold"),
            )
        })?;
        let name = path.trim_start_matches('/');
        let builder = cpio::newc::Builder::new(name)
            .ino(self.next_ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1);
        self.next_ino += 1;
        let mut writer = builder.write(&mut self.out, size);
        let copied = io::copy(&mut Read::take(&mut *data, len), &mut writer)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {len} bytes, read {copied}"),
            ));
        }
        writer.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, (rdev major, rdev minor), content)
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    fn read_back(path: &Path) -> Vec<Entry> {
        let mut input = File::open(path).unwrap();
        let mut entries = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(input).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let meta = (
                e.name().to_string(),
                e.mode(),
                (e.rdev_major(), e.rdev_minor()),
            );
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            entries.push((meta.0, meta.1, meta.2, data));
            input = reader.finish().unwrap();
        }
        entries
    }

    #[test]
    fn archive_holds_dirs_console_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let host_file = dir.path().join("payload");
        std::fs::write(&host_file, b"kernel bytes").unwrap();
        let out = dir.path().join("out.cpio");
        let size = write(
            &out,
            &[
                FileEntry::inline("/init", 0o755, "#!/bin/sh\n"),
                FileEntry::host("/l2/deep/vmlinux", 0o644, &host_file),
            ],
        )
        .unwrap();
        assert_eq!(size, std::fs::metadata(&out).unwrap().len());

        let entries = read_back(&out);
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.0 == name)
                .unwrap_or_else(|| panic!("{name} missing from {entries:?}"))
        };
        assert_eq!(find("init").1, S_IFREG | 0o755);
        assert_eq!(find("init").3, b"#!/bin/sh\n");
        assert_eq!(find("l2/deep/vmlinux").3, b"kernel bytes");
        assert_eq!(find("dev/console").1, S_IFCHR | 0o600);
        assert_eq!(find("dev/console").2, (5, 1));
        for d in ["l2", "l2/deep", "proc", "sys", "dev", "tmp"] {
            assert_eq!(find(d).1, S_IFDIR | 0o755);
        }
        let pos = |name: &str| entries.iter().position(|e| e.0 == name).unwrap();
        assert!(pos("l2") < pos("l2/deep") && pos("l2/deep") < pos("l2/deep/vmlinux"));
    }

    #[test]
    fn missing_host_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(
            &dir.path().join("out.cpio"),
            &[FileEntry::host("/bin/x", 0o755, &dir.path().join("nope"))],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/bin/x") && msg.contains("nope"), "{msg}");
    }
}
