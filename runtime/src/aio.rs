//! `AioContext`: the per-thread event loop — fd handlers, bottom halves, timers — and the `Send`
//! handle other threads use to reach it.
//!
//! QEMU: `util/async.c` (`aio_notify`, `aio_bh_poll`, `aio_co_schedule`) and `util/aio-posix.c`
//! (`aio_set_fd_handler`, `aio_poll`).
//!
//! Every thread has exactly one context, created on first use by [`AioContext::current`]; it is
//! reference-counted but `!Send`, so a handle can never leave its thread:
//!
//! ```compile_fail
//! fn assert_send<T: Send>() {}
//! assert_send::<runtime::AioContext>();
//! ```
//!
//! Other threads talk to a context through a [`RemoteContext`] (`Send + Sync + Clone`), which can
//! only do three things: schedule a one-shot bottom half, wake a coroutine that lives there, and
//! `notify()` the loop out of a blocking poll.
//!
//! ## One `poll()`
//!
//! 1. If `blocking`, announce it (`notify_me = true`), then compute the timeout: zero if a bottom
//!    half or remote work is pending, else until the nearest timer, else forever.
//! 2. `epoll_wait` (one syscall; see [`crate::sys`]). While bottom halves are pending the wait
//!    would not block anyway, so up to 7 rounds in a row skip it; fds are still checked at
//!    least every 8th round.
//! 3. Dispatch ready fd handlers (level-triggered: a handler that does not drain its fd is called
//!    again next round).
//! 4. Run bottom halves scheduled before this step ([`crate::bh`]); ones scheduled meanwhile wait
//!    for the next round.
//! 5. Run expired timers in deadline order ([`crate::timer`]).
//!
//! It returns whether it made progress: a handler, bottom half or timer ran. A wake-up caused only
//! by `notify()` is not progress, as in QEMU, so `while cond() { ctx.poll(true); }` re-checks its
//! condition after every notification without spinning.
//!
//! Differences from QEMU: no adaptive busy-polling (`poll-max-ns`), no `is_external` handlers, and
//! no GSource integration — this context is only ever driven by `poll()`.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bh::{Bh, BhList};
use crate::coroutine::{self, CoWaker};
use crate::sys::{Epoll, Event, EventFd, Interest};
use crate::timer::{Timer, TimerList};

/// A callback for fd readiness. `Fn`, not `FnMut`, so that a handler may safely run a nested
/// `poll()` that dispatches it again; keep state in `Cell`/`RefCell`.
pub type FdHandler = Rc<dyn Fn()>;

struct FdHandlers {
    read: Option<FdHandler>,
    write: Option<FdHandler>,
}

/// Work sent from another thread. Kept in one queue so that its order is preserved.
pub(crate) enum Remote {
    /// A one-shot bottom half (`aio_bh_schedule_oneshot` from another thread).
    Bh(Box<dyn FnOnce() + Send>),
    /// A coroutine to enter (`aio_co_schedule`).
    Wake(CoWaker),
    /// An async task to poll (its waker was woken on another thread).
    Task(Arc<crate::executor::TaskShared>),
    /// Nothing to run, but counts as progress so that `AIO_WAIT_WHILE` loops re-check their
    /// condition (`aio_wait_kick`'s dummy BH).
    Kick,
}

/// The part of a context that other threads may touch.
pub(crate) struct Shared {
    pub(crate) name: String,
    notifier: EventFd,
    /// True while the owner is in, or about to enter, a blocking `epoll_wait`.
    notify_me: AtomicBool,
    /// Cheap "is there remote work?" check, so that a poll does not take the mutex each round.
    remote_pending: AtomicBool,
    remote: Mutex<Vec<Remote>>,
}

impl Shared {
    fn remote_queue(&self) -> MutexGuard<'_, Vec<Remote>> {
        // A panic while holding this lock can only come from `Vec::push` running out of memory;
        // the queue stays consistent, so poisoning carries no information.
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push_remote(&self, work: Remote) {
        self.remote_queue().push(work);
        self.remote_pending.store(true, Ordering::Release);
        self.notify();
    }

    /// QEMU: `aio_notify()`.
    fn notify(&self) {
        // Pairs with the SeqCst fence in `AioContext::poll` after it sets `notify_me`: either the
        // poller sees our `remote_pending` (or whatever the caller changed) and does not block,
        // or we see its `notify_me` and make the eventfd readable. A Dekker handshake — both
        // sides write, fence, then read the other's flag — so a wake-up cannot be lost.
        fence(Ordering::SeqCst);
        if self.notify_me.load(Ordering::Relaxed) {
            self.notifier.set();
        }
    }
}

/// A `Send` handle to another thread's [`AioContext`].
///
/// QEMU lets any thread call `aio_bh_schedule_oneshot`, `aio_co_schedule` and `aio_notify` on
/// any context; this is that subset, and nothing more.
#[derive(Clone)]
pub struct RemoteContext {
    pub(crate) shared: Arc<Shared>,
}

impl RemoteContext {
    /// Runs `f` once on the context's thread, as a bottom half in its next `poll()`.
    ///
    /// QEMU: `aio_bh_schedule_oneshot()`.
    pub fn schedule_oneshot(&self, f: impl FnOnce() + Send + 'static) {
        self.shared.push_remote(Remote::Bh(Box::new(f)));
    }

    /// Wakes the context from a blocking `poll()` (which then returns, made no progress).
    ///
    /// A notification is only a nudge: it carries no data, and the loop may not have started
    /// waiting yet. To hand over work use [`RemoteContext::schedule_oneshot`].
    ///
    /// QEMU: `aio_notify()`.
    pub fn notify(&self) {
        self.shared.notify();
    }

    /// Makes the context's next `poll()` report progress (and wakes it if it blocks).
    pub(crate) fn kick(&self) {
        self.shared.push_remote(Remote::Kick);
    }

    /// The context's name, for logs.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether this is the calling thread's own context.
    pub fn is_current(&self) -> bool {
        is_current(&self.shared)
    }

    /// Whether two handles name the same context.
    pub fn same(&self, other: &RemoteContext) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

pub(crate) struct Inner {
    shared: Arc<Shared>,
    epoll: RefCell<Epoll>,
    /// Spare buffer for `epoll_wait` results (taken during a poll; a nested poll makes its own).
    events: Cell<Vec<Event>>,
    /// Indexed by fd number.
    handlers: RefCell<Vec<Option<Rc<FdHandlers>>>>,
    pub(crate) bhs: BhList,
    pub(crate) timers: TimerList,
    remote_batch: Cell<Vec<Remote>>,
    /// Consecutive polls that skipped `epoll_wait` because bottom halves were pending.
    skipped_waits: Cell<u32>,
}

/// With bottom halves pending, a poll need not ask the kernel about fds every round: it does
/// so at least every this many rounds, so fd handlers wait at most this many rounds of bottom
/// halves. QEMU skips the syscall likewise when polling handlers made progress (`need_wait`).
const MAX_SKIPPED_WAITS: u32 = 7;

/// The event loop of one thread.
///
/// Cloning gives another handle to the same context. QEMU: `AioContext`.
#[derive(Clone)]
pub struct AioContext {
    pub(crate) inner: Rc<Inner>,
}

thread_local! {
    static CURRENT: AioContext = AioContext::new_for_thread();
    /// Identity of this thread's context, or null before it exists. Lets hot paths ask "is this
    /// my context?" without creating one (a thread-pool worker that wakes a coroutine has none).
    static CURRENT_ID: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

/// Whether `shared` belongs to the calling thread's context (false if it has none yet).
pub(crate) fn is_current(shared: &Arc<Shared>) -> bool {
    CURRENT_ID.with(|id| std::ptr::eq(id.get(), Arc::as_ptr(shared)))
}

impl AioContext {
    #[cold]
    fn new_for_thread() -> AioContext {
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        // Failing here means the process is out of file descriptors before its first poll;
        // there is no loop to report the error to, so say what happened and stop.
        let ctx =
            AioContext::new(name).unwrap_or_else(|e| panic!("cannot create an AioContext: {e}"));
        CURRENT_ID.with(|id| id.set(Arc::as_ptr(&ctx.inner.shared)));
        ctx
    }

    fn new(name: String) -> io::Result<AioContext> {
        let epoll = Epoll::new()?;
        let notifier = EventFd::new()?;
        epoll.add(
            notifier.as_raw_fd(),
            Interest {
                readable: true,
                writable: false,
            },
        )?;
        let shared = Arc::new(Shared {
            name,
            notifier,
            notify_me: AtomicBool::new(false),
            remote_pending: AtomicBool::new(false),
            remote: Mutex::new(Vec::new()),
        });
        Ok(AioContext {
            inner: Rc::new(Inner {
                shared,
                epoll: RefCell::new(epoll),
                events: Cell::new(Vec::with_capacity(64)),
                handlers: RefCell::new(Vec::new()),
                bhs: BhList::default(),
                timers: TimerList::default(),
                remote_batch: Cell::new(Vec::new()),
                skipped_waits: Cell::new(0),
            }),
        })
    }

    /// The calling thread's context, created on first use.
    ///
    /// QEMU: `qemu_get_current_aio_context()`.
    pub fn current() -> AioContext {
        CURRENT.with(|c| c.clone())
    }

    /// Runs `f` with the calling thread's context, without cloning the handle.
    pub fn with_current<R>(f: impl FnOnce(&AioContext) -> R) -> R {
        CURRENT.with(f)
    }

    /// A handle other threads can use to reach this context.
    pub fn remote(&self) -> RemoteContext {
        RemoteContext {
            shared: self.inner.shared.clone(),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The context's name (its thread's name when it was created).
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// Registers, replaces or (with both `None`) removes the handlers for `fd`. Handlers are
    /// level-triggered: they are called on every poll while the fd is ready. The caller keeps
    /// `fd` open until it removes the handlers.
    ///
    /// QEMU: `aio_set_fd_handler()`.
    pub fn set_fd_handler(
        &self,
        fd: RawFd,
        read: Option<FdHandler>,
        write: Option<FdHandler>,
    ) -> io::Result<()> {
        let idx = usize::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        let mut handlers = self.inner.handlers.borrow_mut();
        if handlers.len() <= idx {
            handlers.resize(idx + 1, None);
        }
        let interest = Interest {
            readable: read.is_some(),
            writable: write.is_some(),
        };
        let epoll = self.inner.epoll.borrow();
        match (&handlers[idx], read.is_some() || write.is_some()) {
            (None, false) => {}
            (None, true) => epoll.add(fd, interest)?,
            (Some(_), true) => epoll.modify(fd, interest)?,
            (Some(_), false) => epoll.delete(fd)?,
        }
        handlers[idx] =
            (read.is_some() || write.is_some()).then(|| Rc::new(FdHandlers { read, write }));
        Ok(())
    }

    /// Schedules nothing but makes the next `poll()` return; safe from this thread only. From
    /// another thread use [`RemoteContext::notify`].
    pub fn notify(&self) {
        self.inner.shared.notify();
    }

    /// Creates a bottom half: a callback that runs once per [`Bh::schedule`], in the next
    /// `poll()`. Dropping the `Bh` deletes it.
    ///
    /// QEMU: `aio_bh_new()`.
    pub fn bh_new(&self, cb: impl Fn() + 'static) -> Bh {
        self.inner.bhs.new_bh(Rc::new(cb))
    }

    /// Runs `f` once, in the next `poll()`.
    ///
    /// QEMU: `aio_bh_schedule_oneshot()`.
    pub fn schedule_oneshot(&self, f: impl FnOnce() + 'static) {
        self.inner.bhs.schedule_oneshot(Box::new(f));
    }

    /// Creates a disarmed timer on the monotonic clock.
    ///
    /// QEMU: `aio_timer_new()` with `QEMU_CLOCK_REALTIME`.
    pub fn timer_new(&self, cb: impl Fn() + 'static) -> Timer {
        self.inner.timers.new_timer(Rc::new(cb))
    }

    /// Runs one iteration of the event loop; see the module documentation. With `blocking`, waits
    /// until something happens (an fd, a timer, a bottom half, or a `notify()`).
    ///
    /// Returns whether any handler, bottom half or timer ran.
    ///
    /// QEMU: `aio_poll()`.
    pub fn poll(&self, blocking: bool) -> bool {
        let inner = &*self.inner;
        let shared = &*inner.shared;

        // Phase 1: announce a blocking wait, then decide how long it may be.
        if blocking {
            shared.notify_me.store(true, Ordering::Relaxed);
            // Pairs with the fence in `Shared::notify`: after this, any remote work pushed
            // without an eventfd write is visible to the checks below.
            fence(Ordering::SeqCst);
        }
        let work_pending = inner.bhs.has_pending() || shared.remote_pending.load(Ordering::Acquire);
        let timeout = if !blocking || work_pending {
            Some(Duration::ZERO)
        } else {
            inner
                .timers
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()))
        };

        // Phase 2: wait — or, while bottom halves keep coming, skip the syscall for a few rounds.
        let mut events = inner.events.take();
        let skip = work_pending && inner.skipped_waits.get() < MAX_SKIPPED_WAITS;
        let res = if skip {
            inner.skipped_waits.set(inner.skipped_waits.get() + 1);
            Ok(())
        } else {
            inner.skipped_waits.set(0);
            inner.epoll.borrow_mut().wait(timeout, &mut events)
        };
        if blocking {
            shared.notify_me.store(false, Ordering::Relaxed);
        }
        if let Err(e) = res {
            // EBADF/EINVAL on our own epoll fd are programming errors, not outside input.
            panic!("epoll_wait failed on context {}: {e}", shared.name);
        }

        // Phase 3: fd handlers.
        let mut progress = false;
        let notifier = shared.notifier.as_raw_fd();
        for ev in events.drain(..) {
            if ev.fd == notifier {
                shared.notifier.test_and_clear();
                continue;
            }
            progress |= self.dispatch_fd(ev);
        }
        inner.events.set(events);

        // Phase 4: bottom halves, local then remote.
        progress |= inner.bhs.poll();
        progress |= self.poll_remote();

        // Phase 5: timers.
        if !inner.timers.is_empty() {
            progress |= inner.timers.run_expired(Instant::now());
        }
        progress
    }

    fn dispatch_fd(&self, ev: Event) -> bool {
        let handlers = {
            let table = self.inner.handlers.borrow();
            match table.get(ev.fd as usize) {
                Some(Some(h)) => h.clone(),
                _ => return false, // removed by an earlier handler in this round
            }
        };
        let mut progress = false;
        if ev.readable {
            if let Some(read) = &handlers.read {
                read();
                progress = true;
            }
        }
        if ev.writable {
            if let Some(write) = &handlers.write {
                write();
                progress = true;
            }
        }
        progress
    }

    /// Runs work that other threads sent, in the order they sent it.
    fn poll_remote(&self) -> bool {
        let shared = &*self.inner.shared;
        if !shared.remote_pending.swap(false, Ordering::Acquire) {
            return false;
        }
        let mut batch = self.inner.remote_batch.take();
        std::mem::swap(&mut batch, &mut *shared.remote_queue());
        let progress = !batch.is_empty();
        for work in batch.drain(..) {
            match work {
                Remote::Bh(f) => f(),
                Remote::Wake(co) => coroutine::enter_scheduled(co),
                Remote::Task(t) => crate::executor::run_scheduled(t),
                Remote::Kick => {}
            }
        }
        self.inner.remote_batch.set(batch);
        progress
    }
}
