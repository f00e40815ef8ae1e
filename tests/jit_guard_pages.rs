//! The JIT never reads or writes outside its buffers, proved with a test
//! allocator that places every heap block flush against an inaccessible
//! guard page: any access past the end of a buffer (a compiled kernel's, or
//! the GEMM's) faults and kills the test binary instead of reading a
//! neighbour's memory.
//!
//! The whole binary runs on `GuardPages` (a `#[global_allocator]`, hence its
//! own test file): the graphs, the leaves, the interpreter's tensors the
//! kernels read and the outputs they write. `guard_pages_catch_a_read_past_the_end`
//! shows the allocator works: it reruns this binary on a probe that reads
//! one element past a vector and expects the child to die of a signal.
//!
//! Accesses past the end are caught exactly for buffers whose byte length
//! is a multiple of their alignment (every `Vec<f64>` whose capacity equals
//! its length, which is how tensors are built); accesses before the start
//! are caught once they cross the page boundary below the block.
#![cfg(target_os = "linux")]
#![allow(
    unsafe_code,
    reason = "a global allocator built on mmap and mprotect, and a deliberate out-of-bounds probe"
)]

use std::alloc::{GlobalAlloc, Layout};
use std::process::Command;

use gradc::interp::Context;
use gradc::jit::Jit;
use gradc::train::Backend;

mod common;

const PAGE: usize = 4096;

/// Maps `[guard page][data pages][guard page]` per allocation and returns a
/// pointer placed so that the block ends exactly where the trailing guard
/// page begins. Blocks aligned beyond a page go to the system allocator
/// (decided from the layout, so `dealloc` makes the same choice).
struct GuardPages;

impl GuardPages {
    fn data_pages(layout: Layout) -> usize {
        rounded(layout).div_ceil(PAGE).max(1)
    }
}

/// The block's size rounded up to its alignment, so its end is aligned.
fn rounded(layout: Layout) -> usize {
    layout.size().div_ceil(layout.align()) * layout.align()
}

// SAFETY: `alloc` returns either null or a block of at least `layout.size()`
// bytes aligned to `layout.align()` (the page-aligned end minus a multiple
// of the alignment) that no other live allocation overlaps (each has its own
// mapping); `dealloc` unmaps exactly the mapping `alloc` made for that
// pointer and layout.
unsafe impl GlobalAlloc for GuardPages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > PAGE {
            // SAFETY: forwarded with the caller's valid layout.
            return unsafe { std::alloc::System.alloc(layout) };
        }
        let pages = GuardPages::data_pages(layout);
        let length = (pages + 2) * PAGE;
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked against MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let base = base.cast::<u8>();
        // SAFETY: the data pages lie inside the mapping just made.
        let data = unsafe { base.add(PAGE) };
        // SAFETY: `data` and `pages * PAGE` lie inside the mapping.
        if unsafe {
            libc::mprotect(
                data.cast(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } != 0
        {
            // SAFETY: unmapping the mapping made above.
            unsafe { libc::munmap(base.cast(), length) };
            return std::ptr::null_mut();
        }
        // SAFETY: `rounded(layout) <= pages * PAGE`, so the block starts
        // inside the data pages and ends at the trailing guard page.
        unsafe { data.add(pages * PAGE - rounded(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() > PAGE {
            // SAFETY: this block came from `System.alloc` with this layout.
            unsafe { std::alloc::System.dealloc(ptr, layout) };
            return;
        }
        let pages = GuardPages::data_pages(layout);
        // The block starts in the first data page (it is shorter than the
        // data pages by less than a page), so its page is base + PAGE.
        let first_data_page = (ptr as usize) & !(PAGE - 1);
        let base = (first_data_page - PAGE) as *mut libc::c_void;
        // SAFETY: `base` and the length are exactly those `alloc` mapped
        // for this pointer and layout.
        unsafe { libc::munmap(base, (pages + 2) * PAGE) };
    }
}

#[global_allocator]
static ALLOCATOR: GuardPages = GuardPages;

#[test]
fn jit_runs_every_example_within_its_buffers() {
    let mut compiled = 0;
    for (_, dtype, graph) in common::model_graphs(&["examples"]) {
        let leaves = common::leaves_for(&graph, dtype);
        let mut jit = Jit::new();
        for step in 1..3 {
            jit.run(&graph, &leaves, Context { seed: 2, step })
                .expect("jit");
        }
        compiled += jit.coverage(&graph).expect("coverage").0;
    }
    assert!(compiled > 100, "only {compiled} kernels were compiled");
}

/// Reads one element past the end of a vector: under `GuardPages` this
/// faults. Run only as a child process by the test below.
#[test]
#[ignore = "faults on purpose; run by guard_pages_catch_a_read_past_the_end"]
fn probe_read_past_the_end() {
    // A heap vector (an array would live on the stack, beside no guard).
    let values: Vec<f64> = std::iter::repeat_n(1.0, 3).collect();
    // SAFETY: deliberately not safe: this reads one element past the
    // vector, which must hit the guard page and kill the process.
    let past = unsafe { values.as_ptr().add(3).read_volatile() };
    println!("read {past} past the end without a fault");
}

#[test]
fn guard_pages_catch_a_read_past_the_end() {
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "probe_read_past_the_end",
            "--ignored",
            "--nocapture",
        ])
        .output()
        .expect("the test binary reruns");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success() && !stdout.contains("without a fault"),
        "the probe read past its vector unnoticed: {stdout}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGSEGV),
            "the probe should die of SIGSEGV: {:?}",
            output.status
        );
    }
}
