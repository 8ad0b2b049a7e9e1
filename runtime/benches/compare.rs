//! Stackful coroutines and async tasks side by side, on the same `AioContext`:
//! `cargo bench -p runtime --bench compare` (about a minute; run it on a quiet machine).
//!
//! Each group has one row per model; an iteration does the same work in both.
//!
//! | group | one iteration is |
//! |---|---|
//! | `spawn_complete` | create a request unit that finishes at once: `Coroutine::new(..).enter()` vs `spawn_detached(async {..})` (which polls at once) |
//! | `create_cold_warm` | the same, coroutines with an empty stack pool (`max_pooled = 0`: one `mmap` + `munmap` each) vs the warm pool; tasks always `malloc` their box, and reuse their slot |
//! | `suspend_resume` | a long-lived unit parked in a wait is woken by a bottom half and runs until its next wait: `bh.schedule(); ctx.poll(false)`; for coroutines also the direct `co.enter()` (no loop) |
//! | `cross_thread_wake` | an `IoThread` wakes the unit, which lives on the bench thread; the bench thread `poll(true)`s until it ran: one remote BH there, one cross-thread wake back |
//! | `thread_pool` | `submit_co` vs `submit_async(..).await` of a trivial job: submit, worker, cross-thread wake, resume |
//!
//! The memory side (10 000 suspended requests) is `cargo run --release -p runtime --example
//! suspended_memory`.

use std::cell::Cell;
use std::future::poll_fn;
use std::hint::black_box;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use runtime::coroutine::{pool_config, set_pool_config, PoolConfig};
use runtime::{block_on, co_yield, spawn_detached, AioContext, Coroutine, IoThread, ThreadPool};

fn spawn_complete(c: &mut Criterion) {
    let mut g = c.benchmark_group("spawn_complete");
    g.bench_function("coroutine", |b| {
        b.iter(|| Coroutine::new(|| black_box(())).enter())
    });
    g.bench_function("task", |b| {
        b.iter(|| spawn_detached(async { black_box(()) }))
    });
    g.finish();
}

fn create_cold_warm(c: &mut Criterion) {
    let mut g = c.benchmark_group("create_cold_warm");
    let saved = pool_config();
    set_pool_config(PoolConfig {
        max_pooled: 0,
        ..saved
    });
    g.bench_function("coroutine_cold_pool", |b| {
        b.iter(|| Coroutine::new(|| black_box(())).enter())
    });
    set_pool_config(saved);
    g.bench_function("coroutine_warm_pool", |b| {
        b.iter(|| Coroutine::new(|| black_box(())).enter())
    });
    // A task whose future is big (like a request future holding its header): the box is a
    // bigger malloc, still no mmap.
    g.bench_function("task_1k_future", |b| {
        b.iter(|| {
            let big = [0u8; 1024];
            spawn_detached(async move {
                black_box(&big);
            })
        })
    });
    g.finish();
}

/// A future that parks until woken, forever: stores its waker in `slot` on every poll.
async fn park_loop(slot: Rc<Cell<Option<Waker>>>, stop: Rc<Cell<bool>>, runs: Rc<Cell<u64>>) {
    while !stop.get() {
        let mut parked = false;
        poll_fn(|cx| {
            if parked {
                return Poll::Ready(());
            }
            parked = true;
            slot.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        runs.set(runs.get() + 1);
    }
}

fn suspend_resume(c: &mut Criterion) {
    let mut g = c.benchmark_group("suspend_resume");
    let ctx = AioContext::current();

    let stop = Rc::new(Cell::new(false));
    let s = stop.clone();
    let co = Coroutine::new(move || {
        while !s.get() {
            co_yield();
        }
    });
    co.enter();
    g.bench_function("coroutine_direct_enter", |b| b.iter(|| co.enter()));
    let c2 = co.clone();
    let bh = ctx.bh_new(move || c2.enter());
    g.bench_function("coroutine_via_bh", |b| {
        b.iter(|| {
            bh.schedule();
            ctx.poll(false)
        })
    });
    stop.set(true);
    co.enter();

    let slot = Rc::new(Cell::new(None));
    let stop = Rc::new(Cell::new(false));
    let runs = Rc::new(Cell::new(0));
    spawn_detached(park_loop(slot.clone(), stop.clone(), runs.clone()));
    g.bench_function("task_via_bh", |b| {
        b.iter(|| {
            // The waker's same-thread path: ready queue + one bottom half.
            if let Some(w) = slot.take() {
                w.wake();
            }
            ctx.poll(false)
        })
    });
    stop.set(true);
    if let Some(w) = slot.take() {
        w.wake();
    }
    while ctx.poll(false) {}
    black_box(runs.get());
    g.finish();
}

fn cross_thread_wake(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_thread_wake");
    let ctx = AioContext::current();
    let io = IoThread::spawn("bench-waker").expect("iothread");

    let runs = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    let (r, s) = (runs.clone(), stop.clone());
    let co = Coroutine::new(move || loop {
        co_yield();
        if s.get() {
            break;
        }
        r.set(r.get() + 1);
    });
    co.enter();
    g.bench_function("coroutine", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let target = runs.get() + 1;
                let w = co.waker();
                io.run(move || w.wake());
                while runs.get() < target {
                    ctx.poll(true);
                }
            }
            start.elapsed()
        })
    });
    stop.set(true);
    co.enter();

    let slot = Rc::new(Cell::new(None));
    let stop = Rc::new(Cell::new(false));
    let runs = Rc::new(Cell::new(0));
    spawn_detached(park_loop(slot.clone(), stop.clone(), runs.clone()));
    g.bench_function("task", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let target = runs.get() + 1;
                let Some(w) = slot.take() else { break };
                io.run(move || w.wake());
                while runs.get() < target {
                    ctx.poll(true);
                }
            }
            start.elapsed()
        })
    });
    stop.set(true);
    if let Some(w) = slot.take() {
        w.wake();
    }
    while ctx.poll(false) {}
    io.stop();
    g.finish();
}

fn thread_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("thread_pool");
    let ctx = AioContext::current();
    let pool = ThreadPool::global();
    g.bench_function("submit_co", |b| {
        b.iter_custom(|iters| {
            let done = Rc::new(Cell::new(false));
            let d = done.clone();
            let co = Coroutine::new(move || {
                for _ in 0..iters {
                    black_box(pool.submit_co(|| black_box(1)));
                }
                d.set(true);
            });
            let start = Instant::now();
            co.enter();
            while !done.get() {
                ctx.poll(true);
            }
            start.elapsed()
        })
    });
    g.bench_function("submit_async", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            block_on(async {
                for _ in 0..iters {
                    black_box(pool.submit_async(|| black_box(1)).await);
                }
            });
            start.elapsed()
        })
    });
    // One job in flight at a time needs one worker; more means `submit` raced a worker that had
    // finished its job but not yet counted itself idle.
    eprintln!(
        "thread_pool: {} worker thread(s) alive after the runs",
        pool.threads()
    );
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = spawn_complete, create_cold_warm, suspend_resume, cross_thread_wake, thread_pool
}
criterion_main!(benches);
