//! A counting global allocator: per thread, the peak of bytes live since [`reset_peak`].
//!
//! Per thread because the test harness runs several targets at once; every target parses on
//! the thread that measures it (async parsers on a current-thread runtime). Memory freed by
//! another thread makes the count go down there, which can only under-count a peak elsewhere,
//! never report a false one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator itself: [`System`], counting.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn add(delta: isize) {
    // try_with: allocations during thread teardown are not counted rather than aborting.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every method forwards to `System` unchanged; the counting touches only
// const-initialised thread locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Starts a new measurement on this thread: the peak becomes what is live now, counted as 0.
pub fn reset_peak() {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
}

/// The most bytes that were live on this thread at once since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.with(|p| p.get().max(0) as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_the_peak_of_this_thread() {
        super::reset_peak();
        let big = vec![0u8; 1 << 20];
        drop(big);
        let small = vec![0u8; 10];
        assert!(super::peak() >= 1 << 20);
        assert!(super::peak() < (1 << 20) + 4096);
        drop(small);
    }
}
