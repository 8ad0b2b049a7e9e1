//! The async form of the thread pool: [`ThreadPool::submit_async`] and its [`PoolFuture`].
//!
//! QEMU: none (the async counterpart of `thread_pool_submit_co()` in `util/thread-pool.c`,
//! whose twin here is `thread_pool.rs`). The workers, lanes and queue are the pool's, shared
//! with coroutine submitters; a job only wakes a task's `Waker` instead of a `CoWaker`.

use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread;

use crate::thread_pool::{Lane, ThreadPool, Wakeup};

impl ThreadPool {
    /// Runs `f` on a worker; the returned future completes with `f`'s result. The async
    /// counterpart of [`ThreadPool::submit_co`]; a panic in `f` resumes in the awaiting task.
    ///
    /// The job is queued at once, not at the first poll. `f` is `'static`: a future may be
    /// dropped or leaked at any `.await`, so it cannot lend a borrowed buffer to the worker the
    /// way [`ThreadPool::submit_co_scoped`] does (see `executor`, "Borrowing across threads").
    /// Dropping the future early discards the result; the job still runs.
    pub fn submit_async<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> PoolFuture<R> {
        self.submit_async_in(None, f)
    }

    /// [`ThreadPool::submit_async`], in `lane` if given.
    pub fn submit_async_in<R: Send + 'static>(
        &self,
        lane: Option<&Lane>,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> PoolFuture<R> {
        let slot = Arc::new(Mutex::new(PoolSlot {
            result: None,
            waiter: None,
        }));
        let done = slot.clone();
        self.push_in(
            lane,
            Box::new(move || {
                let r = catch_unwind(AssertUnwindSafe(f));
                let mut st = done.lock().unwrap_or_else(|e| e.into_inner());
                st.result = Some(r);
                st.waiter.take().map(Wakeup::Task)
            }),
        );
        PoolFuture { slot }
    }
}

struct PoolSlot<R> {
    result: Option<thread::Result<R>>,
    /// The task to wake when the result arrives (set by a `Pending` poll).
    waiter: Option<Waker>,
}

/// The completion of a [`ThreadPool::submit_async`] job.
pub struct PoolFuture<R> {
    slot: Arc<Mutex<PoolSlot<R>>>,
}

impl<R> Future for PoolFuture<R> {
    type Output = R;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<R> {
        // The worker stores the result and takes the waker under this same lock, so a result
        // is never missed and a waker never left behind.
        let mut st = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match st.result.take() {
            Some(Ok(r)) => {
                log::trace!("task: its pool job is done");
                Poll::Ready(r)
            }
            Some(Err(p)) => {
                drop(st);
                resume_unwind(p)
            }
            None => {
                match &mut st.waiter {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                log::trace!("task: pending: waits for its pool job");
                Poll::Pending
            }
        }
    }
}
