//! The `/dev/fuse` transport: one queue per thread, each a `/dev/fuse` fd watched by that
//! thread's `AioContext`, and one coroutine (or task) per request read from it.
//!
//! QEMU: `block/export/fuse.c` — `read_from_fuse_fd()` (the fd handler),
//! `co_read_from_fuse_fd()` (the read), `fuse_write_response()` (the reply).
//!
//! The request lifecycle (`docs/lifecycle.md` walks through it step by step, and `-vv`
//! traces it): fd readable → [`DevQueue::on_readable`] reads one request into a pooled
//! [`RequestBuf`] → a coroutine is created and entered → `in_flight += 1` (a
//! `runtime::InFlight` guard, its first statement) → [`Session::co_serve`] parses it and runs
//! the export's handler (which may yield in the block layer) → one `writev` reply on the same
//! fd → the guard drops (`in_flight -= 1`), the buffer goes back to the pool.
//!
//! With `--engine async` the same request is a task instead of a coroutine
//! (`DevQueue::process_async`, spawned with `runtime::spawn_detached` and polled at once, as
//! the coroutine is entered at once); reading and replying are the same.
//!
//! Because the read handler hands the buffer to the coroutine before the next read, a request
//! that yields never sees its bytes overwritten by the next one (the bug QEMU's series fixes in
//! "fuse: Copy write buffer content before polling").
//!
//! Every clone of the session fd is woken for every request (the kernel's wait queue is shared:
//! a thundering herd, see `docs/performance.md`); a queue whose read finds nothing (`EAGAIN`:
//! another clone took it) just goes back to waiting.
//!
//! ## Bounded requests in flight
//!
//! A queue has at most `max_in_flight` requests in flight
//! ([`crate::session::DEFAULT_MAX_IN_FLIGHT`], the `--max-in-flight` option). When the request
//! just read reaches the bound, the queue removes its fd handler: it stops reading, and the
//! kernel keeps the rest queued. When one of them replies, the handler goes back (one
//! `epoll_ctl` or poll SQE each way, only while saturated). A flood therefore costs at most
//! `max_in_flight` request buffers, READ buffers and coroutine stacks per queue instead of one
//! of each per request the kernel has queued; see [`crate::session::rss_ceiling_bytes`] for the
//! resulting ceiling. The kernel's own queue is bounded by the `max_background` we announce in
//! INIT (`server.rs` ties it to the bound), past which submitters sleep in the kernel. Each
//! queue logs the most it ever had in flight when it stops (`peak in flight per queue`), so
//! tests can check the bound.
//!
//! QEMU's export has no bound of its own (it relies on `max_background`, which it sets to
//! libfuse's maximum); libfuse's multi-threaded loop bounds threads (`max_threads`), which in a
//! thread-per-request server is the same thing.
//!
//! ## Out of memory
//!
//! No allocation a request needs aborts the process. A coroutine whose stack cannot be mapped
//! ([`Coroutine::try_new`]) or a request buffer that cannot be had means the request is read
//! anyway — into a reserve buffer each queue keeps for that — and answered `ENOMEM`; the next
//! request is served normally. (The async engine's future is a `Box`, which Rust cannot
//! allocate fallibly; the bound caps how many exist.) The hidden `--inject-enomem` option makes
//! these allocations fail on purpose, for tests.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use runtime::{AioContext, Coroutine};

use crate::export::Response;
use crate::protocol::reply::Reply;
use crate::session::{self, Engine, Session, SessionState};
use crate::sys::{self, ReadError};
use crate::transport::buf::{self, RequestBuf};
use crate::transport::ReplyTrace;

/// One queue: its fd, the state of its bound.
pub struct DevQueue {
    index: usize,
    fd: OwnedFd,
    session: Arc<Session>,
    /// Sizes the request buffers (the kernel refuses reads into less than this + 80 bytes).
    max_write: u32,
    /// Set once the fd handler is removed.
    detached: AtomicBool,
    /// Requests of this queue in flight (all on this queue's thread).
    active: Cell<usize>,
    /// The fd handler is off because `active` reached the bound.
    paused: Cell<bool>,
    /// Reads the one request an allocation failure leaves without a buffer, to answer it ENOMEM.
    reserve: RefCell<Option<RequestBuf>>,
}

/// Requests one readiness of `/dev/fuse` reads at most before the loop goes on (see
/// `DevQueue::on_readable`).
const READ_BATCH: usize = 8;

thread_local! {
    /// The queue an iothread serves (set by [`DevQueue::start_here`], taken by
    /// [`DevQueue::stop_here`]).
    static HERE: RefCell<Option<Rc<DevQueue>>> = const { RefCell::new(None) };
}

impl DevQueue {
    /// A queue reading `fd`; `max_write` (what INIT offers) sizes its request buffers.
    pub fn new(index: usize, fd: OwnedFd, session: Arc<Session>, max_write: u32) -> Rc<DevQueue> {
        Rc::new(DevQueue {
            index,
            fd,
            session,
            max_write,
            detached: AtomicBool::new(false),
            active: Cell::new(0),
            paused: Cell::new(false),
            reserve: RefCell::new(None),
        })
    }

    /// Starts serving: maps the reserve buffer and registers the read handler on `ctx`.
    pub fn attach(self: &Rc<DevQueue>, ctx: &AioContext) -> std::io::Result<()> {
        if self.reserve.borrow().is_none() {
            *self.reserve.borrow_mut() = Some(RequestBuf::take(self.max_write)?);
        }
        self.watch(ctx)
    }

    /// Registers the read handler.
    fn watch(self: &Rc<DevQueue>, ctx: &AioContext) -> std::io::Result<()> {
        let q = self.clone();
        ctx.set_fd_handler(
            self.fd.as_raw_fd(),
            Some(Rc::new(move || q.on_readable())),
            None,
        )
    }

    /// Creates a queue on the calling thread, attaches it to the thread's context and keeps it
    /// there until [`DevQueue::stop_here`]. For iothreads (run it with `IoThread::run_sync`).
    pub fn start_here(
        index: usize,
        fd: OwnedFd,
        session: Arc<Session>,
        max_write: u32,
    ) -> std::io::Result<()> {
        let q = DevQueue::new(index, fd, session, max_write);
        q.attach(&AioContext::current())?;
        HERE.with(|h| *h.borrow_mut() = Some(q));
        Ok(())
    }

    /// Detaches and releases the calling thread's queue (requests in flight keep their own
    /// reference and still reply).
    pub fn stop_here() {
        if let Some(q) = HERE.with(|h| h.borrow_mut().take()) {
            q.detach(&AioContext::current());
        }
    }

    /// Stops reading (requests in flight still reply).
    pub fn detach(&self, ctx: &AioContext) {
        if !self.detached.swap(true, Ordering::AcqRel) {
            if let Err(e) = ctx.set_fd_handler(self.fd.as_raw_fd(), None, None) {
                log::warn!("queue {}: removing the fd handler: {e}", self.index);
            }
        }
    }

    /// The fd handler: reads up to [`READ_BATCH`] requests, starting each one's coroutine (or
    /// task) as soon as it is read, so the disk I/O they submit goes to the kernel together, in
    /// the loop's next `io_uring_enter` (one syscall, and one plugged batch for the device,
    /// instead of one of each per request). Stops early when `/dev/fuse` has nothing more, or
    /// the queue reached its in-flight bound.
    ///
    /// QEMU: `read_from_fuse_fd()` (which reads one).
    fn on_readable(self: &Rc<DevQueue>) {
        for i in 0..READ_BATCH {
            if !self.read_one(i == 0) || self.paused.get() || self.detached.load(Ordering::Acquire)
            {
                break;
            }
        }
    }

    /// Reads one request and starts it; whether one was read. `first`: the first read of this
    /// readiness (an `EAGAIN` then means another clone took the request: the herd, traced).
    fn read_one(self: &Rc<DevQueue>, first: bool) -> bool {
        if self.session.state() != SessionState::Running {
            self.detach(&AioContext::current());
            return false;
        }
        let mut rb = match super::take_request_buf(self.max_write) {
            Ok(b) => b,
            Err(e) => {
                self.refuse_one(&format!("no memory for a request buffer: {e}"));
                return false;
            }
        };
        match rb.read(self.fd.as_fd()) {
            Ok(n) => {
                self.session.served[self.index].fetch_add(1, Ordering::Relaxed);
                log::trace!(
                    "queue {}: {}: read from /dev/fuse ({n} bytes)",
                    self.index,
                    super::Described(rb.request().0)
                );
                self.start(rb);
                true
            }
            Err(e) => {
                rb.give_back();
                if first && matches!(e, ReadError::WouldBlock) {
                    log::trace!(
                        "queue {}: woken for nothing: EAGAIN, another clone took the request",
                        self.index
                    );
                }
                self.read_failed(e);
                false
            }
        }
    }

    /// Runs a request just read in a new coroutine (or task), entered at once.
    fn start(self: &Rc<DevQueue>, rb: RequestBuf) {
        let q = self.clone();
        let slot = self.start_request();
        match self.session.engine {
            Engine::Coroutine => {
                // Kept to answer ENOMEM if no coroutine can be made (the buffer goes with it).
                let mut head = [0u8; 40];
                let (h, _) = rb.request();
                let n = h.len().min(head.len());
                head[..n].copy_from_slice(&h[..n]);
                match Coroutine::try_new(move || q.co_process(rb, slot)) {
                    Ok(co) => {
                        let unique = || super::unique_of(&head[..n]);
                        log::trace!("queue {}: unique {}: enters {co}", self.index, unique());
                        co.enter();
                        if log::log_enabled!(log::Level::Trace) && !co.is_finished() {
                            log::trace!(
                                "queue {}: unique {}: {co} yielded; the loop goes on",
                                self.index,
                                unique()
                            );
                        }
                    }
                    // The closure (and with it the slot and the buffer) is dropped.
                    Err(e) => self.answer_enomem(&head[..n], &format!("no coroutine stack: {e}")),
                }
            }
            Engine::Async => {
                let unique =
                    log::log_enabled!(log::Level::Trace).then(|| super::unique_of(rb.request().0));
                let fut = q.process_async(rb, slot);
                session::log_future_size(std::mem::size_of_val(&fut));
                if let Some(unique) = unique {
                    log::trace!(
                        "queue {}: unique {unique}: enters a task (polled at once)",
                        self.index
                    );
                }
                runtime::spawn_detached(fut)
            }
        }
    }

    /// What a failed read means: nothing (another clone took the request, a signal, an
    /// interrupted request: poll again), or the end of the session.
    fn read_failed(&self, e: ReadError) {
        match e {
            ReadError::WouldBlock | ReadError::Interrupted | ReadError::RequestGone => {}
            ReadError::Unmounted => {
                log::debug!("queue {}: /dev/fuse says ENODEV: unmounted", self.index);
                self.detach(&AioContext::current());
                self.session.stop(SessionState::Unmounted);
            }
            ReadError::Io(e) => {
                log::error!("queue {}: reading /dev/fuse: {e}; stopping", self.index);
                self.detach(&AioContext::current());
                self.session.stop(SessionState::Halted);
            }
        }
    }

    /// The request coroutine. QEMU: `co_read_from_fuse_fd()` after the read, then
    /// `fuse_co_process_request()`.
    fn co_process(self: Rc<DevQueue>, rb: RequestBuf, _slot: Slot) {
        // Counted in before `on_readable` returns (the coroutine is entered at once), and out
        // even if something below panics, so a drain neither misses it nor waits forever.
        let _in_flight = self.session.in_flight.enter();
        let (head, data) = rb.request();
        if let Some((unique, resp)) = self.session.co_serve(self.index, head, data) {
            self.send(unique, resp);
            self.session.replied();
        }
        rb.give_back();
    }

    /// The request task of the async engine: [`DevQueue::co_process`] as a future. The
    /// executor owns it and polls it to completion (never cancelled), so the reply is always
    /// sent.
    async fn process_async(self: Rc<DevQueue>, rb: RequestBuf, _slot: Slot) {
        let _in_flight = self.session.in_flight.enter(); // polled at once, as the coroutine
        let (head, data) = rb.request();
        if let Some((unique, resp)) = self.session.serve_async(self.index, head, data).await {
            self.send(unique, resp);
            self.session.replied();
        }
        rb.give_back();
    }

    /// Counts a request in; at the bound, stops reading until one replies.
    fn start_request(self: &Rc<DevQueue>) -> Slot {
        let active = self.active.get() + 1;
        self.active.set(active);
        let peak = &self.session.peak_in_flight[self.index];
        // Relaxed: a statistic, written by this queue's thread only and read after it stopped.
        if active > peak.load(Ordering::Relaxed) {
            peak.store(active, Ordering::Relaxed);
        }
        if active >= self.session.max_in_flight() && !self.paused.get() {
            self.paused.set(true);
            log::trace!("queue {}: {active} requests in flight; pausing", self.index);
            if let Err(e) = AioContext::current().set_fd_handler(self.fd.as_raw_fd(), None, None) {
                log::warn!("queue {}: pausing the fd handler: {e}", self.index);
            }
        }
        Slot(self.clone())
    }

    /// A request replied (its [`Slot`] dropped): below the bound again, resume reading.
    fn finish_request(self: &Rc<DevQueue>) {
        self.active.set(self.active.get() - 1);
        if self.paused.get() && self.active.get() < self.session.max_in_flight() {
            self.paused.set(false);
            if self.detached.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = self.watch(&AioContext::current()) {
                // Epoll refused (ENOMEM): without a handler this queue serves nothing more,
                // and the others may be paused too; stop rather than hang.
                log::error!(
                    "queue {}: resuming the fd handler: {e}; stopping",
                    self.index
                );
                self.session.stop(SessionState::Halted);
            }
        }
    }

    /// An allocation failed before the request could be read: read it into the reserve buffer
    /// and answer ENOMEM, so the kernel does not wait for it and the fd does not stay readable.
    #[cold]
    fn refuse_one(self: &Rc<DevQueue>, why: &str) {
        let Some(mut reserve) = self.reserve.borrow_mut().take() else {
            log::error!("queue {}: {why}, and no reserve buffer", self.index);
            return;
        };
        match reserve.read(self.fd.as_fd()) {
            Ok(_) => {
                self.session.served[self.index].fetch_add(1, Ordering::Relaxed);
                self.answer_enomem(reserve.request().0, why);
            }
            Err(e) => self.read_failed(e),
        }
        *self.reserve.borrow_mut() = Some(reserve);
    }

    /// Replies ENOMEM to the request whose header is `head`, unless it takes no reply.
    #[cold]
    fn answer_enomem(&self, head: &[u8], why: &str) {
        if let Some((unique, resp)) = session::enomem_reply(self.index, head, why) {
            self.send(unique, resp);
        }
    }

    /// Writes one reply. QEMU: `fuse_write_response()`.
    fn send(&self, unique: u64, resp: Response) {
        let result = match &resp {
            Response::None => return,
            Response::Err(errno) => {
                sys::write_reply(self.fd.as_fd(), &Reply::err(unique, *errno).io_slices())
            }
            Response::Bytes(b) => {
                sys::write_reply(self.fd.as_fd(), &Reply::ok(unique, &[b]).io_slices())
            }
            Response::Data(data, len) => sys::write_reply(
                self.fd.as_fd(),
                &Reply::ok(unique, &[&data[..*len]]).io_slices(),
            ),
            // This transport lends no buffer, so the export never answers in place.
            Response::InPlace(_) => {
                log::error!("queue {}: an in-place reply without a buffer", self.index);
                sys::write_reply(self.fd.as_fd(), &Reply::err(unique, libc::EIO).io_slices())
            }
        };
        log::trace!(
            "queue {}: unique {unique}: reply written to /dev/fuse ({})",
            self.index,
            ReplyTrace(&resp)
        );
        if let Response::Data(data, _) = resp {
            buf::give_back(data);
        }
        if let Err(e) = result {
            // ENOENT (the request was interrupted) is filtered out by write_reply.
            log::warn!("queue {}: writing a reply: {e}", self.index);
        }
    }
}

/// One request counted against its queue's bound; dropping it (after the reply) counts it out
/// and may resume reading.
struct Slot(Rc<DevQueue>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.finish_request();
    }
}
