//! Coroutines: enter/yield/self, wakes from the same and other threads, panic isolation, and the
//! aborts on misuse (checked in a child process).

use std::cell::{Cell, RefCell};
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use runtime::{co_yield, in_coroutine, spawn, AioContext, CoWaker, Coroutine, IoThread};

#[test]
fn enter_runs_until_yield_and_resumes_where_it_stopped() {
    let steps = Rc::new(RefCell::new(Vec::new()));
    let s = steps.clone();
    assert!(!in_coroutine());
    let co = Coroutine::new(move || {
        assert!(in_coroutine());
        s.borrow_mut().push(1);
        co_yield();
        s.borrow_mut().push(2);
        co_yield();
        s.borrow_mut().push(3);
    });
    assert!(
        steps.borrow().is_empty(),
        "created coroutines do not run until entered"
    );
    co.enter();
    assert_eq!(*steps.borrow(), [1]);
    co.enter();
    assert_eq!(*steps.borrow(), [1, 2]);
    assert!(!co.is_finished());
    co.enter();
    assert_eq!(*steps.borrow(), [1, 2, 3]);
    assert!(co.is_finished());
    assert!(!in_coroutine());
}

#[test]
fn current_names_the_running_coroutine_and_nesting_works() {
    let outer_seen = Rc::new(Cell::new(false));
    let o = outer_seen.clone();
    let outer = Coroutine::new(move || {
        let me = Coroutine::current().expect("inside");
        let outer_me = me.clone();
        let inner = Coroutine::new(move || {
            let inner_me = Coroutine::current().expect("inside inner");
            assert_ne!(inner_me, outer_me);
            co_yield();
        });
        inner.enter(); // nested: returns when the inner coroutine yields
        assert_eq!(
            Coroutine::current(),
            Some(me),
            "back in the outer coroutine"
        );
        inner.enter();
        assert!(inner.is_finished());
        o.set(true);
    });
    assert!(Coroutine::current().is_none());
    outer.enter();
    assert!(outer_seen.get());
}

#[test]
fn wake_from_inside_a_coroutine_is_deferred_until_it_yields() {
    let order = Rc::new(RefCell::new(Vec::new()));
    let o = order.clone();
    let sleeper = Coroutine::new(move || {
        o.borrow_mut().push("sleeper parks");
        co_yield();
        o.borrow_mut().push("sleeper woken");
    });
    sleeper.enter();
    let o = order.clone();
    let s = sleeper.clone();
    let waker = Coroutine::new(move || {
        s.wake();
        o.borrow_mut().push("waker continues");
        co_yield();
        o.borrow_mut().push("waker ends");
    });
    waker.enter();
    assert_eq!(
        *order.borrow(),
        ["sleeper parks", "waker continues", "sleeper woken"]
    );
    waker.enter();
    assert!(sleeper.is_finished() && waker.is_finished());
}

#[test]
fn spawn_join_returns_value_and_reports_panics() {
    let h = spawn(|| 6 * 7);
    assert_eq!(h.join(), Ok(42));

    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // keep the test output clean
    let h = spawn(|| -> u32 {
        co_yield_via_bh();
        panic!("boom in a coroutine");
    });
    let r = h.join();
    std::panic::set_hook(prev);
    let err = r.expect_err("panic must become an error");
    assert_eq!(err.message, "boom in a coroutine");
    assert!(err.to_string().contains("coroutine panicked"));
    // The loop and this thread are unharmed.
    assert!(!in_coroutine());
    assert_eq!(spawn(|| 1).join(), Ok(1));
}

/// Yields and gets re-entered from the next poll of this thread's loop.
fn co_yield_via_bh() {
    let me = CoWaker::current();
    AioContext::current().schedule_oneshot(move || me.wake());
    co_yield();
}

#[test]
fn join_from_another_coroutine_waits() {
    let inner = spawn(|| {
        co_yield_via_bh();
        co_yield_via_bh();
        "done"
    });
    let outer = spawn(move || inner.join());
    assert_eq!(outer.join(), Ok(Ok("done")));
}

#[test]
fn cross_thread_wakes_from_many_threads_none_lost_or_doubled() {
    const COROUTINES: usize = 16;
    const ROUNDS: usize = 500;
    const WAKERS: usize = 4;
    let ctx = AioContext::current();
    // Coroutines publish their waker, then yield; waker threads wake whatever they receive.
    let (tx, rx) = mpsc::channel::<CoWaker>();
    let rx = Arc::new(Mutex::new(rx));
    let counts: Vec<Rc<Cell<usize>>> = (0..COROUTINES).map(|_| Rc::new(Cell::new(0))).collect();
    let home = thread::current().id();
    let mut cos = Vec::new();
    for c in &counts {
        let (c, tx) = (c.clone(), tx.clone());
        cos.push(Coroutine::new(move || {
            for _ in 0..ROUNDS {
                tx.send(CoWaker::current()).expect("send");
                co_yield();
                assert_eq!(thread::current().id(), home, "a coroutine changed thread");
                c.set(c.get() + 1);
            }
        }));
    }
    drop(tx);
    let woken = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..WAKERS)
        .map(|_| {
            let (rx, woken) = (rx.clone(), woken.clone());
            thread::spawn(move || loop {
                let w = rx.lock().expect("rx").recv();
                match w {
                    Ok(w) => {
                        w.wake();
                        woken.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            })
        })
        .collect();
    for co in &cos {
        co.enter();
    }
    let start = Instant::now();
    while !cos.iter().all(|c| c.is_finished()) {
        ctx.poll(true);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "cross-thread wakes were lost"
        );
    }
    drop(cos);
    for t in threads {
        t.join().expect("waker thread");
    }
    assert!(
        counts.iter().all(|c| c.get() == ROUNDS),
        "every coroutine resumed ROUNDS times"
    );
    assert_eq!(woken.load(Ordering::Relaxed), COROUTINES * ROUNDS);
}

#[test]
fn coroutine_spawned_on_iothread_stays_there() {
    let io = IoThread::spawn("co-home").expect("iothread");
    let (tx, rx) = mpsc::channel();
    io.spawn_co(move || {
        let home = thread::current().id();
        for _ in 0..3 {
            let me = CoWaker::current();
            // Woken from a foreign thread: must resume on its home thread.
            thread::spawn(move || me.wake());
            co_yield();
            assert_eq!(thread::current().id(), home);
        }
        tx.send(thread::current().name().map(str::to_owned))
            .expect("send");
    });
    let name = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("coroutine finished");
    assert_eq!(name.as_deref(), Some("co-home"));
    io.stop();
}

/// Runs this test binary again with `CASE` set; the child must abort with `message` on stderr.
fn expect_abort(case: &str, message: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["--exact", "misuse_child", "--nocapture", "--test-threads=1"])
        .env("RUNTIME_MISUSE_CASE", case)
        .output()
        .expect("run child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc_sigabrt()),
        "{case}: not aborted; stderr: {stderr}"
    );
    assert!(
        stderr.contains(message),
        "{case}: stderr lacks {message:?}: {stderr}"
    );
}

fn libc_sigabrt() -> i32 {
    6 // SIGABRT on Linux
}

/// Not a test on its own: the child side of `misuse_aborts_loudly`.
#[test]
fn misuse_child() {
    let Ok(case) = std::env::var("RUNTIME_MISUSE_CASE") else {
        return;
    };
    match case.as_str() {
        "reenter" => {
            let slot: Rc<RefCell<Option<Coroutine>>> = Rc::new(RefCell::new(None));
            let s = slot.clone();
            let co = Coroutine::new(move || {
                let me = s.borrow().clone().expect("set");
                me.enter(); // entering itself while running
            });
            *slot.borrow_mut() = Some(co.clone());
            co.enter();
        }
        "wake-finished" => {
            let co = Coroutine::new(|| {});
            co.enter();
            co.wake();
        }
        "enter-finished" => {
            let co = Coroutine::new(|| {});
            co.enter();
            co.enter();
        }
        "double-wake" => {
            let co = Coroutine::new(co_yield);
            co.enter();
            let remote = co.waker();
            // Two wakes from another thread before the home loop runs either.
            thread::spawn(move || {
                remote.clone().wake();
                remote.wake();
            })
            .join()
            .ok();
        }
        other => panic!("unknown case {other}"),
    }
    panic!("case {case} did not abort");
}

#[test]
fn misuse_aborts_loudly() {
    expect_abort("reenter", "re-entered recursively");
    expect_abort("wake-finished", "already finished");
    expect_abort("enter-finished", "already finished");
    expect_abort("double-wake", "already has a wake-up pending");
}

/// A coroutine body that captures more than corosensei moves onto a new stack (1 KiB) runs
/// like any other (the runtime boxes it) instead of panicking at creation.
#[test]
fn a_closure_with_large_captures_runs() {
    let big = [7u8; 4096];
    let co = runtime::spawn(move || big.iter().map(|&b| u32::from(b)).sum::<u32>());
    assert!(matches!(co.join(), Ok(28672)));
}
