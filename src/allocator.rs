//! The process's memory allocator: mimalloc (its C library through `libmimalloc-sys`).
//!
//! **Owns**: the `GlobalAlloc` the server binary and the benches install, and the heap of
//! short-lived objects ([`short_lived`]). **Must not touch**: anything else.
//!
//! Why mimalloc: the SIP path allocates many small, short-lived objects (parsed headers,
//! responses, events) where glibc's arenas spent ~19% of the server's CPU (perf,
//! `benches/calls.sh` at 500 calls/s).
//!
//! Written by hand rather than taken from the `mimalloc` crate: its `GlobalAlloc` sends
//! every request through `mi_malloc_aligned`, whose alignment checks and wrapper cost ~3%
//! of a call's instructions (callgrind, issue 14) although almost every Rust allocation
//! asks for an alignment every mimalloc block already has. This one calls the plain entry
//! points for those, and the aligned ones otherwise. The crate has no per-lifetime heaps
//! either (below).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};

use libmimalloc_sys as mi;

/// Every mimalloc block is aligned to at least a machine word: block sizes are multiples
/// of 8 bytes and pages start aligned. Larger alignments (16 and up) go through the
/// aligned entry points, which know which size classes are naturally aligned.
const PLAIN_ALIGN: usize = 8;

thread_local! {
    /// Set while [`short_lived`] runs on this thread. A const-initialised `Cell` without
    /// a destructor: reading it is a plain thread-local load, safe inside the allocator.
    static SHORT_LIVED: Cell<bool> = const { Cell::new(false) };
}

/// The heap of short-lived objects; created on first use. mimalloc (v3) heaps are
/// first-class: any thread allocates from them and frees into them, and a heap's blocks
/// sit on pages of their own.
static SHORT_HEAP: AtomicPtr<mi::mi_heap_t> = AtomicPtr::new(std::ptr::null_mut());

fn short_heap() -> *mut mi::mi_heap_t {
    let heap = SHORT_HEAP.load(Ordering::Acquire);
    if !heap.is_null() {
        return heap;
    }
    // SAFETY: mi_heap_new has no precondition; it returns a heap or null.
    let new = unsafe { mi::mi_heap_new() };
    if new.is_null() {
        return new;
    }
    match SHORT_HEAP.compare_exchange(
        std::ptr::null_mut(),
        new,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => new,
        Err(first) => {
            // SAFETY: `new` is ours, empty, and was never published.
            unsafe { mi::mi_heap_delete(new) };
            first
        }
    }
}

/// Runs `f` with its allocations on a heap of their own: for objects that outlive the
/// code that makes them but not the next half minute, such as a transaction that lingers
/// 64*T1 after its final response (RFC 3261 17.1.1.2, RFC 6026). Allocated among a call's
/// long-lived state, they left holes in its pages when they ended: ~1.6 KB of resident
/// memory per established call (issue 14: 7.1 KB per call held, 5.5 KB with T1 at 20 ms).
/// On pages of their own, those pages empty together and go back to the system. Without
/// this module's allocator installed (tests), `f` simply runs.
pub fn short_lived<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SHORT_LIVED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SHORT_LIVED.with(|s| s.replace(true)));
    f()
}

/// Gives memory that freed objects left empty back to the system now. mimalloc does so
/// lazily, on later allocations and frees; once a burst of calls has been set up and the
/// server waits with them held, nothing comes to do it, and the pages of the set-up's
/// ended transactions stayed resident (issue 14). Cheap when there is nothing to give
/// back; meant to run every few seconds. Without this module's allocator installed, the
/// calls find nothing of theirs to collect.
pub fn give_back() {
    let heap = SHORT_HEAP.load(Ordering::Acquire);
    // SAFETY: neither call has a precondition beyond a heap made by mi_heap_new and never
    // deleted (the short-lived heap lives as long as the process).
    unsafe {
        if !heap.is_null() {
            mi::mi_heap_collect(heap, false);
        }
        mi::mi_collect(false);
    }
}

/// The heap for an allocation made now, if it is the short-lived one.
#[inline]
fn current_heap() -> Option<*mut mi::mi_heap_t> {
    if SHORT_LIVED.with(Cell::get) {
        let heap = short_heap();
        (!heap.is_null()).then_some(heap)
    } else {
        None
    }
}

/// mimalloc as the global allocator: `#[global_allocator] static A: Allocator = Allocator;`
pub struct Allocator;

// SAFETY: each method forwards to mimalloc, which returns memory of at least the requested
// size and alignment (or null), and frees or resizes only what it returned: `mi_free` and
// `mi_realloc*` accept a block from any of the allocation functions and any heap.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match (current_heap(), layout.align() <= PLAIN_ALIGN) {
            (None, true) => mi::mi_malloc(layout.size()).cast(),
            (None, false) => mi::mi_malloc_aligned(layout.size(), layout.align()).cast(),
            (Some(h), true) => mi::mi_heap_malloc(h, layout.size()).cast(),
            (Some(h), false) => mi::mi_heap_malloc_aligned(h, layout.size(), layout.align()).cast(),
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match (current_heap(), layout.align() <= PLAIN_ALIGN) {
            (None, true) => mi::mi_zalloc(layout.size()).cast(),
            (None, false) => mi::mi_zalloc_aligned(layout.size(), layout.align()).cast(),
            (Some(h), true) => mi::mi_heap_zalloc(h, layout.size()).cast(),
            (Some(h), false) => mi::mi_heap_zalloc_aligned(h, layout.size(), layout.align()).cast(),
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = ptr.cast::<c_void>();
        match (current_heap(), layout.align() <= PLAIN_ALIGN) {
            (None, true) => mi::mi_realloc(p, new_size).cast(),
            (None, false) => mi::mi_realloc_aligned(p, new_size, layout.align()).cast(),
            (Some(h), true) => mi::mi_heap_realloc(h, p, new_size).cast(),
            (Some(h), false) => mi::mi_heap_realloc_aligned(h, p, new_size, layout.align()).cast(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size from 1 byte to 4 KiB (and a few large ones), at every alignment from 1
    /// to 4 KiB: the block is aligned, writable over its whole size, keeps its bytes when
    /// grown, and is freed.
    #[test]
    fn blocks_have_the_alignment_asked_for() {
        every_size_and_alignment();
        short_lived(every_size_and_alignment);
    }

    fn every_size_and_alignment() {
        let a = Allocator;
        let sizes = (1..=4096).chain([65_536, 1 << 20, (1 << 22) + 3]);
        for size in sizes {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).expect("layout");
                unsafe {
                    for zeroed in [false, true] {
                        let p = if zeroed {
                            a.alloc_zeroed(layout)
                        } else {
                            a.alloc(layout)
                        };
                        assert!(!p.is_null(), "size {size} align {align}");
                        assert_eq!(p as usize % align, 0, "size {size} align {align}");
                        if zeroed {
                            assert!((0..size).all(|i| *p.add(i) == 0), "zeroed {size}");
                        }
                        std::ptr::write_bytes(p, 0xa5, size);
                        let grown = a.realloc(p, layout, size * 2 + 1);
                        assert!(!grown.is_null());
                        assert_eq!(grown as usize % align, 0, "realloc {size} align {align}");
                        assert!((0..size).all(|i| *grown.add(i) == 0xa5), "kept {size}");
                        let grown_layout =
                            Layout::from_size_align(size * 2 + 1, align).expect("layout");
                        a.dealloc(grown, grown_layout);
                    }
                }
            }
        }
    }

    /// `give_back` after many blocks of both heaps were freed leaves both heaps in use:
    /// blocks still held keep their bytes, new ones can be had. (What it gives back is
    /// measured by the held-calls step of `benches/calls.sh`, not here: resident memory is
    /// the whole test process's.)
    #[test]
    fn giving_memory_back_keeps_both_heaps_usable() {
        let a = Allocator;
        let layout = Layout::from_size_align(1024, 8).expect("layout");
        unsafe {
            let kept = short_lived(|| a.alloc(layout));
            std::ptr::write_bytes(kept, 0x5a, 1024);
            for on_short in [true, false] {
                let burst: Vec<*mut u8> = (0..20_000)
                    .map(|_| {
                        if on_short {
                            short_lived(|| a.alloc(layout))
                        } else {
                            a.alloc(layout)
                        }
                    })
                    .collect();
                assert!(burst.iter().all(|p| !p.is_null()));
                for p in burst {
                    a.dealloc(p, layout);
                }
            }
            give_back();
            assert!((0..1024).all(|i| *kept.add(i) == 0x5a));
            let again = short_lived(|| a.alloc(layout));
            let plain = a.alloc(layout);
            assert!(!again.is_null() && !plain.is_null());
            for p in [kept, again, plain] {
                a.dealloc(p, layout);
            }
        }
    }

    extern "C" {
        // mimalloc v3's; libmimalloc-sys declares it for v2 only.
        fn mi_heap_contains(heap: *const mi::mi_heap_t, p: *const c_void) -> bool;
    }

    /// What `short_lived` allocates sits on the short-lived heap, what follows on the
    /// default one, also after a panic inside; nested scopes restore the outer setting.
    #[test]
    fn short_lived_allocations_sit_on_their_own_heap() {
        let a = Allocator;
        let layout = Layout::from_size_align(200, 8).expect("layout");
        let wide = Layout::from_size_align(200, 64).expect("layout");
        let on_short = |p: *mut u8| unsafe { mi_heap_contains(short_heap(), p.cast()) };
        unsafe {
            let (p, q, r) = short_lived(|| {
                let p = a.alloc(layout);
                let q = a.alloc_zeroed(wide);
                let r = short_lived(|| a.alloc(layout));
                (p, q, r)
            });
            assert!(on_short(p) && on_short(q) && on_short(r));
            let grown = short_lived(|| a.realloc(p, layout, 5000));
            assert!(on_short(grown));
            let after = a.alloc(layout);
            assert!(!on_short(after));
            let _ = std::panic::catch_unwind(|| short_lived(|| panic!("inside")));
            let after_panic = a.alloc(layout);
            assert!(!on_short(after_panic));
            let big = Layout::from_size_align(5000, 8).expect("layout");
            for (ptr, l) in [
                (grown, big),
                (q, wide),
                (r, layout),
                (after, layout),
                (after_panic, layout),
            ] {
                a.dealloc(ptr, l);
            }
        }
    }
}
