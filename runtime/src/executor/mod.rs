//! The async engine of the runtime: a small executor for Rust futures on the same
//! [`AioContext`](crate::AioContext) that runs the coroutines (spawn a local task, wake it from
//! any thread, `block_on` from the main loop, the bridge from a future to a coroutine), and the
//! async forms of everything a coroutine can wait for: the locks, the thread pool, io_uring
//! requests, timers.
//!
//! QEMU has no counterpart: this is the async/await counterpart of `util/qemu-coroutine.c` on
//! `util/async.c`. Where a coroutine is a stack that a wake *enters*, a task is a boxed future
//! that a wake *polls*; both are woken through the same loop, so the two engines can be compared
//! on equal terms (same `poll()`, same bottom halves, same remote queue, same thread pool).
//!
//! ## One engine per place
//!
//! Everything only the async engine uses lives in this directory, so a reader of the coroutine
//! engine can skip it, and a reader of this one finds each piece next to the name of its twin.
//! What both engines share stays with its owner: the event loop and its remote queue (`aio`),
//! a lock's one FIFO of waiters, coroutines and tasks alike (`lock`), the pool's workers and
//! lanes (`thread_pool`), a context's ring (`ring`). The files here add methods to those types
//! (`CoMutex::lock_async` is defined in `executor/lock.rs`) and the futures they return.
//!
//! | file | coroutine twin | QEMU (what it corresponds to) | owns |
//! |---|---|---|---|
//! | `task.rs` | `coroutine.rs` | `util/qemu-coroutine.c` | the per-thread task table, task wakers, [`spawn_local`], [`spawn_detached`], [`TaskHandle`], [`catch_unwind`] |
//! | `wait.rs` | `aio_wait.rs`, `co_sleep` | `AIO_WAIT_WHILE`, `qemu_co_sleep_ns()` | [`block_on`], [`sleep`], [`sleep_until`], [`yield_now`] |
//! | `bridge.rs` | — | a `co_wrapper` | [`co_bridge`]: a future awaiting `co_` code run in a coroutine |
//! | `lock.rs` | `lock.rs` | `util/qemu-coroutine-lock.c` | [`crate::CoMutex::lock_async`], [`crate::CoQueue::wait_async`], the ticket protocol of task waiters |
//! | `thread_pool.rs` | `thread_pool.rs` | `thread_pool_submit_co()` | [`crate::ThreadPool::submit_async`], [`PoolFuture`] |
//! | [`uring`] | `uring.rs` | `block/io_uring.c` | [`uring::read_owned`] & co.: [`uring::Op`] futures that own their buffer and fd |
//!
//! ## The model
//!
//! - [`spawn_local`] boxes the future into a per-thread task table and **polls it at once**, as
//!   `Coroutine::new(..).enter()` runs a coroutine until its first yield. A task never leaves
//!   the thread that spawned it (its *home*), so the future may be `!Send` (hold `Rc`s, borrow
//!   its own locals across `.await`).
//! - The [`std::task::Waker`] of a task is an `Arc<TaskShared>` (the std [`Wake`](std::task::Wake) trait): the
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
//! The wrappers (`CatchUnwind`, the join of `spawn_local`) are structs with pin projections rather than `async` blocks, because an
//! `async` wrapper stores the wrapped future twice (argument slot and pinned local).

mod bridge;
mod lock;
mod task;
mod thread_pool;
pub mod uring;
mod wait;

pub use bridge::co_bridge;
pub use lock::{CoMutexLock, CoQueueWait};
pub use task::{
    catch_unwind, in_task, live_tasks, spawn_detached, spawn_local, CatchUnwind, TaskHandle,
};
pub use thread_pool::PoolFuture;
pub use wait::{block_on, sleep, sleep_until, yield_now};
