//! # 03 — a wake from another thread is a message
//!
//! What it teaches: a coroutine never changes thread. When an [`IoThread`] (or a thread-pool
//! worker, or any thread) wakes a coroutine that lives on the main thread, the wake does not
//! run the coroutine there: it *queues* it on the coroutine's home [`AioContext`] and nudges
//! that loop (an eventfd write), and the home thread enters it from its next `poll()`. A
//! one-shot bottom half sent with [`RemoteContext::schedule_oneshot`] travels through the same
//! queue, so work from one sender arrives in the order it was sent.
//!
//! The handles tell the rule: `Coroutine` and `AioContext` are `!Send` (they cannot leave their
//! thread); `CoWaker` and `RemoteContext` are `Send` and can only wake, schedule or notify.
//!
//! QEMU: `util/async.c` (`aio_co_wake()`, `aio_co_schedule()`, `aio_bh_schedule_oneshot()`,
//! `aio_notify()`), `iothread.c` (`iothread_run()`).
//!
//! Run: `cargo run -p runtime --example 03_cross_thread_wake`
//!
//! Expected output:
//!
//! ```text
//! main: entering the coroutine, then polling until it has finished
//! co: running on thread "main"; handing my waker to the iothread and yielding
//! iothread "io0": sending a one-shot BH to main, then waking the coroutine
//! bh: from the iothread, running on thread "main"
//! co: resumed on thread "main"
//! main: finished; the iothread's own coroutine ran on "io0"
//! ```
//!
//! Exercise: break the order of cross-thread work. In `runtime/src/aio.rs`,
//! `AioContext::poll_remote`, run the batch backwards (`for work in batch.drain(..).rev()`). When the
//! two arrive in one batch (the usual case), the coroutine above then resumes before the
//! bottom half that was sent first, and
//! `cargo test -p runtime --test aio remote_oneshots_from_many_threads_none_lost_or_doubled`
//! fails with "item … out of order". Revert the change afterwards.

use std::sync::mpsc;
use std::thread;

use runtime::{co_yield, AioContext, CoWaker, Coroutine, IoThread};

fn thread_name() -> String {
    thread::current().name().unwrap_or("?").to_owned()
}

fn main() -> std::io::Result<()> {
    let ctx = AioContext::current();
    // A thread that owns one AioContext and does nothing but poll it.
    let io = IoThread::spawn("io0")?;
    // `Send` handles: the iothread's context for us, ours for the iothread.
    let io_ctx = io.context().clone();
    let main_ctx = ctx.remote();

    let co = Coroutine::new(move || {
        println!(
            "co: running on thread {:?}; handing my waker to the iothread and yielding",
            thread_name()
        );
        let waker = CoWaker::current(); // Send: it may travel to another thread
        io_ctx.schedule_oneshot(move || {
            // This closure runs on the iothread, in its poll().
            println!(
                "iothread {:?}: sending a one-shot BH to main, then waking the coroutine",
                thread_name()
            );
            main_ctx.schedule_oneshot(|| {
                println!(
                    "bh: from the iothread, running on thread {:?}",
                    thread_name()
                )
            });
            // Not a jump into the coroutine: a message to its home context. Print nothing
            // after this line: main may already be running the coroutine, so the order of
            // such a line with main's output would be left to chance.
            waker.wake();
        });
        co_yield();
        println!("co: resumed on thread {:?}", thread_name());
    });
    println!("main: entering the coroutine, then polling until it has finished");
    co.enter();
    // The coroutine is parked; only our own poll() can run it again.
    while !co.is_finished() {
        ctx.poll(true);
    }

    // The iothread can run coroutines of its own; they stay there for good.
    let (done_tx, done_rx) = mpsc::channel();
    io.spawn_co(move || {
        let _ = done_tx.send(thread_name());
    });
    let there = done_rx.recv().expect("the iothread's coroutine ran");
    println!("main: finished; the iothread's own coroutine ran on {there:?}");
    io.stop(); // runs what was queued, then joins the thread
    Ok(())
}
