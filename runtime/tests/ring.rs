//! The io_uring of an AioContext: coroutine and async I/O round trips, batching of SQEs,
//! fd handlers through `POLL_ADD`, cancellation at thread exit, dropped `Op`s, `EINTR`, and
//! wake-ups that are not the completion.
//!
//! Tests that change process-global knobs (`set_fd_monitor`, `set_ring_entries`,
//! `inject_setup_failure`) live in `ring_fallback.rs`; everything here uses the defaults, each
//! test on its own libtest thread and so with its own context.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use runtime::executor::uring::StableBuf;
use runtime::uring;
use runtime::{block_on, executor, spawn, spawn_local, AioContext};

/// The bytes of block `i` of a test file: distinct per block and per position.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7 + 1) as u8).collect()
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd this test owns; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(flags >= 0);
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
}

/// A pipe whose read end does not block.
fn nonblocking_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    let (r, w) = std::io::pipe().expect("pipe");
    set_nonblocking(r.as_raw_fd());
    (r, w)
}

/// Polls `ctx` (blocking) until `done()`, failing after `limit` rounds.
fn poll_until(ctx: &AioContext, limit: usize, done: impl Fn() -> bool) {
    for _ in 0..limit {
        if done() {
            return;
        }
        ctx.poll(true);
    }
    assert!(done(), "not done after {limit} polls");
}

#[test]
fn this_machine_has_io_uring() {
    runtime::io_uring_supported().expect("io_uring on this machine");
    let ctx = AioContext::current();
    assert!(ctx.has_io_uring());
    assert!(uring::available());
    assert!(ctx.ring_stats().is_some());
}

#[test]
fn co_write_read_fsync_punch_hole_round_trip() {
    let tf = tempfile::NamedTempFile::new().unwrap();
    let path = tf.path().to_owned();
    let file = Rc::new(tf.reopen().unwrap());
    let data = pattern(3, 8192);

    // Outside a coroutine the call cannot yield, so it declines.
    let mut b = [0u8; 4];
    assert!(uring::co_read(file.as_fd(), &mut b, 0).is_none());

    let f = file.clone();
    let d = data.clone();
    let p = path.clone();
    let h = spawn(move || {
        let n = uring::co_write(f.as_fd(), &d, 4096).expect("ring").unwrap();
        assert_eq!(n, d.len());
        // The oracle: the file as std::fs sees it.
        let disk = std::fs::read(&p).unwrap();
        assert_eq!(disk.len(), 4096 + d.len());
        assert!(disk[..4096].iter().all(|&b| b == 0));
        assert_eq!(&disk[4096..], &d[..]);

        let mut buf = vec![0u8; d.len()];
        let n = uring::co_read(f.as_fd(), &mut buf, 4096)
            .expect("ring")
            .unwrap();
        assert_eq!(n, d.len());
        assert_eq!(buf, d);
        // At end of file: 0 bytes.
        let n = uring::co_read(f.as_fd(), &mut buf, 1 << 20)
            .expect("ring")
            .unwrap();
        assert_eq!(n, 0);

        uring::co_fsync(f.as_fd(), false).expect("ring").unwrap();
        uring::co_fsync(f.as_fd(), true).expect("ring").unwrap();

        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        uring::co_fallocate(f.as_fd(), mode, 4096, 4096)
            .expect("ring")
            .unwrap();
        let mut hole = vec![0xffu8; 8192];
        let n = uring::co_read(f.as_fd(), &mut hole, 4096)
            .expect("ring")
            .unwrap();
        assert_eq!(n, 8192, "KEEP_SIZE: the file did not shrink");
        assert!(hole[..4096].iter().all(|&b| b == 0), "the hole reads zeros");
        assert_eq!(&hole[4096..], &d[4096..], "past the hole the data stays");

        // An error comes back as an errno: a write to a read-only fd.
        let ro = std::fs::File::open(&p).unwrap();
        let e = uring::co_write(ro.as_fd(), b"x", 0)
            .expect("ring")
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        7
    });
    assert_eq!(h.join().unwrap(), 7);
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk.len(), 4096 + data.len());
    assert!(disk[..8192].iter().all(|&b| b == 0));
    assert_eq!(&disk[8192..], &data[4096..]);
    assert!(AioContext::current().ring_stats().unwrap().completed >= 8);
}

#[test]
fn async_owned_round_trip_under_block_on() {
    let tf = tempfile::NamedTempFile::new().unwrap();
    let path = tf.path().to_owned();
    let fd: Arc<OwnedFd> = Arc::new(tf.reopen().unwrap().into());
    let data = pattern(5, 6000);

    let d = data.clone();
    let got = block_on(async move {
        let task = spawn_local(async move {
            let op = executor::uring::write_owned(fd, d.clone(), 1000, 512)
                .map_err(|_| "full")
                .unwrap();
            let ((fd, buf), r) = op.await;
            assert_eq!(r.unwrap(), d.len() - 1000, "write_owned writes buf[at..]");
            assert_eq!(buf, d, "the buffer comes back unchanged");

            let op = executor::uring::fsync_owned(fd, true)
                .map_err(|_| "full")
                .unwrap();
            let (fd, r) = op.await;
            assert_eq!(r.unwrap(), 0);

            // Read into the tail of a buffer: the head stays as it was.
            let op = executor::uring::read_owned(fd, vec![0xaau8; 16 + d.len() - 1000], 16, 512)
                .map_err(|_| "full")
                .unwrap();
            let ((fd, buf), r) = op.await;
            assert_eq!(r.unwrap(), d.len() - 1000);
            assert!(buf[..16].iter().all(|&b| b == 0xaa));

            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let op = executor::uring::fallocate_owned(fd.clone(), mode, 0, 4096)
                .map_err(|_| "full")
                .unwrap();
            let (_, r) = op.await;
            r.unwrap();
            let op = executor::uring::read_owned(fd, vec![0xffu8; 4096], 0, 0)
                .map_err(|_| "full")
                .unwrap();
            let ((_, zeros), r) = op.await;
            assert_eq!(r.unwrap(), 4096);
            (buf[16..].to_vec(), zeros)
        });
        task.await.expect("task panicked")
    });
    let (read, zeros) = got;
    assert_eq!(read, &data[1000..]);
    assert!(zeros.iter().all(|&b| b == 0));
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk.len(), 512 + data.len() - 1000);
    assert!(disk[..4096].iter().all(|&b| b == 0));
    assert_eq!(&disk[4096..], &data[1000 + 4096 - 512..]);
}

#[test]
fn sixteen_reads_of_one_round_go_in_one_enter_and_each_gets_its_own_data() {
    const N: usize = 16;
    const BS: usize = 4096;
    let mut tf = tempfile::NamedTempFile::new().unwrap();
    for i in 0..N {
        tf.write_all(&pattern(i, BS)).unwrap();
    }
    tf.flush().unwrap();
    let file = Rc::new(tf.reopen().unwrap());
    let oracle = std::fs::read(tf.path()).unwrap();

    let ctx = AioContext::current();
    ctx.poll(false); // the notifier's poll goes in now, not with the reads
    let before = ctx.ring_stats().unwrap();
    // Reverse order, so that results matched by slot or submission order would mix up.
    let handles: Vec<_> = (0..N)
        .rev()
        .map(|i| {
            let f = file.clone();
            let h = spawn(move || {
                let mut buf = vec![0u8; BS];
                let n = uring::co_read(f.as_fd(), &mut buf, (i * BS) as u64);
                (i, n.map(|r| r.unwrap()), buf)
            });
            assert!(!h.is_finished(), "co_read yields until its completion");
            h
        })
        .collect();
    let queued = ctx.ring_stats().unwrap();
    assert_eq!(
        queued.enters, before.enters,
        "submitting from coroutines makes no syscall: the SQEs wait for the round's enter"
    );
    poll_until(&ctx, 10, || handles.iter().all(|h| h.is_finished()));
    let after = ctx.ring_stats().unwrap();
    assert!(
        after.submitted - before.submitted >= N as u64,
        "{before:?} {after:?}"
    );
    assert!(
        after.completed - before.completed >= N as u64,
        "{before:?} {after:?}"
    );
    assert!(
        after.enters - before.enters <= 3,
        "16 SQEs of one round in one io_uring_enter: {before:?} {after:?}"
    );
    assert_eq!(after.full, 0);
    for h in handles {
        let (i, n, buf) = h.join().unwrap();
        assert_eq!(n, Some(BS), "read {i}");
        assert_eq!(
            buf,
            &oracle[i * BS..(i + 1) * BS],
            "read {i} got another's data"
        );
    }
}

#[test]
fn read_handler_is_level_triggered_through_the_ring() {
    let ctx = AioContext::current();
    let (mut r, mut w) = nonblocking_pipe();
    let fd = r.as_raw_fd();
    let calls = Rc::new(Cell::new(0));
    let got = Rc::new(RefCell::new(Vec::new()));
    let (c, g) = (calls.clone(), got.clone());
    let reader = Rc::new(RefCell::new(r.try_clone().unwrap()));
    ctx.set_fd_handler(
        fd,
        Some(Rc::new(move || {
            c.set(c.get() + 1);
            let mut b = [0u8; 1];
            match reader.borrow_mut().read(&mut b) {
                Ok(1) => g.borrow_mut().push(b[0]),
                other => panic!("handler called without data: {other:?}"),
            }
        })),
        None,
    )
    .unwrap();
    assert!(!ctx.poll(false), "no data, no call");
    assert_eq!(calls.get(), 0);
    w.write_all(b"abcde").unwrap();
    for k in 1..=5 {
        assert!(ctx.poll(true));
        assert_eq!(calls.get(), k, "one call per poll while data remains");
    }
    assert_eq!(*got.borrow(), b"abcde");
    // Drained: no more calls.
    assert!(!ctx.poll(false));
    assert!(!ctx.poll(false));
    assert_eq!(calls.get(), 5);

    // More data, then removal: the handler is not called again.
    w.write_all(b"fg").unwrap();
    assert!(ctx.poll(true));
    assert_eq!(calls.get(), 6);
    ctx.set_fd_handler(fd, None, None).unwrap();
    for _ in 0..3 {
        assert!(!ctx.poll(false));
    }
    assert_eq!(calls.get(), 6, "removed handler was called");
    let mut rest = [0u8; 4];
    assert_eq!(r.read(&mut rest).unwrap(), 1);
    assert_eq!(rest[0], b'g');

    // Registering again works (a new generation; the cancelled poll is ignored).
    let c = calls.clone();
    let r2 = Rc::new(RefCell::new(r.try_clone().unwrap()));
    ctx.set_fd_handler(
        fd,
        Some(Rc::new(move || {
            let mut b = [0u8; 8];
            let _ = r2.borrow_mut().read(&mut b);
            c.set(c.get() + 100);
        })),
        None,
    )
    .unwrap();
    assert!(!ctx.poll(false));
    w.write_all(b"h").unwrap();
    assert!(ctx.poll(true));
    assert_eq!(calls.get(), 106);
    ctx.set_fd_handler(fd, None, None).unwrap();
}

#[test]
fn handler_replacing_itself_mid_dispatch() {
    let ctx = AioContext::current();
    let (r, mut w) = nonblocking_pipe();
    let fd = r.as_raw_fd();
    let reader = Rc::new(RefCell::new(r));
    let log = Rc::new(RefCell::new(Vec::<(char, u8)>::new()));

    let (rd, lg) = (reader.clone(), log.clone());
    let b_handler: runtime::FdHandler = Rc::new(move || {
        let mut b = [0u8; 1];
        if rd.borrow_mut().read(&mut b).unwrap_or(0) == 1 {
            lg.borrow_mut().push(('B', b[0]));
        }
    });
    let (rd, lg, ctx2) = (reader.clone(), log.clone(), ctx.clone());
    let a_handler: runtime::FdHandler = Rc::new(move || {
        let mut b = [0u8; 1];
        if rd.borrow_mut().read(&mut b).unwrap_or(0) == 1 {
            lg.borrow_mut().push(('A', b[0]));
        }
        // Replace ourselves while being dispatched.
        ctx2.set_fd_handler(fd, Some(b_handler.clone()), None)
            .unwrap();
    });
    ctx.set_fd_handler(fd, Some(a_handler), None).unwrap();
    w.write_all(b"123").unwrap();
    poll_until(&ctx, 10, || log.borrow().len() == 3);
    assert_eq!(*log.borrow(), [('A', b'1'), ('B', b'2'), ('B', b'3')]);
    assert!(!ctx.poll(false));
    assert!(!ctx.poll(false));
    assert_eq!(log.borrow().len(), 3, "a handler ran without data");
    ctx.set_fd_handler(fd, None, None).unwrap();
}

#[test]
fn write_handler_fires_on_a_writable_pipe() {
    let ctx = AioContext::current();
    let (mut r, w) = nonblocking_pipe();
    let fd = w.as_raw_fd();
    let writer = Rc::new(RefCell::new(w));
    let calls = Rc::new(Cell::new(0));
    let (c, wr, ctx2) = (calls.clone(), writer.clone(), ctx.clone());
    ctx.set_fd_handler(
        fd,
        None,
        Some(Rc::new(move || {
            c.set(c.get() + 1);
            wr.borrow_mut().write_all(&[c.get() as u8]).unwrap();
            if c.get() == 3 {
                ctx2.set_fd_handler(fd, None, None).unwrap();
            }
        })),
    )
    .unwrap();
    poll_until(&ctx, 10, || calls.get() == 3);
    for _ in 0..3 {
        ctx.poll(false);
    }
    assert_eq!(calls.get(), 3, "the removed write handler still ran");
    let mut buf = [0u8; 8];
    assert_eq!(r.read(&mut buf).unwrap(), 3);
    assert_eq!(&buf[..3], [1, 2, 3]);
}

#[test]
fn fd_handler_and_io_completion_in_one_poll() {
    let ctx = AioContext::current();
    let (hr, mut hw) = nonblocking_pipe();
    let (ior, mut iow) = std::io::pipe().unwrap();
    hw.write_all(b"h").unwrap();
    iow.write_all(b"io!").unwrap();
    let handled = Rc::new(Cell::new(false));
    let hf = handled.clone();
    let hreader = Rc::new(RefCell::new(hr.try_clone().unwrap()));
    ctx.set_fd_handler(
        hr.as_raw_fd(),
        Some(Rc::new(move || {
            let mut b = [0u8; 4];
            assert_eq!(hreader.borrow_mut().read(&mut b).unwrap(), 1);
            hf.set(true);
        })),
        None,
    )
    .unwrap();
    let ior = Rc::new(ior);
    let h = spawn(move || {
        let mut buf = [0u8; 8];
        let n = uring::co_read(ior.as_fd(), &mut buf, 0)
            .expect("ring")
            .unwrap();
        buf[..n].to_vec()
    });
    assert!(!h.is_finished());
    assert!(!handled.get());
    let before = ctx.ring_stats().unwrap();
    assert!(ctx.poll(true));
    let after = ctx.ring_stats().unwrap();
    assert!(handled.get(), "the fd handler ran");
    assert!(h.is_finished(), "the I/O completed in the same poll");
    assert_eq!(
        after.enters - before.enters,
        1,
        "one io_uring_enter for both"
    );
    assert_eq!(h.join().unwrap(), b"io!");
    ctx.set_fd_handler(hr.as_raw_fd(), None, None).unwrap();
}

#[test]
fn co_read_waits_only_for_its_completion() {
    let ctx = AioContext::current();
    let (r, mut w) = std::io::pipe().unwrap();
    let r = Rc::new(r);
    let yields = Rc::new(Cell::new(0));
    let y = yields.clone();
    let h = spawn(move || {
        let mut buf = [0u8; 16];
        let res = uring::co_read(r.as_fd(), &mut buf, 0);
        y.set(y.get() + 1);
        res.map(|r| r.map(|n| buf[..n].to_vec()))
    });
    assert!(!h.is_finished());
    // Spurious wake-ups: a bottom half and a direct wake. co_read must go back to waiting.
    let waker = h.coroutine().waker();
    ctx.schedule_oneshot(move || waker.wake());
    for _ in 0..3 {
        ctx.poll(false);
    }
    assert!(!h.is_finished(), "co_read returned without its completion");
    h.coroutine().wake();
    ctx.poll(false);
    assert!(!h.is_finished(), "co_read returned without its completion");
    assert_eq!(yields.get(), 0);

    w.write_all(b"the answer").unwrap();
    poll_until(&ctx, 10, || h.is_finished());
    let got = h.join().unwrap().expect("ring").unwrap();
    assert_eq!(got, b"the answer");
}

#[test]
fn thread_exit_with_a_coroutine_waiting_in_co_read() {
    let (r, mut w) = std::io::pipe().unwrap();
    let r: OwnedFd = r.into();
    let t = thread::spawn(move || {
        let ctx = AioContext::current();
        let r = Rc::new(r);
        let h = spawn(move || {
            let mut buf = [0u8; 64];
            uring::co_read(r.as_fd(), &mut buf, 0).map(|r| r.map(|n| buf[..n].to_vec()))
        });
        ctx.poll(false);
        ctx.poll(false);
        assert!(!h.is_finished());
        let s = ctx.ring_stats().unwrap();
        assert!(s.submitted >= 1 && s.completed < s.submitted, "{s:?}");
        // Return without waiting: the context, its ring and the coroutine go away.
        std::mem::forget(h);
    });
    t.join().expect("thread exited cleanly");
    // The read end may or may not still be open (the ring's cancellation is asynchronous):
    // a write either lands in the pipe or fails with EPIPE, and nothing crashes.
    let _ = w.write_all(b"late data");
    drop(w);
    thread::sleep(Duration::from_millis(20));
    // This thread's loop still works.
    let ctx = AioContext::current();
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let timer = ctx.timer_new(move || f.set(true));
    timer.modify_after(Duration::from_millis(1));
    poll_until(&ctx, 10, || fired.get());
}

static DROPS: AtomicUsize = AtomicUsize::new(0);
static FIRST_BYTE: AtomicU8 = AtomicU8::new(0);

/// A buffer that counts its drops and records what the kernel wrote into it.
struct CountedBuf(Vec<u8>);

// SAFETY: the bytes live in the `Vec`'s heap allocation, which moving the value keeps.
unsafe impl StableBuf for CountedBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl Drop for CountedBuf {
    fn drop(&mut self) {
        FIRST_BYTE.store(self.0[0], Ordering::SeqCst);
        DROPS.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn dropped_op_frees_its_buffer_once_at_the_completion() {
    let ctx = AioContext::current();
    let (r, mut w) = std::io::pipe().unwrap();
    let fd: Arc<OwnedFd> = Arc::new(r.into());

    // In flight when dropped: the ring keeps the buffer until the completion.
    let op = executor::uring::read_owned(fd.clone(), CountedBuf(vec![0; 8]), 0, 0)
        .map_err(|_| "full")
        .unwrap();
    ctx.poll(false); // submitted; the pipe is empty
    drop(op);
    for _ in 0..3 {
        ctx.poll(false);
    }
    assert_eq!(
        DROPS.load(Ordering::SeqCst),
        0,
        "freed while the kernel may write it"
    );
    w.write_all(b"Z").unwrap();
    for _ in 0..100 {
        if DROPS.load(Ordering::SeqCst) > 0 {
            break;
        }
        ctx.poll(false);
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(DROPS.load(Ordering::SeqCst), 1, "freed at the completion");
    assert_eq!(
        FIRST_BYTE.load(Ordering::SeqCst),
        b'Z',
        "the read landed first"
    );
    for _ in 0..3 {
        ctx.poll(false);
    }
    assert_eq!(DROPS.load(Ordering::SeqCst), 1, "freed exactly once");

    // Completed but not collected when dropped: freed at the drop.
    w.write_all(b"Y").unwrap();
    let op = executor::uring::read_owned(fd.clone(), CountedBuf(vec![0; 8]), 0, 0)
        .map_err(|_| "full")
        .unwrap();
    let before = ctx.ring_stats().unwrap().completed;
    for _ in 0..100 {
        if ctx.ring_stats().unwrap().completed > before {
            break;
        }
        ctx.poll(false);
        thread::sleep(Duration::from_millis(1));
    }
    assert!(ctx.ring_stats().unwrap().completed > before);
    assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    drop(op);
    assert_eq!(DROPS.load(Ordering::SeqCst), 2);
    assert_eq!(FIRST_BYTE.load(Ordering::SeqCst), b'Y');
    ctx.poll(false);
    assert_eq!(DROPS.load(Ordering::SeqCst), 2);

    // Awaited to the end: the buffer comes back, the ring does not drop it.
    w.write_all(b"X").unwrap();
    let ((_, buf), res) = block_on(
        executor::uring::read_owned(fd, CountedBuf(vec![0; 8]), 0, 0)
            .map_err(|_| "full")
            .unwrap(),
    );
    assert_eq!(res.unwrap(), 1);
    assert_eq!(DROPS.load(Ordering::SeqCst), 2);
    assert_eq!(buf.0[0], b'X');
    drop(buf);
    assert_eq!(DROPS.load(Ordering::SeqCst), 3);
}

extern "C" fn on_sigusr1(_: libc::c_int) {}

#[test]
fn eintr_in_a_blocking_poll_is_not_an_error() {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler does
    // nothing, so it is async-signal-safe, and SIGUSR1 is sent only by this test.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as libc::sighandler_t;
        sa.sa_flags = 0; // no SA_RESTART: the wait fails with EINTR
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let t = thread::spawn(|| {
        let ctx = AioContext::current();
        assert!(ctx.has_io_uring());
        let start = Instant::now();
        let fired = Rc::new(Cell::new(None));
        let f = fired.clone();
        let timer = ctx.timer_new(move || f.set(Some(start.elapsed())));
        timer.modify_after(Duration::from_millis(200));
        let mut polls = 0;
        while fired.get().is_none() {
            ctx.poll(true);
            polls += 1;
            assert!(polls < 100, "spinning");
        }
        (fired.get().unwrap(), polls)
    });
    thread::sleep(Duration::from_millis(50));
    {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the thread is alive (it waits for its 200 ms timer) and SIGUSR1 has a
        // handler installed above.
        let rc = unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
        assert_eq!(rc, 0);
    }
    let (at, polls) = t.join().expect("poll panicked on EINTR");
    assert!(
        at >= Duration::from_millis(200),
        "timer fired early: {at:?}"
    );
    assert!(at < Duration::from_secs(5));
    assert!(
        polls >= 2,
        "the signal did not interrupt the wait ({polls} polls)"
    );
}

/// A handler that runs a nested `wait_while` (allowed outside coroutines and tasks) must still
/// see the other completions of the batch its own came in, and its own fd must stay watched:
/// the loop keeps unprocessed completions in the context and re-arms a poll before running its
/// handler. Both pipes are ready before the first poll, so their completions arrive together;
/// whichever handler runs first waits (nested) for the other one. A 2 s timer ends the nested
/// wait if it would otherwise hang, and the test then fails.
#[test]
fn nested_poll_in_a_handler_sees_the_rest_of_the_batch() {
    let ctx = AioContext::current();
    let (ra, mut wa) = nonblocking_pipe();
    let (rb, mut wb) = nonblocking_pipe();
    let ran: Rc<RefCell<Vec<char>>> = Rc::default();
    let timed_out = Rc::new(Cell::new(false));
    let t = timed_out.clone();
    let timer = ctx.timer_new(move || t.set(true));
    timer.modify(Instant::now() + Duration::from_secs(2));
    for (name, r) in [('a', ra), ('b', rb)] {
        let (ran2, to, c) = (ran.clone(), timed_out.clone(), ctx.clone());
        let r = Rc::new(RefCell::new(r));
        let fd = r.borrow().as_raw_fd();
        let rr = r.clone();
        ctx.set_fd_handler(
            fd,
            Some(Rc::new(move || {
                let mut b = [0u8; 1];
                if rr.borrow_mut().read(&mut b).is_err() {
                    return;
                }
                ran2.borrow_mut().push(name);
                if ran2.borrow().len() == 1 {
                    // The first handler waits for the other one, inside its own dispatch.
                    let seen = ran2.clone();
                    let t = to.clone();
                    runtime::wait_while(&c, || seen.borrow().len() < 2 && !t.get());
                }
            })),
            None,
        )
        .unwrap();
        // Keep the read end alive as long as the handler (it owns `rr`).
        std::mem::forget(r);
    }
    wa.write_all(b"x").unwrap();
    wb.write_all(b"y").unwrap();
    poll_until(&ctx, 50, || ran.borrow().len() == 2 || timed_out.get());
    assert!(
        !timed_out.get(),
        "the nested wait never saw the other handler: {:?}",
        ran.borrow()
    );
    let mut got = ran.borrow().clone();
    got.sort();
    assert_eq!(got, ['a', 'b']);
    // Both fds are still watched after the nested round: new data reaches their handlers.
    wa.write_all(b"x").unwrap();
    wb.write_all(b"y").unwrap();
    poll_until(&ctx, 50, || ran.borrow().len() == 4);
}

/// An `Op` polled again after it returned `Ready` panics instead of touching a slot that may
/// already serve another request.
#[test]
fn op_polled_after_ready_panics() {
    let tf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tf.path(), b"hello").unwrap();
    let fd: Arc<OwnedFd> = Arc::new(tf.reopen().unwrap().into());
    let r = block_on(async move {
        let mut op = match executor::uring::read_owned(fd, vec![0u8; 5], 0, 0) {
            Ok(op) => op,
            Err(_) => panic!("the ring took no request"),
        };
        let ((_, buf), n) = (&mut op).await;
        assert_eq!((&buf[..], n.unwrap()), (&b"hello"[..], 5));
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let w = std::task::Waker::noop();
            let _ = std::pin::Pin::new(&mut op).poll(&mut std::task::Context::from_waker(w));
        }))
    });
    let msg = r.expect_err("a second poll must panic");
    let msg = msg
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| msg.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(msg.contains("polled after it completed"), "{msg}");
}

/// Joining a coroutine from inside an async task would poll the loop from inside a poll (and
/// could swallow the task's own wake-up): refused with a panic, as `wait_while` refuses it.
#[test]
fn join_inside_a_task_is_refused() {
    let r = block_on(async {
        let h = spawn(|| 7);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || h.join()))
    });
    assert!(r.is_err(), "join inside a block_on future must panic");
}
