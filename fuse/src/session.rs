//! The session: what every queue of one export shares (the export, the engine, the state that
//! says whether to go on serving, the in-flight count the drain waits for, the bound and the
//! counters), and the part of a request's life that every transport and both engines share:
//! parse its bytes, hand it to the export, catch a panic, produce the reply.
//!
//! QEMU: the `FuseExport` fields that are not per queue (`halted`, `in_flight`, the
//! `BlockExport`), and `fuse_co_process_request()` in `block/export/fuse.c`.
//!
//! A transport (`crate::transport`) reads a request into its buffers, counts it in flight,
//! runs [`Session::co_serve`] in a new coroutine (or [`Session::serve_async`] in a new task),
//! sends the reply the way it came, and gives its buffers back.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use runtime::{AioContext, InFlight, RemoteContext};
use zerocopy::FromBytes;

use crate::export::{Export, Response};
use crate::protocol::abi::fuse_in_header;
use crate::protocol::reply::Negotiated;
use crate::protocol::request::{self, ParseError, Request};
use crate::transport::buf;

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
    pub(crate) in_flight: InFlight,
    state: AtomicU8,
    /// Requests served per queue (index = queue number).
    pub(crate) served: Vec<AtomicU64>,
    /// Requests a queue may have in flight (`--max-in-flight`).
    max_in_flight: usize,
    /// The most requests each queue had in flight at once.
    pub(crate) peak_in_flight: Vec<AtomicUsize>,
    /// The loop that waits for the session to stop (the one that created it): [`Session::stop`]
    /// wakes it directly. It does not wait with `wait_while`, which would count it as an
    /// `aio_wait` waiter for the whole session, and then every `InFlight` that drops to zero
    /// — a backend's, after each request served inline — would kick it: a cross-thread wake-up
    /// per request.
    main: RemoteContext,
    /// Run once by the transport that sends the INIT reply (see [`Session::replied`]): the
    /// server starts the io_uring transport from it. `after_init_armed` keeps the check a
    /// single load on every other reply.
    after_init: Mutex<Option<AfterInit>>,
    after_init_armed: AtomicBool,
    /// Ring entries whose coroutine (or task) is still running (`transport::uring`).
    ring_entries: AtomicUsize,
    /// How requests arrive, for the log and the mounted line (`/dev/fuse` unless the server
    /// sets up the ring and the kernel grants it).
    transport: Mutex<String>,
    /// Whether the kernel granted the ring (set by the after-INIT hook's caller).
    ring_granted: AtomicBool,
    /// Set once the INIT reply is out and the after-INIT hook ran.
    init_replied: AtomicBool,
    /// Requests that arrived in io_uring entries (also counted in `served`).
    pub(crate) ring_served: AtomicU64,
}

/// What runs after the INIT reply is out, with what was negotiated.
pub type AfterInit = Box<dyn FnOnce(&Negotiated) + Send>;

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
            after_init: Mutex::new(None),
            after_init_armed: AtomicBool::new(false),
            ring_entries: AtomicUsize::new(0),
            transport: Mutex::new("/dev/fuse".to_owned()),
            ring_granted: AtomicBool::new(false),
            init_replied: AtomicBool::new(false),
            ring_served: AtomicU64::new(0),
        }
    }

    /// What the transport is called once the ring is granted (see [`Session::transport_name`]).
    pub fn set_transport_name(&self, name: String) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// How requests arrive: the name set by the server if INIT granted the ring, else
    /// `/dev/fuse`.
    pub fn transport_name(&self) -> String {
        if self.ring_granted.load(Ordering::Acquire) {
            self.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        } else {
            "/dev/fuse".to_owned()
        }
    }

    /// Runs `hook` once, right after the INIT reply has been sent (the io_uring transport may
    /// only register its entries then). Set it before the queues start.
    pub fn set_after_init(&self, hook: AfterInit) {
        *self.after_init.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
        self.after_init_armed.store(true, Ordering::Release);
    }

    /// Called by a transport after each reply it sent: the first one after INIT was
    /// negotiated is the INIT reply (the kernel sends nothing else before it), so this runs
    /// the after-INIT hook then.
    pub(crate) fn replied(&self) {
        if self.after_init_armed.load(Ordering::Relaxed) {
            self.run_after_init();
        }
    }

    #[cold]
    fn run_after_init(&self) {
        let Some(n) = self.export.negotiated() else {
            return;
        };
        if !self.after_init_armed.swap(false, Ordering::AcqRel) {
            return;
        }
        let hook = self
            .after_init
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let granted = n.flags & crate::protocol::abi::FUSE_OVER_IO_URING != 0;
        self.ring_granted.store(granted, Ordering::Release);
        if let Some(hook) = hook {
            hook(n);
        }
        self.init_replied.store(true, Ordering::Release);
        // The main loop may be waiting for this (the mounted line names the transport).
        self.main.schedule_oneshot(|| {});
    }

    /// Whether the INIT reply is out and the after-INIT hook has run.
    pub fn init_replied(&self) -> bool {
        self.init_replied.load(Ordering::Acquire)
    }

    /// Requests that arrived in io_uring entries so far.
    pub fn ring_served(&self) -> u64 {
        self.ring_served.load(Ordering::Relaxed)
    }

    /// Ring entries still being served (`transport::uring`); the server waits for 0 after
    /// unmounting, before it stops the queue threads.
    pub fn ring_entries(&self) -> usize {
        self.ring_entries.load(Ordering::Acquire)
    }

    /// Runs the calling thread's loop until no ring entry is served any more, or `timeout`
    /// passed; whether they all ended.
    pub fn wait_ring_entries(&self, ctx: &AioContext, timeout: std::time::Duration) -> bool {
        poll_until(ctx, timeout, || self.ring_entries() == 0)
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

/// Default `--max-in-flight`: requests one queue has in flight at once.
///
/// 64 because: it is twice the deepest queue our benchmarks use (QD32), spread over the
/// queues; the buffer pool (`transport::buf`) keeps a request and a READ buffer for each of
/// them, so a saturated queue maps no new buffers; and it keeps the flood ceiling
/// ([`rss_ceiling_bytes`]) near 300 MiB per queue with 1 MiB requests.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// The most memory the requests in flight of `queues` queues can hold with bound `max_in_flight`
/// and requests of `max_write` bytes: per request one request buffer and one READ buffer (each
/// rounded up to 2 MiB huge pages, `transport::buf`) and one coroutine stack (256 KiB, usually
/// barely touched). The daemon's fixed part (binary, caches such as qcow2's L2 cache, thread
/// stacks) comes on top.
pub fn rss_ceiling_bytes(queues: usize, max_in_flight: usize, max_write: usize) -> u64 {
    const HUGE: u64 = 2 << 20;
    let buffer = (buf::request_buf_size(max_write as u32) as u64).div_ceil(HUGE) * HUGE;
    let stack = runtime::coroutine::pool_config().stack_size as u64;
    let per_request = 2 * buffer + stack;
    // The pool keeps buffers a queue no longer has in flight: as many as a queue of the
    // default bound uses.
    let requests = max_in_flight.max(DEFAULT_MAX_IN_FLIGHT) as u64;
    queues as u64 * requests * per_request
}

// ---------------------------------------------------------------------------------------------
// One request, from bytes to reply: the part every transport and both engines share
// ---------------------------------------------------------------------------------------------

impl Session {
    /// Serves one request in the calling coroutine (`--engine coroutine`): parse its bytes,
    /// run [`Export::co_handle`] (which may yield in the block layer), catch a panic. Returns
    /// the reply to send, or `None` when the request takes none (FORGET) or the stream is
    /// broken (the session halts). QEMU: `fuse_co_process_request()`.
    pub(crate) fn co_serve(
        &self,
        queue: usize,
        head: &[u8],
        data: &[u8],
    ) -> Option<(u64, Response)> {
        self.co_serve_into(queue, head, data, None)
    }

    /// [`Session::co_serve`] with a buffer the transport lends for READ data
    /// ([`Export::co_handle_into`]).
    pub(crate) fn co_serve_into(
        &self,
        queue: usize,
        head: &[u8],
        data: &[u8],
        out: Option<&mut [u8]>,
    ) -> Option<(u64, Response)> {
        let req = match self.parse(queue, head, data) {
            Ok(req) => req,
            Err(errno) => return errno.map(|(unique, e)| (unique, Response::Err(e))),
        };
        let resp = catch_unwind(AssertUnwindSafe(|| self.export.co_handle_into(&req, out)))
            .unwrap_or_else(|_| panicked(&req));
        Some((req.unique(), resp))
    }

    /// [`Session::co_serve`] as a future (`--engine async`): only the handler call differs.
    pub(crate) async fn serve_async(
        &self,
        queue: usize,
        head: &[u8],
        data: &[u8],
    ) -> Option<(u64, Response)> {
        self.serve_async_into(queue, head, data, None).await
    }

    /// [`Session::serve_async`] with a buffer the transport lends for READ data.
    pub(crate) async fn serve_async_into(
        &self,
        queue: usize,
        head: &[u8],
        data: &[u8],
        out: Option<&mut [u8]>,
    ) -> Option<(u64, Response)> {
        let req = match self.parse(queue, head, data) {
            Ok(req) => req,
            Err(errno) => return errno.map(|(unique, e)| (unique, Response::Err(e))),
        };
        let resp = runtime::executor::catch_unwind(self.export.handle_async_into(&req, out))
            .await
            .unwrap_or_else(|p| {
                if p.message.starts_with(runtime::NO_STACK) {
                    log::error!("queue {queue}: {}; replying ENOMEM", p.message);
                    Response::Err(libc::ENOMEM)
                } else {
                    panicked(&req)
                }
            });
        Some((req.unique(), resp))
    }

    /// Parses a request. One the export cannot use gets an error reply instead (`(unique,
    /// EINVAL)`), or none when it halts the session (a framing error: the stream cannot be
    /// trusted).
    fn parse<'a>(
        &self,
        queue: usize,
        head: &'a [u8],
        data: &'a [u8],
    ) -> Result<Request<'a>, Option<(u64, i32)>> {
        // Before INIT the minor is unknown; INIT is parsed by its own announced minor.
        let minor = self
            .export
            .minor()
            .max(crate::protocol::reply::MIN_SUPPORTED_MINOR);
        match request::parse(head, data, minor) {
            Ok(req) => Ok(req),
            Err(e) if e.is_framing() => {
                log::error!(
                    "queue {queue}: malformed request from the kernel ({e}); halting the export"
                );
                self.stop(SessionState::Halted);
                Err(None)
            }
            Err(e) => {
                log::warn!("queue {queue}: bad request: {e}");
                Err(fuse_in_header::read_from_prefix(head)
                    .ok()
                    .map(|(h, _)| (h.unique, libc::EINVAL)))
            }
        }
    }
}

/// Runs the calling thread's loop until `done()` or until `timeout` passed (a timer wakes the
/// loop then); whether `done()` became true. For waits that must not hang on the kernel.
pub fn poll_until(ctx: &AioContext, timeout: std::time::Duration, done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let timer = ctx.timer_new(|| {});
    timer.modify(deadline);
    while !done() && std::time::Instant::now() < deadline {
        ctx.poll(true);
    }
    done()
}

/// A ring entry's coroutine started (`transport::uring`).
pub(crate) fn ring_entry_started(s: &Session) {
    s.ring_entries.fetch_add(1, Ordering::AcqRel);
}

/// A ring entry's coroutine returned; the last one wakes the main loop (which may wait for
/// them in [`Session::wait_ring_entries`]).
pub(crate) fn ring_entry_ended(s: &Session) {
    if s.ring_entries.fetch_sub(1, Ordering::AcqRel) == 1 {
        s.main.schedule_oneshot(|| {});
    }
}

/// The reply to a request that could not be served for lack of memory (`why`): ENOMEM, or
/// `None` if it takes no reply (FORGET, BATCH_FORGET, INTERRUPT) or is too short to answer.
pub(crate) fn enomem_reply(queue: usize, head: &[u8], why: &str) -> Option<(u64, Response)> {
    let Ok((h, _)) = fuse_in_header::read_from_prefix(head) else {
        log::error!("queue {queue}: {why}; the request is too short to answer");
        return None;
    };
    let name = crate::protocol::abi::opcode_name(h.opcode).unwrap_or("?");
    if matches!(
        h.opcode,
        crate::protocol::abi::FUSE_FORGET
            | crate::protocol::abi::FUSE_BATCH_FORGET
            | crate::protocol::abi::FUSE_INTERRUPT
    ) {
        log::warn!("queue {queue}: {why}; dropping {name} (it takes no reply)");
        return None;
    }
    log::error!("queue {queue}: {why}; replying ENOMEM to {name}");
    Some((h.unique, Response::Err(libc::ENOMEM)))
}

/// Says once how big a request's future is: the async engine's one allocation per request.
pub(crate) fn log_future_size(bytes: usize) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    // Relaxed: a statistic; after the first request this is a load of a line nobody writes.
    if !LOGGED.load(Ordering::Relaxed) && !LOGGED.swap(true, Ordering::Relaxed) {
        log::info!("async engine: a request future is {bytes} bytes (one allocation per request)");
    }
}

/// The reply of a request whose handler panicked: EIO, and the export keeps serving.
fn panicked(req: &Request<'_>) -> Response {
    log::error!(
        "request {} ({}) panicked; replying EIO",
        req.unique(),
        crate::protocol::abi::opcode_name(req.header.opcode).unwrap_or("?")
    );
    Response::Err(libc::EIO)
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
