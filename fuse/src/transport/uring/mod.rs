//! The io_uring transport (`--transport uring`, FUSE over io_uring, Linux 6.14+, protocol
//! 7.42): requests arrive in *ring entries* the kernel fills, and replies leave from the same
//! entries, through the io_uring of each queue thread's `AioContext` — the ring that already
//! waits for that thread's fds and carries its disk I/O. No `read(2)` or `writev(2)` per
//! request: one command per request, COMMIT_AND_FETCH, hands the reply to the kernel and waits
//! for the entry's next request.
//!
//! The life of the transport (kernel facts with the kernel functions behind them, and
//! measurements, in `docs/fuse-uring.md`):
//!
//! 1. **Before INIT.** The server asks for rings of 128-byte SQEs before any context exists
//!    (`runtime::ring::set_ring_sqe128`), offers `FUSE_OVER_IO_URING` in INIT, and plans on
//!    every queue thread which kernel queues it serves ([`UringQueue::prepare_here`]): the
//!    kernel has one queue per possible CPU and sends a request to the queue of the CPU its
//!    caller runs on; kernel queue `q` goes to queue thread `q % threads`.
//! 2. **INIT** is read and answered on `/dev/fuse` as always (`transport::dev`). If the kernel
//!    granted the flag, the reply's sender runs the session's after-INIT hook, which starts
//!    every planned queue on its own thread ([`UringQueue::start_here`]): N entries per kernel
//!    queue, each one coroutine (or task) that REGISTERs it and then loops. The kernel switches
//!    to the ring only once *every* queue has an entry; until then callers wait in the kernel.
//! 3. **Each request**: the command completes with a request in the entry → count it in flight
//!    → [`crate::session::Session::co_serve`] (parse, the export, the same code as for
//!    `/dev/fuse`) → write the reply into the entry → COMMIT_AND_FETCH, which yields until the
//!    next request. A request that arrives after the export started stopping is answered
//!    ENOTCONN unserved.
//! 4. **Still on `/dev/fuse`**: FORGET, INTERRUPT and notifications — the `/dev/fuse` queues
//!    keep reading — and everything, if the kernel refuses a REGISTER (it then drops the ring
//!    for the whole connection and serves over `/dev/fuse`: the fallback needs nothing from us
//!    but a warning).
//! 5. **Teardown**: unmounting (ours or from outside) ends every pending command with
//!    `ENOTCONN`; the entry coroutines return and the server waits for them before it stops
//!    the threads. A queue thread must never leave while the session lives: the kernel would
//!    keep sending that CPU's requests to entries nobody serves.
//!
//! QEMU: none (its export uses `/dev/fuse` only; Brian Song's unmerged series adds this).
//! libfuse: `lib/fuse_uring.c`. Kernel: `fs/fuse/dev_uring.c`.

mod entry;

pub use entry::*;

use std::cell::RefCell;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use runtime::Coroutine;

use crate::export::Response;
use crate::session::{self, Engine, Session, SessionState};

/// Entries per kernel queue by default (`--uring-entries`): see `docs/fuse-uring.md` for the
/// measurement behind it.
pub const DEFAULT_ENTRIES: usize = 16;

/// One queue thread's part of the ring transport: the kernel queues it serves and their
/// entries.
pub struct UringQueue {
    /// The queue thread's number (for logs and the `served` counters).
    index: usize,
    /// A `/dev/fuse` fd of the session (any fd of the connection takes the commands).
    fd: OwnedFd,
    session: Arc<Session>,
    /// Kernel queues (CPU numbers) this thread serves.
    qids: Vec<u16>,
    /// Entries registered on each of them.
    entries: usize,
    /// Payload buffer size instead of the kernel's minimum (a test hook: a smaller one makes
    /// the kernel refuse REGISTER, the fallback path).
    payload_override: Option<usize>,
    /// `--uring-pin`: pin this thread to its kernel queue's CPU when it serves exactly one.
    pin: bool,
}

thread_local! {
    /// The queue planned on this thread, waiting for INIT ([`UringQueue::prepare_here`]).
    static PLANNED: RefCell<Option<UringQueue>> = const { RefCell::new(None) };
}

impl UringQueue {
    /// Plans this thread's queue before INIT: it will serve kernel queues `qids` with
    /// `entries` entries each. Fails when this thread's ring cannot take the commands (no
    /// io_uring, or one of 64-byte SQEs because `set_ring_sqe128` came too late).
    pub fn prepare_here(
        index: usize,
        fd: OwnedFd,
        session: Arc<Session>,
        qids: Vec<u16>,
        entries: usize,
        payload_override: Option<usize>,
        pin: bool,
    ) -> Result<(), UringError> {
        if !runtime::uring::sqe128_available() {
            return Err(UringError::NoRing);
        }
        let q = UringQueue {
            index,
            fd,
            session,
            qids,
            entries: entries.max(1),
            payload_override,
            pin,
        };
        PLANNED.with(|p| *p.borrow_mut() = Some(q));
        Ok(())
    }

    /// Drops the queue planned on this thread (INIT did not grant the ring).
    pub fn forget_here() {
        PLANNED.with(|p| p.borrow_mut().take());
    }

    /// Starts the queue planned on this thread, once INIT granted the ring: one coroutine (or
    /// task) per entry, entered at once, each registering its entry. Run on the queue's thread
    /// (a bottom half scheduled by the after-INIT hook).
    pub fn start_here() {
        let Some(q) = PLANNED.with(|p| p.borrow_mut().take()) else {
            return;
        };
        let Some(n) = q.session.export.negotiated().copied() else {
            return;
        };
        let payload = q
            .payload_override
            .unwrap_or_else(|| payload_size(n.max_write, n.max_pages, 4096));
        q.pin_to_its_cpu();
        let q = Rc::new(q);
        let mut started = 0;
        for &qid in &q.qids {
            for _ in 0..q.entries {
                let entry = match RingEntry::new(qid, payload) {
                    Ok(e) => e,
                    Err(e) => {
                        // Fewer entries than asked: the queue still works with the others; a
                        // queue with none would stall its CPU's requests, so say it loudly.
                        log::error!("fuse ring queue {qid}: no memory for an entry: {e}");
                        continue;
                    }
                };
                let live = Live::new(q.session.clone());
                match q.session.engine {
                    Engine::Coroutine => {
                        let qq = q.clone();
                        match Coroutine::try_new(move || qq.co_serve(entry, live)) {
                            Ok(co) => co.enter(),
                            Err(e) => {
                                log::error!("fuse ring queue {qid}: no coroutine stack: {e}");
                                continue;
                            }
                        }
                    }
                    Engine::Async => runtime::spawn_detached(q.clone().serve_async(entry, live)),
                }
                started += 1;
            }
        }
        log::debug!(
            "queue thread {}: {started} ring entries on kernel queues {:?} ({payload}-byte \
             payloads)",
            q.index,
            q.qids
        );
    }

    /// Pins this thread to the CPU of its kernel queue, when it serves exactly one (threads ≥
    /// CPUs). The kernel queues a request on the queue of the CPU that issued it (fact 9 of
    /// docs/fuse-uring.md); with the thread on that CPU the request is served there, and
    /// neither the hand-over nor the reply wakes another CPU — two cross-CPU wake-ups saved
    /// per round trip, which at queue depth 1 are most of it. libfuse pins its ring threads
    /// the same way. A thread serving several queues (fewer threads than CPUs) is left to the
    /// scheduler. A CPU outside this process's allowed set (a cpuset) refuses the pin: then
    /// the thread floats, and the log says so.
    fn pin_to_its_cpu(&self) {
        let [qid] = self.qids[..] else {
            return;
        };
        if !self.pin {
            return;
        }
        let cpu = usize::from(qid);
        match runtime::affinity::pin_current_thread(cpu) {
            Ok(()) => log::debug!("queue thread {}: pinned to CPU {cpu}", self.index),
            Err(e) => log::warn!(
                "queue thread {}: cannot pin to CPU {cpu} ({e}); it floats",
                self.index
            ),
        }
    }

    /// One entry's life, coroutine engine: REGISTER, then per request serve it, write the
    /// reply, COMMIT_AND_FETCH — until the kernel ends the session.
    fn co_serve(self: Rc<UringQueue>, mut entry: RingEntry, _live: Live) {
        let fd = self.fd.as_fd();
        let mut next = entry.co_register(fd);
        while self.fetched(&entry, next) {
            log::trace!(
                "queue {}: kernel queue {}: {}: fetched from a ring entry, in {}",
                self.index,
                entry.qid(),
                super::Described(entry.bytes().map_or(&[][..], |(h, _)| h)),
                runtime::Coroutine::current().map_or_else(String::new, |co| co.to_string())
            );
            let (unique, resp) = self.co_answer(&mut entry);
            log::trace!(
                "queue {}: unique {unique}: reply written to the ring entry ({}); \
                 COMMIT_AND_FETCH",
                self.index,
                super::ReplyTrace(&resp)
            );
            self.write(&mut entry, unique, resp);
            next = entry.co_commit_and_fetch(fd);
        }
    }

    /// [`UringQueue::co_serve`] for the async engine.
    async fn serve_async(self: Rc<UringQueue>, mut entry: RingEntry, _live: Live) {
        let fd = self.fd.as_fd();
        let mut next = entry.register_async(fd).await;
        while self.fetched(&entry, next) {
            log::trace!(
                "queue {}: kernel queue {}: {}: fetched from a ring entry, in its task",
                self.index,
                entry.qid(),
                super::Described(entry.bytes().map_or(&[][..], |(h, _)| h))
            );
            let (unique, resp) = self.answer_async(&mut entry).await;
            log::trace!(
                "queue {}: unique {unique}: reply written to the ring entry ({}); \
                 COMMIT_AND_FETCH",
                self.index,
                super::ReplyTrace(&resp)
            );
            self.write(&mut entry, unique, resp);
            next = entry.commit_and_fetch_async(fd).await;
        }
    }

    /// Whether a command left a request in the entry; else why the entry is done.
    fn fetched(&self, entry: &RingEntry, result: Result<bool, UringError>) -> bool {
        match result {
            Ok(true) => {
                self.session.served[self.index].fetch_add(1, Ordering::Relaxed);
                self.session.ring_served.fetch_add(1, Ordering::Relaxed);
                true
            }
            // Unmounted (by us or from outside), aborted, or the ring closing.
            Ok(false) => false,
            Err(e) => {
                // Every entry of every queue hears the same refusal: say it once.
                static SAID: AtomicBool = AtomicBool::new(false);
                if !SAID.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "fuse ring queue {}: {e}; the kernel serves this connection over \
                         /dev/fuse",
                        entry.qid()
                    );
                }
                false
            }
        }
    }

    /// The answer to the request in `entry`, coroutine engine.
    fn co_answer(&self, entry: &mut RingEntry) -> (u64, Response) {
        let unique = entry.in_header().map_or(0, |h| h.unique);
        if self.session.state() != SessionState::Running {
            return (unique, Response::Err(libc::ENOTCONN));
        }
        let _in_flight = self.session.in_flight.enter();
        let qid = entry.qid();
        // A READ's data goes straight into the entry's payload buffer: no copy.
        match entry.bytes_and_out() {
            Ok((head, data, out)) => self
                .session
                .co_serve_into(self.index, head, data, out)
                .unwrap_or((unique, Response::None)),
            Err(e) => self.bad(qid, unique, e),
        }
    }

    /// The answer to the request in `entry`, async engine.
    async fn answer_async(&self, entry: &mut RingEntry) -> (u64, Response) {
        let unique = entry.in_header().map_or(0, |h| h.unique);
        if self.session.state() != SessionState::Running {
            return (unique, Response::Err(libc::ENOTCONN));
        }
        let _in_flight = self.session.in_flight.enter();
        let qid = entry.qid();
        match entry.bytes_and_out() {
            Ok((head, data, out)) => self
                .session
                .serve_async_into(self.index, head, data, out)
                .await
                .unwrap_or((unique, Response::None)),
            Err(e) => self.bad(qid, unique, e),
        }
    }

    #[cold]
    fn bad(&self, qid: u16, unique: u64, e: UringError) -> (u64, Response) {
        log::warn!("fuse ring queue {qid}: {e}; answering EIO");
        (unique, Response::Err(libc::EIO))
    }

    /// Writes the answer into the entry (an EIO if it does not fit: the kernel waits for a
    /// commit of every request it put in an entry).
    fn write(&self, entry: &mut RingEntry, unique: u64, resp: Response) {
        if let Err(e) = entry.write_response(unique, resp) {
            log::warn!("fuse ring queue {}: {e}; answering EIO", entry.qid());
            let _ = entry.write_response(unique, Response::Err(libc::EIO));
        }
    }
}

/// Counts one entry's coroutine (or task) as live until it returns; the server waits for
/// none to be left before it stops the queue threads.
struct Live(Arc<Session>);

impl Live {
    fn new(session: Arc<Session>) -> Live {
        session::ring_entry_started(&session);
        Live(session)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        session::ring_entry_ended(&self.0);
    }
}

/// Which kernel queues (CPU numbers `0..cpus`) queue thread `thread` of `threads` serves:
/// `q % threads == thread`, so every kernel queue has exactly one thread and the threads share
/// them evenly.
pub fn qids_for_thread(thread: usize, threads: usize, cpus: usize) -> Vec<u16> {
    (0..cpus)
        .filter(|q| q % threads.max(1) == thread)
        .filter_map(|q| u16::try_from(q).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_queue_has_one_thread() {
        for cpus in 1..9 {
            for threads in 1..6 {
                let mut seen: Vec<u16> = (0..threads)
                    .flat_map(|t| qids_for_thread(t, threads, cpus))
                    .collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..cpus as u16).collect::<Vec<_>>());
            }
        }
        assert_eq!(qids_for_thread(1, 2, 5), vec![1, 3]);
    }
}
