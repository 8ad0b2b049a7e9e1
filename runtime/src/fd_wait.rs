//! A coroutine waits until a file descriptor is readable or writable: the yield on a socket.
//!
//! QEMU: `io/channel.c`, `qio_channel_yield()` (a coroutine yields until its channel's fd
//! handler on the current `AioContext` re-enters it) and `qio_channel_wait()` (the same
//! outside a coroutine, with a private loop). The NBD client (`block/src/nbd/`) reads and
//! writes its non-blocking socket with these: a `recv`/`send` that returns `EAGAIN` becomes a
//! [`co_wait_fd`], and the loop keeps serving other requests meanwhile.
//!
//! ```text
//!   coroutine                      AioContext of its thread
//!   recv() = EAGAIN
//!   co_wait_fd(fd, Readable) ────> fd handler armed for fd (read side)
//!     co_yield ...                 ... poll: fd readable → handler: disarm, wake
//!   recv() again  <─────────────── (entered right there, in the handler)
//! ```
//!
//! The handler is registered on the context of the thread the coroutine runs on, only while
//! someone waits, and removed before the waiter is woken. One waiter per (thread, fd,
//! direction): a reader and a writer of one socket may wait at once on the same thread (the
//! registration carries both handlers), and waiters on other threads register with their own
//! contexts (an fd may sit in several epoll sets or rings at once). Two coroutines of one
//! thread waiting for the same direction of the same fd is a logic error the caller must
//! prevent (the NBD client does so with its send lock and its single reader): it panics.
//!
//! The wait ends when the fd *polls* ready, which includes errors and hang-ups (`POLLERR`,
//! `POLLHUP`): the caller's next syscall reports them. A `shutdown(2)` of a socket therefore
//! wakes every coroutine waiting on it, on every thread — the NBD client's way to cancel.
//! A coroutine woken by something else while it waits here (it must not be) finds its
//! registration withdrawn, so no stale wake-up can follow it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;

use crate::aio::{AioContext, FdHandler};
use crate::coroutine::{co_yield, CoWaker, Running};

/// Which readiness [`co_wait_fd`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdReady {
    /// Data to read, end of file, or an error (`POLLIN`, `POLLRDHUP`, `POLLHUP`, `POLLERR`).
    Readable,
    /// Room to write, or an error (`POLLOUT`, `POLLHUP`, `POLLERR`).
    Writable,
}

/// The waiters of one fd on this thread: `[read, write]`.
type Waiters = [Option<CoWaker>; 2];

thread_local! {
    /// fd → its waiters on this thread's context. An fd is here only while someone waits.
    static WAITING: RefCell<HashMap<RawFd, Waiters>> = RefCell::new(HashMap::new());
}

fn index(dir: FdReady) -> usize {
    match dir {
        FdReady::Readable => 0,
        FdReady::Writable => 1,
    }
}

/// Suspends the running coroutine until `fd` is ready for `dir` (or has an error or hang-up),
/// as seen by this thread's [`AioContext`]. Returns with the fd registered on no context.
/// Panics outside a coroutine, or when another coroutine of this thread already waits for the
/// same direction of `fd`.
///
/// An error means the fd cannot be watched on this thread's event loop (`EBADF`, `EPERM` for
/// a regular file, `ENOMEM`): the coroutine did not wait, and waiting again would fail the
/// same way, so a caller looping on `EAGAIN` must stop and treat the fd as broken rather
/// than spin.
///
/// QEMU: `qio_channel_yield()`.
pub fn co_wait_fd(fd: BorrowedFd<'_>, dir: FdReady) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    let me = CoWaker::current();
    WAITING.with(|w| {
        let mut w = w.borrow_mut();
        let slot = &mut w.entry(raw).or_default()[index(dir)];
        assert!(
            slot.is_none(),
            "two coroutines of one thread wait for fd {raw} to be {dir:?}"
        );
        *slot = Some(me);
    });
    if let Err(e) = rearm(raw) {
        // The fd cannot be watched: do not wait for an event that cannot come.
        log::warn!("cannot wait for fd {raw} on this thread's event loop: {e}");
        take_waiter(raw, dir);
        let _ = rearm(raw);
        return Err(e);
    }
    log::trace!("{}: yields: waits for fd {raw} to be {dir:?}", Running);
    co_yield();
    // Normally the handler already took our waker; if something else woke us, withdraw it so
    // that the handler cannot wake us a second time later.
    if take_waiter(raw, dir).is_some() {
        let _ = rearm(raw);
    }
    Ok(())
}

/// Removes and returns the waiter of `fd` for `dir` on this thread.
fn take_waiter(fd: RawFd, dir: FdReady) -> Option<CoWaker> {
    WAITING.with(|w| {
        let mut w = w.borrow_mut();
        let slots = w.get_mut(&fd)?;
        let waker = slots[index(dir)].take();
        if slots.iter().all(Option::is_none) {
            w.remove(&fd);
        }
        waker
    })
}

/// Registers with this thread's context exactly the handlers `fd` has waiters for (none:
/// the fd is removed from the context).
fn rearm(fd: RawFd) -> std::io::Result<()> {
    let (read, write) = WAITING.with(|w| {
        let w = w.borrow();
        match w.get(&fd) {
            Some(s) => (s[0].is_some(), s[1].is_some()),
            None => (false, false),
        }
    });
    let handler = |dir: FdReady| -> FdHandler { Rc::new(move || ready(fd, dir)) };
    AioContext::with_current(|ctx| {
        ctx.set_fd_handler(
            fd,
            read.then(|| handler(FdReady::Readable)),
            write.then(|| handler(FdReady::Writable)),
        )
    })
}

/// The fd handler: `fd` is ready for `dir`. Withdraws the registration first (the waiter may
/// register again as soon as it runs), then wakes the waiter — which, outside any coroutine
/// as fd handlers run, enters it right here.
fn ready(fd: RawFd, dir: FdReady) {
    let Some(waker) = take_waiter(fd, dir) else {
        return;
    };
    if let Err(e) = rearm(fd) {
        log::warn!("fd {fd}: cannot update its event-loop registration: {e}");
    }
    waker.wake();
}
