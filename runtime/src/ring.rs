//! The io_uring of one [`crate::AioContext`]: the fd monitor that waits for everything, and the
//! submission queue that coroutines and async tasks put their I/O on.
//!
//! QEMU: `util/fdmon-io_uring.c` (`fdmon_io_uring_setup()`, `add_poll_add_sqe()`,
//! `fdmon_io_uring_wait()`, `process_cqe()`) and `aio_add_sqe()` in `util/aio-posix.c`
//! (QEMU 10.2).
//!
//! ## What goes through the ring
//!
//! - **fd handlers.** Each registered fd has one one-shot `POLL_ADD` in flight. When it
//!   completes, the loop arms a new one and then runs the handler (QEMU's order, so that a
//!   nested `poll()` in a handler still watches the fd); a one-shot poll checks readiness when
//!   it is submitted, so an fd the handler did not drain completes again at once — the
//!   level-triggered behaviour of the epoll monitor. Changing or removing a handler
//!   sends a `POLL_REMOVE`; the completion of a removed poll is recognised by its generation and
//!   ignored.
//! - **The notifier** (the eventfd of `aio_notify()`), armed the same way.
//! - **I/O.** `Ring::submit` takes an SQE and whom to wake ([`Waker`]: a coroutine's or a
//!   task's) and returns a slot number; the completion stores its result in the slot and wakes
//!   the waiter on this thread, during `poll()`. Nothing crosses threads: no eventfd, no thread
//!   pool (the kernel may still use its own io-wq workers, invisibly).
//!
//! SQEs pushed during a round wait in the submission queue and go to the kernel together, in
//! the `io_uring_enter` that also waits for the next completions (one syscall per round). The
//! completion queue is shared memory, so a round that need not wait reads it without a syscall.
//!
//! ## SQE size
//!
//! A ring is set up with 64-byte SQEs unless [`set_ring_sqe128`] asked for 128-byte ones
//! (`IORING_SETUP_SQE128`) before the context was created. Only `IORING_OP_URING_CMD` with an
//! 80-byte command area (FUSE over io_uring) needs the big ones; every other SQE is a 64-byte
//! one copied into the first half of a 128-byte slot. See `docs/fuse-uring.md` for the
//! measurement behind the default.
//!
//! ## Memory an SQE points at
//!
//! The kernel reads or writes a buffer until the completion is posted. A slot therefore keeps
//! whatever must outlive the request (an async task's owned buffer and fd, see
//! `Ring::orphan`) when its waiter went away; a ring dropped with requests in flight (thread
//! exit) leaks those rather than free memory the kernel may still write.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::Waker;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

/// One completion, copied out of the completion queue so that no borrow of the ring is held
/// while handlers and coroutines run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cqe {
    pub user_data: u64,
    pub result: i32,
}

/// What a completion's `user_data` names: the top two bits say which kind.
pub(crate) const TAG_MASK: u64 = 0b11 << 62;
/// An fd handler's poll: generation in bits 32..62, fd in bits 0..32.
pub(crate) const TAG_POLL: u64 = 0b01 << 62;
/// An I/O request: its slot in bits 0..32.
pub(crate) const TAG_IO: u64 = 0b10 << 62;
/// The notifier's poll.
pub(crate) const TAG_NOTIFY: u64 = 0b11 << 62;
/// Completions nobody waits for (a `POLL_REMOVE`'s own).
const UD_IGNORE: u64 = 0;

/// The `user_data` of fd `fd`'s poll of generation `gen`.
pub(crate) fn poll_user_data(fd: RawFd, gen: u32) -> u64 {
    TAG_POLL | (u64::from(gen & 0x3fff_ffff) << 32) | u64::from(fd as u32)
}

/// The fd and generation of a poll's `user_data`.
pub(crate) fn poll_target(user_data: u64) -> (RawFd, u32) {
    (
        user_data as u32 as RawFd,
        ((user_data >> 32) & 0x3fff_ffff) as u32,
    )
}

/// Entries in a new ring's submission queue (the completion queue gets four times as many).
static RING_ENTRIES: AtomicU32 = AtomicU32::new(256);

/// Sets the submission-queue size of rings created from now on (rounded up to a power of two
/// by the kernel). For tests of a full ring.
pub fn set_ring_entries(entries: u32) {
    RING_ENTRIES.store(entries.max(1), Ordering::Relaxed);
}

/// Whether rings created from now on have 128-byte SQEs (see [`set_ring_sqe128`]).
static RING_SQE128: AtomicBool = AtomicBool::new(false);

/// Makes rings created from now on use 128-byte SQEs (`IORING_SETUP_SQE128`), as
/// `IORING_OP_URING_CMD` with an 80-byte command area needs (FUSE over io_uring: the kernel
/// answers `EINVAL` to such a command on a ring of 64-byte SQEs). Contexts that exist already
/// keep their ring. Call it before creating the contexts (iothreads) that will submit them.
pub fn set_ring_sqe128(on: bool) {
    RING_SQE128.store(on, Ordering::Relaxed);
}

/// Whether rings created now get 128-byte SQEs.
pub fn ring_sqe128() -> bool {
    RING_SQE128.load(Ordering::Relaxed)
}

/// Set by [`inject_setup_failure`].
static FAIL_SETUP: crate::fault::FailAfter = crate::fault::FailAfter::new();

/// Test hook: the next `count` ring setups fail with `ENOSYS`, as on a kernel without io_uring,
/// so the contexts created meanwhile fall back to epoll. `0` disarms it.
pub fn inject_setup_failure(count: usize) {
    FAIL_SETUP.arm(0, count);
}

/// Counters of one ring, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// SQEs handed to the kernel.
    pub submitted: u64,
    /// Completions reaped.
    pub completed: u64,
    /// I/O submissions refused because the submission queue stayed full.
    pub full: u64,
}

enum Slot {
    Free,
    /// A request in flight or completed and not yet collected.
    Busy {
        waker: Option<Waker>,
        result: Option<i32>,
        /// What must live until the completion, held here once its owner went away.
        keep: Option<Box<dyn Any>>,
    },
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
}

/// An SQE of either size, as [`Ring::submit`] takes it.
pub(crate) enum AnySqe {
    E64(squeue::Entry),
    E128(squeue::Entry128),
}

impl From<squeue::Entry> for AnySqe {
    fn from(e: squeue::Entry) -> AnySqe {
        AnySqe::E64(e)
    }
}

impl From<squeue::Entry128> for AnySqe {
    fn from(e: squeue::Entry128) -> AnySqe {
        AnySqe::E128(e)
    }
}

impl AnySqe {
    fn user_data(self, ud: u64) -> AnySqe {
        match self {
            AnySqe::E64(e) => AnySqe::E64(e.user_data(ud)),
            AnySqe::E128(e) => AnySqe::E128(e.user_data(ud)),
        }
    }
}

/// The kernel ring with its SQE size as a type (the io-uring crate makes it a type parameter).
enum Uring {
    Sqe64(IoUring),
    Sqe128(IoUring<squeue::Entry128>),
}

/// Runs `$body` with `$u` bound to the `IoUring` of either size.
macro_rules! with_uring {
    ($uring:expr, $u:ident => $body:expr) => {
        match $uring {
            Uring::Sqe64($u) => $body,
            Uring::Sqe128($u) => $body,
        }
    };
}

impl Uring {
    /// Pushes `entry` on the submission queue; `false` if the queue is full or a 128-byte SQE
    /// meets a ring of 64-byte ones.
    ///
    /// # Safety
    ///
    /// Whatever `entry` points at must stay valid until its completion.
    unsafe fn push(&mut self, entry: &AnySqe) -> bool {
        match (self, entry) {
            (Uring::Sqe64(u), AnySqe::E64(e)) => {
                // SAFETY: forwarded from the caller.
                unsafe { u.submission().push(e) }.is_ok()
            }
            (Uring::Sqe64(_), AnySqe::E128(_)) => false,
            (Uring::Sqe128(u), AnySqe::E64(e)) => {
                let big = squeue::Entry128::from(e.clone());
                // SAFETY: forwarded from the caller; the big SQE is the small one padded
                // with zeroes.
                unsafe { u.submission().push(&big) }.is_ok()
            }
            (Uring::Sqe128(u), AnySqe::E128(e)) => {
                // SAFETY: forwarded from the caller.
                unsafe { u.submission().push(e) }.is_ok()
            }
        }
    }

    fn submit(&self) -> io::Result<usize> {
        with_uring!(self, u => u.submit())
    }
}

/// The io_uring instance of one context (owned by its thread: not `Send`).
pub(crate) struct Ring {
    uring: RefCell<Uring>,
    slots: RefCell<Slots>,
    stats: Cell<RingStats>,
    /// Poll SQEs that did not fit in a full submission queue (see [`Ring::arm_poll`]).
    deferred: RefCell<Vec<squeue::Entry>>,
}

impl Ring {
    /// Sets up a ring, or says why not (an old kernel, `kernel.io_uring_disabled`, seccomp,
    /// a kernel without the features this loop needs).
    pub(crate) fn new() -> io::Result<Ring> {
        if FAIL_SETUP.fire() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let entries = RING_ENTRIES.load(Ordering::Relaxed);
        // COOP_TASKRUN + TASKRUN_FLAG (5.19): completions are not forced on us by an
        // interrupt; the kernel flags them and our next `io_uring_enter` (or return to user
        // space) runs them. SINGLE_ISSUER (6.0): only this thread submits, as it is. Older
        // kernels refuse the flags (EINVAL): then a plain ring.
        fn build<S: squeue::EntryMarker>(entries: u32, flags: bool) -> io::Result<IoUring<S>> {
            let mut b = IoUring::<S>::builder();
            b.setup_cqsize(entries.saturating_mul(4)).setup_clamp();
            if flags {
                b.setup_single_issuer()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag();
            }
            b.build(entries)
        }
        fn build_either<S: squeue::EntryMarker>(entries: u32) -> io::Result<IoUring<S>> {
            match build(entries, true) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => build(entries, false),
                r => r,
            }
        }
        let uring = if ring_sqe128() {
            Uring::Sqe128(build_either(entries)?)
        } else {
            Uring::Sqe64(build_either(entries)?)
        };
        let p = with_uring!(&uring, u => u.params().clone());
        // EXT_ARG (5.11): a wait with a timeout needs no timeout SQE. NODROP (5.5): more
        // requests in flight than the completion queue holds are kept, not lost.
        if !p.is_feature_ext_arg() || !p.is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's io_uring lacks EXT_ARG or NODROP (Linux 5.11+ needed)",
            ));
        }
        let mut probe = io_uring::Probe::new();
        with_uring!(&uring, u => u.submitter().register_probe(&mut probe))?;
        for (code, name) in [
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::PollRemove::CODE, "POLL_REMOVE"),
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring has no {name}"),
                ));
            }
        }
        Ok(Ring {
            uring: RefCell::new(uring),
            slots: RefCell::new(Slots::default()),
            stats: Cell::new(RingStats::default()),
            deferred: RefCell::new(Vec::new()),
        })
    }

    /// Whether this ring takes 128-byte SQEs.
    pub(crate) fn is_sqe128(&self) -> bool {
        matches!(*self.uring.borrow(), Uring::Sqe128(_))
    }

    pub(crate) fn stats(&self) -> RingStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut RingStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Puts `entry` on the submission queue; if the queue is full, first hands what it holds
    /// to the kernel. `false` if it stays full (the kernel refused to take SQEs).
    ///
    /// # Safety
    ///
    /// Whatever `entry` points at (buffers, iovecs) must stay valid until its completion.
    unsafe fn push(&self, entry: &AnySqe) -> bool {
        let mut uring = self.uring.borrow_mut();
        if matches!((&*uring, entry), (Uring::Sqe64(_), AnySqe::E128(_))) {
            return false;
        }
        // SAFETY: the caller guarantees the entry's memory outlives the request.
        if unsafe { uring.push(entry) } {
            return true;
        }
        let n = match uring.submit() {
            Ok(n) => n,
            Err(e) => {
                log::debug!("io_uring: submitting a full queue failed: {e}");
                0
            }
        };
        self.count(|s| {
            s.enters += 1;
            s.submitted += n as u64;
        });
        // SAFETY: as above.
        unsafe { uring.push(entry) }
    }

    /// Arms a one-shot poll of `fd` for `events` (`POLLIN`, `POLLOUT`...), completing with
    /// `user_data`. Cannot fail: if the submission queue stays full the SQE waits in
    /// `deferred` and goes first in the next [`Ring::wait`] (a lost poll would be an fd
    /// handler that is never called again).
    pub(crate) fn arm_poll(&self, fd: RawFd, events: u32, user_data: u64) {
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .build()
            .user_data(user_data);
        self.push_or_defer(entry);
    }

    /// Cancels the poll armed with `user_data` (its completion, `-ECANCELED`, is then ignored
    /// by generation). Deferred like [`Ring::arm_poll`] when the queue is full.
    pub(crate) fn disarm_poll(&self, user_data: u64) {
        let entry = opcode::PollRemove::new(user_data)
            .build()
            .user_data(UD_IGNORE);
        self.push_or_defer(entry);
    }

    /// Pushes a poll or poll-remove SQE (they point at no memory), or keeps it for later.
    fn push_or_defer(&self, entry: squeue::Entry) {
        let entry = AnySqe::E64(entry);
        // SAFETY: poll and poll-remove SQEs point at no memory.
        if !unsafe { self.push(&entry) } {
            if let AnySqe::E64(e) = entry {
                self.deferred.borrow_mut().push(e);
            }
        }
    }

    /// Moves deferred poll SQEs into the submission queue, as many as fit.
    fn push_deferred(&self) {
        let mut deferred = self.deferred.borrow_mut();
        if deferred.is_empty() {
            return;
        }
        let mut uring = self.uring.borrow_mut();
        let mut n = 0;
        for e in deferred.iter() {
            // SAFETY: poll and poll-remove SQEs point at no memory.
            if !unsafe { uring.push(&AnySqe::E64(e.clone())) } {
                break;
            }
            n += 1;
        }
        deferred.drain(..n);
    }

    /// Submits an I/O request that wakes `waker` when it completes; returns its slot, or
    /// `None` if the submission queue is full (the caller then does the I/O another way) or
    /// `entry` is a 128-byte SQE and this ring takes 64-byte ones.
    ///
    /// # Safety
    ///
    /// What `entry` points at must stay valid until the slot completes: either the caller
    /// waits for [`Ring::take_result`] (a suspended coroutine is never freed), or it hands
    /// the memory to [`Ring::orphan`] before going away.
    pub(crate) unsafe fn submit(&self, entry: impl Into<AnySqe>, waker: Waker) -> Option<u32> {
        let entry = entry.into();
        if matches!(entry, AnySqe::E128(_)) && !self.is_sqe128() {
            return None;
        }
        let idx = {
            let mut s = self.slots.borrow_mut();
            let busy = Slot::Busy {
                waker: Some(waker),
                result: None,
                keep: None,
            };
            let idx = match s.free.pop() {
                Some(i) => {
                    s.slots[i as usize] = busy;
                    i
                }
                None => {
                    let i = u32::try_from(s.slots.len()).ok()?;
                    s.slots.push(busy);
                    i
                }
            };
            s.in_flight += 1;
            idx
        };
        let entry = entry.user_data(TAG_IO | u64::from(idx));
        // SAFETY: forwarded from the caller.
        if unsafe { self.push(&entry) } {
            return Some(idx);
        }
        self.count(|s| s.full += 1);
        self.release(idx);
        None
    }

    fn release(&self, idx: u32) {
        let mut s = self.slots.borrow_mut();
        s.slots[idx as usize] = Slot::Free;
        s.free.push(idx);
        s.in_flight -= 1;
    }

    /// The result of slot `idx` if it completed (then the slot is free again).
    pub(crate) fn take_result(&self, idx: u32) -> Option<i32> {
        let r = {
            let mut s = self.slots.borrow_mut();
            match &mut s.slots[idx as usize] {
                Slot::Busy { result, .. } => result.take()?,
                Slot::Free => return None,
            }
        };
        self.release(idx);
        Some(r)
    }

    /// Replaces the waker of slot `idx` (an async task polled with another waker).
    pub(crate) fn set_waker(&self, idx: u32, new: &Waker) {
        if let Some(Slot::Busy {
            waker: Some(w),
            result: None,
            ..
        }) = self.slots.borrow_mut().slots.get_mut(idx as usize)
        {
            if !w.will_wake(new) {
                *w = new.clone();
            }
        }
    }

    /// The waiter of slot `idx` went away (a future dropped before its completion): the slot
    /// keeps `keep` — the memory the request uses — and frees both when the completion comes.
    pub(crate) fn orphan(&self, idx: u32, keep: Box<dyn Any>) {
        let done = {
            let mut s = self.slots.borrow_mut();
            match &mut s.slots[idx as usize] {
                Slot::Busy {
                    waker,
                    result,
                    keep: k,
                } => {
                    *waker = None;
                    if result.is_some() {
                        true
                    } else {
                        *k = Some(keep);
                        return;
                    }
                }
                Slot::Free => return,
            }
        };
        if done {
            self.release(idx);
        }
    }

    /// Records the completion of an I/O slot and wakes its waiter (on this thread: a
    /// coroutine is entered at once, a task queued for this round's bottom halves).
    pub(crate) fn complete(&self, user_data: u64, result: i32) {
        let idx = (user_data & 0xffff_ffff) as u32;
        let (waker, orphaned) = {
            let mut s = self.slots.borrow_mut();
            match s.slots.get_mut(idx as usize) {
                Some(Slot::Busy {
                    waker,
                    result: r,
                    keep,
                }) => {
                    *r = Some(result);
                    (waker.take(), keep.take())
                }
                _ => {
                    log::warn!("io_uring: completion for free slot {idx}");
                    return;
                }
            }
        };
        if let Some(keep) = orphaned {
            self.release(idx);
            drop(keep);
        } else if let Some(w) = waker {
            w.wake();
        }
    }

    /// Hands queued SQEs to the kernel and waits up to `timeout` (`None`: forever) for at
    /// least one completion, unless completions are already there; then appends all
    /// completions to `out`. A wait with nothing to submit, no overflowed completions and a
    /// zero timeout makes no syscall. `EINTR`, `ETIME` and `EBUSY` count as "nothing yet".
    pub(crate) fn wait(&self, timeout: Option<Duration>, out: &mut Vec<Cqe>) -> io::Result<()> {
        self.push_deferred();
        let mut uring = self.uring.borrow_mut();
        let before = out.len();
        let entered = with_uring!(&mut *uring, u => enter_and_reap(u, timeout, out))?;
        let n = (out.len() - before) as u64;
        self.count(|s| {
            if let Some(submitted) = entered {
                s.enters += 1;
                s.submitted += submitted as u64;
            }
            s.completed += n;
        });
        Ok(())
    }
}

/// The body of [`Ring::wait`] for either SQE size: `Some(SQEs submitted)` if it entered the
/// kernel.
fn enter_and_reap<S: squeue::EntryMarker>(
    uring: &mut IoUring<S>,
    timeout: Option<Duration>,
    out: &mut Vec<Cqe>,
) -> io::Result<Option<usize>> {
    let ready = !uring.completion().is_empty();
    let queued = uring.submission().len();
    let wait = !ready && timeout != Some(Duration::ZERO);
    // Completions that did not fit in the completion queue wait in the kernel (NODROP)
    // until an `io_uring_enter` with GETEVENTS flushes them; `submit()` sets that flag
    // when the kernel says so. Without this a non-blocking poll would never see them.
    let overflow = uring.submission().cq_overflow();
    // Completions the kernel holds as task work (COOP_TASKRUN) until we enter.
    let taskrun = uring.submission().taskrun();
    let mut entered = None;
    if queued > 0 || wait || overflow || taskrun {
        let res = if !wait {
            uring.submit()
        } else if let Some(t) = timeout {
            let ts = types::Timespec::new()
                .sec(t.as_secs())
                .nsec(t.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            uring.submitter().submit_with_args(1, &args)
        } else {
            uring.submit_and_wait(1)
        };
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY) => 0,
                    // Out of kernel memory for requests: what was queued stays queued and the
                    // next round tries again; pause a little rather than spin on it.
                    Some(libc::EAGAIN | libc::ENOMEM) => {
                        log::debug!("io_uring_enter: {e}; retrying next round");
                        if wait {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        0
                    }
                    // The kernel dropped completions (EBADR, a CQ overflow it could not keep):
                    // their waiters will never be woken. Say so; the loop itself can go on.
                    Some(libc::EBADR) => {
                        log::error!("io_uring: the kernel dropped completions; some requests will never finish");
                        0
                    }
                    _ => return Err(e),
                }
            }
        };
        entered = Some(n);
    }
    out.extend(uring.completion().map(|c| Cqe {
        user_data: c.user_data(),
        result: c.result(),
    }));
    Ok(entered)
}

impl Drop for Ring {
    fn drop(&mut self) {
        let s = self.slots.get_mut();
        if s.in_flight > 0 {
            // The kernel may still write into these requests' memory after the ring's fd is
            // closed (cancellation finishes asynchronously): leak it, as suspended coroutines
            // are leaked at thread exit.
            log::warn!(
                "io_uring: {} request(s) still in flight when the ring closed; leaking their buffers",
                s.in_flight
            );
            std::mem::forget(std::mem::take(&mut s.slots));
        }
    }
}
