//! The async executor on the AioContext: spawn, wakes from this and other threads, dropped
//! wakers, block_on, panics, the coroutine bridge, the pool, sleep, and async/coroutine lock
//! interoperation.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use runtime::executor::{self, catch_unwind, live_tasks, sleep, yield_now};
use runtime::{
    block_on, co_bridge, co_yield, spawn_detached, spawn_local, AioContext, CoMutex, CoQueue,
    CoWaker, Coroutine, IoThread, ThreadPool,
};

/// A future that is `Pending` until `slot` receives a waker and someone wakes it once.
fn park(slot: Rc<RefCell<Option<Waker>>>) -> impl Future<Output = ()> {
    let mut parked = false;
    poll_fn(move |cx| {
        if parked {
            return Poll::Ready(());
        }
        parked = true;
        *slot.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    })
}

#[test]
fn spawn_polls_at_once_and_finishes_without_suspending() {
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    let h = spawn_local(async move {
        r.set(true);
        7
    });
    assert!(ran.get(), "spawn_local polls the task before returning");
    assert!(h.is_finished());
    assert_eq!(h.try_join().ok().map(|r| r.ok()), Some(Some(7)));
}

#[test]
fn same_thread_wake_runs_in_a_bottom_half() {
    let slot = Rc::new(RefCell::new(None));
    let done = Rc::new(Cell::new(false));
    let (s, d) = (slot.clone(), done.clone());
    spawn_detached(async move {
        park(s).await;
        d.set(true);
    });
    assert!(!done.get());
    let waker = slot.borrow_mut().take().expect("the task parked");
    waker.wake_by_ref();
    waker.wake(); // a second wake before the poll queues it once
    assert!(!done.get(), "a wake only queues the task");
    let ctx = AioContext::current();
    assert!(ctx.poll(false), "the ready-queue bottom half ran");
    assert!(done.get());
    assert_eq!(live_tasks(), 0);
}

#[test]
fn wake_from_another_thread_reaches_the_home_loop() {
    let (tx, rx) = mpsc::channel::<Waker>();
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    spawn_detached(async move {
        let mut sent = false;
        poll_fn(|cx| {
            if sent {
                return Poll::Ready(());
            }
            sent = true;
            tx.send(cx.waker().clone()).expect("send");
            Poll::Pending
        })
        .await;
        d.set(true);
    });
    let waker = rx.recv().expect("waker");
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        waker.wake();
    });
    let ctx = AioContext::current();
    let start = Instant::now();
    while !done.get() {
        assert!(start.elapsed() < Duration::from_secs(30), "lost wake");
        ctx.poll(true); // blocks until the remote wake arrives
    }
    t.join().expect("waker thread");
}

#[test]
fn many_cross_thread_wakes_are_neither_lost_nor_doubled() {
    const N: usize = 2000;
    let io = IoThread::spawn("exec-waker").expect("iothread");
    let polls = Rc::new(Cell::new(0usize));
    let p = polls.clone();
    let remaining = Arc::new(AtomicUsize::new(N));
    let h = spawn_local({
        let remaining = remaining.clone();
        async move {
            // Each round sends our waker to the iothread, which wakes us.
            for _ in 0..N {
                let mut sent = false;
                poll_fn(|cx| {
                    p.set(p.get() + 1);
                    if sent {
                        return Poll::Ready(());
                    }
                    sent = true;
                    let w = cx.waker().clone();
                    let r = remaining.clone();
                    io.run(move || {
                        r.fetch_sub(1, Ordering::Relaxed);
                        w.wake();
                    });
                    Poll::Pending
                })
                .await;
            }
            io
        }
    });
    let io = block_on(h).expect("no panic");
    assert_eq!(remaining.load(Ordering::Relaxed), 0);
    assert_eq!(
        polls.get(),
        2 * N,
        "every wake polled the task exactly once"
    );
    io.stop();
}

#[test]
fn dropped_waker_leaves_the_task_suspended_and_a_stale_wake_is_ignored() {
    let slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    let before = live_tasks();
    spawn_detached(async move {
        park(s).await;
    });
    assert_eq!(live_tasks(), before + 1);
    drop(slot.borrow_mut().take()); // nobody can wake it now
    let ctx = AioContext::current();
    while ctx.poll(false) {}
    assert_eq!(
        live_tasks(),
        before + 1,
        "still suspended (never cancelled)"
    );

    // A waker of a finished task: waking it later does nothing.
    let keep: Rc<RefCell<Option<Waker>>> = Rc::new(RefCell::new(None));
    let k = keep.clone();
    spawn_detached(async move {
        poll_fn(|cx| {
            *k.borrow_mut() = Some(cx.waker().clone());
            Poll::Ready(())
        })
        .await;
    });
    let stale = keep.borrow_mut().take().expect("waker");
    stale.wake();
    while ctx.poll(false) {}
    // A new task may reuse the slot; the stale wake must not poll it.
    let polls = Rc::new(Cell::new(0));
    let p = polls.clone();
    let slot2 = Rc::new(RefCell::new(None));
    let s2 = slot2.clone();
    spawn_detached(async move {
        p.set(p.get() + 1);
        park(s2).await;
    });
    while ctx.poll(false) {}
    assert_eq!(polls.get(), 1);
}

#[test]
fn block_on_runs_the_loop_for_timers_and_tasks() {
    let start = Instant::now();
    let v = block_on(async {
        sleep(Duration::from_millis(10)).await;
        let h = spawn_local(async {
            yield_now().await;
            5
        });
        h.await.expect("no panic") + 1
    });
    assert_eq!(v, 6);
    assert!(start.elapsed() >= Duration::from_millis(10));
}

#[test]
fn a_panicking_task_reports_to_its_handle_and_the_loop_keeps_going() {
    let h = spawn_local(async {
        yield_now().await;
        panic!("boom in a task");
    });
    let r = block_on(h);
    assert_eq!(r.err().map(|p| p.message), Some("boom in a task".into()));
    // Detached: logged, nothing unwinds into poll().
    spawn_detached(async {
        yield_now().await;
        panic!("detached boom");
    });
    let ctx = AioContext::current();
    while ctx.poll(false) {}
    assert_eq!(block_on(async { 3 }), 3);
    let caught = block_on(catch_unwind(async { panic!("inline") }));
    assert!(caught.is_err());
}

#[test]
#[should_panic(expected = "block_on() inside a coroutine")]
fn block_on_inside_a_coroutine_is_refused() {
    let h = runtime::spawn(|| block_on(async {}));
    if let Err(p) = h.join() {
        panic!("{}", p.message);
    }
}

#[test]
fn thread_pool_submit_async_returns_on_the_home_thread() {
    let home = std::thread::current().id();
    let (worker, back) = block_on(async {
        let w = ThreadPool::global()
            .submit_async(|| std::thread::current().id())
            .await;
        (w, std::thread::current().id())
    });
    assert_ne!(worker, home);
    assert_eq!(back, home);
    // A panic on the worker resumes in the task.
    let r = block_on(catch_unwind(
        ThreadPool::global().submit_async(|| -> u32 { panic!("worker boom") }),
    ));
    assert_eq!(r.err().map(|p| p.message), Some("worker boom".into()));
}

#[test]
fn co_bridge_runs_coroutine_code_and_propagates_panics() {
    let v = block_on(co_bridge(|| {
        let me = CoWaker::current();
        AioContext::current().schedule_oneshot(move || me.wake());
        co_yield();
        ThreadPool::global().submit_co(|| 40) + 2
    }));
    assert_eq!(v, 42);
    let r = block_on(catch_unwind(co_bridge(|| -> () { panic!("co boom") })));
    assert_eq!(r.err().map(|p| p.message), Some("co boom".into()));
}

#[test]
fn comutex_is_shared_fifo_between_coroutines_and_tasks() {
    let m = Rc::new(CoMutex::new(Vec::new()));
    let held = m.try_lock().expect("free");
    // Waiters in this order: task 0, coroutine 1, task 2, coroutine 3.
    let mut handles = Vec::new();
    for i in 0..4 {
        let m = m.clone();
        if i % 2 == 0 {
            handles.push(Some(spawn_local(async move {
                let mut g = m.lock_async().await;
                yield_now().await; // hold it across a suspension
                g.push(i);
            })));
        } else {
            Coroutine::new(move || {
                let mut g = m.co_lock();
                let me = CoWaker::current();
                AioContext::current().schedule_oneshot(move || me.wake());
                co_yield();
                g.push(i);
            })
            .enter();
            handles.push(None);
        }
    }
    assert_eq!(m.waiters(), 4);
    drop(held);
    let ctx = AioContext::current();
    let start = Instant::now();
    while m.is_locked() || m.waiters() > 0 {
        assert!(start.elapsed() < Duration::from_secs(10));
        ctx.poll(false);
    }
    while ctx.poll(false) {}
    assert_eq!(*m.try_lock().expect("free"), vec![0, 1, 2, 3]);
    for h in handles.into_iter().flatten() {
        assert!(h.is_finished());
    }
}

#[test]
fn a_dropped_lock_future_leaves_the_queue_or_passes_the_lock_on() {
    let m = Rc::new(CoMutex::new(0));
    let held = m.try_lock().expect("free");
    let waker = Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    // Waiting, then dropped: leaves the queue.
    let mut a = Box::pin(m.lock_async());
    assert!(a.as_mut().poll(&mut cx).is_pending());
    assert_eq!(m.waiters(), 1);
    drop(a);
    assert_eq!(m.waiters(), 0);
    // Picked (the lock handed to it), then dropped before taking it: the lock passes on.
    let mut b = Box::pin(m.lock_async());
    assert!(b.as_mut().poll(&mut cx).is_pending());
    let got = Rc::new(Cell::new(false));
    let (m2, g2) = (m.clone(), got.clone());
    spawn_detached(async move {
        let _g = m2.lock_async().await;
        g2.set(true);
    });
    drop(held); // hands the lock to `b`
    assert!(m.is_locked());
    drop(b); // passes it on to the task
    let ctx = AioContext::current();
    while ctx.poll(false) {}
    assert!(got.get());
    assert!(!m.is_locked());
}

#[test]
fn coqueue_wakes_coroutines_and_tasks_in_order_across_threads() {
    let q = Arc::new(CoQueue::new());
    let order = Arc::new(Mutex::new(Vec::new()));
    let (q1, o1) = (q.clone(), order.clone());
    spawn_detached(async move {
        q1.wait_async().await;
        o1.lock().expect("lock").push("task");
    });
    let (q2, o2) = (q.clone(), order.clone());
    Coroutine::new(move || {
        q2.co_wait();
        o2.lock().expect("lock").push("co");
    })
    .enter();
    assert_eq!(q.len(), 2);
    // Wake from another thread: both wakes travel through the remote queue.
    let q3 = q.clone();
    std::thread::spawn(move || q3.restart_all())
        .join()
        .expect("thread");
    let ctx = AioContext::current();
    let start = Instant::now();
    while order.lock().expect("lock").len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10));
        ctx.poll(true);
    }
    assert_eq!(*order.lock().expect("lock"), vec!["task", "co"]);
}

#[test]
fn tasks_on_an_iothread_stay_there() {
    let io = IoThread::spawn("exec-io").expect("iothread");
    let (tx, rx) = mpsc::channel();
    io.run(move || {
        let home = std::thread::current().id();
        executor::spawn_detached(async move {
            let a = std::thread::current().id();
            ThreadPool::global().submit_async(|| ()).await;
            sleep(Duration::from_millis(1)).await;
            let b = std::thread::current().id();
            let _ = tx.send((home, a, b));
        });
    });
    let (home, a, b) = rx.recv_timeout(Duration::from_secs(30)).expect("result");
    assert_eq!(home, a);
    assert_eq!(home, b);
    io.stop();
}
