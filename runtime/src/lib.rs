//! The QEMU execution model in small: per-thread event loops, stackful coroutines, coroutine
//! locks, a thread pool for blocking work, and iothreads.
//!
//! # A tour
//!
//! Every thread has one [`AioContext`] (QEMU: `AioContext`), an event loop you drive by calling
//! [`AioContext::poll`]. One poll waits for something to happen and runs what became ready:
//!
//! - **fd handlers** — callbacks for readable/writable file descriptors
//!   ([`AioContext::set_fd_handler`]), level-triggered;
//! - **bottom halves** — callbacks deferred to the next round ([`AioContext::bh_new`],
//!   [`AioContext::schedule_oneshot`]); this is how work is handed from one piece of code (or
//!   one thread, via [`RemoteContext`]) to the loop;
//! - **timers** — callbacks at a deadline ([`AioContext::timer_new`]).
//!
//! A **coroutine** ([`Coroutine`], QEMU: `Coroutine`) is a function with its own stack that can
//! stop in the middle ([`co_yield`]) and continue later. Code that would block — waiting for a
//! lock ([`CoMutex`]), a timer ([`co_sleep`]) or a syscall run on the [`ThreadPool`] — yields
//! instead, and whatever completes the wait wakes it ([`CoWaker`]), through the event loop of the
//! thread the coroutine lives on. Coroutines never move between threads.
//!
//! An **async task** ([`spawn_local`], [`executor`]) is the same idea written as a Rust future:
//! instead of a stack that yields, a boxed state machine that returns `Pending`; its
//! `std::task::Waker` schedules it on the same context, through the same bottom halves and
//! remote queue. The coroutine locks, the thread pool and timers have async forms
//! ([`CoMutex::lock_async`], [`ThreadPool::submit_async`], [`executor::sleep`]), and
//! [`block_on`] waits for a future from the main loop. All of the async engine lives in
//! [`executor`] (`runtime/src/executor/`), so a reader of the coroutine engine can skip it:
//!
//! ```
//! use runtime::{block_on, executor, spawn_local, ThreadPool};
//! use std::time::Duration;
//!
//! let answer = block_on(async {
//!     executor::sleep(Duration::from_millis(1)).await; // a timer of this thread's context
//!     let task = spawn_local(async { ThreadPool::global().submit_async(|| 6 * 7).await });
//!     task.await.expect("the task panicked")
//! });
//! assert_eq!(answer, 42);
//! ```
//!
//! A context waits through an **io_uring** when the kernel allows it ([`ring`]; else epoll,
//! [`FdMonitor`]): its fd handlers are polls on the ring, and a coroutine or task can put its own
//! I/O on the same ring ([`uring::co_read`], [`executor::uring::read_owned`]) and be resumed by the
//! completion on its own thread — the yield on I/O without a thread-pool hop.
//!
//! An [`IoThread`] is a thread whose only job is to poll its context; [`wait_while`] blocks the
//! main loop on a condition such as "requests still in flight" (QEMU: `AIO_WAIT_WHILE`).
//!
//! Functions that may yield start with `co_` (QEMU marks them `coroutine_fn`).
//!
//! # Example: a coroutine sleeping on a timer
//!
//! ```
//! use runtime::{co_sleep, AioContext, Coroutine};
//! use std::cell::Cell;
//! use std::rc::Rc;
//! use std::time::{Duration, Instant};
//!
//! let ctx = AioContext::current();
//! let done = Rc::new(Cell::new(false));
//! let flag = done.clone();
//! let start = Instant::now();
//! let co = Coroutine::new(move || {
//!     co_sleep(Duration::from_millis(5)); // yields; the loop below runs the timer
//!     flag.set(true);
//! });
//! co.enter(); // runs until the coroutine yields in co_sleep
//! while !done.get() {
//!     ctx.poll(true); // blocks until the timer fires, which wakes the coroutine
//! }
//! assert!(start.elapsed() >= Duration::from_millis(5));
//! ```
//!
//! # Where things live
//!
//! | module | QEMU | owns |
//! |---|---|---|
//! | [`aio`] | `util/async.c`, `util/aio-posix.c` | `AioContext`, `RemoteContext`, `poll()` |
//! | [`bh`] | `util/async.c` | bottom halves |
//! | [`timer`] | `util/qemu-timer.c` | timers |
//! | [`coroutine`] | `util/qemu-coroutine.c` | coroutines, wakes, the stack pool |
//! | [`lock`] | `util/qemu-coroutine-lock.c` | `CoMutex`, `CoQueue`, `CoRwLock`, `co_sleep` |
//! | [`fd_wait`] | `io/channel.c` `qio_channel_yield()` | `co_wait_fd`: a coroutine yields until a socket is readable/writable |
//! | [`thread_pool`] | `util/thread-pool.c` | `ThreadPool` |
//! | [`iothread`] | `iothread.c` | `IoThread` |
//! | [`affinity`] | none (libfuse `lib/fuse_uring.c` pins its ring threads) | pinning a thread to a CPU; pool workers started by a pinned thread unpinned |
//! | [`aio_wait`] | `util/aio-wait.c` | `wait_while`, `kick` |
//! | [`ring`] | `util/fdmon-io_uring.c`, `aio_add_sqe()` | the io_uring of a context: fd polls, SQEs, completions |
//! | [`uring`] | `block/io_uring.c` | I/O on the thread's ring for coroutines: `co_read` & co. |
//! | `sys` (private) | `util/fdmon-epoll.c` | the epoll and eventfd syscalls (the fallback monitor), CPU affinity |
//! | [`executor`] (`executor/`) | none (the async/await counterpart of `util/qemu-coroutine.c` and of the waits above) | the async engine: tasks, wakers, `block_on`, `sleep`, the coroutine bridge (`task.rs`, `wait.rs`, `bridge.rs`), and the async forms of the locks, the pool and ring I/O (`lock.rs`, `thread_pool.rs`, `uring.rs`: the same names as their coroutine twins) |
//!
//! `docs/runtime.md` at the repository root walks through the same material with diagrams and
//! the measured costs.

pub mod affinity;
pub mod aio;
pub mod aio_wait;
pub mod bh;
pub mod coroutine;
pub mod executor;
pub mod fault;
pub mod fd_wait;
pub mod iothread;
pub mod lock;
pub mod ring;
mod sys;
pub mod thread_pool;
pub mod timer;
pub mod uring;

pub use aio::{
    io_uring_supported, set_fd_monitor, AioContext, FdHandler, FdMonitor, RemoteContext,
};
pub use aio_wait::{kick, wait_while, InFlight, InFlightGuard};
pub use bh::Bh;
pub use coroutine::{
    co_yield, in_coroutine, inject_stack_failures, set_stack_canary, spawn, stack_high_water,
    CoPanic, CoWaker, Coroutine, JoinHandle, PoolConfig, NO_STACK,
};
pub use executor::{
    block_on, co_bridge, spawn_detached, spawn_local, CoMutexLock, CoQueueWait, PoolFuture,
    TaskHandle,
};
pub use fd_wait::{co_wait_fd, FdReady};
pub use iothread::IoThread;
pub use lock::{
    co_sleep, co_sleep_until, CoMutex, CoMutexGuard, CoQueue, CoReadGuard, CoRwLock, CoWriteGuard,
};
pub use thread_pool::{inject_spawn_failures, Lane, ThreadPool};
pub use timer::Timer;

#[doc(hidden)]
pub mod __bench {
    //! Raw syscall wrappers, exposed only for the benchmark that compares them with `polling`.
    pub use crate::sys::{Epoll, Event, EventFd, Interest};
}
