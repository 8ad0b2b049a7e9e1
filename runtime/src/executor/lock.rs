//! The async forms of the coroutine locks: [`CoMutex::lock_async`] and [`CoQueue::wait_async`],
//! and their futures.
//!
//! QEMU: none (the async counterparts of `qemu_co_mutex_lock()` and `qemu_co_queue_wait()` of
//! `util/qemu-coroutine-lock.c`, whose twin here is `lock.rs`).
//!
//! [`CoMutex::lock_async`] and [`CoQueue::wait_async`] are the same locks for async tasks: one
//! wait queue holds both kinds of waiter (`Waiter`: a `CoWaker` or a `std::task::Waker`), so a
//! coroutine and a future contending for one mutex are served in one FIFO order and hand the
//! lock to each other. Each waiter carries a ticket, increasing in
//! queue order; since waiters leave the queue only from the front (or by cancellation), a
//! waiting future knows it was picked when the front ticket is past its own (or the queue is
//! empty) — no extra allocation per wait. A future can be dropped while it waits (coroutines
//! cannot): it then leaves the queue, or, if it was already picked, passes the lock (or the
//! wake-up) on to the next waiter.
//!
//! The lock state, the wait queue and the hand-off on unlock are `lock.rs`'s, shared with
//! coroutine waiters; this file adds the task side of the protocol: queueing with a ticket,
//! finding out it was picked, and leaving the queue when the future is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use crate::lock::{lock_state, thread_tag, CoMutex, CoMutexGuard, CoQueue, WaitList, WaiterKind};

/// The ticket protocol of a task waiter (coroutine waiters are simply woken).
impl WaitList {
    /// Whether the waiter with `ticket` has left the queue from the front (was picked).
    fn was_picked(&self, ticket: u64) -> bool {
        self.queue.front().is_none_or(|w| w.ticket > ticket)
    }

    /// Keeps the newest waker of a task that is polled again while it waits.
    fn update_waker(&mut self, ticket: u64, waker: &Waker) {
        if let Some(w) = self.queue.iter_mut().find(|w| w.ticket == ticket) {
            match &mut w.kind {
                WaiterKind::Task(old) if old.will_wake(waker) => {}
                kind => *kind = WaiterKind::Task(waker.clone()),
            }
        }
    }

    /// Removes a waiter that gave up (a dropped future).
    fn remove(&mut self, ticket: u64) {
        if let Some(i) = self.queue.iter().position(|w| w.ticket == ticket) {
            self.queue.remove(i);
        }
    }
}

impl<T: ?Sized> CoMutex<T> {
    /// Takes the lock from an async task; the future completes when the lock is ours. Shares
    /// the FIFO of [`CoMutex::co_lock`]. Dropping the future while it waits gives up the place
    /// (or passes on the lock, if it had just been handed over).
    pub fn lock_async(&self) -> CoMutexLock<'_, T> {
        CoMutexLock {
            mutex: self,
            ticket: None,
            acquired: false,
        }
    }
}

/// The future of [`CoMutex::lock_async`].
pub struct CoMutexLock<'a, T: ?Sized> {
    mutex: &'a CoMutex<T>,
    /// Our place in the queue, once we had to wait.
    ticket: Option<u64>,
    /// The guard was handed out.
    acquired: bool,
}

impl<'a, T: ?Sized> Future for CoMutexLock<'a, T> {
    type Output = CoMutexGuard<'a, T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CoMutexGuard<'a, T>> {
        let this = self.get_mut();
        let mut st = lock_state(&this.mutex.state);
        let got = match this.ticket {
            None if !st.locked => {
                st.locked = true;
                true
            }
            None => {
                this.ticket = Some(st.waiters.push(WaiterKind::Task(cx.waker().clone())));
                false
            }
            // Picked by `unlock`, which handed the lock over (`locked` stayed true).
            Some(t) if st.waiters.was_picked(t) => true,
            Some(t) => {
                st.waiters.update_waker(t, cx.waker());
                false
            }
        };
        if got {
            this.acquired = true;
            this.mutex.busy.store(true, Ordering::Relaxed);
            this.mutex.owner.store(thread_tag(), Ordering::Relaxed);
            Poll::Ready(CoMutexGuard { mutex: this.mutex })
        } else {
            Poll::Pending
        }
    }
}

impl<T: ?Sized> Drop for CoMutexLock<'_, T> {
    fn drop(&mut self) {
        let Some(t) = self.ticket else { return };
        if self.acquired {
            return;
        }
        let mut st = lock_state(&self.mutex.state);
        if st.waiters.was_picked(t) {
            // The lock was handed to us but never taken: pass it on.
            drop(st);
            self.mutex.unlock();
        } else {
            st.waiters.remove(t);
        }
    }
}

impl CoQueue {
    /// Waits, from an async task, until `next()` or `restart_all()` picks it; shares the FIFO
    /// of [`CoQueue::co_wait`]. Dropping the future while it waits leaves the queue; dropping
    /// it after it was picked passes the wake-up on to the next waiter.
    pub fn wait_async(&self) -> CoQueueWait<'_> {
        CoQueueWait {
            queue: self,
            ticket: None,
            done: false,
        }
    }
}

/// The future of [`CoQueue::wait_async`].
pub struct CoQueueWait<'a> {
    queue: &'a CoQueue,
    ticket: Option<u64>,
    done: bool,
}

impl Future for CoQueueWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut st = lock_state(&this.queue.waiters);
        match this.ticket {
            None => {
                this.ticket = Some(st.push(WaiterKind::Task(cx.waker().clone())));
                Poll::Pending
            }
            Some(t) if st.was_picked(t) => {
                this.done = true;
                Poll::Ready(())
            }
            Some(t) => {
                st.update_waker(t, cx.waker());
                Poll::Pending
            }
        }
    }
}

impl Drop for CoQueueWait<'_> {
    fn drop(&mut self) {
        let Some(t) = self.ticket else { return };
        if self.done {
            return;
        }
        let mut st = lock_state(&self.queue.waiters);
        if st.was_picked(t) {
            drop(st);
            self.queue.next();
        } else {
            st.remove(t);
        }
    }
}
