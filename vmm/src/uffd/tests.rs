//! The handler and prefetch against real userfaultfd registrations, with no VM: this thread
//! touches guest memory as a vCPU would, and the handler thread fills each page.

use std::sync::mpsc::channel;

use snapshot::MemoryLayout;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory;
use crate::seccomp::SeccompLevel;

const MIB: u64 = 1 << 20;

/// A 2 MiB memory file: page i starts with the u32 i + 1, except every fourth page, a hole.
fn memory_file(dir: &std::path::Path) -> (PathBuf, MemoryLayout) {
    let layout = MemoryLayout::packed([(0, 2 * MIB)]);
    let path = dir.join("vm.mem");
    snapshot::write_memory_file(&path, &layout, |_, offset, buf| {
        for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
            let index = offset / PAGE_SIZE + i as u64;
            if !index.is_multiple_of(4) {
                page[..4].copy_from_slice(&(index as u32 + 1).to_le_bytes());
            }
        }
        Ok(())
    })
    .unwrap();
    (path, layout)
}

/// What [`memory_file`] put at the start of `page`.
fn first_word(page: u64) -> u32 {
    if page.is_multiple_of(4) {
        0
    } else {
        page as u32 + 1
    }
}

fn start(
    path: &std::path::Path,
    layout: &MemoryLayout,
    mem: &GuestMemoryMmap,
    working_set: Option<WorkingSet>,
) -> (UffdBackend, std::sync::mpsc::Receiver<VmmEvent>) {
    let (events, failures) = channel();
    let backend = UffdBackend::start(UffdSetup {
        mem,
        layout,
        mem_file: File::open(path).unwrap(),
        mem_file_path: path.to_path_buf(),
        working_set,
        events,
        seccomp: ThreadSeccomp {
            level: SeccompLevel::Enforce,
            test_violation: false,
        },
    })
    .expect("uffd backend (needs root or /dev/userfaultfd access)");
    (backend, failures)
}

#[test]
fn faults_are_served_from_the_file_recorded_and_prefetched_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let (path, layout) = memory_file(dir.path());
    let ws_path = snapshot::working_set_path(&path);

    let mem = memory::map_anonymous(&layout, 2).unwrap_or_else(|e| panic!("{e}"));
    let (mut backend, failures) = start(&path, &layout, &mem, None);
    let touched = [5u64, 4, 7, 300];
    for page in touched {
        let value: u32 = mem.read_obj(GuestAddress(page * PAGE_SIZE)).unwrap();
        assert_eq!(value, first_word(page), "page {page}");
    }
    // A write lands in guest memory only, never in the file.
    mem.write_obj(0xdead_u32, GuestAddress(5 * PAGE_SIZE))
        .unwrap();
    let totals = backend.metrics().unwrap().totals();
    assert_eq!(totals.faults, 4);
    assert_eq!(totals.zero_pages, 2, "pages 4 and 300 are holes");
    assert_eq!(totals.prefetched, 0);
    backend.metrics().unwrap().end_recording();
    // Not part of the working set: recording has ended.
    let _: u32 = mem.read_obj(GuestAddress(9 * PAGE_SIZE)).unwrap();
    backend.finish();
    assert!(
        failures.try_recv().is_err(),
        "the handler reported a failure"
    );
    let set = snapshot::read_working_set(&ws_path).unwrap().unwrap();
    assert_eq!(set.pages, touched, "the pages, in fault order");
    drop(mem);

    let mem = memory::map_anonymous(&layout, 2).unwrap();
    let (mut backend, _failures) = start(&path, &layout, &mem, Some(set.clone()));
    assert_eq!(backend.metrics().unwrap().totals().prefetched, 4);
    for page in touched {
        let value: u32 = mem.read_obj(GuestAddress(page * PAGE_SIZE)).unwrap();
        assert_eq!(value, first_word(page), "prefetched page {page}");
    }
    assert_eq!(
        backend.metrics().unwrap().totals().faults,
        0,
        "prefetched pages fault"
    );
    let _: u32 = mem.read_obj(GuestAddress(10 * PAGE_SIZE)).unwrap();
    assert_eq!(backend.metrics().unwrap().totals().faults, 1);
    backend.finish();
    assert_eq!(
        snapshot::read_working_set(&ws_path).unwrap(),
        Some(set),
        "a prefetching restore does not record over the set"
    );
}

#[test]
fn a_page_the_file_cannot_give_is_reported_and_the_toucher_released() {
    let dir = tempfile::tempdir().unwrap();
    let (path, layout) = memory_file(dir.path());
    let mem = memory::map_anonymous(&layout, 2).unwrap();
    let (mut backend, failures) = start(&path, &layout, &mem, None);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(PAGE_SIZE))
        .unwrap();
    // Served: inside what is left of the file.
    let _: u32 = mem.read_obj(GuestAddress(0)).unwrap();
    // Not servable: the handler reports it and closes the userfaultfd, which lets this read
    // finish (on a zero page) instead of blocking forever.
    let value: u32 = mem.read_obj(GuestAddress(3 * PAGE_SIZE)).unwrap();
    assert_eq!(value, 0);
    match failures.recv_timeout(Duration::from_secs(10)) {
        Ok(VmmEvent::MemoryBackendFailed(why)) => {
            assert!(why.contains("reading guest page 0x3000"), "{why}")
        }
        other => panic!("expected a memory backend failure, got {other:?}"),
    }
    backend.finish();
}

#[test]
fn a_working_set_the_file_cannot_give_fails_the_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (path, layout) = memory_file(dir.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(4 * PAGE_SIZE))
        .unwrap();
    let mem = memory::map_anonymous(&layout, 2).unwrap();
    let (events, _failures) = channel();
    let set = WorkingSet {
        mem_file_len: 2 * MIB,
        mem_file_mtime_ns: 0,
        pages: vec![2, 3, 4, 5],
    };
    let err = UffdBackend::start(UffdSetup {
        mem: &mem,
        layout: &layout,
        mem_file: File::open(&path).unwrap(),
        mem_file_path: path.clone(),
        working_set: Some(set),
        events,
        seccomp: ThreadSeccomp::default(),
    })
    .err()
    .expect("a prefetch past the end of the file fails");
    assert!(
        err.to_string()
            .contains("prefetch: reading the memory file at 0x2000: the file ends before 0x6000"),
        "{err}"
    );
}
