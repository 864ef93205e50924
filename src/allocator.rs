//! The process's memory allocator: mimalloc (its C library through `libmimalloc-sys`).
//!
//! **Owns**: the `GlobalAlloc` the server binary and the benches install. **Must not
//! touch**: anything else; nothing here allocates or keeps state.
//!
//! Why mimalloc: the SIP path allocates many small, short-lived objects (parsed headers,
//! responses, events) where glibc's arenas spent ~19% of the server's CPU (perf,
//! `benches/calls.sh` at 500 calls/s).
//!
//! Written by hand rather than taken from the `mimalloc` crate: its `GlobalAlloc` sends
//! every request through `mi_malloc_aligned`, whose alignment checks and wrapper cost ~3%
//! of a call's instructions (callgrind, issue 14) although almost every Rust allocation
//! asks for an alignment every mimalloc block already has. This one calls the plain entry
//! points for those, and the aligned ones otherwise.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Every mimalloc block is aligned to at least a machine word: block sizes are multiples
/// of 8 bytes and pages start aligned. Larger alignments (16 and up) go through the
/// aligned entry points, which know which size classes are naturally aligned.
const PLAIN_ALIGN: usize = 8;

/// mimalloc as the global allocator: `#[global_allocator] static A: Allocator = Allocator;`
pub struct Allocator;

// SAFETY: each method forwards to mimalloc, which returns memory of at least the requested
// size and alignment (or null), and frees or resizes only what it returned: `mi_free` and
// `mi_realloc*` accept a block from any of the allocation functions.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
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
}
