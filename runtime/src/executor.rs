//! A small executor for Rust futures on the same [`AioContext`] that runs the coroutines:
//! spawn a local task, wake it from any thread, `block_on` from the main loop, and the bridge
//! from a future to a coroutine.
//!
//! QEMU has no counterpart: this is the async/await counterpart of `util/qemu-coroutine.c` on
//! `util/async.c`. Where a coroutine is a stack that a wake *enters*, a task is a boxed future
//! that a wake *polls*; both are woken through the same loop, so the two engines can be compared
//! on equal terms (same `poll()`, same bottom halves, same remote queue, same thread pool).
//!
//! ## The model
//!
//! - [`spawn_local`] boxes the future into a per-thread task table and **polls it at once**, as
//!   `Coroutine::new(..).enter()` runs a coroutine until its first yield. A task never leaves
//!   the thread that spawned it (its *home*), so the future may be `!Send` (hold `Rc`s, borrow
//!   its own locals across `.await`).
//! - The [`std::task::Waker`] of a task is an `Arc<TaskShared>` (the std [`Wake`] trait): the
//!   task's slot number, its home context, and a `scheduled` flag so that any number of wakes
//!   before the next poll queue it once. Waking never allocates:
//!   - from the home thread: push the `Arc` on the thread's ready queue and, if none is pending,
//!     schedule one bottom half that polls the ready tasks (no syscall);
//!   - from another thread: push it on the home context's remote queue and `notify()` the loop
//!     (the same path as [`crate::CoWaker::wake`], QEMU's `aio_co_schedule`).
//! - **A task is never cancelled.** There is no abort: the table owns the future and polls it
//!   until it returns; dropping a [`TaskHandle`] only detaches it. Request handlers rely on
//!   this (a FUSE request always gets its reply), as coroutines are never unwound. Suspended
//!   tasks left at thread exit are leaked with a warning, like suspended coroutines.
//! - **Panics** are caught at the task boundary: a [`TaskHandle`] yields `Err(CoPanic)`
//!   ([`catch_unwind`]), a detached task's panic is caught around its poll and logged. A panic
//!   never unwinds into the event loop.
//!
//! ## Borrowing across threads
//!
//! A coroutine may lend a borrowed buffer to a worker thread
//! ([`crate::ThreadPool::submit_co_scoped`]) because a suspended coroutine is never freed. A
//! future can be dropped — or `mem::forget`-ten — at any `.await`, so the same trick would be
//! unsound. The async forms therefore move **owned** data: [`crate::ThreadPool::submit_async`]
//! and [`co_bridge`] take `'static` closures, and callers that hold a borrowed buffer copy
//! through an owned one. That copy is the price of cancellation safety; `docs/comparison.md`
//! measures it.
//!
//! ## Costs per task
//!
//! One heap allocation for the boxed future (exactly its size for [`spawn_detached`]); the
//! `Arc<TaskShared>` of a finished task is reused when no waker of it survives (as coroutine
//! slots are). Polling clones the waker once (one atomic increment). Nothing else allocates.
//! The wrappers here are structs with pin projections rather than `async` blocks, because an
//! `async` wrapper stores the wrapped future twice (argument slot and pinned local).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use crate::aio::{self, AioContext, Remote, RemoteContext, Resume, Shared};
use crate::coroutine::{CoPanic, Coroutine};

type BoxFuture = Pin<Box<dyn Future<Output = ()>>>;

/// The part of a task that wakers (on any thread) hold.
pub(crate) struct TaskShared {
    home: Arc<Shared>,
    /// Index into the home thread's task table.
    slot: u32,
    /// A wake is queued and not yet consumed by a poll. Cleared (Acquire) right before each
    /// poll, set (AcqRel) by a wake: a wake that comes while the poll runs queues the task
    /// again, and whatever the waker wrote before waking is visible to the next poll.
    scheduled: AtomicBool,
}

impl Wake for TaskShared {
    fn wake(self: Arc<Self>) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            deliver(self);
        }
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            deliver(self.clone());
        }
    }
}

/// Queues a woken task on its home thread.
fn deliver(task: Arc<TaskShared>) {
    if aio::is_current(&task.home) {
        push_ready(task);
    } else {
        let home = task.home.clone();
        home.push_remote(Remote::Resume(task));
    }
}

struct Slot {
    shared: Arc<TaskShared>,
    /// `None` while the task is being polled, and once it has finished.
    future: Option<BoxFuture>,
}

/// The per-thread task table. Borrowed only briefly, never across a poll.
#[derive(Default)]
struct Executor {
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: VecDeque<Arc<TaskShared>>,
    /// A bottom half that runs the ready queue is scheduled.
    bh_pending: bool,
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Thread exit: suspended tasks are leaked, not dropped (see the module doc).
        let suspended: Vec<BoxFuture> = self
            .slots
            .iter_mut()
            .filter_map(|s| s.future.take())
            .collect();
        if !suspended.is_empty() {
            log::warn!(
                "{} async task(s) still suspended at thread exit; leaking them",
                suspended.len()
            );
            std::mem::forget(suspended);
        }
    }
}

thread_local! {
    static EXEC: RefCell<Executor> = RefCell::new(Executor::default());
}

/// Whether the caller runs inside the poll of a task (or of a `block_on` future).
pub fn in_task() -> bool {
    aio::in_task_poll()
}

use aio::TaskPollGuard as PollingGuard;

fn push_ready(task: Arc<TaskShared>) {
    // `try_with`: a wake during thread exit (a destructor waking a task of this thread) finds
    // the table gone; the task is leaked with the others then.
    let schedule = EXEC.try_with(|e| {
        let mut e = e.borrow_mut();
        e.ready.push_back(task);
        !std::mem::replace(&mut e.bh_pending, true)
    });
    if schedule == Ok(true) {
        // `run_ready` is a function item, so the box holds nothing and does not allocate.
        AioContext::with_current(|ctx| ctx.schedule_oneshot(run_ready));
    }
}

/// The bottom half: polls the tasks that were ready when it started; tasks woken meanwhile
/// wait for the next round (the bottom-half rule, so a task that wakes itself cannot starve
/// fd handlers).
fn run_ready() {
    let n = EXEC.with(|e| {
        let mut e = e.borrow_mut();
        e.bh_pending = false;
        e.ready.len()
    });
    for _ in 0..n {
        let Some(task) = EXEC.with(|e| e.borrow_mut().ready.pop_front()) else {
            break;
        };
        run_task(&task);
    }
}

impl Resume for TaskShared {
    /// A task whose wake came through its home context's remote queue: poll it.
    fn resume(self: Arc<Self>) {
        run_task(&self);
    }
}

/// Polls a task once, unless it finished (a stale wake) or is being polled (impossible: see
/// [`block_on`]'s rule against nested loops).
fn run_task(task: &Arc<TaskShared>) {
    let slot = task.slot as usize;
    let future = EXEC.with(|e| {
        let mut e = e.borrow_mut();
        let s = e.slots.get_mut(slot)?;
        if !Arc::ptr_eq(&s.shared, task) {
            return None;
        }
        s.future.take()
    });
    let Some(mut future) = future else {
        return;
    };
    // Pairs with the AcqRel swap of a waker: what it wrote before waking is visible here, and
    // a wake from now on queues the task again.
    task.scheduled.swap(false, Ordering::AcqRel);
    let waker = Waker::from(task.clone());
    let done = {
        let _polling = PollingGuard::new();
        let mut cx = Context::from_waker(&waker);
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
            Ok(p) => p.is_ready(),
            Err(p) => {
                // A detached task panicked (a `spawn_local` one reports to its handle): it is
                // over; the loop goes on.
                log::error!("async task panicked: {}", CoPanic::from_payload(p).message);
                true
            }
        }
    };
    if done {
        EXEC.with(|e| e.borrow_mut().free.push(task.slot));
        drop(future); // outside the borrow: its destructor may wake or spawn
    } else {
        EXEC.with(|e| e.borrow_mut().slots[slot].future = Some(future));
    }
}

/// Puts a future in a free slot and polls it once.
fn spawn_boxed(future: BoxFuture) {
    let home = AioContext::with_current(|ctx| ctx.shared().clone());
    let task = EXEC.with(|e| {
        let mut e = e.borrow_mut();
        match e.free.pop() {
            Some(i) => {
                let s = &mut e.slots[i as usize];
                // Reuse the shared block when no stale waker can still observe it.
                if Arc::strong_count(&s.shared) == 1 && Arc::ptr_eq(&s.shared.home, &home) {
                    s.shared.scheduled.store(false, Ordering::Relaxed);
                } else {
                    s.shared = Arc::new(TaskShared {
                        home,
                        slot: i,
                        scheduled: AtomicBool::new(false),
                    });
                }
                s.future = Some(future);
                s.shared.clone()
            }
            None => {
                let Ok(i) = u32::try_from(e.slots.len()) else {
                    panic!("more than 4 billion tasks on one thread");
                };
                let shared = Arc::new(TaskShared {
                    home,
                    slot: i,
                    scheduled: AtomicBool::new(false),
                });
                e.slots.push(Slot {
                    shared: shared.clone(),
                    future: Some(future),
                });
                shared
            }
        }
    });
    run_task(&task);
}

/// Polls `fut`, turning a panic into `Err(CoPanic)`. Do not poll it again after that.
///
/// A struct, not an `async fn`: an `async fn` would keep its argument and the pinned local it
/// moves into as two slots, doubling the size of every future it wraps.
pub fn catch_unwind<F: Future>(fut: F) -> CatchUnwind<F> {
    CatchUnwind { fut }
}

/// The future of [`catch_unwind`].
pub struct CatchUnwind<F> {
    fut: F,
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, CoPanic>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of the only field. `fut` is never moved out of a
        // `CatchUnwind` (no method takes it by value, there is no `Drop` impl, and `Unpin` is
        // only auto-derived from `F: Unpin`), so pinning the wrapper pins the future.
        let fut = unsafe { self.map_unchecked_mut(|s| &mut s.fut) };
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(CoPanic::from_payload(p))),
        }
    }
}

/// Runs `fut` as a task of this thread, polled at once until its first `Pending`; a panic is
/// logged. The cheapest form: one allocation, of exactly `size_of_val(&fut)` bytes.
pub fn spawn_detached(fut: impl Future<Output = ()> + 'static) {
    spawn_boxed(Box::pin(fut));
}

struct JoinState<T> {
    result: RefCell<Option<Result<T, CoPanic>>>,
    waiter: Cell<Option<Waker>>,
}

/// The result of a task started with [`spawn_local`]. Await it, or poll [`TaskHandle::is_finished`].
/// Dropping it detaches the task, which still runs to completion.
pub struct TaskHandle<T> {
    state: Rc<JoinState<T>>,
}

/// The boxed future of a [`spawn_local`] task: the user's future, then the hand-over of its
/// result (or panic) to the handle.
struct Joined<F: Future> {
    fut: CatchUnwind<F>,
    state: Rc<JoinState<F::Output>>,
}

impl<F: Future> Future for Joined<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: structural pinning of `fut` only (as in `CatchUnwind`: never moved out, no
        // `Drop` impl); `state` is not pinned and only read through a shared reference.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: `this` came from a pinned reference and `fut` is never moved (see above).
        let fut = unsafe { Pin::new_unchecked(&mut this.fut) };
        let r = match fut.poll(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => return Poll::Pending,
        };
        *this.state.result.borrow_mut() = Some(r);
        if let Some(w) = this.state.waiter.take() {
            w.wake();
        }
        Poll::Ready(())
    }
}

/// Runs `fut` as a task of this thread (polled at once until its first `Pending`) and returns a
/// handle to its output. A panic becomes `Err(CoPanic)` for the handle.
///
/// The async counterpart of [`crate::spawn`].
pub fn spawn_local<F: Future + 'static>(fut: F) -> TaskHandle<F::Output> {
    let state = Rc::new(JoinState {
        result: RefCell::new(None),
        waiter: Cell::new(None),
    });
    spawn_boxed(Box::pin(Joined {
        fut: catch_unwind(fut),
        state: state.clone(),
    }));
    TaskHandle { state }
}

impl<T> TaskHandle<T> {
    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.state.result.borrow().is_some()
    }

    /// The result if the task has finished, else the handle back.
    pub fn try_join(self) -> Result<Result<T, CoPanic>, TaskHandle<T>> {
        let r = self.state.result.borrow_mut().take();
        r.ok_or(self)
    }
}

impl<T> Future for TaskHandle<T> {
    type Output = Result<T, CoPanic>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(r) = self.state.result.borrow_mut().take() {
            return Poll::Ready(r);
        }
        self.state.waiter.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

impl<T> fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

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
            let _polling = PollingGuard::new();
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

struct BridgeState<R> {
    result: RefCell<Option<thread::Result<R>>>,
    waiter: Cell<Option<Waker>>,
}

/// Runs `f` in a coroutine of this thread (entered at once) and waits for it: the bridge that
/// lets a future call code written for coroutines (`co_` functions). `f` owns what it uses;
/// if the future is dropped early the coroutine still finishes and its result is discarded.
/// A panic in `f` resumes in the awaiting task. If no coroutine stack can be had, this panics
/// with a message starting with [`crate::coroutine::NO_STACK`].
///
/// Costs: a coroutine (pooled stack) and a shared cell per call.
pub async fn co_bridge<R: 'static>(f: impl FnOnce() -> R + 'static) -> R {
    let state = Rc::new(BridgeState {
        result: RefCell::new(None),
        waiter: Cell::new(None),
    });
    let s = state.clone();
    let co = Coroutine::try_new(move || {
        let r = std::panic::catch_unwind(AssertUnwindSafe(f));
        *s.result.borrow_mut() = Some(r);
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
    });
    match co {
        Ok(co) => co.enter(),
        // A panic, not an abort: the caller's task catches it (the FUSE queue replies ENOMEM).
        Err(e) => panic!("{}: {e}", crate::coroutine::NO_STACK),
    }
    let r = poll_fn(|cx| {
        if let Some(r) = state.result.borrow_mut().take() {
            return Poll::Ready(r);
        }
        state.waiter.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await;
    r.unwrap_or_else(|p| resume_unwind(p))
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

/// Tasks of this thread that are suspended (spawned and not finished), for tests.
pub fn live_tasks() -> usize {
    EXEC.with(|e| {
        let e = e.borrow();
        e.slots.len() - e.free.len()
    })
}
