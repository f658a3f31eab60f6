//! Working-set prefetch: before the vCPUs run, the pages a previous restore faulted in first are
//! read and copied in contiguous runs (one pread and one UFFDIO_COPY per run), so the guest's
//! first steps after a restore do not wait on faults one page at a time.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use super::counts::UffdCounts;
use super::sys::Uffd;
use super::{GuestRange, Page, PAGE_SIZE};

/// Longest run copied at once (1 MiB): bounds the buffer, long enough to amortise the calls.
const MAX_RUN_PAGES: usize = 256;

/// Runs of consecutive file pages, each inside one guest range: (first page, page count).
pub(super) fn runs(pages: &[u64], ranges: &[GuestRange]) -> Vec<(u64, usize)> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let range_of = |page: u64| {
        ranges
            .iter()
            .position(|r| (r.file_offset..r.file_offset + r.len).contains(&(page * PAGE_SIZE)))
    };
    let mut out: Vec<(u64, usize)> = Vec::new();
    let mut last_range = None;
    for page in sorted {
        let range = range_of(page);
        match out.last_mut() {
            Some((first, count))
                if *first + *count as u64 == page
                    && *count < MAX_RUN_PAGES
                    && range == last_range =>
            {
                *count += 1
            }
            _ => out.push((page, 1)),
        }
        last_range = range;
    }
    out
}

/// Copies every page of `pages` into guest memory; returns how many pages that was.
pub(super) fn prefetch(
    uffd: &Uffd,
    file: &File,
    ranges: &[GuestRange],
    pages: &[u64],
    counts: &UffdCounts,
) -> Result<u64, String> {
    let started = Instant::now();
    let mut buf = vec![Page::default(); MAX_RUN_PAGES];
    let mut copied = 0u64;
    for (first, count) in runs(pages, ranges) {
        let offset = first * PAGE_SIZE;
        let range = ranges
            .iter()
            .find(|r| (r.file_offset..r.file_offset + r.len).contains(&offset))
            .ok_or_else(|| format!("working-set page {first} is outside guest memory"))?;
        let run = &mut buf[..count];
        let len = count as u64 * PAGE_SIZE;
        read_run(file, run, offset)
            .map_err(|e| format!("prefetch: reading the memory file at {offset:#x}: {e}"))?;
        let dst = range.host_addr + (offset - range.file_offset);
        uffd.copy(dst, run.as_ptr().cast(), len).map_err(|e| {
            format!(
                "prefetch: copying {count} pages to {}: {e}",
                range.describe(dst)
            )
        })?;
        copied += count as u64;
    }
    counts.prefetched(copied, started.elapsed().as_nanos() as u64);
    Ok(copied)
}

/// Fills `run` from `file` at `offset` with pread(2) straight into the page-aligned buffer
/// (std's `read_exact_at` wants a byte slice, which a slice of `Page`s is not).
fn read_run(file: &File, run: &mut [Page], offset: u64) -> io::Result<()> {
    let len = std::mem::size_of_val(run);
    let base = run.as_mut_ptr().cast::<u8>();
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        // SAFETY: pread writes at most `len - done` bytes at `base + done`, which stays inside
        // `run` (borrowed mutably here, `len` bytes long).
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                base.add(done).cast(),
                len - done,
                at as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ends before {:#x}", offset + len as u64),
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_sorted_deduplicated_capped_and_split_at_range_ends() {
        let ranges = [
            GuestRange {
                host_addr: 0x10_0000,
                guest_addr: Some(0),
                len: 4 * PAGE_SIZE,
                file_offset: 0,
            },
            GuestRange {
                host_addr: 0x90_0000,
                guest_addr: Some(1 << 32),
                len: 1000 * PAGE_SIZE,
                file_offset: 4 * PAGE_SIZE,
            },
        ];
        assert_eq!(
            runs(&[3, 1, 2, 2, 4, 5, 9], &ranges),
            vec![(1, 3), (4, 2), (9, 1)]
        );
        let long: Vec<u64> = (4..4 + 300).collect();
        assert_eq!(runs(&long, &ranges), vec![(4, 256), (260, 44)]);
        assert!(runs(&[], &ranges).is_empty());
    }
}
