//! # 04 — the thread pool: blocking work off the loop, the result back home
//!
//! What it teaches: a coroutine must not block its thread — the whole event loop would stop
//! with it. A call that may sleep in the kernel (`pread`, `fsync`, `fallocate` where io_uring
//! cannot help) goes to a [`ThreadPool`] worker instead: [`ThreadPool::submit_co`] queues the
//! job and yields; the worker runs it and wakes the coroutine, which — being a cross-thread
//! wake (example 03) — is entered again by its *own* thread's loop. So the result is always
//! consumed on the submitting thread, and many coroutines can have jobs in flight at once.
//! [`ThreadPool::submit_cb`] is the callback form.
//!
//! QEMU: `util/thread-pool.c` (`thread_pool_submit_co()`, `thread_pool_submit_aio()`,
//! `worker_thread()`, the completion bottom half).
//!
//! Run: `cargo run -p runtime --example 04_thread_pool`
//!
//! Expected output:
//!
//! ```text
//! co: submitting a blocking job and yielding (the loop stays free meanwhile)
//! job: running on a worker, not on main: true
//! co: resumed on thread "main" with 42
//! main: three coroutines submit at once; their jobs run side by side
//! main: results in submission order: [1, 4, 9], all consumed on "main": true
//! cb: the callback runs on thread "main" with "done"
//! ```
//!
//! Exercise: run the blocking job on the loop thread instead. In `runtime/src/thread_pool.rs`,
//! `ThreadPool::submit_co_in`, put `return f();` as the first line. The job line above then
//! prints `false` (and a real blocking call would freeze every other request of the thread),
//! and `cargo test -p runtime --test thread_pool submit_co_runs_on_a_worker_and_resumes_on_the_submitting_thread`
//! fails with "the job ran on the submitting thread". Revert the change afterwards.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::thread;
use std::time::Duration;

use runtime::{AioContext, Coroutine, ThreadPool};

fn thread_name() -> String {
    thread::current().name().unwrap_or("?").to_owned()
}

fn main() {
    let ctx = AioContext::current();
    let pool = ThreadPool::global();
    let main_id = thread::current().id();

    // --- one job ---------------------------------------------------------------------------
    let co = Coroutine::new(move || {
        println!("co: submitting a blocking job and yielding (the loop stays free meanwhile)");
        let answer = pool.submit_co(move || {
            // On a worker thread: blocking here is what workers are for.
            thread::sleep(Duration::from_millis(10));
            println!(
                "job: running on a worker, not on main: {}",
                thread::current().id() != main_id
            );
            6 * 7
        });
        println!("co: resumed on thread {:?} with {answer}", thread_name());
    });
    co.enter();
    while !co.is_finished() {
        ctx.poll(true); // the wake-up from the worker arrives here
    }

    // --- many jobs in flight ---------------------------------------------------------------
    // Each coroutine parks in submit_co; the pool starts workers as needed (up to its bound).
    // The jobs finish in any order; each result lands in its own slot, on this thread.
    println!("main: three coroutines submit at once; their jobs run side by side");
    let results = Rc::new(RefCell::new(vec![0u64; 3]));
    let on_main = Rc::new(Cell::new(true));
    let coroutines: Vec<Coroutine> = (0..3u64)
        .map(|i| {
            let (results, on_main) = (results.clone(), on_main.clone());
            let co = Coroutine::new(move || {
                let square = pool.submit_co(move || {
                    thread::sleep(Duration::from_millis(10 * (3 - i)));
                    (i + 1) * (i + 1)
                });
                results.borrow_mut()[i as usize] = square;
                on_main.set(on_main.get() && thread::current().id() == main_id);
            });
            co.enter(); // runs until its submit_co yields
            co
        })
        .collect();
    while !coroutines.iter().all(Coroutine::is_finished) {
        ctx.poll(true);
    }
    println!(
        "main: results in submission order: {:?}, all consumed on \"main\": {}",
        results.borrow(),
        on_main.get()
    );

    // --- the callback form -----------------------------------------------------------------
    let called = Rc::new(Cell::new(false));
    let c = called.clone();
    pool.submit_cb(
        || "done",
        move |r| {
            println!(
                "cb: the callback runs on thread {:?} with {r:?}",
                thread_name()
            );
            c.set(true);
        },
    );
    while !called.get() {
        ctx.poll(true);
    }
}
