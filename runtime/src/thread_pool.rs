//! A pool of worker threads for blocking work (syscalls that may sleep), with completions
//! delivered back to the submitter's event loop.
//!
//! QEMU: `util/thread-pool.c` (`thread_pool_submit_co`, `thread_pool_submit_aio`, the
//! `worker_thread` loop with its idle timeout, `max_threads`).
//!
//! A coroutine calls [`ThreadPool::submit_co`]; the closure runs on a worker; the worker then
//! wakes the coroutine, which — being a cross-thread wake — is queued on the coroutine's home
//! `AioContext` and entered from that context's next `poll()`. So the result is always consumed on
//! the submitting thread, as QEMU's completion bottom half ensures.
//!
//! Workers are started on demand when no worker is idle, up to `max_threads`, and exit after
//! sitting idle for `idle_timeout` (QEMU: 64 threads, 10 s). Jobs are served FIFO.
//!
//! Differences from QEMU: one pool may serve many contexts (QEMU has one per `AioContext`); the
//! routing back is done by the waker, so the pool needs no per-context state. There is no
//! cancellation: a submitted job always runs.
//!
//! ## Lanes
//!
//! Some jobs gain nothing from running side by side: buffered writes to one regular file all
//! take the file's inode lock for their whole copy, so sixteen of them on sixteen workers are one
//! writing and fifteen spinning or sleeping on the lock, each hand-over a wake-up. A [`Lane`]
//! runs its jobs one at a time, in submission order: the first job of an idle lane starts a
//! worker on it, and that worker takes the lane's next job as soon as one is done, without
//! sleeping, until the lane is empty. Linux's io_uring does the same with its "hashed" work
//! (`io_wq_hash_work()` for buffered writes to one inode). The wake-up of each finished job's
//! submitter is delivered before the next job starts.
//!
//! ## Async tasks
//!
//! A job may also wake an async task (`Wakeup::Task`): the workers, lanes and queue are shared
//! by both engines. The async form, `ThreadPool::submit_async` with its `PoolFuture`, is the
//! async engine's: `executor/thread_pool.rs`.

use std::collections::VecDeque;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::thread;
use std::time::Duration;

use crate::coroutine::{co_yield, CoWaker, Coroutine, Running};

/// Whom a finished job wakes: a coroutine ([`ThreadPool::submit_co`]) or an async task
/// ([`ThreadPool::submit_async`]).
pub(crate) enum Wakeup {
    Co(CoWaker),
    Task(Waker),
}

impl Wakeup {
    /// Wakes the submitter. An async task's waker is foreign code: if it panics, the panic
    /// stops here (logged), so a worker never dies, nor leaves a lane marked busy forever.
    /// That submitter's wake-up is lost, though: it waits on (a bug of the waker's owner).
    fn deliver(self, pool: &str) {
        let wake = AssertUnwindSafe(move || match self {
            Wakeup::Co(co) => co.wake(),
            Wakeup::Task(task) => task.wake(),
        });
        if catch_unwind(wake).is_err() {
            log::error!("thread pool '{pool}': waking a submitter panicked");
        }
    }
}

/// A job returns whom to wake, if anyone, so that the worker can count itself idle *before*
/// the wake: otherwise the woken submitter's next job would find no idle worker and start a
/// needless new one.
pub(crate) type Job = Box<dyn FnOnce() -> Option<Wakeup> + Send>;

struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    /// Workers spawned so far, for thread names.
    spawned: usize,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    cond: Condvar,
    max_threads: usize,
    idle_timeout: Duration,
    name: String,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside this lock and the sections inside it cannot panic halfway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A queue of jobs on a pool that runs them one at a time, in submission order (see "Lanes"
/// above). Clone to share.
#[derive(Clone, Default)]
pub struct Lane {
    inner: Arc<Mutex<LaneState>>,
}

#[derive(Default)]
struct LaneState {
    queue: VecDeque<Job>,
    /// A worker is draining the lane.
    active: bool,
}

impl Lane {
    /// An idle lane; it takes no worker until a job comes.
    pub fn new() -> Lane {
        Lane::default()
    }

    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // Jobs run outside this lock.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the lane's jobs until it is empty (on a worker).
    fn drain(&self, pool: &str) {
        loop {
            let job = {
                let mut st = self.lock();
                match st.queue.pop_front() {
                    Some(job) => job,
                    None => {
                        st.active = false;
                        return;
                    }
                }
            };
            let wakeup = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|_| {
                log::error!("thread pool '{pool}': a job panicked");
                None
            });
            if let Some(w) = wakeup {
                w.deliver(pool);
            }
        }
    }
}

/// A bounded pool of worker threads. Clone to share.
///
/// QEMU: `ThreadPool`.
#[derive(Clone)]
pub struct ThreadPool {
    inner: Arc<Inner>,
}

impl ThreadPool {
    /// A pool of at most `max_threads` workers, each exiting after `idle_timeout` without work.
    pub fn new(name: &str, max_threads: usize, idle_timeout: Duration) -> ThreadPool {
        ThreadPool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    threads: 0,
                    idle: 0,
                    spawned: 0,
                    shutdown: false,
                }),
                cond: Condvar::new(),
                max_threads: max_threads.max(1),
                idle_timeout,
                name: name.to_owned(),
            }),
        }
    }

    /// The process-wide pool (64 workers, 10 s idle timeout, as QEMU's defaults).
    pub fn global() -> &'static ThreadPool {
        static POOL: OnceLock<ThreadPool> = OnceLock::new();
        POOL.get_or_init(|| ThreadPool::new("worker", 64, Duration::from_secs(10)))
    }

    /// Runs `job` on a worker. The building block of the other forms.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        self.push(Box::new(move || {
            job();
            None
        }));
    }

    fn push(&self, job: Job) {
        let mut st = self.inner.lock();
        st.queue.push_back(job);
        if st.idle == 0 && st.threads < self.inner.max_threads {
            st.threads += 1;
            st.spawned += 1;
            let name = format!("{}-{}", self.inner.name, st.spawned);
            drop(st);
            self.spawn_worker(name);
        } else {
            drop(st);
            self.inner.cond.notify_one();
        }
    }

    /// Queues `job` in `lane` (or, without one, in the pool).
    pub(crate) fn push_in(&self, lane: Option<&Lane>, job: Job) {
        let Some(lane) = lane else {
            return self.push(job);
        };
        let mut st = lane.lock();
        st.queue.push_back(job);
        if st.active {
            return; // the draining worker will take it
        }
        st.active = true;
        drop(st);
        let (lane, name) = (lane.clone(), self.inner.name.clone());
        self.push(Box::new(move || {
            lane.drain(&name);
            None
        }));
    }

    #[cold]
    fn spawn_worker(&self, name: String) {
        let inner = self.inner.clone();
        let spawned = if FAIL_SPAWNS.fire() {
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        } else {
            thread::Builder::new()
                .name(name)
                .spawn(move || worker(inner))
                .map(drop)
        };
        if let Err(e) = spawned {
            log::error!(
                "thread pool '{}': cannot start a worker: {e}",
                self.inner.name
            );
            let mut st = self.inner.lock();
            st.threads -= 1;
            if st.threads > 0 {
                return; // the job stays queued; an existing worker will take it
            }
            drop(st);
            self.run_queued_here();
        }
    }

    /// No worker exists and none could be started (out of memory, threads, mappings): runs the
    /// queued jobs on the calling thread, as a worker would, until one exists again. Slow — the
    /// caller's loop blocks for each job — but every job completes; left queued, a job would
    /// wait for a thread that may never come, and its request would hang.
    #[cold]
    fn run_queued_here(&self) {
        log::warn!(
            "thread pool '{}': no worker; running queued jobs on the submitting thread",
            self.inner.name
        );
        loop {
            let job = {
                let mut st = self.inner.lock();
                if st.threads > 0 {
                    return;
                }
                match st.queue.pop_front() {
                    Some(job) => job,
                    None => return,
                }
            };
            // A wake-up of a submitter on this thread is deferred until it yields (`co_wake`
            // and task wakers are messages), so delivering it here is safe.
            let waker = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|_| {
                log::error!("thread pool '{}': a job panicked", self.inner.name);
                None
            });
            if let Some(w) = waker {
                w.deliver(&self.inner.name);
            }
        }
    }

    /// Runs `f` on a worker and yields the calling coroutine until it is done; returns `f`'s
    /// result on the calling thread. A panic in `f` resumes in the caller.
    ///
    /// QEMU: `thread_pool_submit_co()`.
    pub fn submit_co<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.submit_co_in(None, f)
    }

    /// [`ThreadPool::submit_co`], in `lane` if given.
    fn submit_co_in<R: Send + 'static>(
        &self,
        lane: Option<&Lane>,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        let waker = CoWaker::current();
        // Before the push: the worker may finish (and say so) before this coroutine yields.
        let lane_note = if lane.is_some() { " (in a lane)" } else { "" };
        log::trace!("{waker}: yields: job handed to the thread pool{lane_note}");
        let slot: Arc<Mutex<Option<thread::Result<R>>>> = Arc::new(Mutex::new(None));
        let result = slot.clone();
        self.push_in(
            lane,
            Box::new(move || {
                let r = catch_unwind(AssertUnwindSafe(f));
                *result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                log::trace!(
                    "{}: job of {waker} done; waking it on its own thread",
                    thread::current().name().unwrap_or("pool worker")
                );
                Some(Wakeup::Co(waker))
            }),
        );
        loop {
            co_yield();
            if let Some(r) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                log::trace!("{}: woken after its pool job", Running);
                return r.unwrap_or_else(|p| resume_unwind(p));
            }
        }
    }

    /// Like [`ThreadPool::submit_co`], but `f` may borrow from the caller (a buffer on the
    /// coroutine's stack or in its request): the coroutine stays suspended until `f` has run,
    /// so the borrow outlives its use. This is how a block driver hands `&mut [u8]` to `preadv`
    /// on a worker without copying.
    pub fn submit_co_scoped<'a, R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'a) -> R {
        self.submit_co_scoped_in(None, f)
    }

    /// [`ThreadPool::submit_co_scoped`], in `lane` if given: after the lane's earlier jobs,
    /// never beside them.
    pub fn submit_co_scoped_in<'a, R: Send + 'static>(
        &self,
        lane: Option<&Lane>,
        f: impl FnOnce() -> R + Send + 'a,
    ) -> R {
        let job: Box<dyn FnOnce() -> R + Send + 'a> = Box::new(f);
        // SAFETY: we erase the lifetime `'a` so the job can cross to a worker. This function does
        // not return until the job has finished: `submit_co_in` yields until the worker (in the
        // pool or in the lane) stored the result, and loops on spurious wakes. While it waits,
        // the borrows in `f` cannot end: the caller's frame is on this coroutine's stack, which
        // is neither resumed nor freed (a suspended coroutine is never unwound or dropped — see
        // `coroutine`, "leaked at thread exit"). A panic in `f` is caught on the worker and re-raised only after the
        // job is complete. So `f` never outlives what it borrows.
        let job: Box<dyn FnOnce() -> R + Send + 'static> = unsafe { std::mem::transmute(job) };
        self.submit_co_in(lane, job)
    }

    /// Runs `f` on a worker, then `cb(result)` on the calling thread's event loop. The callback
    /// form of [`ThreadPool::submit_co`]; a panic in `f` is logged and `cb` is not called.
    ///
    /// QEMU: `thread_pool_submit_aio()`.
    pub fn submit_cb<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
        cb: impl FnOnce(R) + 'static,
    ) {
        let pool = self.clone();
        // The coroutine is the completion's home: it is woken on this thread. `Coroutine::new`
        // logs a panic of `f` (resumed by `submit_co`) instead of calling `cb`.
        Coroutine::new(move || cb(pool.submit_co(f))).enter();
    }

    /// Lets workers exit as soon as the queue is empty instead of waiting for the idle timeout.
    /// Jobs submitted later still run (on a fresh worker).
    pub fn shutdown(&self) {
        self.inner.lock().shutdown = true;
        self.inner.cond.notify_all();
    }

    /// Workers alive now (for tests and statistics).
    pub fn threads(&self) -> usize {
        self.inner.lock().threads
    }
}

/// Set by [`inject_spawn_failures`].
static FAIL_SPAWNS: crate::fault::FailAfter = crate::fault::FailAfter::new();

/// Test hook: after the next `after` worker threads started (any pool), the following `count`
/// fail to start as if the system had no threads left.
pub fn inject_spawn_failures(after: usize, count: usize) {
    FAIL_SPAWNS.arm(after, count);
}

fn worker(inner: Arc<Inner>) {
    // Started by whichever thread submitted; if that one is pinned to a CPU, do not stay there.
    crate::affinity::unpin_current_thread();
    let mut st = inner.lock();
    loop {
        if let Some(job) = st.queue.pop_front() {
            drop(st);
            // A panicking job must not kill the worker; submit_co reports f's panic itself.
            let waker = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|_| {
                log::error!("thread pool '{}': a job panicked", inner.name);
                None
            });
            st = inner.lock();
            if let Some(w) = waker {
                // Idle from the submitter's point of view while we deliver the completion.
                st.idle += 1;
                drop(st);
                w.deliver(&inner.name);
                st = inner.lock();
                st.idle -= 1;
            }
            continue;
        }
        if st.shutdown {
            break;
        }
        st.idle += 1;
        let (guard, timeout) = inner
            .cond
            .wait_timeout(st, inner.idle_timeout)
            .unwrap_or_else(|e| e.into_inner());
        st = guard;
        st.idle -= 1;
        if timeout.timed_out() && st.queue.is_empty() {
            break;
        }
    }
    st.threads -= 1;
}
