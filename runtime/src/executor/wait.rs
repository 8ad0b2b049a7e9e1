//! Waiting in the async engine: [`block_on`] (the main loop waits for a future), [`sleep`] and
//! [`sleep_until`] (a task waits for a timer), [`yield_now`] (a task lets the others run).
//!
//! QEMU: none (the async counterparts of `AIO_WAIT_WHILE` in `include/block/aio-wait.h`,
//! `qemu_co_sleep_ns()` in `util/qemu-coroutine-sleep.c`, and `aio_co_wake()` of oneself
//! followed by `qemu_coroutine_yield()`).

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use crate::aio::{AioContext, RemoteContext, TaskPollGuard};

use super::in_task;

/// The waker of [`block_on`]: a flag, and a kick of the blocked loop when woken from afar.
struct BlockOnWaker {
    woken: AtomicBool,
    home: RemoteContext,
}

impl Wake for BlockOnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Release pairs with the Acquire load in `block_on`.
        self.woken.store(true, Ordering::Release);
        if !self.home.is_current() {
            // A queued no-op, not a bare notify: it cannot be lost between the flag check and
            // the blocking wait (see `aio_wait`).
            self.home.kick();
        }
    }
}

/// Polls `fut` to completion on the calling thread, running this thread's event loop (so its
/// tasks, coroutines, timers and fd handlers) while it waits. For the main thread and tests;
/// must not be called inside a coroutine or a task (it would block their loop from inside).
///
/// The async counterpart of [`crate::wait_while`] (`AIO_WAIT_WHILE`).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    assert!(
        !crate::in_coroutine() && !in_task(),
        "block_on() inside a coroutine or a task would block its own event loop"
    );
    let ctx = AioContext::current();
    let flag = Arc::new(BlockOnWaker {
        woken: AtomicBool::new(false),
        home: ctx.remote(),
    });
    let waker = Waker::from(flag.clone());
    let mut fut = pin!(fut);
    loop {
        flag.woken.store(false, Ordering::Relaxed);
        let polled = {
            let _polling = TaskPollGuard::new();
            fut.as_mut().poll(&mut Context::from_waker(&waker))
        };
        if let Poll::Ready(v) = polled {
            return v;
        }
        while !flag.woken.load(Ordering::Acquire) {
            ctx.poll(true);
        }
    }
}

/// Waits until `deadline` on this thread's context timer. Dropping the future disarms it.
///
/// The async counterpart of [`crate::co_sleep_until`].
pub async fn sleep_until(deadline: Instant) {
    struct Fired {
        done: Cell<bool>,
        waiter: Cell<Option<Waker>>,
    }
    let fired = Rc::new(Fired {
        done: Cell::new(false),
        waiter: Cell::new(None),
    });
    let f = fired.clone();
    let timer = AioContext::with_current(|ctx| {
        ctx.timer_new(move || {
            f.done.set(true);
            if let Some(w) = f.waiter.take() {
                w.wake();
            }
        })
    });
    timer.modify(deadline);
    poll_fn(|cx| {
        if fired.done.get() {
            return Poll::Ready(());
        }
        fired.waiter.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await;
}

/// Waits at least `dur`. The async counterpart of [`crate::co_sleep`].
pub async fn sleep(dur: Duration) {
    sleep_until(Instant::now() + dur).await;
}

/// Returns `Pending` once (after waking itself), so other ready tasks run first. The async
/// counterpart of a coroutine waking itself and yielding.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}
