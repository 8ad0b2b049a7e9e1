//! The `nbd` protocol driver: a remote image served by an NBD server (`qemu-nbd`, `nbdkit`,
//! `nbd-server`), reached by a URI — `nbd://HOST[:PORT]/EXPORT` or
//! `nbd+unix:///EXPORT?socket=PATH`.
//!
//! QEMU: `block/nbd.c` (the driver: requests, replies, reconnect), `nbd/client.c` (the
//! handshake), `nbd/client-connection.c` (connecting on a separate thread),
//! `include/block/nbd.h` (the wire format).
//!
//! | file | QEMU | owns |
//! |---|---|---|
//! | `uri.rs` | `nbd_parse_uri()` | the URI syntax; the TCP or Unix socket |
//! | `proto.rs` | `include/block/nbd.h`, the parsing in `nbd/client.c` | constants, request encoding, checks of every reply field (pure: tested and fuzzed on bytes) |
//! | `handshake.rs` | `nbd_receive_negotiate()` | fixed newstyle: structured replies, `base:allocation`, `NBD_OPT_GO` with block sizes |
//! | `conn.rs` | `nbd_co_send_request()`, `nbd_receive_replies()` | one connection: the send lock, the slots, the reader coroutine |
//! | `mod.rs` | `nbd_co_request()`, `nbd_reconnect_attempt()` | the driver: splitting, retrying, reconnecting |
//!
//! ## The model
//!
//! One connection carries every request of the export, from every queue thread, up to
//! [`conn::MAX_IN_FLIGHT`] at once. A request coroutine takes a slot (its cookie), sends its
//! header and data under a `CoMutex`, then waits; one *reader coroutine* reads reply headers
//! and wakes the request each one answers, which reads the payload straight into its own
//! buffer and hands the socket back (`conn.rs` draws it). Every wait — an empty or full
//! socket, the send lock, a reply, a free slot — is a coroutine yield; the socket's waits are
//! [`runtime::co_wait_fd`], QEMU's `qio_channel_yield`, the fd handler that the rest of the
//! project never needed.
//!
//! The reader lives on the context that opened (or last re-opened) the connection; requests
//! run on the context of their queue thread. They wake each other across threads with
//! `CoWaker::wake`, i.e. a message to the other context (QEMU's `aio_co_wake`).
//!
//! The async engine reaches this driver through the coroutine bridge (`runtime::co_bridge`),
//! as it reaches qcow2: `AsyncPath::of` does not know this leaf, so each request runs in a
//! coroutine on the task's thread.
//!
//! ## Failures
//!
//! A server that lies — bad magic, an unknown cookie, a chunk outside the request, a payload
//! longer than allowed, a read reply that does not cover the read — is a protocol error: the
//! connection is closed with an error log line naming the lie, the request that met it fails
//! with EIO, and every other request in flight is treated as if the connection had dropped.
//! An error the server reports for a request (`NBD_EIO` …) fails that request only. Nothing
//! the server sends can panic the driver or make a request wait for bytes that will not come:
//! a dead connection is shut down, which wakes every coroutine waiting on its socket.
//!
//! When the connection drops, the reader coroutine becomes the *reconnect loop*: it connects
//! and negotiates again on the thread pool (a blocking connect and handshake, as QEMU's
//! connection thread), pausing 0.1 s, then doubling up to 2 s between attempts, until it
//! succeeds or the driver closes. Meanwhile requests — the ones that were in flight and new
//! ones — wait up to `reconnect_delay` from the moment of the drop, then fail with EIO; after
//! that, new requests fail at once until a reconnect succeeds. With a reconnect the waiting
//! requests are sent again. This is QEMU's `reconnect-delay` (default 0: fail at once, still
//! reconnect in the background). A reconnect to an export that differs from the first one
//! (size, flags, structured replies, `base:allocation`, block sizes) is refused.
//!
//! A server that keeps the socket open but stops answering is caught by
//! [`NbdOptions::reply_timeout`] (default 30 s; see `conn.rs`): the connection is closed
//! with "server stopped answering" and handled as a drop. TCP sockets also get
//! `SO_KEEPALIVE`, as QEMU sets it.
//!
//! Differences from QEMU: no TLS, no extended headers, no `NBD_CMD_CACHE` or resize, no
//! multi-conn; FUA is not used (a flush follows writes that must be durable); the reconnect
//! loop's pauses are shorter (QEMU: 1 s up to 16 s) so that a restarted server is seen soon.

#[doc(hidden)]
pub mod conn;
pub mod handshake;
pub mod proto;
pub mod uri;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runtime::{co_sleep, co_yield, AioContext, CoWaker, ThreadPool};

use crate::{BlockDriver, BlockError, BlockStatus, Result};
use conn::{Conn, Data, Failure, Request};
pub use handshake::ExportInfo;
use proto::*;
pub use uri::{is_nbd_uri, NbdUri};

/// Options of [`NbdDriver::connect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// Refuse writes even if the server allows them.
    pub read_only: bool,
    /// How long requests wait for a reconnect after the connection drops (QEMU's
    /// `reconnect-delay`; zero: they fail at once).
    pub reconnect_delay: Duration,
    /// How long the server may stay silent while requests are in flight before the
    /// connection is treated as lost ("server stopped answering": reconnect, or EIO); zero:
    /// no limit. Default [`DEFAULT_REPLY_TIMEOUT`]. QEMU has no such timeout and relies on
    /// TCP keepalive, which we set too, but keepalive sees only a dead peer host, not a hung
    /// server process, and does nothing for Unix sockets.
    pub reply_timeout: Duration,
}

/// The default [`NbdOptions::reply_timeout`]: 30 s, far beyond any healthy server's answer
/// to one request of at most 32 MiB (a slow disk behind it included), short enough that a
/// hung server surfaces as EIO (or a reconnect) rather than as a hung filesystem.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            read_only: false,
            reconnect_delay: Duration::ZERO,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
        }
    }
}

/// How long a connect and handshake may take (QEMU's `open-timeout` is 0, i.e. none; a
/// server that accepts and then says nothing must not hang the open).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request that keeps losing its connection fails after this many sends.
const MAX_SENDS: u32 = 16;

/// The `nbd` driver. QEMU: `BDRVNBDState`.
pub struct NbdDriver {
    client: Arc<Client>,
    /// Bumped by every write, write-zeroes and trim; a flush with nothing new since the last
    /// one is skipped (QEMU: `write_gen`/`flushed_gen` in `bdrv_co_flush()`), so an export
    /// that only read needs no server at its final flush.
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
}

/// What the driver and its reconnect loop share.
struct Client {
    uri: NbdUri,
    /// The URI as text, for log lines.
    name: Arc<str>,
    opts: NbdOptions,
    /// What the first connection negotiated; later ones must agree (see
    /// [`Client::incompatible`]).
    info: ExportInfo,
    link: Mutex<Link>,
}

/// The state of the connection. QEMU: `NBDClientState`.
enum Link {
    /// Connected (the connection may have died a moment ago: [`Conn::is_dead`]).
    Up(Arc<Conn>),
    /// Disconnected since `since`; the reconnect loop is trying. Requests park in `waiters`
    /// until `since + reconnect_delay`.
    Down {
        since: Instant,
        waiters: Vec<Arc<WakeOnce>>,
    },
    /// Closed by the driver.
    Closed,
}

/// A parked coroutine that several parties may wake (the reconnect loop, a timer): only the
/// first wake reaches it, so it is never woken twice for one wait.
struct WakeOnce(Mutex<Option<CoWaker>>);

impl WakeOnce {
    fn wake(&self) {
        let w = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl NbdDriver {
    /// Connects to `uri`, negotiates, and starts the reader coroutine on this thread's
    /// context (which must be polled for requests to complete: the export's main loop, or a
    /// `spawn(..).join()`). Call outside a coroutine; blocks for the connect and handshake.
    ///
    /// QEMU: `nbd_open()`.
    pub fn connect(uri: &NbdUri, opts: NbdOptions) -> Result<NbdDriver> {
        let name: Arc<str> = uri.to_string().into();
        let (stream, info) = establish(uri).map_err(|e| BlockError::Open {
            path: name.to_string().into(),
            source: e,
        })?;
        log::info!(
            "nbd {name}: {} bytes, {}{}{}, block sizes {}/{}/{}",
            info.size,
            if info.read_only() {
                "read-only"
            } else {
                "writable"
            },
            if info.structured {
                ", structured replies"
            } else {
                ""
            },
            if info.meta_context.is_some() {
                ", base:allocation"
            } else {
                ""
            },
            info.min_block,
            info.pref_block,
            info.max_block
        );
        let conn = Arc::new(Conn::new(
            stream,
            info.clone(),
            name.clone(),
            Some(opts.reply_timeout),
        )?);
        let client = Arc::new(Client {
            uri: uri.clone(),
            name,
            opts,
            info,
            link: Mutex::new(Link::Up(conn.clone())),
        });
        client.clone().start_reader(conn);
        Ok(NbdDriver {
            client,
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        })
    }

    /// What the server offered at the first connection.
    pub fn export_info(&self) -> &ExportInfo {
        &self.client.info
    }

    /// Whether a connection is up now (for tests and logs).
    pub fn is_connected(&self) -> bool {
        matches!(&*self.client.link(), Link::Up(c) if !c.is_dead())
    }

    /// Runs one request, sending it again after a reconnect if the connection drops.
    fn co_run(&self, mut req: Request<'_>) -> Result<()> {
        let writes = matches!(req.ty, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
        let r = self.co_request_retrying(&mut req);
        if writes {
            // At completion, as QEMU's `bdrv_co_write_req_finish()`: a flush that starts
            // later sees it. Release pairs with the Acquire load in `co_flush`.
            self.write_gen.fetch_add(1, Ordering::Release);
        }
        r
    }

    /// Sends `req` until it is answered, on the current connection or the next ones.
    fn co_request_retrying(&self, req: &mut Request<'_>) -> Result<()> {
        let client = &self.client;
        for _ in 0..MAX_SENDS {
            let conn = client.co_connection()?;
            match conn.co_request(req) {
                Ok(()) => return Ok(()),
                Err(Failure::Failed(e)) => return Err(e),
                Err(Failure::Lost) => client.connection_lost(&conn),
            }
        }
        log::error!(
            "nbd {}: a request lost its connection {MAX_SENDS} times; failing it",
            client.name
        );
        Err(eio())
    }

    /// The largest payload of one request: the server's maximum, a multiple of its minimum.
    fn max_payload(&self) -> u64 {
        let info = &self.client.info;
        u64::from(info.max_block.max(info.min_block))
    }

    /// Splits `[offset, offset + len)` into requests of at most `max` bytes (and u32).
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = max.min(u64::from(u32::MAX)).max(1);
        let mut at = 0;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let n = (len - at).min(max);
            let piece = (offset + at, n as u32);
            at += n;
            Some(piece)
        })
    }

    fn simple(&self, ty: u16, flags: u16, offset: u64, len: u32) -> Request<'static> {
        Request {
            ty,
            flags,
            offset,
            len,
            data: Data::None,
        }
    }
}

/// Connects and negotiates (blocking, bounded by [`CONNECT_TIMEOUT`]).
fn establish(uri: &NbdUri) -> io::Result<(uri::Stream, ExportInfo)> {
    let stream = uri::Stream::connect(&uri.address, CONNECT_TIMEOUT)?;
    stream.set_timeouts(Some(CONNECT_TIMEOUT))?;
    let info = handshake::negotiate(&mut &stream, &uri.export).map_err(|e| match e {
        handshake::HandshakeError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the server did not finish the handshake within {} s (busy with another \
                     client? qemu-nbd serves one at a time unless --shared=N)",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )
        }
        handshake::HandshakeError::Io(e) => e,
        e => io::Error::other(e.to_string()),
    })?;
    Ok((stream, info))
}

impl Client {
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the reader coroutine of `conn` on this thread; when the connection ends it
    /// becomes the reconnect loop.
    fn start_reader(self: Arc<Self>, conn: Arc<Conn>) {
        conn::spawn_reader(conn, move |dead| {
            self.connection_lost(&dead);
            if let Some(next) = self.co_reconnect() {
                self.start_reader(next);
            }
        });
    }

    /// `conn` is dead: if it is still the current connection, the link goes down now.
    fn connection_lost(&self, conn: &Arc<Conn>) {
        let mut link = self.link();
        if let Link::Up(c) = &*link {
            if Arc::ptr_eq(c, conn) {
                *link = Link::Down {
                    since: Instant::now(),
                    waiters: Vec::new(),
                };
            }
        }
    }

    /// The live connection, waiting for a reconnect up to the reconnect delay.
    fn co_connection(&self) -> Result<Arc<Conn>> {
        loop {
            let (token, deadline) = {
                let mut link = self.link();
                match &mut *link {
                    Link::Up(c) if !c.is_dead() => return Ok(c.clone()),
                    Link::Up(_) => {
                        // Dead a moment ago; its reader will notice too.
                        *link = Link::Down {
                            since: Instant::now(),
                            waiters: Vec::new(),
                        };
                        continue;
                    }
                    Link::Closed => return Err(eio()),
                    Link::Down { since, waiters } => {
                        let deadline = *since + self.opts.reconnect_delay;
                        if Instant::now() >= deadline {
                            log::debug!("nbd {}: not connected; request fails", self.name);
                            return Err(eio());
                        }
                        let token = Arc::new(WakeOnce(Mutex::new(Some(CoWaker::current()))));
                        waiters.push(token.clone());
                        (token, deadline)
                    }
                }
            };
            let t = token.clone();
            let timer = AioContext::with_current(|ctx| ctx.timer_new(move || t.wake()));
            timer.modify(deadline);
            co_yield();
            // Whoever woke us took the waker; make sure the other party cannot.
            token.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Tries to connect again until it works (the new connection, now current) or the
    /// driver is closed (`None`). Runs in the old connection's reader coroutine.
    ///
    /// QEMU: `nbd_co_reconnect_loop()`.
    fn co_reconnect(&self) -> Option<Arc<Conn>> {
        let mut pause = Duration::from_millis(100);
        let mut said = false;
        loop {
            if matches!(&*self.link(), Link::Closed) {
                return None;
            }
            let uri = self.uri.clone();
            let r = ThreadPool::global().submit_co(move || establish(&uri));
            match r {
                Ok((stream, info)) if self.incompatible(&info).is_none() => {
                    let timeout = Some(self.opts.reply_timeout);
                    match Conn::new(stream, info, self.name.clone(), timeout) {
                        Ok(c) => {
                            if let Some(c) = self.install(Arc::new(c)) {
                                log::info!("nbd {}: reconnected", self.name);
                                return Some(c);
                            }
                            return None;
                        }
                        Err(e) => log::warn!("nbd {}: reconnect: {e}", self.name),
                    }
                }
                Ok((_, info)) => log::warn!(
                    "nbd {}: reconnect refused: {}",
                    self.name,
                    self.incompatible(&info).unwrap_or_default()
                ),
                Err(e) if !said => {
                    log::warn!("nbd {}: reconnecting ({e}); retrying", self.name);
                    said = true;
                }
                Err(e) => log::debug!("nbd {}: reconnect attempt: {e}", self.name),
            }
            co_sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Why a reconnect that negotiated `new` cannot replace the first connection, if it
    /// cannot: the driver promised its users (and sized, split and routed requests by) what
    /// the first connection said — the size, the transmission flags (read-only, flush, trim,
    /// write-zeroes…), structured replies, `base:allocation`, and the block sizes. The meta
    /// context's id may differ: each connection parses with its own.
    fn incompatible(&self, new: &ExportInfo) -> Option<String> {
        let old = &self.info;
        let why = if new.size != old.size {
            format!("the export now has {} bytes, not {}", new.size, old.size)
        } else if new.flags != old.flags {
            format!(
                "the export's flags are now {:#06x}, not {:#06x}",
                new.flags, old.flags
            )
        } else if new.structured != old.structured {
            format!(
                "the server {} structured replies now",
                if new.structured { "offers" } else { "refuses" }
            )
        } else if new.meta_context.is_some() != old.meta_context.is_some() {
            format!(
                "the server {} base:allocation now",
                if new.meta_context.is_some() {
                    "offers"
                } else {
                    "refuses"
                }
            )
        } else if (new.min_block, new.max_block) != (old.min_block, old.max_block) {
            format!(
                "the block sizes are now {}..{}, not {}..{}",
                new.min_block, new.max_block, old.min_block, old.max_block
            )
        } else {
            return None;
        };
        Some(why)
    }

    /// Makes `conn` current and wakes the requests that wait; `None` (and closes `conn`) if
    /// the driver was closed meanwhile.
    fn install(&self, conn: Arc<Conn>) -> Option<Arc<Conn>> {
        let waiters = {
            let mut link = self.link();
            if matches!(&*link, Link::Closed) {
                drop(link);
                conn.kill("");
                return None;
            }
            match std::mem::replace(&mut *link, Link::Up(conn.clone())) {
                Link::Down { waiters, .. } => waiters,
                _ => Vec::new(),
            }
        };
        for w in waiters {
            w.wake();
        }
        Some(conn)
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        // Without a close: end the connection so that its reader coroutine returns.
        let old = std::mem::replace(&mut *self.client.link(), Link::Closed);
        if let Link::Up(c) = old {
            c.kill("");
        }
    }
}

impl BlockDriver for NbdDriver {
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn getlength(&self) -> u64 {
        self.client.info.size
    }

    fn request_alignment(&self) -> u64 {
        u64::from(self.client.info.min_block.max(1))
    }

    fn is_read_only(&self) -> bool {
        self.client.opts.read_only || self.client.info.read_only()
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let max = self.max_payload();
        let mut rest = buf;
        for (at, n) in Self::pieces(offset, rest.len() as u64, max) {
            let (piece, tail) = rest.split_at_mut(n as usize);
            rest = tail;
            self.co_run(Request {
                data: Data::In(piece),
                ..self.simple(CMD_READ, 0, at, n)
            })?;
        }
        Ok(())
    }

    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        let max = self.max_payload();
        let mut rest = buf;
        for (at, n) in Self::pieces(offset, rest.len() as u64, max) {
            let (piece, tail) = rest.split_at(n as usize);
            rest = tail;
            self.co_run(Request {
                data: Data::Out(piece),
                ..self.simple(CMD_WRITE, 0, at, n)
            })?;
        }
        Ok(())
    }

    fn co_flush(&self) -> Result<()> {
        let gen = self.write_gen.load(Ordering::Acquire);
        if !self.client.info.has(FLAG_SEND_FLUSH) || gen == self.flushed_gen.load(Ordering::Relaxed)
        {
            return Ok(());
        }
        self.co_run(self.simple(CMD_FLUSH, 0, 0, 0))?;
        self.flushed_gen.fetch_max(gen, Ordering::Relaxed);
        Ok(())
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        if !self.client.info.has(FLAG_SEND_WRITE_ZEROES) {
            return self.co_write_zero_buffers(offset, len);
        }
        let flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        let max = u64::from(u32::MAX) / 2;
        let max = max - max % self.request_alignment();
        for (at, n) in Self::pieces(offset, len, max) {
            self.co_run(self.simple(CMD_WRITE_ZEROES, flags, at, n))?;
        }
        Ok(())
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        if !self.client.info.has(FLAG_SEND_TRIM) {
            return Err(BlockError::NotSupported("the NBD server has no trim"));
        }
        let max = u64::from(u32::MAX) / 2;
        let max = max - max % self.request_alignment();
        for (at, n) in Self::pieces(offset, len, max) {
            self.co_run(self.simple(CMD_TRIM, 0, at, n))?;
        }
        Ok(())
    }

    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        if self.client.info.meta_context.is_none() {
            return Ok((BlockStatus::Data, len.max(1)));
        }
        let max = u64::from(u32::MAX) / 2;
        let n = len.clamp(1, max - max % self.request_alignment()) as u32;
        let mut req = Request {
            data: Data::Status(None),
            ..self.simple(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, n)
        };
        self.co_request_retrying(&mut req)?;
        let Data::Status(Some((length, flags))) = req.data else {
            return Err(eio()); // `Conn` checks that a status came; never reached
        };
        // Only NBD_STATE_ZERO says what the bytes are: zeros. NBD_STATE_HOLE says only that
        // no storage is allocated, and a hole without ZERO may read as anything (a server
        // backed by a device that does not zero on discard): reporting it as zeros would let
        // a caller skip data. QEMU keeps the two apart too (`nbd_client_co_block_status()`
        // maps ZERO to BDRV_BLOCK_ZERO; a hole is only "not allocated").
        let status = if flags & STATE_ZERO != 0 {
            BlockStatus::Zero
        } else {
            BlockStatus::Data
        };
        Ok((status, length))
    }

    fn co_truncate(&self, _size: u64) -> Result<()> {
        Err(BlockError::NotSupported("resizing an NBD export"))
    }

    fn close(&self) -> Result<()> {
        let old = std::mem::replace(&mut *self.client.link(), Link::Closed);
        match old {
            Link::Up(c) if runtime::in_coroutine() => c.co_disconnect(),
            Link::Up(c) => c.kill(""),
            Link::Down { waiters, .. } => {
                for w in waiters {
                    w.wake();
                }
            }
            Link::Closed => {}
        }
        Ok(())
    }
}

impl NbdDriver {
    /// Write-zeroes for a server without `NBD_CMD_WRITE_ZEROES`: writes of zero buffers.
    fn co_write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = self.max_payload().min(1 << 20);
        let zeros = vec![0u8; chunk as usize];
        for (at, n) in Self::pieces(offset, len, chunk) {
            self.co_pwritev(at, &zeros[..n as usize])?;
        }
        Ok(())
    }
}

fn eio() -> BlockError {
    BlockError::Io(io::Error::from_raw_os_error(libc::EIO))
}

/// Opens `uri` the way the command line does: the `nbd` driver, under a `raw` window when
/// `opts` gives an offset or a size, under the error-injection rules `inject`, in a
/// `BlockBackend`. The export is read-only if asked, or if the server says so (logged).
/// `-f raw` and `-f auto` mean the same here (the bytes are exported as they are; no
/// probing); other formats are refused.
///
/// QEMU: `blk_new_open()` with `driver=nbd` (and `driver=raw,file.driver=nbd`).
pub fn open_nbd(
    uri: &str,
    opts: &crate::OpenOptions,
    nbd: NbdOptions,
    inject: &[crate::Rule],
) -> Result<Arc<crate::BlockBackend>> {
    use crate::{BackendOptions, Format, RawDriver, RawOptions};
    let parsed = NbdUri::parse(uri).map_err(BlockError::Invalid)?;
    match opts.format {
        Format::Raw | Format::Auto => {}
        _ => {
            return Err(BlockError::Invalid(
                "an NBD export is opened as raw bytes (-f raw or auto)".into(),
            ))
        }
    }
    let read_only = opts.read_only || opts.force_share || nbd.read_only;
    let driver = NbdDriver::connect(&parsed, NbdOptions { read_only, ..nbd })?;
    if driver.export_info().read_only() && !read_only {
        log::info!("nbd {parsed}: the server exports it read-only; so does this export");
    }
    let read_only = driver.is_read_only();
    let mut node: Arc<dyn BlockDriver> = Arc::new(driver);
    if opts.offset != 0 || opts.size.is_some() {
        let window = RawOptions {
            offset: opts.offset,
            size: opts.size,
        };
        node = Arc::new(RawDriver::new(node, window)?);
    }
    if !inject.is_empty() {
        let dbg = crate::BlkdebugDriver::new(node);
        for r in inject {
            dbg.add_rule(r.clone());
        }
        node = Arc::new(dbg);
    }
    let backend = BackendOptions {
        read_only,
        write_beyond_eof: false,
        discard: opts.discard,
        detect_zeroes: opts.detect_zeroes,
    };
    Ok(Arc::new(crate::BlockBackend::new(node, backend)?))
}
