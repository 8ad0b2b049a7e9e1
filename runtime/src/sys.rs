//! The raw epoll and eventfd syscalls of `runtime` (the io_uring ones go through the `io-uring`
//! crate, in [`crate::ring`] and [`crate::uring`]).
//!
//! QEMU: `util/fdmon-epoll.c` (epoll backend of the fd monitor) and `util/event_notifier-posix.c`
//! (the eventfd behind `aio_notify()`).
//!
//! Why not the `polling` crate: on every wait `polling` re-arms a timerfd (`timerfd_settime`) for
//! the timeout, re-arms its own notifier and the timerfd with `epoll_ctl`, and reads its notifier;
//! in its default one-shot mode each ready source costs another `epoll_ctl` to re-arm. Measured
//! here (`runtime/examples/poll_syscalls.sh`): 5 to 7 syscalls per wait. An AioContext wants
//! level-triggered, persistently registered fds and a plain `epoll_wait` timeout, so a `poll()`
//! is one `epoll_wait`, plus one `read` of the eventfd when another thread woke it.
//! `docs/runtime.md` gives the figures.
//!
//! Timeouts have millisecond resolution (rounded up); `epoll_pwait2` would give nanoseconds, but
//! nothing here needs sub-millisecond timers yet.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Readiness interest or result for one fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub readable: bool,
    pub writable: bool,
}

impl Interest {
    fn to_epoll(self) -> u32 {
        let mut ev = 0;
        if self.readable {
            ev |= libc::EPOLLIN | libc::EPOLLRDHUP;
        }
        if self.writable {
            ev |= libc::EPOLLOUT;
        }
        ev as u32
    }
}

/// One ready fd, as returned by [`Epoll::wait`].
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub fd: RawFd,
    /// Readable, or hung up / in error (a read handler then sees the error from `read`).
    pub readable: bool,
    /// Writable, or in error.
    pub writable: bool,
}

/// A level-triggered epoll instance.
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; we check the result before wrapping it.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let empty = libc::epoll_event { events: 0, u64: 0 };
        Ok(Epoll {
            fd,
            events: vec![empty; 64],
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: Interest) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: interest.to_epoll(),
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; the kernel copies it.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Starts watching `fd` (which the caller keeps open until [`Epoll::delete`]).
    pub fn add(&self, fd: RawFd, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, interest)
    }

    pub fn modify(&self, fd: RawFd, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, interest)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, Interest::default())
    }

    /// Waits for readiness. `None` blocks forever, `Some(ZERO)` does not block. A timeout is
    /// rounded *up* to whole milliseconds so that timers never fire early. `EINTR` is reported as
    /// zero events. Ready events are appended to `out`.
    pub fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        let ms: libc::c_int = match timeout {
            None => -1,
            Some(t) => {
                let ms = t.as_nanos().div_ceil(1_000_000);
                ms.min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: `events` is a live buffer of `len` epoll_event entries the kernel may fill.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                ms,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(err)
            };
        }
        let err_bits = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        for ev in &self.events[..n as usize] {
            let bits = ev.events;
            out.push(Event {
                fd: ev.u64 as RawFd,
                readable: bits & ((libc::EPOLLIN | libc::EPOLLRDHUP) as u32 | err_bits) != 0,
                writable: bits & (libc::EPOLLOUT as u32 | err_bits) != 0,
            });
        }
        Ok(())
    }
}

/// An eventfd used as a counter-less wake-up flag (QEMU's `EventNotifier`).
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked before wrapping.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Makes the fd readable. Never blocks (a full counter already means "readable").
    pub fn set(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64, as eventfd requires.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the fd to not readable; returns whether it was set.
    pub fn test_and_clear(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64, as eventfd requires.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        r == 8
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

// ---------------------------------------------------------------------------------------
// CPU affinity
// ---------------------------------------------------------------------------------------

/// The CPUs the calling thread may run on (`sched_getaffinity(0)`).
pub(crate) fn thread_affinity() -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

/// Lets the calling thread run on the CPUs of `set` only (`sched_setaffinity(0)`).
pub(crate) fn set_thread_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The set holding CPU `cpu` alone; `EINVAL` past `CPU_SETSIZE`.
pub(crate) fn single_cpu(cpu: usize) -> io::Result<libc::cpu_set_t> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    Ok(set)
}
