//! Memory per suspended request, coroutines vs async tasks:
//! `cargo run --release -p runtime --example suspended_memory [N]` (default 10 000).
//!
//! Each "request" does what a FUSE handler does before its I/O: keeps a small header (here 512
//! bytes) live across its wait, then waits in a `CoQueue` until all are released. We report:
//!
//! - the RSS growth per suspended request (`VmRSS` of `/proc/self/status` before and after;
//!   for coroutines that is the stack pages each one touched, plus its table slot; for tasks the
//!   heap box of the future, plus slot and waiter entry);
//! - heap allocations and bytes per request (a counting global allocator);
//! - for tasks, `size_of_val` of the future, which is exactly what one request's box holds;
//! - for coroutines, the mapped stack size (address space, not memory).
//!
//! Run on a quiet machine; the integrator copies the output into docs/comparison.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use runtime::coroutine::{mapped_stacks, pool_config};
use runtime::{spawn_detached, AioContext, CoQueue, Coroutine};

/// Counts allocations on top of the system allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is the system allocator's; the counters are plain statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (every allocation goes
        // through `alloc` above).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Sample {
    rss_kib: u64,
    allocs: u64,
    bytes: u64,
}

fn sample() -> Sample {
    Sample {
        rss_kib: rss_kib(),
        allocs: ALLOCS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
    }
}

fn report(what: &str, n: u64, before: &Sample, after: &Sample) {
    let rss = after.rss_kib.saturating_sub(before.rss_kib) * 1024;
    println!(
        "{what:<11} {n} suspended: RSS +{} KiB = {} B/request; {:.2} allocations/request, {} heap B/request",
        rss / 1024,
        rss / n,
        (after.allocs - before.allocs) as f64 / n as f64,
        (after.bytes - before.bytes) / n
    );
}

/// What a handler keeps across its wait: a parsed header.
fn header(i: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..8].copy_from_slice(&i.to_le_bytes());
    h
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let ctx = AioContext::current();
    let queue = Rc::new(CoQueue::new());

    // Warm up both paths once so that one-time costs (the thread's tables, the first stack,
    // the executor's thread-local) are not charged to the measured requests.
    {
        let q = queue.clone();
        Coroutine::new(move || q.co_wait()).enter();
        let q = queue.clone();
        spawn_detached(async move { q.wait_async().await });
        queue.restart_all();
        while ctx.poll(false) {}
    }

    let before = sample();
    let stacks_before = mapped_stacks();
    for i in 0..n {
        let q = queue.clone();
        Coroutine::new(move || {
            let h = header(i);
            black_box(&h); // on the coroutine's stack, live across the wait
            q.co_wait();
            black_box(&h);
        })
        .enter();
    }
    let after = sample();
    report("coroutines", n, &before, &after);
    println!(
        "            {} stacks mapped of {} KiB each (address space, not memory)",
        mapped_stacks() - stacks_before,
        pool_config().stack_size / 1024
    );
    queue.restart_all();
    while ctx.poll(false) {}

    let q = queue.clone();
    let probe = async move {
        let h = header(0);
        black_box(&h);
        q.wait_async().await;
        black_box(&h);
    };
    let future_size = std::mem::size_of_val(&probe);
    drop(probe);
    let before = sample();
    for i in 0..n {
        let q = queue.clone();
        spawn_detached(async move {
            let h = header(i);
            black_box(&h); // inside the future, live across the await
            q.wait_async().await;
            black_box(&h);
        });
    }
    let after = sample();
    report("tasks", n, &before, &after);
    println!(
        "            size_of_val(future) = {future_size} B: the task's box (the other allocation is its waker's Arc, reused for later tasks)"
    );
    queue.restart_all();
    while ctx.poll(false) {}
}
