//! Microbenchmarks of the runtime's primitives: `cargo bench -p runtime` (about a minute).
//!
//! | benchmark | one iteration is |
//! |---|---|
//! | `coroutine/create_enter_finish` | `Coroutine::new(|| {}).enter()` with a warm stack pool: create, switch in, return, switch out, recycle |
//! | `coroutine/yield_reenter` | `co.enter()` of a long-lived coroutine looping on `co_yield()`: one switch in + one switch out |
//! | `bh/poll_idle` | `ctx.poll(false)` with nothing to do: the fixed cost of a round (one `epoll_wait(.., 0)`) |
//! | `bh/schedule_run_same_thread` | `bh.schedule(); ctx.poll(false)` with a persistent `Bh` |
//! | `bh/schedule_oneshot_run_same_thread` | `ctx.schedule_oneshot(|| {}); ctx.poll(false)` (boxes a closure each time) |
//! | `wake/cross_thread_co_round_trip` | bench thread `CoWaker::wake`s coroutine B on an `IoThread`; B wakes coroutine A on the bench thread, which `poll(true)`s until A ran: **two** cross-thread wakes, two blocking waits, two coroutine switches |
//! | `wake/cross_thread_bh_round_trip` | the same ping-pong with `RemoteContext::schedule_oneshot` and no coroutines (the baseline of the row above) |
//!
//! The thread pool's round trip (`thread_pool/submit_co`) is in `benches/compare.rs`, beside
//! its async form. Cross-thread numbers are round trips; a one-way wake is roughly half of one (both threads
//! block in `epoll_wait` between wakes, so this includes the kernel's wake-up latency, which
//! dominates on a small VM).

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use runtime::{co_yield, AioContext, Coroutine, IoThread};

fn coroutine(c: &mut Criterion) {
    let mut g = c.benchmark_group("coroutine");

    g.bench_function("create_enter_finish", |b| {
        b.iter(|| Coroutine::new(|| black_box(())).enter())
    });

    let stop = Rc::new(Cell::new(false));
    let flag = stop.clone();
    let co = Coroutine::new(move || {
        while !flag.get() {
            co_yield();
        }
    });
    g.bench_function("yield_reenter", |b| b.iter(|| co.enter()));
    // Let the coroutine finish so that its stack goes back to the pool instead of leaking.
    stop.set(true);
    co.enter();
    assert!(co.is_finished());

    // The floor: corosensei's own resume + suspend, without any of our bookkeeping (thread
    // check, state atomics, the per-thread table, deferred wakes).
    let mut raw = corosensei::Coroutine::new(|y: &corosensei::Yielder<(), ()>, ()| loop {
        y.suspend(());
    });
    g.bench_function("raw_corosensei_round_trip", |b| b.iter(|| raw.resume(())));
    g.finish();
}

fn bh(c: &mut Criterion) {
    let mut g = c.benchmark_group("bh");
    let ctx = AioContext::current();

    g.bench_function("poll_idle", |b| b.iter(|| ctx.poll(false)));

    let runs = Rc::new(Cell::new(0u64));
    let bh = ctx.bh_new(move || runs.set(runs.get() + 1));
    g.bench_function("schedule_run_same_thread", |b| {
        b.iter(|| {
            bh.schedule();
            ctx.poll(false)
        })
    });

    g.bench_function("schedule_oneshot_run_same_thread", |b| {
        b.iter(|| {
            ctx.schedule_oneshot(|| black_box(()));
            ctx.poll(false)
        })
    });
    g.finish();
}

fn wake(c: &mut Criterion) {
    let mut g = c.benchmark_group("wake");
    let ctx = AioContext::current();
    let iothread = IoThread::spawn("bench-iothread").expect("spawn iothread");

    // Coroutine A lives on the bench thread and counts its wake-ups.
    let rounds = Rc::new(Cell::new(0u64));
    let stop_a = Rc::new(Cell::new(false));
    let (r, s) = (rounds.clone(), stop_a.clone());
    let co_a = Coroutine::new(move || loop {
        co_yield();
        if s.get() {
            break;
        }
        r.set(r.get() + 1);
    });
    co_a.enter(); // parks A in its first co_yield()
    let a_waker = co_a.waker();

    // Coroutine B lives on the iothread; each wake-up of B wakes A.
    let stop_b = Arc::new(AtomicBool::new(false));
    let s = stop_b.clone();
    let (tx, rx) = mpsc::channel();
    iothread.run(move || {
        let co_b = Coroutine::new(move || loop {
            co_yield();
            if s.load(Ordering::Relaxed) {
                break;
            }
            a_waker.clone().wake();
        });
        co_b.enter();
        let _ = tx.send(co_b.waker());
    });
    let b_waker = rx.recv().expect("iothread started coroutine B");

    g.bench_function("cross_thread_co_round_trip", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let target = rounds.get() + 1;
                b_waker.clone().wake();
                while rounds.get() < target {
                    ctx.poll(true);
                }
            }
            start.elapsed()
        })
    });

    // Baseline: the same ping-pong made of remote one-shot bottom halves, no coroutines.
    let pongs = Arc::new(AtomicU64::new(0));
    let home = ctx.remote();
    g.bench_function("cross_thread_bh_round_trip", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let target = pongs.load(Ordering::Relaxed) + 1;
                let (p, h) = (pongs.clone(), home.clone());
                iothread.run(move || {
                    h.schedule_oneshot(move || {
                        p.fetch_add(1, Ordering::Relaxed);
                    })
                });
                while pongs.load(Ordering::Relaxed) < target {
                    ctx.poll(true);
                }
            }
            start.elapsed()
        })
    });

    // Let both coroutines finish; B is entered before the iothread's stop request runs.
    stop_b.store(true, Ordering::Relaxed);
    b_waker.wake();
    stop_a.set(true);
    co_a.enter();
    assert!(co_a.is_finished());
    iothread.stop();
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = coroutine, bh, wake
}
criterion_main!(benches);
