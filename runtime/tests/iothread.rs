//! IoThread start/stop/run and wait_while/kick across threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use runtime::{co_sleep, kick, wait_while, AioContext, IoThread};

#[test]
fn run_and_run_sync_execute_on_the_iothread() {
    let io = IoThread::spawn("worker-a").expect("iothread");
    let name = io.run_sync(|| thread::current().name().map(str::to_owned));
    assert_eq!(name.as_deref(), Some("worker-a"));
    assert!(io.run_sync(|| AioContext::current().name() == "worker-a"));
    let hits = Arc::new(AtomicUsize::new(0));
    for _ in 0..100 {
        let h = hits.clone();
        io.run(move || {
            h.fetch_add(1, Ordering::SeqCst);
        });
    }
    // run_sync is queued behind the 100 runs, so they have all happened when it returns.
    io.run_sync(|| ());
    assert_eq!(hits.load(Ordering::SeqCst), 100);
    io.stop();
}

#[test]
fn stop_joins_the_thread_after_queued_work() {
    let io = IoThread::spawn("stopper").expect("iothread");
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    io.run(move || {
        thread::sleep(Duration::from_millis(20));
        r.store(true, Ordering::SeqCst);
    });
    let start = Instant::now();
    io.stop();
    assert!(
        ran.load(Ordering::SeqCst),
        "work queued before stop() was dropped"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn dropping_an_idle_iothread_does_not_hang() {
    for i in 0..20 {
        let io = IoThread::spawn(&format!("short-{i}")).expect("iothread");
        drop(io);
    }
}

#[test]
fn wait_while_returns_when_another_thread_kicks() {
    let io = IoThread::spawn("kicker").expect("iothread");
    let in_flight = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        in_flight.fetch_add(1, Ordering::SeqCst);
        let f = in_flight.clone();
        io.spawn_co(move || {
            co_sleep(Duration::from_millis(10));
            f.fetch_sub(1, Ordering::SeqCst);
            kick();
        });
    }
    let f = in_flight.clone();
    let start = Instant::now();
    wait_while(&AioContext::current(), || f.load(Ordering::SeqCst) > 0);
    assert_eq!(in_flight.load(Ordering::SeqCst), 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    io.stop();
}

#[test]
fn wait_while_rechecks_its_condition_after_every_kick() {
    // Every kick ends one blocking poll of the waiter; `wait_while` must look at its condition
    // again and keep waiting, not return after the first wake-up (runtime/examples/06_drain.rs,
    // part 2). Steps 20 ms apart, so the waiter sees the first kick long before the last.
    let io = IoThread::spawn("stepper").expect("iothread");
    let steps = Arc::new(AtomicUsize::new(0));
    let s = steps.clone();
    io.spawn_co(move || {
        for _ in 0..3 {
            co_sleep(Duration::from_millis(20));
            s.fetch_add(1, Ordering::SeqCst);
            kick();
        }
    });
    wait_while(&AioContext::current(), || steps.load(Ordering::SeqCst) < 3);
    assert_eq!(
        steps.load(Ordering::SeqCst),
        3,
        "wait_while returned before its condition cleared"
    );
    io.stop();
}

#[test]
fn wait_while_racing_kicks_never_hangs() {
    // Many short waits, each released by a kick from another thread at a random-ish moment: a
    // kick that lands between the condition check and the blocking poll must not be lost.
    let io = IoThread::spawn("racer").expect("iothread");
    let ctx = AioContext::current();
    for i in 0..2000u32 {
        let flag = Arc::new(AtomicBool::new(true));
        let f = flag.clone();
        io.run(move || {
            for _ in 0..(i % 50) {
                std::hint::spin_loop();
            }
            f.store(false, Ordering::SeqCst);
            kick();
        });
        let start = Instant::now();
        wait_while(&ctx, || {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "lost kick in round {i}"
            );
            flag.load(Ordering::SeqCst)
        });
    }
    io.stop();
}
