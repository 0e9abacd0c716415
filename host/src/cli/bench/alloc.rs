//! `goutube bench alloc`: what freeing many small allocations costs the next large one, with
//! glibc's malloc (the system allocator) against this binary's own (jemalloc), in the same run.
//! glibc merges every small chunk freed in an arena at that arena's next large allocation, on
//! the thread that asks; a leader letting go of a million-point follower session took an
//! authorizer call past its deadline that way (`docs/operations.md`, "Memory").

use std::alloc::{GlobalAlloc, Layout, System};
use std::time::{Duration, Instant};

use super::median;

/// The size of the allocation timed after the free: above glibc's small-request bins.
const LARGE: usize = 2000;

pub(super) fn run(count: usize, rounds: usize) -> anyhow::Result<()> {
    println!(
        "{count} small allocations (48–96 bytes) freed, then one of {LARGE} bytes; \
         {rounds} round(s), median reported"
    );
    println!("| allocator | free all | the next allocation of {LARGE} bytes |");
    println!("|---|---|---|");
    let allocators: [(&str, &'static (dyn GlobalAlloc + Sync)); 2] = [
        ("system (glibc malloc)", &System),
        ("this binary's (jemalloc)", &crate::ALLOCATOR),
    ];
    let mut next = Vec::new();
    for (name, allocator) in allocators {
        let (mut frees, mut larges) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            // On a thread of its own, as a node's blocking-pool threads come and go.
            let (free, large) = std::thread::spawn(move || mass_free(allocator, count))
                .join()
                .map_err(|_| anyhow::anyhow!("the allocating thread panicked"))?;
            frees.push(free.as_secs_f64());
            larges.push(large.as_secs_f64());
        }
        println!(
            "| {name} | {:.1} ms | {:.3} ms |",
            median(&frees) * 1e3,
            median(&larges) * 1e3
        );
        next.push(median(&larges));
    }
    println!(
        "| the next allocation, glibc / jemalloc | {:.0}x | |",
        next[0] / next[1]
    );
    Ok(())
}

/// Allocates `count` small blocks (a longer-lived one after every third, so that freed blocks
/// cannot merge into the free space at the end of the heap), frees them, and times the free and
/// the next large allocation.
fn mass_free(allocator: &dyn GlobalAlloc, count: usize) -> (Duration, Duration) {
    let small = |i: usize| Layout::from_size_align(48 + (i % 4) * 16, 8).expect("a valid layout");
    let kept_layout = Layout::from_size_align(200, 8).expect("a valid layout");
    let large_layout = Layout::from_size_align(LARGE, 8).expect("a valid layout");
    let mut blocks = Vec::with_capacity(count);
    let mut kept = Vec::with_capacity(count / 3 + 1);
    // SAFETY: every block is allocated with a non-zero layout, checked for null, and freed
    // once, with the layout it was allocated with.
    unsafe {
        for i in 0..count {
            blocks.push(allocate(allocator, small(i)));
            if i % 3 == 0 {
                kept.push(allocate(allocator, kept_layout));
            }
        }
        let started = Instant::now();
        for (i, block) in blocks.into_iter().enumerate() {
            allocator.dealloc(block, small(i));
        }
        let freed = started.elapsed();
        let started = Instant::now();
        let large = allocate(allocator, large_layout);
        let next = started.elapsed();
        allocator.dealloc(large, large_layout);
        for block in kept {
            allocator.dealloc(block, kept_layout);
        }
        (freed, next)
    }
}

/// # Safety
/// `layout` has a non-zero size.
unsafe fn allocate(allocator: &dyn GlobalAlloc, layout: Layout) -> *mut u8 {
    // SAFETY: the caller's.
    let block = unsafe { allocator.alloc(layout) };
    if block.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    block
}
