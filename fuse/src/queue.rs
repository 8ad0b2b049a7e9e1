//! One FUSE queue: a `/dev/fuse` fd watched by one thread's `AioContext`, and one coroutine per
//! request read from it.
//!
//! QEMU: `block/export/fuse.c` — `read_from_fuse_fd()` (the fd handler), `co_read_from_fuse_fd()`
//! / `fuse_co_process_request()` (the request coroutine), `fuse_write_response()`.
//!
//! The request lifecycle (DESIGN.md): fd readable → [`Queue::on_readable`] reads one request
//! (header and fixed arguments into a small array, WRITE data into a pooled payload buffer) →
//! a coroutine is created and entered → `in_flight += 1` (a `runtime::InFlight` guard, its first
//! statement) → it parses, dispatches to
//! [`Export::co_handle`] (which may yield in the block layer), and writes one reply with one
//! `writev` on the same fd → the guard drops (`in_flight -= 1`), buffers back to the pool.
//!
//! With `--engine async` the same request is a task instead of a coroutine
//! (`Queue::process_async`, spawned with `runtime::spawn_detached` and polled at once, as the
//! coroutine is entered at once); reading, parsing and replying are shared.
//!
//! Because the read handler hands the buffers to the coroutine before the next read, a request
//! that yields never sees its bytes overwritten by the next one (the bug QEMU's series fixes in
//! "fuse: Copy write buffer content before polling").
//!
//! ## Bounded requests in flight
//!
//! A queue has at most `max_in_flight` requests in flight ([`DEFAULT_MAX_IN_FLIGHT`], the
//! `--max-in-flight` option). When the request just read reaches the bound, the queue removes
//! its fd handler: it stops reading, and the kernel keeps the rest queued. When one of them
//! replies, the handler goes back (one `epoll_ctl` each way, only while saturated). A flood
//! therefore costs at most `max_in_flight` payload buffers, READ buffers and coroutine stacks
//! per queue instead of one of each per request the kernel has queued; see
//! [`rss_ceiling_bytes`] for the resulting ceiling. The kernel's own queue is bounded by the
//! `max_background` we announce in INIT (`server.rs` ties it to the bound), past which
//! submitters sleep in the kernel. Each queue logs the most it ever had in flight when it stops
//! (`peak in flight per queue`), so tests can check the bound.
//!
//! QEMU's export has no bound of its own (it relies on `max_background`, which it sets to
//! libfuse's maximum); libfuse's multi-threaded loop bounds threads (`max_threads`), which in a
//! thread-per-request server is the same thing.
//!
//! ## Out of memory
//!
//! No allocation a request needs aborts the process. A coroutine whose stack cannot be mapped
//! ([`Coroutine::try_new`]) or a payload buffer that cannot be had means the request is read
//! anyway — into a reserve buffer each queue keeps for that — and answered `ENOMEM`; the next
//! request is served normally. (The async engine's future is a `Box`, which Rust cannot
//! allocate fallibly; the bound caps how many exist.) The hidden `--inject-enomem` option makes
//! these allocations fail on purpose, for tests.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use runtime::{AioContext, Coroutine, InFlight, RemoteContext};
use zerocopy::FromBytes;

use crate::abi::fuse_in_header;
use crate::export::{give_back_buffer, Export, Response};
use crate::reply::Reply;
use crate::request::{self, ParseError, WRITE_HEADER_SIZE};
use crate::sys::{self, PayloadBuf, ReadError};

/// Why the session stopped serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionState {
    Running = 0,
    /// SIGINT/SIGTERM or an explicit stop: drain, flush, unmount.
    Stopping = 1,
    /// The kernel said ENODEV: unmounted from outside (`umount`, `fusermount3 -u`).
    Unmounted = 2,
    /// A malformed request: the stream cannot be trusted; stop reading (QEMU: "halted").
    Halted = 3,
}

/// How requests are executed (`--engine`). Everything else — the loop, the queues, parsing,
/// replies, the semantics — is the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// One stackful coroutine per request ([`Export::co_handle`]).
    #[default]
    Coroutine,
    /// One async task (a boxed future) per request ([`Export::handle_async`]), on
    /// `runtime::executor`.
    Async,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Coroutine => "coroutine",
            Engine::Async => "async",
        }
    }
}

/// State shared by all queues of one export.
pub struct Session {
    pub export: Arc<Export>,
    pub engine: Engine,
    /// Requests read and not yet replied to; the server's drain waits for zero.
    in_flight: InFlight,
    state: AtomicU8,
    /// Requests served per queue (index = queue number).
    served: Vec<AtomicU64>,
    /// Requests a queue may have in flight (`--max-in-flight`).
    max_in_flight: usize,
    /// The most requests each queue had in flight at once.
    peak_in_flight: Vec<AtomicUsize>,
    /// The loop that waits for the session to stop (the one that created it): [`Session::stop`]
    /// wakes it directly. It does not wait with `wait_while`, which would count it as an
    /// `aio_wait` waiter for the whole session, and then every `InFlight` that drops to zero
    /// — a backend's, after each request served inline — would kick it: a cross-thread wake-up
    /// per request.
    main: RemoteContext,
}

impl Session {
    pub fn new(export: Arc<Export>, queues: usize, engine: Engine) -> Session {
        Session {
            export,
            engine,
            in_flight: InFlight::new(),
            state: AtomicU8::new(SessionState::Running as u8),
            served: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            peak_in_flight: (0..queues).map(|_| AtomicUsize::new(0)).collect(),
            main: AioContext::current().remote(),
        }
    }

    /// Runs the calling thread's loop (the one that created the session) until the session
    /// stops serving.
    pub fn wait_stopped(&self, ctx: &AioContext) {
        while self.state() == SessionState::Running {
            ctx.poll(true);
        }
    }

    /// Sets the per-queue bound on requests in flight (at least 1).
    pub fn with_max_in_flight(mut self, n: usize) -> Session {
        self.max_in_flight = n.max(1);
        self
    }

    /// The per-queue bound on requests in flight.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// The most requests each queue had in flight at once so far.
    pub fn peak_in_flight(&self) -> Vec<usize> {
        self.peak_in_flight
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    pub fn state(&self) -> SessionState {
        match self.state.load(Ordering::Acquire) {
            0 => SessionState::Running,
            1 => SessionState::Stopping,
            2 => SessionState::Unmounted,
            _ => SessionState::Halted,
        }
    }

    /// Moves from Running to `to` (the first reason wins); wakes the main loop.
    pub fn stop(&self, to: SessionState) {
        if self
            .state
            .compare_exchange(
                SessionState::Running as u8,
                to as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            // A queued no-op counts as progress: the loop in `wait_stopped` re-checks.
            self.main.schedule_oneshot(|| {});
            runtime::kick();
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Requests each queue has served so far.
    pub fn served(&self) -> Vec<u64> {
        self.served
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// One queue: its fd, its thread's buffers.
pub struct Queue {
    index: usize,
    fd: OwnedFd,
    session: Arc<Session>,
    /// WRITE payload buffers, each `max_write` bytes (+ room for spilled arguments).
    payloads: RefCell<Vec<PayloadBuf>>,
    payload_size: usize,
    /// Set once the fd handler is removed.
    detached: AtomicBool,
    /// Requests of this queue in flight (all on this queue's thread).
    active: Cell<usize>,
    /// The fd handler is off because `active` reached the bound.
    paused: Cell<bool>,
    /// Reads the one request an allocation failure leaves without a buffer, to answer it ENOMEM.
    reserve: RefCell<Option<PayloadBuf>>,
}

/// Requests one readiness of `/dev/fuse` reads at most before the loop goes on (see
/// `Queue::on_readable`).
const READ_BATCH: usize = 8;

/// Default `--max-in-flight`: requests one queue has in flight at once.
///
/// 64 because: it is twice the deepest queue our benchmarks use (QD32), spread over the
/// queues; it equals the buffer pools' size (`MAX_POOLED_PAYLOADS`, the export's READ pool),
/// so a saturated queue maps no new buffers; and it keeps the flood ceiling
/// ([`rss_ceiling_bytes`]) near 300 MiB per queue with 1 MiB requests.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// The most memory the requests in flight of `queues` queues can hold with bound `max_in_flight`
/// and requests of `max_write` bytes: per request one payload buffer and one READ buffer (each
/// rounded up to 2 MiB huge pages, [`PayloadBuf`]) and one coroutine stack (256 KiB, usually
/// barely touched). The daemon's fixed part (binary, caches such as qcow2's L2 cache, thread
/// stacks) comes on top.
pub fn rss_ceiling_bytes(queues: usize, max_in_flight: usize, max_write: usize) -> u64 {
    const HUGE: u64 = 2 << 20;
    let buffer = (request::request_buffer_size(max_write as u32) as u64).div_ceil(HUGE) * HUGE;
    let stack = runtime::coroutine::pool_config().stack_size as u64;
    let per_request = 2 * buffer + stack;
    // The pools keep up to MAX_POOLED_PAYLOADS buffers a queue no longer has in flight.
    let requests = max_in_flight.max(MAX_POOLED_PAYLOADS) as u64;
    queues as u64 * requests * per_request
}

/// Set by the hidden `--inject-enomem buffer:AFTER:COUNT`.
static FAIL_PAYLOADS: runtime::fault::FailAfter = runtime::fault::FailAfter::new();

/// Test hook: after the next `after` payload buffers taken (pooled or not, any queue), the
/// following `count` fail with ENOMEM as if none could be mapped.
pub fn inject_payload_failures(after: usize, count: usize) {
    FAIL_PAYLOADS.arm(after, count);
}

thread_local! {
    /// The queue an iothread serves (set by [`Queue::start_here`], taken by [`Queue::stop_here`]).
    static HERE: RefCell<Option<Rc<Queue>>> = const { RefCell::new(None) };
}

/// Payload buffers kept per queue.
const MAX_POOLED_PAYLOADS: usize = 64;

impl Queue {
    /// A queue reading `fd`; `max_write` sizes its payload buffers.
    pub fn new(index: usize, fd: OwnedFd, session: Arc<Session>, max_write: usize) -> Rc<Queue> {
        Rc::new(Queue {
            index,
            fd,
            session,
            payloads: RefCell::new(Vec::new()),
            // The kernel refuses reads into less than header + write_in + max_write, and a
            // non-WRITE request may be longer than WRITE_HEADER_SIZE (a LOOKUP name, INIT).
            payload_size: request::request_buffer_size(max_write as u32) - WRITE_HEADER_SIZE,
            detached: AtomicBool::new(false),
            active: Cell::new(0),
            paused: Cell::new(false),
            reserve: RefCell::new(None),
        })
    }

    /// Starts serving: maps the reserve buffer and registers the read handler on `ctx`.
    pub fn attach(self: &Rc<Queue>, ctx: &AioContext) -> std::io::Result<()> {
        if self.reserve.borrow().is_none() {
            *self.reserve.borrow_mut() = Some(PayloadBuf::new(self.payload_size)?);
        }
        self.watch(ctx)
    }

    /// Registers the read handler.
    fn watch(self: &Rc<Queue>, ctx: &AioContext) -> std::io::Result<()> {
        let q = self.clone();
        ctx.set_fd_handler(
            self.fd.as_raw_fd(),
            Some(Rc::new(move || q.on_readable())),
            None,
        )
    }

    /// Creates a queue on the calling thread, attaches it to the thread's context and keeps it
    /// there until [`Queue::stop_here`]. For iothreads (run it with `IoThread::run_sync`).
    pub fn start_here(
        index: usize,
        fd: OwnedFd,
        session: Arc<Session>,
        max_write: usize,
    ) -> std::io::Result<()> {
        let q = Queue::new(index, fd, session, max_write);
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

    fn take_payload(&self) -> std::io::Result<PayloadBuf> {
        if FAIL_PAYLOADS.fire() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
        }
        match self.payloads.borrow_mut().pop() {
            Some(b) => Ok(b),
            None => PayloadBuf::new(self.payload_size),
        }
    }

    fn give_back_payload(&self, v: PayloadBuf) {
        let mut p = self.payloads.borrow_mut();
        if p.len() < MAX_POOLED_PAYLOADS {
            p.push(v);
        }
    }

    /// The fd handler: reads up to [`READ_BATCH`] requests, starting each one's coroutine (or
    /// task) as soon as it is read, so the disk I/O they submit goes to the kernel together, in
    /// the loop's next `io_uring_enter` (one syscall, and one plugged batch for the device,
    /// instead of one of each per request). Stops early when `/dev/fuse` has nothing more, or
    /// the queue reached its in-flight bound.
    ///
    /// QEMU: `read_from_fuse_fd()` (which reads one).
    fn on_readable(self: &Rc<Queue>) {
        for _ in 0..READ_BATCH {
            if !self.read_one() || self.paused.get() || self.detached.load(Ordering::Acquire) {
                break;
            }
        }
    }

    /// Reads one request and starts it; whether one was read.
    fn read_one(self: &Rc<Queue>) -> bool {
        if self.session.state() != SessionState::Running {
            self.detach(&AioContext::current());
            return false;
        }
        let mut head = [0u8; WRITE_HEADER_SIZE];
        let mut payload = match self.take_payload() {
            Ok(p) => p,
            Err(e) => {
                self.refuse_one(&format!("no memory for a request buffer: {e}"));
                return false;
            }
        };
        match sys::read_request(self.fd.as_fd(), &mut head, &mut payload) {
            Ok(n) => {
                self.session.served[self.index].fetch_add(1, Ordering::Relaxed);
                let q = self.clone();
                match self.session.engine {
                    Engine::Coroutine => {
                        let slot = self.start_request();
                        match Coroutine::try_new(move || {
                            let _slot = slot;
                            q.co_process(head, payload, n)
                        }) {
                            Ok(co) => co.enter(),
                            // The closure (and with it the slot and the payload) is dropped.
                            Err(e) => {
                                self.answer_enomem(&head, n, &format!("no coroutine stack: {e}"))
                            }
                        }
                    }
                    Engine::Async => {
                        let slot = self.start_request();
                        let fut = q.process_async(head, payload, n, slot);
                        log_future_size(std::mem::size_of_val(&fut));
                        runtime::spawn_detached(fut)
                    }
                }
                true
            }
            Err(ReadError::WouldBlock | ReadError::Interrupted | ReadError::RequestGone) => {
                // Another clone took it, a signal, or an interrupted request: poll again.
                self.give_back_payload(payload);
                false
            }
            Err(ReadError::Unmounted) => {
                self.give_back_payload(payload);
                log::debug!("queue {}: /dev/fuse says ENODEV: unmounted", self.index);
                self.detach(&AioContext::current());
                self.session.stop(SessionState::Unmounted);
                false
            }
            Err(ReadError::Io(e)) => {
                self.give_back_payload(payload);
                log::error!("queue {}: reading /dev/fuse: {e}; stopping", self.index);
                self.detach(&AioContext::current());
                self.session.stop(SessionState::Halted);
                false
            }
        }
    }

    /// The request coroutine. QEMU: `fuse_co_process_request()`.
    fn co_process(self: Rc<Queue>, head: [u8; WRITE_HEADER_SIZE], payload: PayloadBuf, n: usize) {
        // Counted in before `on_readable` returns (the coroutine is entered at once), and out
        // even if something below panics, so a drain neither misses it nor waits forever.
        let _in_flight = self.session.in_flight.enter();
        let mut contiguous = Vec::new();
        if let Some(req) = self.parse(&head, &payload, n, &mut contiguous) {
            let export = &self.session.export;
            let resp = catch_unwind(AssertUnwindSafe(|| export.co_handle(&req)))
                .unwrap_or_else(|_| panicked(&req));
            self.send(req.unique(), resp);
        }
        self.give_back_payload(payload);
    }

    /// The request task of the async engine: [`Queue::co_process`] as a future. The executor
    /// owns it and polls it to completion (never cancelled), so the reply is always sent.
    async fn process_async(
        self: Rc<Queue>,
        head: [u8; WRITE_HEADER_SIZE],
        payload: PayloadBuf,
        n: usize,
        _slot: Slot,
    ) {
        let _in_flight = self.session.in_flight.enter(); // polled at once, as the coroutine
        let mut contiguous = Vec::new();
        if let Some(req) = self.parse(&head, &payload, n, &mut contiguous) {
            let export = &self.session.export;
            let resp = runtime::executor::catch_unwind(export.handle_async(&req))
                .await
                .unwrap_or_else(|p| {
                    if p.message.starts_with(runtime::NO_STACK) {
                        log::error!("queue {}: {}; replying ENOMEM", self.index, p.message);
                        Response::Err(libc::ENOMEM)
                    } else {
                        panicked(&req)
                    }
                });
            self.send(req.unique(), resp);
        }
        self.give_back_payload(payload);
    }

    /// Counts a request in; at the bound, stops reading until one replies.
    fn start_request(self: &Rc<Queue>) -> Slot {
        let active = self.active.get() + 1;
        self.active.set(active);
        let peak = &self.session.peak_in_flight[self.index];
        // Relaxed: a statistic, written by this queue's thread only and read after it stopped.
        if active > peak.load(Ordering::Relaxed) {
            peak.store(active, Ordering::Relaxed);
        }
        if active >= self.session.max_in_flight && !self.paused.get() {
            self.paused.set(true);
            log::trace!("queue {}: {active} requests in flight; pausing", self.index);
            if let Err(e) = AioContext::current().set_fd_handler(self.fd.as_raw_fd(), None, None) {
                log::warn!("queue {}: pausing the fd handler: {e}", self.index);
            }
        }
        Slot(self.clone())
    }

    /// A request replied (its [`Slot`] dropped): below the bound again, resume reading.
    fn finish_request(self: &Rc<Queue>) {
        self.active.set(self.active.get() - 1);
        if self.paused.get() && self.active.get() < self.session.max_in_flight {
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
    fn refuse_one(self: &Rc<Queue>, why: &str) {
        let Some(mut reserve) = self.reserve.borrow_mut().take() else {
            log::error!("queue {}: {why}, and no reserve buffer", self.index);
            return;
        };
        let mut head = [0u8; WRITE_HEADER_SIZE];
        let read = sys::read_request(self.fd.as_fd(), &mut head, &mut reserve);
        *self.reserve.borrow_mut() = Some(reserve);
        match read {
            Ok(n) => {
                self.session.served[self.index].fetch_add(1, Ordering::Relaxed);
                self.answer_enomem(&head, n, why);
            }
            Err(ReadError::WouldBlock | ReadError::Interrupted | ReadError::RequestGone) => {}
            Err(ReadError::Unmounted) => {
                self.detach(&AioContext::current());
                self.session.stop(SessionState::Unmounted);
            }
            Err(ReadError::Io(e)) => {
                log::error!("queue {}: reading /dev/fuse: {e}; stopping", self.index);
                self.detach(&AioContext::current());
                self.session.stop(SessionState::Halted);
            }
        }
    }

    /// Replies ENOMEM to the request in `head` (`n` bytes read), unless it takes no reply.
    #[cold]
    fn answer_enomem(&self, head: &[u8; WRITE_HEADER_SIZE], n: usize, why: &str) {
        let Ok((h, _)) = fuse_in_header::read_from_prefix(&head[..n.min(WRITE_HEADER_SIZE)]) else {
            log::error!(
                "queue {}: {why}; the request is too short to answer",
                self.index
            );
            return;
        };
        let name = crate::abi::opcode_name(h.opcode).unwrap_or("?");
        if matches!(
            h.opcode,
            crate::abi::FUSE_FORGET | crate::abi::FUSE_BATCH_FORGET | crate::abi::FUSE_INTERRUPT
        ) {
            log::warn!(
                "queue {}: {why}; dropping {name} (it takes no reply)",
                self.index
            );
            return;
        }
        log::error!("queue {}: {why}; replying ENOMEM to {name}", self.index);
        self.send(h.unique, Response::Err(libc::ENOMEM));
    }

    /// Parses a request (shared by both engines). A request the export cannot use is answered
    /// (EINVAL) or halts the session here; `None` then.
    fn parse<'a>(
        &self,
        head: &'a [u8; WRITE_HEADER_SIZE],
        payload: &'a PayloadBuf,
        n: usize,
        contiguous: &'a mut Vec<u8>,
    ) -> Option<request::Request<'a>> {
        // Before INIT the minor is unknown; INIT is parsed by its own announced minor.
        let minor = self
            .session
            .export
            .minor()
            .max(crate::reply::MIN_SUPPORTED_MINOR);
        let (head_len, spill) = if n <= WRITE_HEADER_SIZE {
            (n, 0)
        } else {
            (WRITE_HEADER_SIZE, n - WRITE_HEADER_SIZE)
        };
        let opcode = fuse_in_header::read_from_prefix(&head[..head_len])
            .map(|(h, _)| h.opcode)
            .ok();
        let parsed = if spill > 0 && opcode != Some(crate::abi::FUSE_WRITE) {
            // A non-WRITE request longer than the first iovec: make it one buffer (rare: LOOKUP,
            // SETATTR, INIT, BATCH_FORGET).
            if contiguous.try_reserve_exact(n).is_err() {
                self.answer_enomem(head, n, "no memory to join a request's arguments");
                return None;
            }
            contiguous.extend_from_slice(head);
            contiguous.extend_from_slice(&payload[..spill]);
            request::parse(contiguous, &[], minor)
        } else {
            request::parse(&head[..head_len], &payload[..spill], minor)
        };
        match parsed {
            Ok(req) => Some(req),
            Err(e) if e.is_framing() => {
                log::error!(
                    "queue {}: malformed request from the kernel ({e}); halting the export",
                    self.index
                );
                self.session.stop(SessionState::Halted);
                None
            }
            Err(e) => {
                log::warn!("queue {}: bad request: {e}", self.index);
                if let Ok((h, _)) = fuse_in_header::read_from_prefix(&head[..head_len]) {
                    self.send(h.unique, Response::Err(libc::EINVAL));
                }
                None
            }
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
            Response::Data(buf, len) => sys::write_reply(
                self.fd.as_fd(),
                &Reply::ok(unique, &[&buf[..*len]]).io_slices(),
            ),
        };
        if let Response::Data(buf, _) = resp {
            give_back_buffer(buf);
        }
        if let Err(e) = result {
            // ENOENT (the request was interrupted) is filtered out by write_reply.
            log::warn!("queue {}: writing a reply: {e}", self.index);
        }
    }
}

/// Says once how big a request's future is: the async engine's one allocation per request.
fn log_future_size(bytes: usize) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    // Relaxed: a statistic; after the first request this is a load of a line nobody writes.
    if !LOGGED.load(Ordering::Relaxed) && !LOGGED.swap(true, Ordering::Relaxed) {
        log::info!("async engine: a request future is {bytes} bytes (one allocation per request)");
    }
}

/// The reply of a request whose handler panicked: EIO, and the export keeps serving.
fn panicked(req: &request::Request<'_>) -> Response {
    log::error!(
        "request {} ({}) panicked; replying EIO",
        req.unique(),
        crate::abi::opcode_name(req.header.opcode).unwrap_or("?")
    );
    Response::Err(libc::EIO)
}

/// One request counted against its queue's bound; dropping it (after the reply) counts it out
/// and may resume reading.
struct Slot(Rc<Queue>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.finish_request();
    }
}

/// Framing errors make the whole stream untrustworthy; others concern one request.
trait Framing {
    fn is_framing(&self) -> bool;
}

impl Framing for ParseError {
    fn is_framing(&self) -> bool {
        matches!(
            self,
            ParseError::ShortHeader { .. } | ParseError::LengthMismatch { .. }
        )
    }
}
