//! CoMutex, CoQueue, CoRwLock and co_sleep, on one thread and across two.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::{
    co_sleep, co_yield, wait_while, AioContext, CoMutex, CoQueue, CoRwLock, CoWaker, Coroutine,
    IoThread,
};

/// Yields and is re-entered from the next poll of its thread's loop.
fn co_yield_via_bh() {
    let me = CoWaker::current();
    AioContext::current().schedule_oneshot(move || me.wake());
    co_yield();
}

/// Polls this thread's loop until `done()`; other threads must `runtime::kick()` after changing
/// what `done` reads.
fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    wait_while(&AioContext::current(), || {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        !done()
    });
}

#[test]
fn comutex_excludes_across_two_threads_with_yields_inside() {
    const PER_THREAD: usize = 20;
    const ITERS: usize = 50;
    let io = IoThread::spawn("mutex-b").expect("iothread");
    let m = Arc::new(CoMutex::new(0usize));
    let inside = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicUsize::new(0));
    let body = {
        let (m, inside, finished) = (m.clone(), inside.clone(), finished.clone());
        move || {
            for _ in 0..ITERS {
                let mut g = m.co_lock();
                assert!(!inside.swap(true, Ordering::SeqCst), "two owners at once");
                let v = *g;
                co_yield_via_bh(); // a yield inside the critical section
                *g = v + 1;
                inside.store(false, Ordering::SeqCst);
                drop(g);
                co_yield_via_bh();
            }
            finished.fetch_add(1, Ordering::SeqCst);
            runtime::kick();
        }
    };
    for _ in 0..PER_THREAD {
        io.spawn_co(body.clone());
        Coroutine::new(body.clone()).enter();
    }
    let f = finished.clone();
    wait_while(&AioContext::current(), || {
        f.load(Ordering::SeqCst) < 2 * PER_THREAD
    });
    assert_eq!(
        *m.try_lock().expect("free at the end"),
        2 * PER_THREAD * ITERS
    );
    io.stop();
}

#[test]
fn comutex_hands_over_in_fifo_order_across_threads() {
    const WAITERS: usize = 8;
    let io = IoThread::spawn("mutex-fifo").expect("iothread");
    let m = Arc::new(CoMutex::new(Vec::<usize>::new()));
    let release = Arc::new(AtomicBool::new(false));
    // The holder takes the lock and keeps it until every waiter has queued.
    let (hm, hr) = (m.clone(), release.clone());
    let holder = Coroutine::new(move || {
        let g = hm.co_lock();
        while !hr.load(Ordering::SeqCst) {
            co_yield_via_bh();
        }
        drop(g);
    });
    holder.enter();
    for i in 0..WAITERS {
        let m2 = m.clone();
        let body = move || {
            let mut g = m2.co_lock();
            g.push(i);
            co_yield_via_bh(); // hold it across a yield: later waiters must keep waiting
            drop(g);
            runtime::kick();
        };
        // Alternate threads; wait until waiter i is queued before starting i+1.
        if i % 2 == 0 {
            Coroutine::new(body).enter();
        } else {
            io.spawn_co(body);
        }
        poll_until("waiter to queue", || m.waiters() == i + 1);
    }
    release.store(true, Ordering::SeqCst);
    poll_until("all waiters", || {
        m.try_lock().is_some_and(|g| g.len() == WAITERS)
    });
    assert_eq!(
        *m.try_lock().expect("free"),
        (0..WAITERS).collect::<Vec<_>>()
    );
    io.stop();
}

#[test]
fn unlock_does_not_let_the_unlocker_barge_ahead() {
    let m = Rc::new(CoMutex::new(()));
    let order = Rc::new(RefCell::new(Vec::new()));
    let (m1, o1) = (m.clone(), order.clone());
    let a = Coroutine::new(move || {
        let g = m1.co_lock();
        co_yield(); // B queues meanwhile
        drop(g);
        let _g = m1.co_lock(); // must queue behind B, which owns the lock now
        o1.borrow_mut().push("a again");
    });
    let (m2, o2) = (m.clone(), order.clone());
    let b = Coroutine::new(move || {
        let _g = m2.co_lock();
        o2.borrow_mut().push("b");
        co_yield();
    });
    a.enter();
    b.enter(); // queues
    a.enter(); // unlocks (B owns it, wake deferred), relocks: queued behind B
    assert_eq!(*order.borrow(), ["b"]);
    b.enter(); // B unlocks: hands to A
    assert_eq!(*order.borrow(), ["b", "a again"]);
    assert!(a.is_finished() && b.is_finished());
}

#[test]
fn coqueue_next_restart_all_and_wait_locked() {
    let q = Rc::new(CoQueue::new());
    let woke = Rc::new(RefCell::new(Vec::new()));
    let mut cos = Vec::new();
    for i in 0..4 {
        let (q, w) = (q.clone(), woke.clone());
        let co = Coroutine::new(move || {
            q.co_wait();
            w.borrow_mut().push(i);
        });
        co.enter();
        cos.push(co);
    }
    assert_eq!(q.len(), 4);
    assert!(q.next());
    assert_eq!(*woke.borrow(), [0], "next() wakes the first waiter only");
    q.restart_all();
    assert_eq!(
        *woke.borrow(),
        [0, 1, 2, 3],
        "restart_all() wakes the rest in order"
    );
    assert!(!q.next(), "empty queue");

    // Condition-variable use: wait with the mutex released, return holding it.
    let state = Rc::new(CoMutex::new(false));
    let (s, q2) = (state.clone(), q.clone());
    let seen = Rc::new(Cell::new(false));
    let sn = seen.clone();
    let consumer = Coroutine::new(move || {
        let mut g = s.co_lock();
        while !*g {
            g = q2.co_wait_locked(g);
        }
        sn.set(true);
    });
    consumer.enter();
    assert!(!state.is_locked(), "waiting released the mutex");
    let (s, q3) = (state.clone(), q.clone());
    Coroutine::new(move || {
        *s.co_lock() = true;
        q3.next();
    })
    .enter();
    assert!(seen.get());
    assert!(!state.is_locked());
}

#[test]
fn corwlock_readers_share_writers_exclude_and_writers_are_not_starved() {
    let l = Rc::new(CoRwLock::new(0u32));
    let log = Rc::new(RefCell::new(Vec::new()));
    let gate = Rc::new(CoQueue::new());

    let reader = |name: &'static str| {
        let (l, log, gate) = (l.clone(), log.clone(), gate.clone());
        Coroutine::new(move || {
            let g = l.co_read();
            log.borrow_mut().push(format!("{name} in ({})", *g));
            gate.co_wait();
            drop(g);
            log.borrow_mut().push(format!("{name} out"));
        })
    };
    let r1 = reader("r1");
    let r2 = reader("r2");
    r1.enter();
    r2.enter();
    assert_eq!(
        *log.borrow(),
        ["r1 in (0)", "r2 in (0)"],
        "readers share the lock"
    );

    let (lw, logw) = (l.clone(), log.clone());
    let w = Coroutine::new(move || {
        let mut g = lw.co_write();
        *g += 1;
        logw.borrow_mut().push("w in".to_string());
    });
    w.enter();
    assert_eq!(l.waiters(), 1, "the writer waits for the readers");
    let r3 = reader("r3");
    r3.enter();
    assert_eq!(
        l.waiters(),
        2,
        "a reader arriving after a waiting writer queues behind it"
    );

    gate.next(); // r1 leaves; r2 still holds: writer keeps waiting
    assert!(!log.borrow().iter().any(|e| e == "w in"));
    gate.next(); // r2 leaves: writer runs, then r3 gets in and sees its write
    let l2 = log.borrow().clone();
    assert_eq!(&l2[2..], ["r1 out", "r2 out", "w in", "r3 in (1)"]);
    gate.next();
    assert!(r1.is_finished() && r2.is_finished() && r3.is_finished() && w.is_finished());
}

#[test]
fn corwlock_across_threads_keeps_invariant() {
    const ITERS: usize = 200;
    let io = IoThread::spawn("rwlock-b").expect("iothread");
    // Writers keep both halves equal; readers check it.
    let l = Arc::new(CoRwLock::new((0u64, 0u64)));
    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (l, done) = (l.clone(), done.clone());
        move || {
            for _ in 0..ITERS {
                let mut g = l.co_write();
                g.0 += 1;
                co_yield_via_bh();
                g.1 += 1;
                drop(g);
                co_yield_via_bh();
            }
            done.fetch_add(1, Ordering::SeqCst);
            runtime::kick();
        }
    };
    let reader = {
        let (l, done) = (l.clone(), done.clone());
        move || {
            for _ in 0..ITERS {
                let g = l.co_read();
                assert_eq!(g.0, g.1, "reader saw a half-done write");
                co_yield_via_bh();
                drop(g);
            }
            done.fetch_add(1, Ordering::SeqCst);
            runtime::kick();
        }
    };
    for _ in 0..2 {
        io.spawn_co(writer.clone());
        io.spawn_co(reader.clone());
        Coroutine::new(writer.clone()).enter();
        Coroutine::new(reader.clone()).enter();
    }
    let d = done.clone();
    wait_while(&AioContext::current(), || d.load(Ordering::SeqCst) < 8);
    let l2 = l.clone();
    let total = runtime::spawn(move || *l2.co_read()).join();
    assert_eq!(total, Ok((4 * ITERS as u64, 4 * ITERS as u64)));
    io.stop();
}

#[test]
fn co_sleep_sleeps_at_least_the_duration_without_blocking_the_loop() {
    let ctx = AioContext::current();
    let start = Instant::now();
    let woke_at = Rc::new(Cell::new(None));
    let w = woke_at.clone();
    Coroutine::new(move || {
        co_sleep(Duration::from_millis(40));
        w.set(Some(Instant::now()));
    })
    .enter();
    // Meanwhile, the loop serves other work.
    let ticks = Rc::new(Cell::new(0));
    let t = ticks.clone();
    ctx.schedule_oneshot(move || t.set(t.get() + 1));
    poll_until("sleeper", || woke_at.get().is_some());
    assert_eq!(ticks.get(), 1);
    assert!(woke_at.get().expect("woke") - start >= Duration::from_millis(40));
}

#[test]
fn a_long_hand_off_chain_iterates_instead_of_recursing() {
    // 20k coroutines queue on one mutex; each unlock wakes the next from inside a coroutine.
    // Deferred wakes must be run by a loop, or the main thread's stack would overflow.
    const N: usize = 20_000; // each live stack is 2 mappings; vm.max_map_count is 65530
    let m = Rc::new(CoMutex::new(0usize));
    let first = m.clone();
    let holder = Coroutine::new(move || {
        let g = first.co_lock();
        co_yield();
        drop(g);
    });
    holder.enter();
    for _ in 0..N {
        let m = m.clone();
        Coroutine::new(move || *m.co_lock() += 1).enter();
    }
    assert_eq!(m.waiters(), N);
    holder.enter(); // releases: the whole chain runs from here
    assert_eq!(*m.try_lock().expect("free"), N);
}
