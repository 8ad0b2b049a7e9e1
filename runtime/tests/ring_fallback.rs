//! Process-global ring knobs: the epoll fallback (`inject_setup_failure`, `set_fd_monitor`),
//! `io_uring_supported`, and small rings (`set_ring_entries`): a full submission queue and an
//! overflowing completion queue.
//!
//! Every test holds `KNOBS` for its whole run, sets a knob, creates the context under test in
//! a fresh thread, and restores the knob once that context exists.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use runtime::ring::{inject_setup_failure, set_ring_entries};
use runtime::{executor, set_fd_monitor, spawn, uring, AioContext, FdMonitor};

static KNOBS: Mutex<()> = Mutex::new(());

fn knobs() -> MutexGuard<'static, ()> {
    KNOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `body` in a new thread whose context is created while `set` is in effect; `reset`
/// runs as soon as that context exists.
fn with_knob<T: Send + 'static>(
    set: impl FnOnce(),
    reset: impl FnOnce(),
    body: impl FnOnce(AioContext) -> T + Send + 'static,
) -> T {
    set();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let ctx = AioContext::current();
        tx.send(()).unwrap();
        body(ctx)
    });
    rx.recv().unwrap();
    reset();
    t.join().expect("test thread panicked")
}

/// What an epoll context must still do: level-triggered fd handlers, timers; and what it
/// must decline: ring I/O.
fn epoll_context_works(ctx: AioContext) {
    assert!(!ctx.has_io_uring());
    assert!(ctx.ring_stats().is_none());
    assert!(!uring::available());

    let (r, mut w) = std::io::pipe().unwrap();
    let reader = Rc::new(RefCell::new(r));
    let calls = Rc::new(Cell::new(0));
    let (c, rd) = (calls.clone(), reader.clone());
    let fd = reader.borrow().as_raw_fd();
    ctx.set_fd_handler(
        fd,
        Some(Rc::new(move || {
            let mut b = [0u8; 1];
            assert_eq!(rd.borrow_mut().read(&mut b).unwrap(), 1);
            c.set(c.get() + 1);
        })),
        None,
    )
    .unwrap();
    w.write_all(b"xyz").unwrap();
    for k in 1..=3 {
        assert!(ctx.poll(true));
        assert_eq!(calls.get(), k);
    }
    assert!(!ctx.poll(false));
    ctx.set_fd_handler(fd, None, None).unwrap();

    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let timer = ctx.timer_new(move || f.set(true));
    timer.modify_after(Duration::from_millis(5));
    while !fired.get() {
        ctx.poll(true);
    }

    let tf = tempfile::tempfile().unwrap();
    let h = spawn(move || {
        let mut buf = [0u8; 8];
        let r = uring::co_read(tf.as_fd(), &mut buf, 0).is_none();
        let w = uring::co_write(tf.as_fd(), b"abc", 0).is_none();
        let s = uring::co_fsync(tf.as_fd(), false).is_none();
        let a = uring::co_fallocate(tf.as_fd(), 0, 0, 4096).is_none();
        [r, w, s, a]
    });
    assert_eq!(h.join().unwrap(), [true; 4], "ring I/O without a ring");
    let fd: Arc<OwnedFd> = Arc::new(tempfile::tempfile().unwrap().into());
    match executor::uring::read_owned(fd, vec![7u8; 4], 0, 0) {
        Ok(_) => panic!("read_owned accepted without a ring"),
        Err((_, buf)) => assert_eq!(buf, [7; 4], "the buffer comes back"),
    }
}

#[test]
fn failed_ring_setup_falls_back_to_epoll() {
    let _g = knobs();
    with_knob(|| inject_setup_failure(1), || {}, epoll_context_works);
    // The injection was used up: the next context has its ring again.
    let has = thread::spawn(|| AioContext::current().has_io_uring())
        .join()
        .unwrap();
    assert!(has);
}

#[test]
fn epoll_monitor_by_choice() {
    let _g = knobs();
    with_knob(
        || set_fd_monitor(FdMonitor::Epoll),
        || set_fd_monitor(FdMonitor::IoUring),
        epoll_context_works,
    );
    let has = thread::spawn(|| AioContext::current().has_io_uring())
        .join()
        .unwrap();
    assert!(has, "set_fd_monitor(IoUring) restores the default");
}

#[test]
fn io_uring_supported_reports_setup_failure() {
    let _g = knobs();
    runtime::io_uring_supported().expect("io_uring on this machine");
    inject_setup_failure(1);
    let e = runtime::io_uring_supported().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSYS));
    runtime::io_uring_supported().expect("only one failure was injected");
    // Disarming works too.
    inject_setup_failure(3);
    inject_setup_failure(0);
    runtime::io_uring_supported().expect("disarmed");
}

/// A ring of 2 entries and many coroutines reading at once: each read either goes through the
/// ring (right data) or is declined as "full" (counted); none is lost.
#[test]
fn full_submission_queue() {
    let _g = knobs();
    const N: usize = 1000;
    const BS: usize = 512;
    let tf = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..N * BS).map(|i| (i % 251) as u8).collect();
    std::fs::write(tf.path(), &data).unwrap();
    let file = tf.reopen().unwrap();
    let (some, none, stats) = with_knob(
        || set_ring_entries(2),
        || set_ring_entries(256),
        move |ctx| {
            assert!(ctx.has_io_uring());
            let file = Rc::new(file);
            let handles: Vec<_> = (0..N)
                .map(|i| {
                    let f = file.clone();
                    spawn(move || {
                        let mut buf = vec![0u8; BS];
                        let r = uring::co_read(f.as_fd(), &mut buf, (i * BS) as u64);
                        (i, r.map(|r| r.unwrap()), buf)
                    })
                })
                .collect();
            for _ in 0..10_000 {
                if handles.iter().all(|h| h.is_finished()) {
                    break;
                }
                ctx.poll(true);
            }
            assert!(
                handles.iter().all(|h| h.is_finished()),
                "a completion was lost"
            );
            let (mut some, mut none) = (0u64, 0u64);
            for h in handles {
                let (i, r, buf) = h.join().unwrap();
                match r {
                    Some(n) => {
                        assert_eq!(n, BS);
                        assert_eq!(buf, &data[i * BS..(i + 1) * BS], "read {i}");
                        some += 1;
                    }
                    None => none += 1,
                }
            }
            (some, none, ctx.ring_stats().unwrap())
        },
    );
    assert!(some > 0, "no read went through the ring");
    assert_eq!(stats.full, none, "{stats:?}");
    assert!(stats.completed >= some, "{stats:?}");
    // A queue of 2 entries took 1000 reads: many enters, each submitting a queueful.
    assert!(stats.enters >= (N / 2) as u64 / 2, "{stats:?}");
}

/// More completions than the completion queue holds (2 SQ entries, 8 CQ entries, 64 reads):
/// the kernel keeps the rest (NODROP) until the next `io_uring_enter`, so a non-blocking poll
/// must still enter the kernel to get them, or the waiters hang until something else makes
/// a syscall.
#[test]
fn completion_queue_overflow_is_flushed_by_nonblocking_polls() {
    let _g = knobs();
    const N: usize = 64;
    let got = with_knob(
        || set_ring_entries(2),
        || set_ring_entries(256),
        |ctx| {
            assert!(ctx.has_io_uring());
            let (r, mut w) = std::io::pipe().unwrap();
            let r = Rc::new(r);
            let handles: Vec<_> = (0..N)
                .map(|_| {
                    let r = r.clone();
                    spawn(move || {
                        let mut b = [0u8; 1];
                        let n = uring::co_read(r.as_fd(), &mut b, 0).expect("ring").unwrap();
                        assert_eq!(n, 1);
                        b[0]
                    })
                })
                .collect();
            ctx.poll(false); // submit what is still queued; the pipe is empty
            assert!(handles.iter().all(|h| !h.is_finished()));
            let bytes: Vec<u8> = (0..N as u8).collect();
            w.write_all(&bytes).unwrap(); // 64 completions at once
            for _ in 0..1000 {
                if handles.iter().all(|h| h.is_finished()) {
                    break;
                }
                ctx.poll(false);
            }
            let done = handles.iter().filter(|h| h.is_finished()).count();
            assert_eq!(done, N, "completions stuck in the kernel's overflow list");
            let mut got: Vec<u8> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            got.sort_unstable();
            got
        },
    );
    assert_eq!(
        got,
        (0..N as u8).collect::<Vec<_>>(),
        "each byte read exactly once"
    );
}
