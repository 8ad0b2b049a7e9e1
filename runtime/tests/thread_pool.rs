//! ThreadPool: results come back on the submitting thread; bounded workers; idle exit.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use runtime::{spawn, wait_while, AioContext, IoThread, ThreadPool};

#[test]
fn submit_co_runs_on_a_worker_and_resumes_on_the_submitting_thread() {
    let io = IoThread::spawn("submitter").expect("iothread");
    let (tx, rx) = mpsc::channel();
    io.spawn_co(move || {
        let home = thread::current().id();
        let worker = ThreadPool::global().submit_co(|| thread::current().id());
        tx.send((home, worker, thread::current().id()))
            .expect("send");
    });
    let (home, worker, after) = rx.recv_timeout(Duration::from_secs(10)).expect("completed");
    assert_ne!(worker, home, "the job ran on the submitting thread");
    assert_eq!(after, home, "the coroutine resumed on another thread");
    io.stop();
}

#[test]
fn submit_cb_calls_back_on_the_submitting_thread() {
    let ctx = AioContext::current();
    let got = Rc::new(Cell::new(None));
    let g = got.clone();
    let home = thread::current().id();
    ThreadPool::global().submit_cb(
        || 40 + 2,
        move |v| {
            assert_eq!(thread::current().id(), home);
            g.set(Some(v));
        },
    );
    let start = Instant::now();
    while got.get().is_none() {
        ctx.poll(true);
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    assert_eq!(got.get(), Some(42));
}

#[test]
fn a_panicking_job_reaches_its_coroutine_not_the_worker() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = spawn(|| ThreadPool::global().submit_co(|| -> u32 { panic!("job failed") })).join();
    std::panic::set_hook(prev);
    assert_eq!(r.expect_err("the panic is reported").message, "job failed");
    // The pool still works.
    assert_eq!(spawn(|| ThreadPool::global().submit_co(|| 7)).join(), Ok(7));
}

#[test]
fn workers_are_bounded_and_exit_when_idle() {
    let pool = ThreadPool::new("bounded", 3, Duration::from_millis(100));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    for i in 0..9 {
        let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
        pool.submit(move || {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            if i < 3 {
                // First wave: hold on until three run at once (proves three workers).
                let start = Instant::now();
                while peak.load(Ordering::SeqCst) < 3 && start.elapsed() < Duration::from_secs(5) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            thread::sleep(Duration::from_millis(5));
            running.fetch_sub(1, Ordering::SeqCst);
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    let start = Instant::now();
    while done.load(Ordering::SeqCst) < 9 {
        thread::sleep(Duration::from_millis(5));
        assert!(start.elapsed() < Duration::from_secs(10), "jobs stuck");
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "more workers than max_threads ran at once"
    );
    assert!(pool.threads() <= 3);
    let start = Instant::now();
    while pool.threads() > 0 {
        thread::sleep(Duration::from_millis(20));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "idle workers did not exit"
        );
    }
}

#[test]
fn sequential_submits_reuse_one_worker() {
    let pool = ThreadPool::new("reuse", 8, Duration::from_secs(5));
    let p = pool.clone();
    let ids = spawn(move || {
        (0..50)
            .map(|_| p.submit_co(|| thread::current().id()))
            .collect::<Vec<_>>()
    })
    .join()
    .expect("ran");
    let mut distinct = ids.clone();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        1,
        "one job at a time should keep to one worker: {distinct:?}"
    );
    assert_eq!(pool.threads(), 1);
    pool.shutdown();
}

#[test]
fn many_coroutines_in_flight_complete_on_their_thread() {
    let ctx = AioContext::current();
    let done = Rc::new(Cell::new(0));
    for i in 0..200u64 {
        let d = done.clone();
        runtime::Coroutine::new(move || {
            let r = ThreadPool::global().submit_co(move || {
                thread::sleep(Duration::from_micros(100));
                i * 2
            });
            assert_eq!(r, i * 2);
            d.set(d.get() + 1);
        })
        .enter();
    }
    let d = done.clone();
    wait_while(&ctx, || d.get() < 200);
}

/// Runs `jobs` coroutines on this thread, each submitting one job that sleeps a little, in
/// `lane` if given; returns the order in which the jobs ran and the most that ran at once.
fn run_sleepers(lane: Option<&runtime::Lane>, jobs: usize) -> (Vec<usize>, usize) {
    let ctx = AioContext::current();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Rc::new(Cell::new(0));
    for i in 0..jobs {
        let (running, most, order, d) =
            (running.clone(), most.clone(), order.clone(), done.clone());
        let lane = lane.cloned();
        runtime::Coroutine::new(move || {
            ThreadPool::global().submit_co_scoped_in(lane.as_ref(), || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                thread::sleep(Duration::from_micros(300));
                order.lock().expect("order").push(i);
                running.fetch_sub(1, Ordering::SeqCst);
            });
            d.set(d.get() + 1);
        })
        .enter();
    }
    wait_while(&ctx, || done.get() < jobs);
    let order = order.lock().expect("order").clone();
    (order, most.load(Ordering::SeqCst))
}

#[test]
fn a_lane_runs_its_jobs_one_at_a_time_in_order() {
    let (_, most) = run_sleepers(None, 40);
    assert!(
        most > 1,
        "without a lane the jobs should overlap (at most {most} at once)"
    );
    let lane = runtime::Lane::new();
    let (order, most) = run_sleepers(Some(&lane), 40);
    assert_eq!(most, 1, "lane jobs overlapped");
    assert_eq!(
        order,
        (0..40).collect::<Vec<_>>(),
        "lane jobs ran out of order"
    );
    // The lane went idle; it starts again for the next jobs.
    let (order, most) = run_sleepers(Some(&lane), 5);
    assert_eq!((order, most), ((0..5).collect(), 1));
}

#[test]
fn lane_jobs_from_two_threads_never_overlap() {
    let lane = runtime::Lane::new();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let threads: Vec<IoThread> = (0..2)
        .map(|t| IoThread::spawn(&format!("lane-{t}")).expect("iothread"))
        .collect();
    for t in &threads {
        for _ in 0..20 {
            let (lane, running, most, tx) =
                (lane.clone(), running.clone(), most.clone(), tx.clone());
            t.spawn_co(move || {
                ThreadPool::global().submit_co_scoped_in(Some(&lane), || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    thread::sleep(Duration::from_micros(200));
                    running.fetch_sub(1, Ordering::SeqCst);
                });
                tx.send(()).expect("send");
            });
        }
    }
    for _ in 0..40 {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a lane job completed");
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "lane jobs overlapped");
    for t in threads {
        t.stop();
    }
}

#[test]
fn a_panicking_lane_job_reaches_its_coroutine_and_the_lane_goes_on() {
    let ctx = AioContext::current();
    let lane = runtime::Lane::new();
    let results = Rc::new(std::cell::RefCell::new(Vec::new()));
    for i in 0..3 {
        let (lane, r) = (lane.clone(), results.clone());
        runtime::Coroutine::new(move || {
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ThreadPool::global().submit_co_scoped_in(Some(&lane), || {
                    if i == 1 {
                        panic!("job {i} fails");
                    }
                    i
                })
            }));
            r.borrow_mut().push(got.ok());
        })
        .enter();
    }
    wait_while(&ctx, || results.borrow().len() < 3);
    assert_eq!(*results.borrow(), vec![Some(0), None, Some(2)]);
}

#[test]
fn async_lane_jobs_complete_in_order() {
    let lane = runtime::Lane::new();
    let running = Arc::new(AtomicUsize::new(0));
    let futures: Vec<_> = (0..10)
        .map(|i| {
            let running = running.clone();
            ThreadPool::global().submit_async_in(Some(&lane), move || {
                assert_eq!(
                    running.fetch_add(1, Ordering::SeqCst),
                    0,
                    "lane jobs overlapped"
                );
                thread::sleep(Duration::from_micros(200));
                running.fetch_sub(1, Ordering::SeqCst);
                i
            })
        })
        .collect();
    let got: Vec<i32> = runtime::block_on(async move {
        let mut got = Vec::new();
        for f in futures {
            got.push(f.await);
        }
        got
    });
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// A waker that panics when woken: foreign code a pool worker calls.
struct PanickingWaker;

impl std::task::Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("this waker panics");
    }
}

/// A pool job whose completion wakes a waker that panics. Polled once, while the job is held
/// on `release`: the worker wakes the waker when the job ends.
fn job_with_panicking_waker(
    pool: &ThreadPool,
    lane: Option<&runtime::Lane>,
) -> (runtime::PoolFuture<()>, mpsc::Sender<()>) {
    let (release, held) = mpsc::channel::<()>();
    let mut job = pool.submit_async_in(lane, move || {
        let _ = held.recv();
    });
    let waker = std::task::Waker::from(Arc::new(PanickingWaker));
    let mut cx = std::task::Context::from_waker(&waker);
    let poll = std::future::Future::poll(std::pin::Pin::new(&mut job), &mut cx);
    assert!(poll.is_pending(), "the job is held");
    (job, release)
}

/// A waker that panics does not kill the worker that wakes it, nor leave its lane busy: the
/// next jobs, in the lane and out of it, still run (the pool has a single worker).
#[test]
fn a_panicking_waker_leaves_the_worker_and_the_lane_running() {
    let pool = ThreadPool::new("waker-test", 1, Duration::from_secs(10));
    let lane = runtime::Lane::new();
    for in_lane in [false, true] {
        let lane = in_lane.then_some(&lane);
        let (_job, release) = job_with_panicking_waker(&pool, lane);
        release.send(()).expect("release the job");
        for next_lane in [lane, None] {
            let (tx, rx) = mpsc::channel();
            let _next = pool.submit_async_in(next_lane, move || tx.send(()).expect("send"));
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| {
                    panic!(
                        "after a panicking waker (lane: {in_lane}), a job (lane: {}) never ran",
                        next_lane.is_some()
                    )
                });
        }
    }
}
