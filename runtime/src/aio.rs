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
//! 2. Wait for the fd monitor. With io_uring (the default, [`crate::ring`]): one
//!    `io_uring_enter` that also submits the SQEs this round queued (re-armed polls, the I/O of
//!    coroutines and tasks); with nothing to submit and no time to wait, the completion queue
//!    is read without a syscall. With epoll (the fallback, `sys`): one `epoll_wait`;
//!    while bottom halves are pending the wait would not block anyway, so up to 7 rounds in a
//!    row skip it; fds are still checked at least every 8th round.
//! 3. Dispatch ready fd handlers (level-triggered: a handler that does not drain its fd is called
//!    again next round) and, with io_uring, I/O completions — each enters its coroutine or wakes
//!    its task right there, in completion order.
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
use std::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bh::{Bh, BhList};
use crate::ring::{self, Cqe, Ring};
use crate::sys::{Epoll, Event, EventFd, Interest};
use crate::timer::{Timer, TimerList};

/// A callback for fd readiness. `Fn`, not `FnMut`, so that a handler may safely run a nested
/// `poll()` that dispatches it again; keep state in `Cell`/`RefCell`.
pub type FdHandler = Rc<dyn Fn()>;

struct FdHandlers {
    read: Option<FdHandler>,
    write: Option<FdHandler>,
    /// With the io_uring monitor: this registration's generation, and the `user_data` of its
    /// poll in flight (0 while none is armed: between its completion and the re-arm).
    gen: u32,
    armed: Cell<u64>,
}

/// How a context waits for its fds. QEMU: the `FDMonOps` of an `AioContext`.
// One per thread: not boxing the ring saves an indirection on every poll.
#[allow(clippy::large_enum_variant)]
enum Monitor {
    /// `epoll_wait` ([`crate::sys`]); I/O cannot be submitted to the loop.
    Epoll(RefCell<Epoll>),
    /// `io_uring_enter` ([`crate::ring`]): polls for the fds, and I/O of this thread's
    /// coroutines and tasks.
    Ring(Ring),
}

/// Which fd monitor contexts created from now on use; see [`set_fd_monitor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FdMonitor {
    /// io_uring where it works (QEMU's default since 10.2), else epoll with a warning.
    #[default]
    IoUring,
    /// epoll only: every blocking syscall goes to the thread pool.
    Epoll,
}

static FD_MONITOR: AtomicU8 = AtomicU8::new(0);

/// Chooses the fd monitor of contexts created from now on, in every thread (a context that
/// exists keeps its own). Call it before starting threads.
pub fn set_fd_monitor(m: FdMonitor) {
    FD_MONITOR.store(m as u8, Ordering::Relaxed);
}

fn fd_monitor() -> FdMonitor {
    match FD_MONITOR.load(Ordering::Relaxed) {
        0 => FdMonitor::IoUring,
        _ => FdMonitor::Epoll,
    }
}

/// Whether a context created now on this machine gets an io_uring: sets up (and drops) a
/// ring. `Err` says why not.
pub fn io_uring_supported() -> io::Result<()> {
    Ring::new().map(drop)
}

/// What the loop resumes when another thread woke it: a coroutine to enter
/// ([`crate::coroutine`]) or an async task to poll ([`crate::executor`]).
///
/// The loop knows them only through this trait, so the modules layer one way — `aio` below
/// `coroutine` below `executor` below `aio_wait` — instead of naming each other in a cycle.
/// QEMU's `aio_co_schedule()` names `Coroutine` directly; it has only one kind of waiter.
pub(crate) trait Resume: Send + Sync {
    /// Runs it on its home thread, from that context's `poll()`. Its wake-up was already
    /// accounted for by whoever queued it (the `scheduled` flags).
    fn resume(self: Arc<Self>);
}

/// Work sent from another thread. Kept in one queue so that its order is preserved.
pub(crate) enum Remote {
    /// A one-shot bottom half (`aio_bh_schedule_oneshot` from another thread).
    Bh(Box<dyn FnOnce() + Send>),
    /// A coroutine to enter (`aio_co_schedule`) or a task to poll.
    Resume(Arc<dyn Resume>),
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
    monitor: Monitor,
    /// Spare buffer for `epoll_wait` results (taken during a poll; a nested poll makes its own).
    events: Cell<Vec<Event>>,
    /// The same for io_uring completions.
    cqes: Cell<Vec<Cqe>>,
    /// Completions reaped and not yet dispatched (see `poll_ring`).
    pending: RefCell<std::collections::VecDeque<Cqe>>,
    /// Generation of the next fd registration (io_uring monitor).
    next_gen: Cell<u32>,
    /// Indexed by fd number.
    handlers: RefCell<Vec<Option<Rc<FdHandlers>>>>,
    pub(crate) bhs: BhList,
    pub(crate) timers: TimerList,
    remote_batch: Cell<Vec<Remote>>,
    /// Consecutive polls that skipped `epoll_wait` because bottom halves were pending.
    skipped_waits: Cell<u32>,
}

/// `POLL_ADD` events of a read handler (hang-ups and errors are always reported).
const POLL_READ: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;

/// Arms the poll of registration `h` of `fd`.
fn arm(ring: &Ring, fd: RawFd, h: &FdHandlers) {
    let mut events = 0;
    if h.read.is_some() {
        events |= POLL_READ;
    }
    if h.write.is_some() {
        events |= libc::POLLOUT as u32;
    }
    let ud = ring::poll_user_data(fd, h.gen);
    ring.arm_poll(fd, events, ud);
    h.armed.set(ud);
}

/// Says once per process that contexts fall back to epoll, and why.
#[cold]
fn warn_no_ring(e: &io::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::warn!(
            "io_uring is not available ({e}); event loops use epoll and blocking I/O goes to the thread pool"
        )
    });
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

thread_local! {
    /// How many polls of async tasks (or `block_on` futures) run on this thread. Kept here,
    /// below both engines, so that coroutine code can refuse to block inside a task without
    /// naming the executor.
    static TASK_POLLS: Cell<u32> = const { Cell::new(0) };
}

/// Whether the caller runs inside the poll of an async task (or of a `block_on` future).
pub(crate) fn in_task_poll() -> bool {
    TASK_POLLS.with(|p| p.get() > 0)
}

/// Counts a task poll in while it lives ([`crate::executor`] holds one around each poll).
pub(crate) struct TaskPollGuard;

impl TaskPollGuard {
    pub(crate) fn new() -> TaskPollGuard {
        TASK_POLLS.with(|p| p.set(p.get() + 1));
        TaskPollGuard
    }
}

impl Drop for TaskPollGuard {
    fn drop(&mut self) {
        TASK_POLLS.with(|p| p.set(p.get() - 1));
    }
}

/// [`AioContext::with_current`], or `None` during thread exit once the context is gone.
pub(crate) fn try_with_current<R>(f: impl FnOnce(&AioContext) -> R) -> Option<R> {
    CURRENT.try_with(f).ok()
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
        let notifier = EventFd::new()?;
        let monitor = match fd_monitor() {
            FdMonitor::IoUring => match Ring::new() {
                Ok(r) => {
                    r.arm_poll(notifier.as_raw_fd(), POLL_READ, ring::TAG_NOTIFY);
                    Some(Monitor::Ring(r))
                }
                Err(e) => {
                    warn_no_ring(&e);
                    None
                }
            },
            FdMonitor::Epoll => None,
        };
        let monitor = match monitor {
            Some(m) => m,
            None => {
                let epoll = Epoll::new()?;
                epoll.add(
                    notifier.as_raw_fd(),
                    Interest {
                        readable: true,
                        writable: false,
                    },
                )?;
                Monitor::Epoll(RefCell::new(epoll))
            }
        };
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
                monitor,
                events: Cell::new(Vec::with_capacity(64)),
                cqes: Cell::new(Vec::with_capacity(64)),
                pending: RefCell::new(std::collections::VecDeque::with_capacity(64)),
                next_gen: Cell::new(1),
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
        let wanted = read.is_some() || write.is_some();
        match &self.inner.monitor {
            Monitor::Epoll(epoll) => {
                let epoll = epoll.borrow();
                match (&handlers[idx], wanted) {
                    (None, false) => {}
                    (None, true) => epoll.add(fd, interest)?,
                    (Some(_), true) => epoll.modify(fd, interest)?,
                    (Some(_), false) => epoll.delete(fd)?,
                }
            }
            Monitor::Ring(ring) => {
                if let Some(old) = &handlers[idx] {
                    if old.armed.get() != 0 {
                        ring.disarm_poll(old.armed.replace(0));
                    }
                }
            }
        }
        let gen = self.inner.next_gen.get();
        self.inner.next_gen.set(gen.wrapping_add(1));
        handlers[idx] = wanted.then(|| {
            Rc::new(FdHandlers {
                read,
                write,
                gen,
                armed: Cell::new(0),
            })
        });
        if let (Monitor::Ring(ring), Some(h)) = (&self.inner.monitor, &handlers[idx]) {
            arm(ring, fd, h);
        }
        Ok(())
    }

    /// The io_uring of this context, if its monitor is one.
    pub(crate) fn ring(&self) -> Option<&Ring> {
        match &self.inner.monitor {
            Monitor::Ring(r) => Some(r),
            Monitor::Epoll(_) => None,
        }
    }

    /// Whether this context waits through io_uring (and so can take I/O submissions).
    pub fn has_io_uring(&self) -> bool {
        self.ring().is_some()
    }

    /// Counters of this context's ring, if it has one.
    pub fn ring_stats(&self) -> Option<ring::RingStats> {
        self.ring().map(Ring::stats)
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

        if let Monitor::Ring(ring) = &inner.monitor {
            return self.poll_ring(ring, blocking, timeout);
        }

        // Phase 2: wait — or, while bottom halves keep coming, skip the syscall for a few rounds.
        let mut events = inner.events.take();
        let skip = work_pending && inner.skipped_waits.get() < MAX_SKIPPED_WAITS;
        let res = if skip {
            inner.skipped_waits.set(inner.skipped_waits.get() + 1);
            Ok(())
        } else {
            inner.skipped_waits.set(0);
            match &inner.monitor {
                Monitor::Epoll(epoll) => epoll.borrow_mut().wait(timeout, &mut events),
                Monitor::Ring(_) => unreachable!("a ring context polls in poll_ring"),
            }
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

        progress | self.poll_bhs_and_timers()
    }

    /// Phases 4 and 5 of a poll.
    fn poll_bhs_and_timers(&self) -> bool {
        let inner = &*self.inner;
        // Phase 4: bottom halves, local then remote.
        let mut progress = inner.bhs.poll();
        progress |= self.poll_remote();

        // Phase 5: timers.
        if !inner.timers.is_empty() {
            progress |= inner.timers.run_expired(Instant::now());
        }
        progress
    }

    /// Phases 2 to 5 with the io_uring monitor: one `io_uring_enter` submits what this round
    /// queued and waits; then fd handlers and I/O completions run in completion order.
    ///
    /// Completions wait in `Inner::pending` and are taken one at a time, and a poll is re-armed
    /// *before* its handler runs (as QEMU's `process_cqe()` does): a handler or a coroutine
    /// that runs a nested `poll()` (a `wait_while` inside a handler) then sees the rest of the
    /// batch and every fd still armed, instead of waiting for completions an outer loop holds.
    fn poll_ring(&self, ring: &Ring, blocking: bool, timeout: Option<Duration>) -> bool {
        let inner = &*self.inner;
        let shared = &*inner.shared;
        let mut fresh = inner.cqes.take();
        let timeout = if inner.pending.borrow().is_empty() {
            timeout
        } else {
            Some(Duration::ZERO) // an outer poll left completions: run them, do not sleep
        };
        let res = ring.wait(timeout, &mut fresh);
        if blocking {
            shared.notify_me.store(false, Ordering::Relaxed);
        }
        if let Err(e) = res {
            // `wait` absorbs the transient errors (EINTR, ETIME, EBUSY, EAGAIN, ENOMEM); what is
            // left (EBADF, EFAULT, EINVAL on our own ring) means the ring itself is broken.
            panic!("io_uring_enter failed on context {}: {e}", shared.name);
        }
        inner.pending.borrow_mut().extend(fresh.drain(..));
        inner.cqes.set(fresh);
        let mut progress = false;
        loop {
            let Some(cqe) = inner.pending.borrow_mut().pop_front() else {
                break;
            };
            match cqe.user_data & ring::TAG_MASK {
                ring::TAG_IO => {
                    ring.complete(cqe.user_data, cqe.result);
                    progress = true;
                }
                ring::TAG_POLL => progress |= self.dispatch_poll(ring, cqe),
                ring::TAG_NOTIFY => {
                    ring.arm_poll(shared.notifier.as_raw_fd(), POLL_READ, ring::TAG_NOTIFY);
                    shared.notifier.test_and_clear();
                }
                _ => {} // a POLL_REMOVE's own completion
            }
        }
        progress | self.poll_bhs_and_timers()
    }

    /// A poll completed: arm the next one (level-triggered: it completes at once if the fd is
    /// still ready), then run the fd's handlers.
    fn dispatch_poll(&self, ring: &Ring, cqe: Cqe) -> bool {
        let (fd, gen) = ring::poll_target(cqe.user_data);
        let handlers = {
            let table = self.inner.handlers.borrow();
            match table.get(fd as usize) {
                Some(Some(h)) if h.gen & 0x3fff_ffff == gen => h.clone(),
                _ => return false, // a poll of a removed or replaced registration
            }
        };
        if handlers.armed.get() != cqe.user_data {
            return false; // cancelled (its -ECANCELED) or already re-armed
        }
        handlers.armed.set(0);
        let (readable, writable) = if cqe.result < 0 {
            // The fd cannot be polled (EBADF: closed without removing its handler; EINVAL):
            // run the handlers once so they see the error from their own syscalls, and stop
            // polling it — re-arming would fail the same way every round.
            log::warn!(
                "context {}: polling fd {fd} failed ({}); its handlers stop being called",
                self.inner.shared.name,
                io::Error::from_raw_os_error(-cqe.result)
            );
            (true, true)
        } else {
            arm(ring, fd, &handlers);
            let ev = cqe.result as u32 as i16;
            let err = ev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
            (
                err || ev & (libc::POLLIN | libc::POLLRDHUP) != 0,
                err || ev & libc::POLLOUT != 0,
            )
        };
        self.dispatch_fd(Event {
            fd,
            readable,
            writable,
        })
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
                Remote::Resume(r) => r.resume(),
                Remote::Kick => {}
            }
        }
        self.inner.remote_batch.set(batch);
        progress
    }
}
