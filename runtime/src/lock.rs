//! Coroutine locks: `CoMutex`, `CoQueue`, `CoRwLock`, and `co_sleep`.
//!
//! QEMU: `util/qemu-coroutine-lock.c` (`CoMutex`, `CoQueue`, `CoRwlock`) and
//! `util/qemu-coroutine-sleep.c` (`qemu_co_sleep_ns`).
//!
//! A coroutine that cannot take a lock *yields* instead of blocking its thread, so the thread's
//! event loop keeps serving other requests. The waiters may live on different threads (the
//! multi-queue export shares one image between queue threads): each waiter is remembered by its
//! [`CoWaker`], and a wake-up goes to its home context.
//!
//! Each lock keeps its bookkeeping behind a `std::sync::Mutex` that is held only for a few
//! instructions and never across a yield. Ownership is *handed off*: the unlocker picks the next
//! waiter and makes it the owner before waking it, so the queue is served strictly first come,
//! first served and a coroutine that just unlocked cannot barge back in ahead of the waiters.
//!
//! Like QEMU's, `CoMutex` *spins* briefly before it queues when the holder runs on another
//! thread and nobody waits yet: a metadata lock (qcow2's) is usually held for a few hundred
//! nanoseconds by a coroutine that does not yield, while queueing costs a cross-thread wake-up
//! (tens of microseconds on a VM). Spinning is pointless when the holder lives on our own thread
//! (it cannot run until we yield), so we don't. Differences from QEMU: no lock-free wait list
//! (QEMU's `handoff` protocol); the data sits inside the lock, as in `std::sync::Mutex`, and is
//! reached through a guard that unlocks when dropped.
//!
//! Async tasks wait in the same queues: a waiter is a coroutine or a task (`WaiterKind`), so a
//! coroutine and a future contending for one mutex are served in one FIFO order. The async
//! forms (`CoMutex::lock_async`, `CoQueue::wait_async`) and the tickets by which a waiting
//! future finds out it was picked are the async engine's: `executor/lock.rs`.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::aio::AioContext;
use crate::coroutine::{co_yield, CoWaker, Running};

pub(crate) fn lock_state<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected sections below only move waiters between queues and cannot panic halfway,
    // so a poisoned lock still holds consistent state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fair mutex for coroutines; the lock is handed to waiters in FIFO order.
///
/// QEMU: `CoMutex`, `qemu_co_mutex_lock()`, `qemu_co_mutex_unlock()`.
pub struct CoMutex<T: ?Sized> {
    pub(crate) state: Mutex<MutexState>,
    /// Mirrors `state.locked` for spinners, who read it without taking `state`.
    pub(crate) busy: AtomicBool,
    /// The thread of the current holder ([`thread_tag`]), a hint for spinners; Relaxed: a stale
    /// value only costs a useless spin or a queueing.
    pub(crate) owner: AtomicUsize,
    data: UnsafeCell<T>,
}

/// How many times a coroutine re-checks a lock held on another thread before it queues
/// (a few microseconds; QEMU spins up to 1000 times).
const SPIN_LIMIT: u32 = 200;

thread_local! {
    static TAG: u8 = const { 0 };
}

/// A number unique to the calling thread while it lives: the address of a thread-local.
pub(crate) fn thread_tag() -> usize {
    TAG.with(|t| t as *const u8 as usize)
}

#[derive(Default)]
pub(crate) struct MutexState {
    pub(crate) locked: bool,
    pub(crate) waiters: WaitList,
}

/// Who waits: a coroutine or an async task.
pub(crate) enum WaiterKind {
    Co(CoWaker),
    Task(Waker),
}

/// One entry of a wait queue; tickets increase from front to back (only a task waiter reads
/// its ticket: see `executor/lock.rs`).
pub(crate) struct Waiter {
    pub(crate) ticket: u64,
    pub(crate) kind: WaiterKind,
}

impl Waiter {
    fn wake(self) {
        match self.kind {
            WaiterKind::Co(w) => w.wake(),
            WaiterKind::Task(w) => w.wake(),
        }
    }
}

/// A FIFO of coroutine and task waiters, shared by both engines.
#[derive(Default)]
pub(crate) struct WaitList {
    pub(crate) queue: VecDeque<Waiter>,
    next_ticket: u64,
}

impl WaitList {
    pub(crate) fn push(&mut self, kind: WaiterKind) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queue.push_back(Waiter { ticket, kind });
        ticket
    }

    fn push_current_co(&mut self) {
        self.push(WaiterKind::Co(CoWaker::current()));
    }

    fn pop_front(&mut self) -> Option<Waiter> {
        self.queue.pop_front()
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

// SAFETY: the data is only reached through a `CoMutexGuard`, and the hand-off protocol lets at
// most one guard exist at a time, whichever thread its coroutine runs on; so sharing the mutex
// needs only `T: Send`, exactly as for `std::sync::Mutex`.
unsafe impl<T: ?Sized + Send> Sync for CoMutex<T> {}
// SAFETY: moving the mutex moves the `T` inside it, which is allowed when `T: Send`.
unsafe impl<T: ?Sized + Send> Send for CoMutex<T> {}

impl<T> CoMutex<T> {
    pub fn new(data: T) -> CoMutex<T> {
        CoMutex {
            state: Mutex::default(),
            busy: AtomicBool::new(false),
            owner: AtomicUsize::new(0),
            data: UnsafeCell::new(data),
        }
    }

    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: ?Sized> CoMutex<T> {
    /// Takes the lock, yielding while another coroutine holds it. Must run in a coroutine when
    /// the lock may be contended.
    pub fn co_lock(&self) -> CoMutexGuard<'_, T> {
        let me = thread_tag();
        let mut spins = 0;
        loop {
            let mut st = lock_state(&self.state);
            if !st.locked {
                st.locked = true;
                self.busy.store(true, Ordering::Relaxed);
                self.owner.store(me, Ordering::Relaxed);
                return CoMutexGuard { mutex: self };
            }
            if spins == SPIN_LIMIT
                || !st.waiters.is_empty()
                || self.owner.load(Ordering::Relaxed) == me
            {
                st.waiters.push_current_co();
                break;
            }
            drop(st);
            // The holder runs on another thread and nobody queues: it will likely unlock
            // within a few hundred nanoseconds, far sooner than a cross-thread wake-up.
            while spins < SPIN_LIMIT && self.busy.load(Ordering::Relaxed) {
                std::hint::spin_loop();
                spins += 1;
            }
            spins = spins.max(1);
        }
        log::trace!(
            "{}: yields: waits for a CoMutex another coroutine holds",
            Running
        );
        // The unlocker made us the owner before waking us (hand-off).
        co_yield();
        log::trace!(
            "{}: woken holding the CoMutex (handed over by its unlocker)",
            Running
        );
        self.owner.store(me, Ordering::Relaxed);
        CoMutexGuard { mutex: self }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<CoMutexGuard<'_, T>> {
        let mut st = lock_state(&self.state);
        if st.locked {
            return None;
        }
        st.locked = true;
        self.busy.store(true, Ordering::Relaxed);
        self.owner.store(thread_tag(), Ordering::Relaxed);
        Some(CoMutexGuard { mutex: self })
    }

    /// Whether some coroutine holds the lock.
    pub fn is_locked(&self) -> bool {
        lock_state(&self.state).locked
    }

    /// How many coroutines wait for the lock (for statistics and tests).
    pub fn waiters(&self) -> usize {
        lock_state(&self.state).waiters.len()
    }

    pub(crate) fn unlock(&self) {
        let next = {
            let mut st = lock_state(&self.state);
            let next = st.waiters.pop_front();
            // With a waiter, `locked` stays true: ownership passes to it.
            st.locked = next.is_some();
            self.busy.store(st.locked, Ordering::Relaxed);
            next
        };
        if let Some(w) = next {
            w.wake();
        }
    }

    /// Mutable access without locking, through exclusive ownership.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

/// Holds a [`CoMutex`]; unlocks when dropped.
pub struct CoMutexGuard<'a, T: ?Sized> {
    pub(crate) mutex: &'a CoMutex<T>,
}

impl<T: ?Sized> Deref for CoMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard's existence means this coroutine owns the lock (see `CoMutex`).
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T: ?Sized> DerefMut for CoMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow through the guard.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T: ?Sized> Drop for CoMutexGuard<'_, T> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

impl<'a, T: ?Sized> CoMutexGuard<'a, T> {
    /// The mutex this guard holds.
    pub fn mutex(&self) -> &'a CoMutex<T> {
        self.mutex
    }
}

/// A queue of coroutines waiting for a condition.
///
/// QEMU: `CoQueue`, `qemu_co_queue_wait()`, `qemu_co_queue_next()`,
/// `qemu_co_queue_restart_all()`.
#[derive(Default)]
pub struct CoQueue {
    pub(crate) waiters: Mutex<WaitList>,
}

impl CoQueue {
    pub fn new() -> CoQueue {
        CoQueue::default()
    }

    /// Waits until `next()` or `restart_all()` picks this coroutine.
    pub fn co_wait(&self) {
        lock_state(&self.waiters).push_current_co();
        log::trace!("{}: yields: waits on a CoQueue", Running);
        co_yield();
        log::trace!("{}: woken from a CoQueue", Running);
    }

    /// Releases `guard` while waiting and takes the mutex again before returning, so the
    /// condition can be checked and waited for without a lost wake-up.
    pub fn co_wait_locked<'a, T: ?Sized>(&self, guard: CoMutexGuard<'a, T>) -> CoMutexGuard<'a, T> {
        let mutex = guard.mutex();
        // Queue first, then unlock: a `next()` issued by whoever takes the mutex after us
        // already finds us in the queue.
        lock_state(&self.waiters).push_current_co();
        drop(guard);
        log::trace!("{}: yields: waits on a CoQueue (mutex released)", Running);
        co_yield();
        log::trace!("{}: woken from a CoQueue", Running);
        mutex.co_lock()
    }

    /// Wakes the first waiter; returns whether there was one.
    pub fn next(&self) -> bool {
        let w = lock_state(&self.waiters).pop_front();
        match w {
            Some(w) => {
                w.wake();
                true
            }
            None => false,
        }
    }

    /// Wakes every waiter, in queue order.
    pub fn restart_all(&self) {
        let all = std::mem::take(&mut lock_state(&self.waiters).queue);
        for w in all {
            w.wake();
        }
    }

    pub fn is_empty(&self) -> bool {
        lock_state(&self.waiters).is_empty()
    }

    /// How many coroutines wait (for statistics and tests).
    pub fn len(&self) -> usize {
        lock_state(&self.waiters).len()
    }
}

/// A fair reader-writer lock for coroutines: readers share it, a writer excludes everyone, and
/// a waiting writer stops new readers from overtaking it. Waiters are served in FIFO order, with
/// consecutive readers at the head admitted together.
///
/// QEMU: `CoRwlock`, `qemu_co_rwlock_rdlock()`, `qemu_co_rwlock_wrlock()`,
/// `qemu_co_rwlock_unlock()`.
pub struct CoRwLock<T: ?Sized> {
    state: Mutex<RwState>,
    data: UnsafeCell<T>,
}

#[derive(Default)]
struct RwState {
    readers: usize,
    writer: bool,
    /// `(waker, wants_write)`.
    waiters: VecDeque<(CoWaker, bool)>,
}

impl RwState {
    /// Admits waiters from the head while they fit; returns whom to wake.
    fn admit(&mut self) -> Vec<CoWaker> {
        let mut wake = Vec::new();
        while let Some(&(_, wants_write)) = self.waiters.front() {
            let fits = if wants_write {
                !self.writer && self.readers == 0
            } else {
                !self.writer
            };
            if !fits {
                break;
            }
            let Some((w, _)) = self.waiters.pop_front() else {
                break;
            };
            if wants_write {
                self.writer = true;
            } else {
                self.readers += 1;
            }
            wake.push(w);
        }
        wake
    }
}

// SAFETY: readers get `&T` concurrently from several threads (needs `T: Sync`), a writer gets
// `&mut T` exclusively, possibly on another thread than the last one (needs `T: Send`); the
// state machine in `RwState` guarantees the exclusion, as for `std::sync::RwLock`.
unsafe impl<T: ?Sized + Send + Sync> Sync for CoRwLock<T> {}
// SAFETY: moving the lock moves the `T`.
unsafe impl<T: ?Sized + Send> Send for CoRwLock<T> {}

impl<T> CoRwLock<T> {
    pub fn new(data: T) -> CoRwLock<T> {
        CoRwLock {
            state: Mutex::default(),
            data: UnsafeCell::new(data),
        }
    }
}

impl<T: ?Sized> CoRwLock<T> {
    /// Takes a shared lock, yielding while a writer holds or waits for it.
    pub fn co_read(&self) -> CoReadGuard<'_, T> {
        {
            let mut st = lock_state(&self.state);
            if !st.writer && st.waiters.is_empty() {
                st.readers += 1;
                return CoReadGuard { lock: self };
            }
            st.waiters.push_back((CoWaker::current(), false));
        }
        log::trace!("{}: yields: waits to read-lock a CoRwLock", Running);
        co_yield(); // admitted by `admit()` before the wake
        log::trace!("{}: woken holding a CoRwLock (read)", Running);
        CoReadGuard { lock: self }
    }

    /// Takes the exclusive lock, yielding while anyone holds it or waits ahead.
    pub fn co_write(&self) -> CoWriteGuard<'_, T> {
        {
            let mut st = lock_state(&self.state);
            if !st.writer && st.readers == 0 && st.waiters.is_empty() {
                st.writer = true;
                return CoWriteGuard { lock: self };
            }
            st.waiters.push_back((CoWaker::current(), true));
        }
        log::trace!("{}: yields: waits to write-lock a CoRwLock", Running);
        co_yield();
        log::trace!("{}: woken holding a CoRwLock (write)", Running);
        CoWriteGuard { lock: self }
    }

    /// How many coroutines wait for the lock (for statistics and tests).
    pub fn waiters(&self) -> usize {
        lock_state(&self.state).waiters.len()
    }

    fn release(&self, write: bool) {
        let wake = {
            let mut st = lock_state(&self.state);
            if write {
                st.writer = false;
            } else {
                st.readers -= 1;
            }
            st.admit()
        };
        for w in wake {
            w.wake();
        }
    }
}

/// Shared access to a [`CoRwLock`].
pub struct CoReadGuard<'a, T: ?Sized> {
    lock: &'a CoRwLock<T>,
}

/// Exclusive access to a [`CoRwLock`].
pub struct CoWriteGuard<'a, T: ?Sized> {
    lock: &'a CoRwLock<T>,
}

impl<T: ?Sized> Deref for CoReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a read guard exists only while `readers > 0` and no writer is admitted.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T: ?Sized> Deref for CoWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a write guard is the only guard while it exists.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T: ?Sized> DerefMut for CoWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: a write guard is the only guard while it exists; `&mut self` makes this the
        // only borrow through it.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T: ?Sized> Drop for CoReadGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.release(false);
    }
}

impl<T: ?Sized> Drop for CoWriteGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.release(true);
    }
}

/// Suspends the running coroutine for at least `dur`, letting its thread's loop run meanwhile.
/// A wake from elsewhere ends the sleep early (the timer is then disarmed).
///
/// QEMU: `qemu_co_sleep_ns()`.
pub fn co_sleep(dur: Duration) {
    co_sleep_until(Instant::now() + dur);
}

/// Suspends the running coroutine until `deadline`.
pub fn co_sleep_until(deadline: Instant) {
    let waker = CoWaker::current();
    let timer = AioContext::with_current(|ctx| ctx.timer_new(move || waker.clone().wake()));
    timer.modify(deadline);
    co_yield();
}
