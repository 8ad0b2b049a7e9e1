//! Async tasks: the per-thread task table, the waker of a task, spawning ([`spawn_local`],
//! [`spawn_detached`]), a task's result ([`TaskHandle`]) and the panic boundary
//! ([`catch_unwind`]).
//!
//! QEMU: none (the async/await counterpart of `util/qemu-coroutine.c`, whose twin here is
//! `coroutine.rs`; a wake goes through `util/async.c` as `aio_co_wake()` does). See the
//! module documentation of [`crate::executor`] for the model.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::aio::{self, AioContext, Remote, Resume, Shared};
use crate::coroutine::CoPanic;

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
/// [`super::block_on`]'s rule against nested loops).
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

/// Tasks of this thread that are suspended (spawned and not finished), for tests.
pub fn live_tasks() -> usize {
    EXEC.with(|e| {
        let e = e.borrow();
        e.slots.len() - e.free.len()
    })
}
