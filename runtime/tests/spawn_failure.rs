//! A thread pool that cannot start a worker (no threads, memory or mappings left) still runs
//! every job: with no worker at all, the submitting thread runs the queue itself. Its own test
//! binary, because the failure knob (`inject_spawn_failures`) is process-wide.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use runtime::{block_on, inject_spawn_failures, spawn, ThreadPool};

/// Runs `f` on a thread of its own and fails if it does not finish in time (a job left queued
/// with no worker would hang the test instead of failing it).
fn within(secs: u64, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("a queued job never ran: no worker and none could start");
}

#[test]
fn jobs_run_on_the_submitter_when_no_worker_can_start() {
    within(30, body);
}

fn body() {
    let pool: &'static ThreadPool = Box::leak(Box::new(ThreadPool::new(
        "nothreads",
        4,
        Duration::from_secs(10),
    )));
    inject_spawn_failures(0, usize::MAX);
    let home = thread::current().id();
    // A coroutine submitter: the job runs here, and its wake-up waits until the coroutine yields.
    let r = spawn(move || pool.submit_co(|| (thread::current().id(), 6 * 7))).join();
    assert_eq!(r.expect("no panic"), (home, 42));
    // An async submitter, and several jobs in a row.
    let sum = block_on(async move {
        let mut sum = 0;
        for i in 0..10u64 {
            sum += pool.submit_async(move || i).await;
        }
        sum
    });
    assert_eq!(sum, 45);

    // Threads again: the next job gets a worker, not the submitter.
    inject_spawn_failures(0, 0);
    let r = spawn(move || pool.submit_co(|| thread::current().id())).join();
    assert_ne!(r.expect("no panic"), home, "a worker again");
}
