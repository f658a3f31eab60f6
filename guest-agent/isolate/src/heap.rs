//! The global allocator over the heap range the host gives in the boot info. A failed allocation
//! is remembered so that the panic it turns into is reported as "out of memory".

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, Ordering};

use linked_list_allocator::LockedHeap;

struct RecordingHeap {
    heap: LockedHeap,
    exhausted: AtomicBool,
}

#[global_allocator]
static HEAP: RecordingHeap = RecordingHeap {
    heap: LockedHeap::empty(),
    exhausted: AtomicBool::new(false),
};

// SAFETY: delegates to linked_list_allocator's LockedHeap, which upholds GlobalAlloc's contract.
unsafe impl GlobalAlloc for RecordingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { self.heap.alloc(layout) };
        if p.is_null() {
            self.exhausted.store(true, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { self.heap.dealloc(ptr, layout) }
    }
}

pub fn init(start: u64, size: u64) {
    // SAFETY: the host reserves [start, start+size) for the heap: identity-mapped guest RAM that
    // nothing else uses. Called once, before the first allocation.
    unsafe { HEAP.heap.lock().init(start as *mut u8, size as usize) };
}

pub fn exhausted() -> bool {
    HEAP.exhausted.load(Ordering::Relaxed)
}
