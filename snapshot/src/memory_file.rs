//! The memory file: guest RAM regions back to back, raw, so a restore can mmap it directly.
//! All-zero pages are not written (the file is sized first, so they read back as zeroes from
//! holes): a freshly booted guest's memory is mostly zero and its file takes little disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::atomic_write::AtomicFile;
use crate::SnapshotError;

const PAGE: usize = 4096;
/// Guest memory is copied through a buffer of this size.
const CHUNK: usize = 1 << 20;

/// One guest RAM region and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Guest RAM as the memory file holds it; stored in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<MemoryRegion>,
}

impl MemoryLayout {
    /// Regions laid out back to back in the file, in the order given.
    pub fn packed(regions: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut offset = 0;
        let regions = regions
            .into_iter()
            .map(|(guest_addr, size)| {
                let region = MemoryRegion {
                    guest_addr,
                    size,
                    file_offset: offset,
                };
                offset += size;
                region
            })
            .collect();
        Self { regions }
    }

    /// Bytes of guest RAM (and of the memory file). A layout read from a file may be asked
    /// before [`validate`](Self::validate) refuses it: sizes that add up past `u64::MAX` give
    /// `u64::MAX` (no machine's size, as it is not a whole number of pages) instead of an
    /// overflow (a panic with overflow checks, a wrong small sum without).
    pub fn total_size(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |total, r| total.saturating_add(r.size))
    }

    /// A layout read from a state file is untrusted until this passes: page-aligned, non-empty,
    /// packed regions whose guest ranges do not overlap.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |why: String| Err(SnapshotError::Layout(why));
        if self.regions.is_empty() {
            return bad("no memory regions".into());
        }
        let mut offset = 0u64;
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.size % PAGE as u64 != 0 || r.guest_addr % PAGE as u64 != 0 {
                return bad(format!(
                    "region {i} ({:#x}+{:#x}) is empty or not page-aligned",
                    r.guest_addr, r.size
                ));
            }
            if r.file_offset != offset {
                return bad(format!(
                    "region {i} is at file offset {:#x}, expected {offset:#x}",
                    r.file_offset
                ));
            }
            let Some(end) = r.guest_addr.checked_add(r.size) else {
                return bad(format!("region {i} wraps the address space"));
            };
            if i > 0 && r.guest_addr < prev_end {
                return bad(format!("region {i} overlaps or precedes region {}", i - 1));
            }
            prev_end = end;
            offset += r.size;
        }
        Ok(())
    }
}

/// A run of consecutive pages of the memory file (page = 4 KiB, counted from the file's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub first_page: u64,
    pub pages: u64,
}

/// What a memory file holds; recorded in the state file beside the layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryKind {
    /// All of guest RAM.
    Full,
    /// Only the pages in `dirty` (written at their offsets; holes elsewhere), as they were when
    /// this snapshot was taken; the rest is the memory of the snapshot whose state file's
    /// checksum is `base`. Restoring needs `agentvm snapshot merge` onto that base first.
    Diff { base: [u8; 32], dirty: Vec<PageRun> },
}

impl MemoryLayout {
    /// Refuses page runs that reach past the memory file (a diff read from an untrusted file).
    pub fn check_runs(&self, runs: &[PageRun]) -> Result<(), SnapshotError> {
        let pages = self.total_size() / PAGE as u64;
        for run in runs {
            let end = run.first_page.checked_add(run.pages);
            if run.pages == 0 || end.is_none_or(|end| end > pages) {
                return Err(SnapshotError::Layout(format!(
                    "dirty page run {}+{} is outside the {pages}-page memory file",
                    run.first_page, run.pages
                )));
            }
        }
        Ok(())
    }
}

/// Writes guest RAM to `path` atomically. `read(region, offset, buf)` fills `buf` with the
/// region's bytes from `offset` (the caller owns guest memory and how to read it safely).
pub fn write_memory_file(
    path: &Path,
    layout: &MemoryLayout,
    read: impl FnMut(&MemoryRegion, u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    prepare_memory_file(path, layout, None, read)?.commit()
}

/// Writes guest RAM (all of it, or only the `dirty` page runs for a diff) to a temporary file
/// beside `path`, synced but not yet renamed: the caller commits it together with its state file,
/// state file last, so a failure in between leaves the previous snapshot as it was.
pub fn prepare_memory_file(
    path: &Path,
    layout: &MemoryLayout,
    dirty: Option<&[PageRun]>,
    mut read: impl FnMut(&MemoryRegion, u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<AtomicFile, SnapshotError> {
    layout.validate()?;
    let whole: Vec<PageRun>;
    let runs = match dirty {
        Some(runs) => {
            layout.check_runs(runs)?;
            runs
        }
        None => {
            whole = vec![PageRun {
                first_page: 0,
                pages: layout.total_size() / PAGE as u64,
            }];
            &whole
        }
    };
    let out = AtomicFile::create(path)?;
    let temp = out.temp_path().to_path_buf();
    out.file()
        .set_len(layout.total_size())
        .map_err(SnapshotError::io(&temp))?;
    let mut buf = vec![0u8; CHUNK];
    for (region, start, end) in runs.iter().flat_map(|run| run_in_regions(layout, run)) {
        let mut done = start;
        while done < end {
            let len = CHUNK.min((end - done) as usize);
            let chunk = &mut buf[..len];
            read(region, done, chunk).map_err(|source| SnapshotError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    source.kind(),
                    format!(
                        "reading guest memory at {:#x}: {source}",
                        region.guest_addr + done
                    ),
                ),
            })?;
            write_nonzero_pages(out.file(), region.file_offset + done, chunk)
                .map_err(SnapshotError::io(&temp))?;
            done += len as u64;
        }
    }
    out.file().sync_all().map_err(SnapshotError::io(&temp))?;
    Ok(out)
}

/// The parts of `run` (file pages) in each region: (region, start, end) as offsets in the region.
fn run_in_regions<'a>(
    layout: &'a MemoryLayout,
    run: &PageRun,
) -> impl Iterator<Item = (&'a MemoryRegion, u64, u64)> + 'a {
    let run_start = run.first_page * PAGE as u64;
    let run_end = run_start + run.pages * PAGE as u64;
    layout.regions.iter().filter_map(move |r| {
        let start = run_start.max(r.file_offset);
        let end = run_end.min(r.file_offset + r.size);
        (start < end).then(|| (r, start - r.file_offset, end - r.file_offset))
    })
}

/// Applies a diff memory file onto its base: a new memory file at `out` (temporary until the
/// caller commits it) holding the base's pages, with the diff's `dirty` pages over them. The
/// caller checks that the two belong together (the diff's state file names its base).
pub fn merge_memory_files(
    base: &Path,
    diff: &Path,
    layout: &MemoryLayout,
    dirty: &[PageRun],
    out: &Path,
) -> Result<AtomicFile, SnapshotError> {
    let base_file = open_memory_file(base, layout)?;
    let diff_file = open_memory_file(diff, layout)?;
    layout.check_runs(dirty)?;
    let merged = prepare_memory_file(out, layout, None, |region, offset, buf| {
        base_file.read_exact_at(buf, region.file_offset + offset)
    })?;
    let temp = merged.temp_path().to_path_buf();
    let mut buf = vec![0u8; CHUNK];
    for run in dirty {
        let mut at = run.first_page * PAGE as u64;
        let end = at + run.pages * PAGE as u64;
        while at < end {
            let len = CHUNK.min((end - at) as usize);
            let chunk = &mut buf[..len];
            diff_file
                .read_exact_at(chunk, at)
                .map_err(SnapshotError::io(diff))?;
            // Written even when zero: the page may be non-zero in the base.
            merged
                .file()
                .write_all_at(chunk, at)
                .map_err(SnapshotError::io(&temp))?;
            at += len as u64;
        }
    }
    merged.file().sync_all().map_err(SnapshotError::io(&temp))?;
    Ok(merged)
}

/// Writes the runs of non-zero pages of `chunk` at `offset` onward; zero pages stay holes.
fn write_nonzero_pages(file: &File, offset: u64, chunk: &[u8]) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at <= chunk.len() {
        let nonzero = at < chunk.len()
            && chunk[at..(at + PAGE).min(chunk.len())]
                .iter()
                .any(|&b| b != 0);
        match (run_start, nonzero) {
            (None, true) => run_start = Some(at),
            (Some(start), false) => {
                file.write_all_at(&chunk[start..at.min(chunk.len())], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
        at += PAGE;
    }
    Ok(())
}

/// Opens the memory file for a restore, refusing one whose size does not match `layout`.
pub fn open_memory_file(path: &Path, layout: &MemoryLayout) -> Result<File, SnapshotError> {
    layout.validate()?;
    let file = File::open(path).map_err(SnapshotError::io(path))?;
    let found = file.metadata().map_err(SnapshotError::io(path))?.len();
    let expected = layout.total_size();
    if found != expected {
        return Err(SnapshotError::MemoryFileSize {
            path: path.to_path_buf(),
            found,
            expected,
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Found by the `snapshot_state_file` fuzz target: the restore asks an unvalidated layout
    /// for its size, and these sizes add up past u64::MAX.
    #[test]
    fn total_size_of_an_overflowing_layout_saturates_and_validate_refuses_it() {
        let layout = MemoryLayout {
            regions: vec![
                MemoryRegion {
                    guest_addr: 18375230965560653623,
                    size: 3978709506094217215,
                    file_offset: 17221766074895302655,
                },
                MemoryRegion {
                    guest_addr: u64::MAX,
                    size: 18446497783091298303,
                    file_offset: 3834029163820351487,
                },
                MemoryRegion {
                    guest_addr: 0,
                    size: 0,
                    file_offset: 0,
                },
            ],
        };
        assert_eq!(layout.total_size(), u64::MAX);
        assert!(layout.validate().is_err());
        assert!(layout
            .check_runs(&[PageRun {
                first_page: 0,
                pages: 1
            }])
            .is_ok());
        let small = MemoryLayout::packed([(0, 2 * PAGE as u64), (1 << 20, PAGE as u64)]);
        assert_eq!(small.total_size(), 3 * PAGE as u64);
    }

    fn guest(layout: &MemoryLayout) -> Vec<Vec<u8>> {
        layout
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut bytes = vec![0u8; r.size as usize];
                // A few scattered non-zero pages, the rest zero.
                for page in [0usize, 3, 300] {
                    if let Some(p) = bytes.get_mut(page * PAGE..page * PAGE + 16) {
                        p.fill(i as u8 + 1);
                    }
                }
                if let Some(last) = bytes.last_mut() {
                    *last = 0xee;
                }
                bytes
            })
            .collect()
    }

    #[test]
    fn round_trips_and_leaves_zero_pages_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let layout = MemoryLayout::packed([(0, 4 << 20), (1 << 32, 2 << 20)]);
        let ram = guest(&layout);
        write_memory_file(&path, &layout, |region, offset, buf| {
            let i = layout.regions.iter().position(|r| r == region).unwrap();
            let start = offset as usize;
            buf.copy_from_slice(&ram[i][start..start + buf.len()]);
            Ok(())
        })
        .unwrap();
        let file = open_memory_file(&path, &layout).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 6 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "zero pages were written: {} blocks",
            meta.blocks()
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4 << 20], &ram[0][..]);
        assert_eq!(&bytes[4 << 20..], &ram[1][..]);
    }

    #[test]
    fn diff_holds_only_dirty_pages_and_merges_onto_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let layout = MemoryLayout::packed([(0, 1 << 20), (1 << 32, 1 << 20)]);
        let before: Vec<u8> = (0..2 << 20).map(|i| (i / PAGE) as u8 | 1).collect();
        let mut after = before.clone();
        // Page 3 rewritten, page 4 zeroed, page 300 (second region) rewritten.
        after[3 * PAGE..4 * PAGE].fill(0xaa);
        after[4 * PAGE..5 * PAGE].fill(0);
        after[300 * PAGE..301 * PAGE].fill(0xbb);
        let dirty = [
            PageRun {
                first_page: 3,
                pages: 2,
            },
            PageRun {
                first_page: 300,
                pages: 1,
            },
        ];
        let from = |ram: &[u8]| {
            let ram = ram.to_vec();
            move |region: &MemoryRegion, offset: u64, buf: &mut [u8]| {
                let at = (region.file_offset + offset) as usize;
                buf.copy_from_slice(&ram[at..at + buf.len()]);
                Ok(())
            }
        };
        let base = dir.path().join("base");
        let diff = dir.path().join("diff");
        let merged = dir.path().join("merged");
        write_memory_file(&base, &layout, from(&before)).unwrap();
        prepare_memory_file(&diff, &layout, Some(&dirty), from(&after))
            .unwrap()
            .commit()
            .unwrap();
        let diff_bytes = std::fs::read(&diff).unwrap();
        assert_eq!(diff_bytes.len(), 2 << 20);
        assert_eq!(&diff_bytes[..3 * PAGE], &vec![0u8; 3 * PAGE][..]);
        assert_eq!(&diff_bytes[3 * PAGE..4 * PAGE], &after[3 * PAGE..4 * PAGE]);
        merge_memory_files(&base, &diff, &layout, &dirty, &merged)
            .unwrap()
            .commit()
            .unwrap();
        assert!(std::fs::read(&merged).unwrap() == after);

        let outside = [PageRun {
            first_page: 511,
            pages: 2,
        }];
        let err = merge_memory_files(&base, &diff, &layout, &outside, &merged).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
    }

    #[test]
    fn wrong_size_memory_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let layout = MemoryLayout::packed([(0, 2 << 20)]);
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let err = open_memory_file(&path, &layout).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::MemoryFileSize {
                    found: 1048576,
                    expected: 2097152,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut overlapping = MemoryLayout::packed([(0x10_0000, 0x10_0000), (0x18_0000, 0x1000)]);
        assert!(overlapping.validate().is_err());
        overlapping.regions.truncate(1);
        assert!(overlapping.validate().is_ok());
        assert!(MemoryLayout::packed([(0, 100)]).validate().is_err());
        assert!(MemoryLayout { regions: vec![] }.validate().is_err());
        let mut gap = MemoryLayout::packed([(0, 0x1000), (0x2000, 0x1000)]);
        gap.regions[1].file_offset = 0x3000;
        assert!(gap.validate().is_err());
    }
}
