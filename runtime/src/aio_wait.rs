//! Blocking the calling thread's event loop until a condition clears, and waking such waits.
//!
//! QEMU: `util/aio-wait.c` and `AIO_WAIT_WHILE()` in `include/block/aio-wait.h`.
//!
//! `wait_while(ctx, cond)` polls `ctx` until `cond()` is false — typically "requests are still in
//! flight" during drain. The condition may be changed by another thread (a request finishing on
//! an iothread); that thread then calls [`kick`], which makes every waiting context's next
//! `poll()` return so the condition is checked again. A kick is a queued no-op bottom half, not a
//! bare `notify()`: a notification sent while the waiter is between checking `cond()` and blocking
//! could otherwise be lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::aio::{AioContext, RemoteContext};

/// Number of `wait_while` calls in progress. QEMU: `AioWait::num_waiters`.
static NUM_WAITERS: AtomicUsize = AtomicUsize::new(0);
static WAITERS: Mutex<Vec<RemoteContext>> = Mutex::new(Vec::new());

fn waiters() -> std::sync::MutexGuard<'static, Vec<RemoteContext>> {
    WAITERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `ctx` (blocking) while `cond()` holds. Must not be called inside a coroutine or an
/// async task.
///
/// QEMU: `AIO_WAIT_WHILE(ctx, cond)`.
pub fn wait_while(ctx: &AioContext, mut cond: impl FnMut() -> bool) {
    assert!(
        !crate::in_coroutine(),
        "wait_while() would block a coroutine's thread; yield instead"
    );
    assert!(
        !crate::executor::in_task(),
        "wait_while() inside an async task would poll its own loop from inside a poll; await instead"
    );
    waiters().push(ctx.remote());
    // Pairs with the SeqCst load in `kick()`: either the kicker sees us counted (and kicks), or
    // we see the condition it changed before it loaded the count.
    NUM_WAITERS.fetch_add(1, Ordering::SeqCst);
    while cond() {
        ctx.poll(true);
    }
    NUM_WAITERS.fetch_sub(1, Ordering::SeqCst);
    let mut w = waiters();
    if let Some(i) = w.iter().position(|r| r.is_current()) {
        w.swap_remove(i);
    }
}

/// Wakes every `wait_while` in progress so that it re-checks its condition. Call it after
/// changing state that such a condition reads. Cheap when nobody waits.
///
/// QEMU: `aio_wait_kick()`.
pub fn kick() {
    if NUM_WAITERS.load(Ordering::SeqCst) > 0 {
        for r in waiters().iter() {
            r.kick();
        }
    }
}
