//! AioContext: bottom halves, timers, fd handlers, remote work and notification.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use runtime::AioContext;

fn log() -> Rc<RefCell<Vec<&'static str>>> {
    Rc::new(RefCell::new(Vec::new()))
}

#[test]
fn bh_runs_once_per_schedule_in_schedule_order() {
    let ctx = AioContext::current();
    let seen = log();
    let (s1, s2) = (seen.clone(), seen.clone());
    let a = ctx.bh_new(move || s1.borrow_mut().push("a"));
    let b = ctx.bh_new(move || s2.borrow_mut().push("b"));
    b.schedule();
    a.schedule();
    b.schedule(); // already scheduled: no second run
    assert!(ctx.poll(false));
    assert_eq!(*seen.borrow(), ["b", "a"]);
    assert!(!ctx.poll(false), "nothing left to run");
    assert_eq!(seen.borrow().len(), 2);
}

#[test]
fn bh_scheduled_while_bhs_run_waits_for_next_round() {
    let ctx = AioContext::current();
    let seen = log();
    let s = seen.clone();
    let second = Rc::new(ctx.bh_new(move || s.borrow_mut().push("second")));
    let (s, sec) = (seen.clone(), second.clone());
    let first = ctx.bh_new(move || {
        s.borrow_mut().push("first");
        sec.schedule();
    });
    first.schedule();
    assert!(ctx.poll(false));
    assert_eq!(
        *seen.borrow(),
        ["first"],
        "BH scheduled during the round ran in the same round"
    );
    assert!(ctx.poll(false));
    assert_eq!(*seen.borrow(), ["first", "second"]);
}

#[test]
fn bh_rescheduling_itself_does_not_starve_the_loop() {
    let ctx = AioContext::current();
    let runs = Rc::new(Cell::new(0));
    let slot: Rc<RefCell<Option<runtime::Bh>>> = Rc::new(RefCell::new(None));
    let (r, sl) = (runs.clone(), slot.clone());
    let bh = ctx.bh_new(move || {
        r.set(r.get() + 1);
        if let Some(bh) = sl.borrow().as_ref() {
            bh.schedule();
        }
    });
    bh.schedule();
    *slot.borrow_mut() = Some(bh);
    for i in 1..=5 {
        assert!(ctx.poll(false));
        assert_eq!(runs.get(), i, "exactly one run per round");
    }
    // A pending BH makes a blocking poll return at once.
    let t = Instant::now();
    assert!(ctx.poll(true));
    assert!(t.elapsed() < Duration::from_secs(1));
    slot.borrow_mut().take(); // delete: breaks the cycle and cancels the pending run
    assert!(!ctx.poll(false));
    assert_eq!(runs.get(), 6);
}

#[test]
fn bh_cancel_and_delete() {
    let ctx = AioContext::current();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let bh = ctx.bh_new(move || r.set(r.get() + 1));
    bh.schedule();
    assert!(bh.is_scheduled());
    bh.cancel();
    assert!(!bh.is_scheduled());
    assert!(!ctx.poll(false));
    assert_eq!(runs.get(), 0);

    // Cancel then reschedule in the same round: runs once.
    bh.schedule();
    bh.cancel();
    bh.schedule();
    assert!(ctx.poll(false));
    assert!(!ctx.poll(false));
    assert_eq!(runs.get(), 1);

    bh.schedule();
    bh.delete();
    assert!(!ctx.poll(false));
    assert_eq!(runs.get(), 1);
}

#[test]
fn oneshot_bh_runs_once_in_order_with_others() {
    let ctx = AioContext::current();
    let seen = log();
    let s = seen.clone();
    ctx.schedule_oneshot(move || s.borrow_mut().push("one"));
    let s = seen.clone();
    let bh = ctx.bh_new(move || s.borrow_mut().push("bh"));
    bh.schedule();
    let s = seen.clone();
    ctx.schedule_oneshot(move || s.borrow_mut().push("two"));
    assert!(ctx.poll(false));
    assert_eq!(*seen.borrow(), ["one", "bh", "two"]);
    assert!(!ctx.poll(false));
}

#[test]
fn timers_fire_in_deadline_order_and_never_early() {
    let ctx = AioContext::current();
    let fired: Rc<RefCell<Vec<(u32, Instant)>>> = Rc::new(RefCell::new(Vec::new()));
    let start = Instant::now();
    let mut timers = Vec::new();
    // Armed out of order; two share a deadline (then arming order decides).
    for (id, ms) in [(1u32, 30u64), (2, 10), (3, 20), (4, 20), (5, 5)] {
        let f = fired.clone();
        let t = ctx.timer_new(move || f.borrow_mut().push((id, Instant::now())));
        t.modify(start + Duration::from_millis(ms));
        timers.push((t, ms));
    }
    while fired.borrow().len() < 5 {
        ctx.poll(true);
    }
    let order: Vec<u32> = fired.borrow().iter().map(|(id, _)| *id).collect();
    assert_eq!(order, [5, 2, 3, 4, 1]);
    for (id, at) in fired.borrow().iter() {
        let ms = timers[*id as usize - 1].1;
        assert!(
            *at >= start + Duration::from_millis(ms),
            "timer {id} fired {:?} before its deadline",
            (start + Duration::from_millis(ms)) - *at
        );
    }
    assert!(timers.iter().all(|(t, _)| !t.is_pending()));
}

#[test]
fn timer_modify_delete_and_drop() {
    let ctx = AioContext::current();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let t = ctx.timer_new(move || r.set(r.get() + 1));
    t.modify_after(Duration::from_millis(1));
    t.delete();
    assert!(!t.is_pending());
    // Re-arm later than first set: only the last arming counts.
    t.modify_after(Duration::from_millis(500));
    t.modify_after(Duration::from_millis(2));
    let deadline = t.deadline().expect("armed");
    while runs.get() == 0 {
        ctx.poll(true);
    }
    assert!(Instant::now() >= deadline);
    // The stale 500 ms entry must not fire.
    let end = Instant::now() + Duration::from_millis(20);
    while Instant::now() < end {
        ctx.poll(false);
    }
    assert_eq!(runs.get(), 1);

    let r = runs.clone();
    let dropped = ctx.timer_new(move || r.set(r.get() + 100));
    dropped.modify_after(Duration::ZERO);
    drop(dropped);
    ctx.poll(false);
    assert_eq!(runs.get(), 1, "a dropped timer fired");
}

#[test]
fn blocking_poll_sleeps_until_the_timer() {
    let ctx = AioContext::current();
    let t = ctx.timer_new(|| {});
    let start = Instant::now();
    t.modify(start + Duration::from_millis(30));
    assert!(ctx.poll(true), "the timer ran");
    assert!(start.elapsed() >= Duration::from_millis(30));
}

#[test]
fn fd_handler_level_triggered_with_a_socket_pair() {
    let ctx = AioContext::current();
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    rx.set_nonblocking(true).expect("nonblocking");
    let rx = Rc::new(RefCell::new(rx));
    let calls = Rc::new(Cell::new(0));
    let got = Rc::new(RefCell::new(Vec::new()));
    let (c, g, r) = (calls.clone(), got.clone(), rx.clone());
    // Reads one byte per call: level-triggered means it is called again while data remains.
    let read = Rc::new(move || {
        c.set(c.get() + 1);
        let mut b = [0u8; 1];
        if let Ok(1) = r.borrow_mut().read(&mut b) {
            g.borrow_mut().push(b[0]);
        }
    });
    let fd = rx.borrow().as_raw_fd();
    ctx.set_fd_handler(fd, Some(read), None).expect("register");
    assert!(!ctx.poll(false), "nothing readable yet");
    tx.write_all(b"xyz").expect("write");
    for _ in 0..3 {
        assert!(ctx.poll(true));
    }
    assert_eq!(*got.borrow(), b"xyz");
    assert_eq!(calls.get(), 3);
    assert!(!ctx.poll(false), "drained: handler not called again");

    // A write handler on the other end fires while the socket has room.
    let w_calls = Rc::new(Cell::new(0));
    let wc = w_calls.clone();
    let txfd = tx.as_raw_fd();
    ctx.set_fd_handler(txfd, None, Some(Rc::new(move || wc.set(wc.get() + 1))))
        .expect("reg");
    assert!(ctx.poll(false));
    assert_eq!(w_calls.get(), 1);
    ctx.set_fd_handler(txfd, None, None).expect("remove");

    // Removal: no more calls even with data pending.
    ctx.set_fd_handler(fd, None, None).expect("remove");
    tx.write_all(b"!").expect("write");
    assert!(!ctx.poll(false));
    assert_eq!(calls.get(), 3);
}

#[test]
fn remote_oneshots_from_many_threads_none_lost_or_doubled() {
    const THREADS: usize = 8;
    const EACH: usize = 2_000;
    let ctx = AioContext::current();
    let remote = ctx.remote();
    let counts: Arc<Vec<AtomicUsize>> =
        Arc::new((0..THREADS * EACH).map(|_| AtomicUsize::new(0)).collect());
    let total = Rc::new(Cell::new(0usize));
    // The BHs run on this thread; count per item to catch doubles, in order per sender.
    let last_seen: Arc<Vec<AtomicUsize>> =
        Arc::new((0..THREADS).map(|_| AtomicUsize::new(0)).collect());
    let barrier = Arc::new(Barrier::new(THREADS));
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (remote, counts, last_seen, barrier) = (
            remote.clone(),
            counts.clone(),
            last_seen.clone(),
            barrier.clone(),
        );
        handles.push(thread::spawn(move || {
            barrier.wait();
            for i in 0..EACH {
                let (counts, last_seen) = (counts.clone(), last_seen.clone());
                remote.schedule_oneshot(move || {
                    counts[t * EACH + i].fetch_add(1, Ordering::Relaxed);
                    // Per-sender FIFO: item i arrives after item i-1.
                    let prev = last_seen[t].swap(i + 1, Ordering::Relaxed);
                    assert_eq!(prev, i, "sender {t}: item {i} out of order");
                });
            }
        }));
    }
    let start = Instant::now();
    while counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum::<usize>()
        < THREADS * EACH
    {
        ctx.poll(true);
        total.set(total.get() + 1);
        assert!(start.elapsed() < Duration::from_secs(30), "remote BHs lost");
    }
    for h in handles {
        h.join().expect("sender");
    }
    ctx.poll(false);
    assert!(
        counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
        "a BH ran twice"
    );
}

#[test]
fn notify_wakes_a_blocking_poll_without_progress() {
    let ctx = AioContext::current();
    let remote = ctx.remote();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        remote.notify();
    });
    let start = Instant::now();
    // Nothing is registered: only the notification can end this wait.
    assert!(!ctx.poll(true), "a bare notification is not progress");
    assert!(start.elapsed() >= Duration::from_millis(40));
    t.join().expect("notifier");
}

/// A `notify()` sent while nobody waits is not remembered: the next blocking poll sleeps until
/// real work (here a timer) arrives. QEMU's `aio_notify()` also sets `ctx->notified`, which
/// makes the next `aio_poll()` skip its wait; see "Differences from QEMU" in docs/runtime.md.
#[test]
fn a_notify_before_poll_is_not_remembered() {
    let ctx = AioContext::current();
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let timer = ctx.timer_new(move || f.set(true));
    ctx.remote().notify(); // nobody is polling: notify_me is false, the eventfd stays clear
    timer.modify_after(Duration::from_millis(20));
    let start = Instant::now();
    // Had the notification been kept, this poll would return at once without progress.
    assert!(ctx.poll(true), "the poll returned before the timer");
    assert!(fired.get());
    assert!(start.elapsed() >= Duration::from_millis(20));
}

#[test]
fn no_lost_wakeup_under_racing_notifies() {
    // Ping-pong between two threads through remote BHs; a lost wake-up hangs (caught by the
    // deadline assertion, since a blocked poll would never return).
    const ROUNDS: usize = 20_000;
    let ctx = AioContext::current();
    let here = ctx.remote();
    let io = runtime::IoThread::spawn("pingpong").expect("iothread");
    let there = io.context().clone();
    let count = Arc::new(AtomicUsize::new(0));
    // `main` gets a final no-op BH: the loop below only re-checks `count` when woken.
    fn ping(
        here: runtime::RemoteContext,
        there: runtime::RemoteContext,
        main: runtime::RemoteContext,
        count: Arc<AtomicUsize>,
    ) {
        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
        if n < ROUNDS {
            let (h, t) = (there.clone(), here.clone());
            there.schedule_oneshot(move || ping(h, t, main, count));
        } else {
            main.schedule_oneshot(|| {});
        }
    }
    let (h, t, m, c) = (here.clone(), there.clone(), here.clone(), count.clone());
    here.schedule_oneshot(move || ping(h, t, m, c));
    let start = Instant::now();
    while count.load(Ordering::Relaxed) < ROUNDS {
        ctx.poll(true);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ping-pong stalled"
        );
    }
    io.stop();
}

#[test]
fn fd_handlers_are_not_starved_by_a_busy_bottom_half() {
    let ctx = AioContext::current();
    let slot: Rc<RefCell<Option<runtime::Bh>>> = Rc::new(RefCell::new(None));
    let sl = slot.clone();
    let bh = ctx.bh_new(move || {
        if let Some(bh) = sl.borrow().as_ref() {
            bh.schedule();
        }
    });
    bh.schedule();
    *slot.borrow_mut() = Some(bh);
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    let seen = Rc::new(Cell::new(false));
    let s = seen.clone();
    ctx.set_fd_handler(rx.as_raw_fd(), Some(Rc::new(move || s.set(true))), None)
        .expect("reg");
    for _ in 0..3 {
        ctx.poll(false); // warm: some rounds skip epoll_wait while the BH is pending
    }
    tx.write_all(b"x").expect("write");
    let mut rounds = 0;
    while !seen.get() {
        assert!(ctx.poll(false), "the BH always makes progress");
        rounds += 1;
        assert!(rounds <= 8, "fd handler starved for {rounds} rounds");
    }
    ctx.set_fd_handler(rx.as_raw_fd(), None, None)
        .expect("remove");
    slot.borrow_mut().take();
}

/// `InFlight`: a drain on one thread returns once guards dropped on other threads bring the
/// count to zero (the last one kicks), and not before; many rounds, so a lost kick would hang.
#[test]
fn in_flight_drain_waits_for_guards_dropped_on_other_threads() {
    let counter = Arc::new(runtime::InFlight::new());
    let ctx = AioContext::current();
    for round in 0..2000 {
        let guards = 1 + round % 3;
        let started = Arc::new(Barrier::new(guards + 1));
        let done = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..guards)
            .map(|_| {
                let (counter, started, done) = (counter.clone(), started.clone(), done.clone());
                thread::spawn(move || {
                    let g = counter.enter();
                    started.wait();
                    done.fetch_add(1, Ordering::SeqCst);
                    drop(g);
                })
            })
            .collect();
        started.wait();
        counter.drain(&ctx);
        assert_eq!(counter.get(), 0);
        assert_eq!(
            done.load(Ordering::SeqCst),
            guards,
            "drained before the last guard"
        );
        for w in workers {
            w.join().expect("worker");
        }
    }
}
