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
//!
//! [`InFlight`] is the counter such a condition reads: the FUSE session counts its requests
//! with one, each `BlockBackend` counts its own with another, and both drains are
//! `wait_while(ctx, || counter.get() > 0)`.

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
        !crate::aio::in_task_poll(),
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

/// A count of requests in flight, for a drain to wait on with [`wait_while`]: [`InFlight::enter`]
/// counts a request in, dropping the guard counts it out however the request leaves (a return,
/// an error, a panic).
///
/// QEMU: `BlockBackend::in_flight` with `blk_inc_in_flight()` / `blk_dec_in_flight()`, whose
/// decrement calls `aio_wait_kick()`.
///
/// # Ordering
///
/// Every access is `SeqCst`, and the decrement that reaches zero is followed by [`kick`]. A
/// drain is `wait_while` on `get() > 0`, and `wait_while` counts itself a waiter (`SeqCst`)
/// before its first check. Of the two orders of "count out, then load the waiter count" and
/// "count the waiter, then load the in-flight count", one comes first in the single `SeqCst`
/// order: either the drainer sees zero, or `kick` sees the drainer and wakes its loop to look
/// again. `Acquire`/`Release` would not do: they do not order a store before a later load of
/// another location, and the drain could sleep through the last request.
#[derive(Debug, Default)]
pub struct InFlight(AtomicUsize);

/// One request counted in an [`InFlight`]; dropping it counts the request out.
#[must_use = "the request is counted out as soon as the guard is dropped"]
#[derive(Debug)]
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    pub const fn new() -> InFlight {
        InFlight(AtomicUsize::new(0))
    }

    /// Counts a request in until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self)
    }

    /// Requests in flight now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Polls `ctx` until no request is in flight. QEMU: `AIO_WAIT_WHILE(ctx, in_flight > 0)`.
    pub fn drain(&self, ctx: &AioContext) {
        wait_while(ctx, || self.get() > 0);
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0 .0.fetch_sub(1, Ordering::SeqCst) == 1 {
            kick();
        }
    }
}
