//! Counts the syscalls one event-loop wait costs, for the `polling` crate, for our own epoll
//! wrapper (`runtime::__bench`) and for a whole `AioContext::poll(true)`.
//!
//! ```text
//! cargo build --release -p runtime --example poll_syscalls
//! strace -f -c -o out.txt target/release/examples/poll_syscalls MODE N
//! runtime/examples/poll_syscalls.sh [N]     # every mode, per-thread counts, one table
//! ```
//!
//! The measured loop runs on the **main thread** (the "poller"); a second thread (the "waker")
//! makes it runnable once per iteration. Each iteration is one wake-up: the waker waits —
//! spinning, without syscalls — until the poller has consumed the previous wake-up, then issues
//! the next one, so wake-ups never coalesce. The poller touches only atomics to report progress,
//! so every syscall it makes belongs to the wait itself.
//!
//! The poller brackets its loop with two `getppid()` calls, which nothing else in this program
//! makes, so a per-thread trace (`strace -ff`) can count exactly the loop's syscalls; the main
//! thread's trace file is `PREFIX.<pid>` and the pid is printed on stdout.
//!
//! Modes (the `-timeout` variants wait with `Some(10ms)`, as a loop with an armed timer does):
//!
//! | mode | poller | waker |
//! |---|---|---|
//! | `polling-fd[-timeout]` | `Poller::wait` on an eventfd added with `Poller::add` (one-shot), then reads it and re-arms it with `Poller::modify` | writes the eventfd |
//! | `polling-fd-level[-timeout]` | the same, added with `PollMode::Level` (no re-arm) | writes the eventfd |
//! | `polling-notify[-timeout]` | `Poller::wait`, nothing registered | `Poller::notify()` |
//! | `polling-timer` | `Poller::wait(Some(1ms))` times out; no waker | — |
//! | `epoll-fd[-timeout]` | `runtime::__bench::Epoll::wait` on a level-triggered eventfd, then `EventFd::test_and_clear` | `EventFd::set` |
//! | `aio-remote` | `AioContext::poll(true)` until the bottom half ran | `RemoteContext::schedule_oneshot` |
//! | `aio-remote-timer` | the same, with a timer re-armed 10 ms ahead before each poll | `RemoteContext::schedule_oneshot` |
//! | `aio-timer` | a 1 ms timer, `poll(true)` until it fired; no waker | — |
//! | `aio-local-bh` | `ctx.schedule_oneshot`, then `poll(true)`; no waker | — |

use std::cell::Cell;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use polling::{Events, PollMode, Poller};
use runtime::__bench::{Epoll, EventFd, Interest};
use runtime::AioContext;

const KEY: usize = 7;
const TIMEOUT: Duration = Duration::from_millis(10);

fn usage() -> ! {
    eprintln!(
        "usage: poll_syscalls MODE N\nmodes: polling-fd polling-fd-timeout polling-fd-level \
         polling-fd-level-timeout polling-notify polling-notify-timeout polling-timer epoll-fd \
         epoll-fd-timeout aio-remote aio-remote-timer aio-timer aio-local-bh"
    );
    std::process::exit(2);
}

/// The marker syscall around the measured loop (see the module documentation).
fn marker() {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { libc::getppid() };
}

/// Runs `n` iterations. `wake` runs on the waker thread once per iteration (`None`: no waker);
/// `wait` runs on this thread and returns whether the iteration's wake-up arrived (it is called
/// again until it does). Returns the number of `wait` calls.
fn run(n: u64, wake: Option<Box<dyn Fn() + Send>>, mut wait: impl FnMut() -> bool) -> u64 {
    let consumed = Arc::new(AtomicU64::new(0));
    let quit = Arc::new(AtomicBool::new(false));
    let waker = wake.map(|wake| {
        let (consumed, quit) = (consumed.clone(), quit.clone());
        thread::Builder::new()
            .name("waker".into())
            .spawn(move || {
                for i in 1..=n {
                    let mut spins = 0u32;
                    while consumed.load(Ordering::Acquire) < i - 1 {
                        if quit.load(Ordering::Relaxed) {
                            return;
                        }
                        spins += 1;
                        if spins < 1 << 16 {
                            std::hint::spin_loop();
                        } else {
                            thread::yield_now(); // the poller is descheduled (e.g. by strace)
                        }
                    }
                    wake();
                }
            })
            .expect("spawn waker")
    });

    let mut waits = 0;
    marker();
    for i in 1..=n {
        loop {
            waits += 1;
            if wait() {
                break;
            }
        }
        consumed.store(i, Ordering::Release);
    }
    marker();
    quit.store(true, Ordering::Relaxed);
    if let Some(w) = waker {
        w.join().expect("waker thread");
    }
    waits
}

/// `polling::Poller` with an eventfd source (`mode` = one-shot or level) or, with `fd == false`,
/// woken by `Poller::notify`.
fn polling_mode(n: u64, fd: bool, mode: PollMode, timeout: Option<Duration>) -> u64 {
    let poller = Arc::new(Poller::new().expect("Poller::new"));
    let efd = Arc::new(EventFd::new().expect("eventfd"));
    let raw = efd.as_raw_fd();
    if fd {
        // SAFETY: `efd` outlives the registration: it is deleted below before `efd` is dropped.
        unsafe { poller.add_with_mode(raw, polling::Event::readable(KEY), mode) }
            .expect("Poller::add");
    }
    let wake: Box<dyn Fn() + Send> = if fd {
        let efd = efd.clone();
        Box::new(move || efd.set())
    } else {
        let poller = poller.clone();
        Box::new(move || poller.notify().expect("Poller::notify"))
    };
    let mut events = Events::new();
    // SAFETY: `raw` is `efd`'s descriptor, open for the whole function.
    let source = unsafe { BorrowedFd::borrow_raw(raw) };
    let waits = run(n, Some(wake), || {
        events.clear();
        poller.wait(&mut events, timeout).expect("Poller::wait");
        if !fd {
            // A notification shows up as a return with no events; a timeout looks the same, but
            // the waker is microseconds away, so a 10 ms timeout means strace slowed us down.
            return true;
        }
        let ready = events.iter().any(|e| e.key == KEY);
        if ready {
            efd.test_and_clear();
            if mode == PollMode::Oneshot {
                poller
                    .modify(source, polling::Event::readable(KEY))
                    .expect("Poller::modify");
            }
        }
        ready
    });
    if fd {
        poller.delete(source).expect("Poller::delete");
    }
    waits
}

/// `polling::Poller::wait` timing out after 1 ms, nothing else.
fn polling_timer(n: u64) -> u64 {
    let poller = Poller::new().expect("Poller::new");
    let mut events = Events::new();
    run(n, None, || {
        events.clear();
        poller
            .wait(&mut events, Some(Duration::from_millis(1)))
            .expect("Poller::wait");
        true
    })
}

/// Our level-triggered epoll wrapper with an eventfd.
fn epoll_mode(n: u64, timeout: Option<Duration>) -> u64 {
    let mut epoll = Epoll::new().expect("epoll");
    let efd = Arc::new(EventFd::new().expect("eventfd"));
    epoll
        .add(
            efd.as_raw_fd(),
            Interest {
                readable: true,
                writable: false,
            },
        )
        .expect("epoll add");
    let e = efd.clone();
    let mut out = Vec::with_capacity(64);
    run(n, Some(Box::new(move || e.set())), || {
        out.clear();
        epoll.wait(timeout, &mut out).expect("epoll wait");
        let ready = out.iter().any(|ev| ev.fd == efd.as_raw_fd() && ev.readable);
        if ready {
            efd.test_and_clear();
        }
        ready
    })
}

/// `AioContext::poll(true)` woken by a remote one-shot bottom half; with `timer`, a timer is
/// re-armed 10 ms ahead before each poll so that every wait has a finite timeout.
fn aio_remote(n: u64, timer: bool) -> u64 {
    let ctx = AioContext::current();
    let remote = ctx.remote();
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let t = ctx.timer_new(|| {});
    let wake = Box::new(move || {
        let r = r.clone();
        remote.schedule_oneshot(move || r.store(true, Ordering::Relaxed));
    });
    run(n, Some(wake), || {
        if timer {
            t.modify_after(TIMEOUT);
        }
        ctx.poll(true);
        ran.swap(false, Ordering::Relaxed)
    })
}

/// A 1 ms timer and `poll(true)` until it fired.
fn aio_timer(n: u64) -> u64 {
    let ctx = AioContext::current();
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let t = ctx.timer_new(move || f.set(true));
    let mut armed = false;
    run(n, None, || {
        if !armed {
            t.modify_after(Duration::from_millis(1));
            armed = true;
        }
        ctx.poll(true);
        if fired.replace(false) {
            armed = false;
            return true;
        }
        false
    })
}

/// A local one-shot bottom half and `poll(true)`: the cost of a round that does not block.
fn aio_local_bh(n: u64) -> u64 {
    let ctx = AioContext::current();
    let ran = Rc::new(Cell::new(false));
    run(n, None, || {
        let r = ran.clone();
        ctx.schedule_oneshot(move || r.set(true));
        ctx.poll(true);
        ran.replace(false)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        usage();
    }
    let n: u64 = args[2].parse().unwrap_or_else(|_| usage());
    if n == 0 {
        usage();
    }
    let mode = args[1].as_str();
    // Create the context before the loop, so that its setup syscalls are not counted.
    AioContext::with_current(|_| ());
    let start = Instant::now();
    let waits = match mode {
        "polling-fd" => polling_mode(n, true, PollMode::Oneshot, None),
        "polling-fd-timeout" => polling_mode(n, true, PollMode::Oneshot, Some(TIMEOUT)),
        "polling-fd-level" => polling_mode(n, true, PollMode::Level, None),
        "polling-fd-level-timeout" => polling_mode(n, true, PollMode::Level, Some(TIMEOUT)),
        "polling-notify" => polling_mode(n, false, PollMode::Oneshot, None),
        "polling-notify-timeout" => polling_mode(n, false, PollMode::Oneshot, Some(TIMEOUT)),
        "polling-timer" => polling_timer(n),
        "epoll-fd" => epoll_mode(n, None),
        "epoll-fd-timeout" => epoll_mode(n, Some(TIMEOUT)),
        "aio-remote" => aio_remote(n, false),
        "aio-remote-timer" => aio_remote(n, true),
        "aio-timer" => aio_timer(n),
        "aio-local-bh" => aio_local_bh(n),
        _ => usage(),
    };
    let elapsed = start.elapsed();
    println!(
        "mode={mode} n={n} pid={} waits_per_iter={:.3} ns_per_iter={:.0}",
        std::process::id(),
        waits as f64 / n as f64,
        elapsed.as_nanos() as f64 / n as f64
    );
}
