//! One NBD connection in transmission phase: many requests in flight on one socket, one
//! reader coroutine that reads reply headers and hands each reply to the request it answers.
//!
//! QEMU: `block/nbd.c` — `nbd_co_send_request()` (the send lock), `nbd_receive_replies()` and
//! `nbd_co_receive_one_chunk()` (a reply header read, the owner woken to read its payload),
//! `nbd_channel_error()` (a broken connection fails every request in flight).
//!
//! ## Who reads what
//!
//! ```text
//!   request coroutine (any queue thread)          reader coroutine (one context)
//!   take a slot → cookie = seq << 16 | slot
//!   send lock: write header (+ data), unlock
//!   wait for a chunk in its slot  <─── wake ───   read a 16/20-byte reply header,
//!   read the chunk's payload from the socket       check magic and cookie, put the header
//!     straight into its own buffer                 in the slot, wait for the hand-back
//!   hand back  ────────────────────── wake ───>   read the next header
//!   … until the chunk flagged DONE; free the slot
//! ```
//!
//! The socket has one reader at a time: the reader coroutine while it reads a header, then
//! the request that owns the reply while it reads the payload into its own buffer — no copy,
//! and no buffer shared between threads. Every wait is a coroutine yield: on the socket
//! ([`runtime::co_wait_fd`] on the waiting coroutine's own context), on the send `CoMutex`,
//! or on a waker parked in the connection's state (`Mutex<State>`, never held across a
//! yield). A request coroutine on queue thread B and the reader on thread A wake each other
//! with `CoWaker::wake`, a message to the other context (QEMU's `aio_co_wake`).
//!
//! Each parked waker is taken out by whoever wakes it, under the state lock, so a coroutine is
//! woken once per wait. [`Conn::kill`] — the reader seeing EOF, bad magic or an unknown
//! cookie, a request seeing a short payload or a chunk that does not fit — marks the connection
//! dead, shuts the socket down (which wakes every coroutine waiting on it, on any thread) and
//! wakes every parked waiter; each then finds the connection dead and fails its request.
//!
//! ## A server that stops answering
//!
//! A server may keep its socket open and never answer (hung, or its host gone without a reset
//! reaching us). With a reply timeout, a *watchdog* timer on the reader's context kills the
//! connection ("server stopped answering") when requests are in flight and no byte has come
//! for that long; the requests then take the reconnect / EIO path like any lost connection.
//! The clock restarts at every byte read and when a request is sent on an idle connection.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runtime::{co_wait_fd, co_yield, AioContext, CoMutex, CoWaker, Coroutine, FdReady, Timer};

use super::handshake::ExportInfo;
use super::proto::{self, *};
use super::uri::Stream;
use crate::BlockError;

/// Requests one connection has in flight at most; more wait for a free slot. QEMU's
/// `MAX_NBD_REQUESTS` is 16, but that connection serves one `AioContext`; this one serves
/// every queue thread of the export at once (the FUSE queues, each with many requests), so
/// it gets more room. 64 slots fit easily in the 16-bit slot index of the cookie, and
/// servers (`qemu-nbd`, `nbdkit`) put no limit of their own below that.
pub const MAX_IN_FLIGHT: usize = 64;

/// How a request failed.
#[derive(Debug)]
pub enum Failure {
    /// The connection went away before the reply was complete: the request may be sent
    /// again on a new connection.
    Lost,
    /// The server answered with an error, or this request's own reply broke the protocol
    /// (EIO): final.
    Failed(BlockError),
}

/// What a request carries and receives.
pub enum Data<'a> {
    None,
    /// NBD_CMD_WRITE's payload.
    Out(&'a [u8]),
    /// NBD_CMD_READ's destination (its length is the request's).
    In(&'a mut [u8]),
    /// NBD_CMD_BLOCK_STATUS's answer: `(length, flags)` of the first extent.
    Status(Option<(u64, u32)>),
}

/// One request: command, flags, range and data.
pub struct Request<'a> {
    pub ty: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
    pub data: Data<'a>,
}

#[derive(Default)]
struct Slot {
    in_use: bool,
    /// Bumped at every use: a late reply to an earlier use of the slot has a wrong cookie.
    seq: u64,
    /// The final chunk was delivered; any further one for this cookie is a protocol error.
    done: bool,
    /// A delivered header whose payload the owner has not read yet.
    chunk: Option<ReplyHeader>,
    /// The owner, parked until a chunk comes.
    waiter: Option<CoWaker>,
}

struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Requests parked until a slot is free.
    slot_waiters: VecDeque<CoWaker>,
    /// Why the connection is over (`Some("")` after a clean close).
    dead: Option<String>,
    /// A delivered chunk's payload is still being read by its owner.
    handed_off: bool,
    /// The reader, parked until the hand-back.
    reader: Option<CoWaker>,
    /// When the server last showed life: a byte read, or a request sent while none was in
    /// flight. The reply watchdog measures silence from here.
    last_progress: Instant,
}

/// A connected, negotiated NBD connection.
pub struct Conn {
    stream: Stream,
    pub info: ExportInfo,
    /// For log lines: the URI.
    name: Arc<str>,
    send: CoMutex<()>,
    state: Mutex<State>,
    /// Silence allowed with requests in flight before the connection is killed (`None`: no
    /// limit). See the module documentation.
    reply_timeout: Option<Duration>,
}

fn locked(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // No section below panics halfway; a poisoned lock still holds consistent state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    /// Wraps a negotiated `stream` (switched to non-blocking here). Start its reader with
    /// [`spawn_reader`]. `reply_timeout`: see the module documentation (`None`: no limit).
    pub fn new(
        stream: Stream,
        info: ExportInfo,
        name: Arc<str>,
        reply_timeout: Option<Duration>,
    ) -> io::Result<Conn> {
        stream.set_timeouts(None)?;
        stream.set_nonblocking(true)?;
        let slots = (0..MAX_IN_FLIGHT).map(|_| Slot::default()).collect();
        Ok(Conn {
            stream,
            info,
            name,
            send: CoMutex::new(()),
            state: Mutex::new(State {
                slots,
                free: (0..MAX_IN_FLIGHT).rev().collect(),
                slot_waiters: VecDeque::new(),
                dead: None,
                handed_off: false,
                reader: None,
                last_progress: Instant::now(),
            }),
            reply_timeout: reply_timeout.filter(|t| !t.is_zero()),
        })
    }

    pub fn is_dead(&self) -> bool {
        locked(&self.state).dead.is_some()
    }

    /// Ends the connection: every request in flight fails with [`Failure::Lost`]. `why` is
    /// logged as an error unless empty (a clean close). Idempotent.
    pub fn kill(&self, why: &str) {
        let wake: Vec<CoWaker> = {
            let mut st = locked(&self.state);
            if st.dead.is_some() {
                return;
            }
            st.dead = Some(why.to_owned());
            let mut wake: Vec<CoWaker> = st.slot_waiters.drain(..).collect();
            wake.extend(st.reader.take());
            wake.extend(st.slots.iter_mut().filter_map(|s| s.waiter.take()));
            wake
        };
        if !why.is_empty() {
            log::error!("nbd {}: {why}; connection closed", self.name);
        }
        self.stream.shutdown();
        for w in wake {
            w.wake();
        }
    }

    /// Sends `NBD_CMD_DISC` (best effort) and closes the connection.
    pub fn co_disconnect(&self) {
        {
            let _g = self.send.co_lock();
            if !self.is_dead() {
                let hdr = encode_request(0, CMD_DISC, 0, 0, 0);
                let _ = self.co_write_all(&hdr, &[]);
            }
        }
        self.kill("");
    }

    // -----------------------------------------------------------------------------------
    // The request side
    // -----------------------------------------------------------------------------------

    /// Sends `req` and receives its whole reply. Call from a coroutine.
    pub fn co_request(&self, req: &mut Request<'_>) -> Result<(), Failure> {
        let (slot, seq) = self.co_acquire_slot()?;
        let r = self.co_send_and_receive(slot, seq, req);
        self.release_slot(slot);
        r
    }

    fn co_send_and_receive(
        &self,
        slot: usize,
        seq: u64,
        req: &mut Request<'_>,
    ) -> Result<(), Failure> {
        if let Data::Status(s) = &mut req.data {
            *s = None; // a resend after a lost connection starts afresh
        }
        let cookie = seq << 16 | slot as u64;
        let hdr = encode_request(req.flags, req.ty, cookie, req.offset, req.len);
        let payload = match &req.data {
            Data::Out(b) => *b,
            _ => &[],
        };
        self.co_send(&hdr, payload)?;
        let mut outcome = Outcome::default();
        loop {
            let h = self.co_wait_chunk(slot)?;
            let r = self.co_consume(&h, req, &mut outcome);
            if let Err(e) = r {
                // A lie about this request, or the socket failed mid-payload.
                self.kill(&e.to_string());
                return Err(match e {
                    Broken::Io(_) => Failure::Lost,
                    Broken::Protocol(_) => Failure::Failed(eio()),
                });
            }
            self.hand_back();
            if h.is_final() {
                break;
            }
        }
        outcome.finish(req, &self.name)
    }

    fn co_acquire_slot(&self) -> Result<(usize, u64), Failure> {
        loop {
            {
                let mut st = locked(&self.state);
                if st.dead.is_some() {
                    return Err(Failure::Lost);
                }
                if st.free.len() == MAX_IN_FLIGHT {
                    // The first request on an idle connection: silence counts from now.
                    st.last_progress = Instant::now();
                }
                if let Some(i) = st.free.pop() {
                    let s = &mut st.slots[i];
                    s.in_use = true;
                    s.seq = (s.seq + 1) & 0xffff_ffff_ffff;
                    s.done = false;
                    s.chunk = None;
                    return Ok((i, s.seq));
                }
                st.slot_waiters.push_back(CoWaker::current());
            }
            co_yield();
        }
    }

    fn release_slot(&self, i: usize) {
        let next = {
            let mut st = locked(&self.state);
            let s = &mut st.slots[i];
            s.in_use = false;
            s.chunk = None;
            s.waiter = None;
            st.free.push(i);
            st.slot_waiters.pop_front()
        };
        if let Some(w) = next {
            w.wake();
        }
    }

    fn co_send(&self, hdr: &[u8], payload: &[u8]) -> Result<(), Failure> {
        let _g = self.send.co_lock();
        if self.is_dead() {
            return Err(Failure::Lost);
        }
        if let Err(e) = self.co_write_all(hdr, payload) {
            self.kill(&format!("sending a request failed: {e}"));
            return Err(Failure::Lost);
        }
        Ok(())
    }

    /// Parks until the reader delivers a chunk to `slot`.
    fn co_wait_chunk(&self, slot: usize) -> Result<ReplyHeader, Failure> {
        loop {
            {
                let mut st = locked(&self.state);
                if let Some(h) = st.slots[slot].chunk.take() {
                    return Ok(h);
                }
                if st.dead.is_some() {
                    return Err(Failure::Lost);
                }
                st.slots[slot].waiter = Some(CoWaker::current());
            }
            co_yield();
        }
    }

    /// The payload is read: the reader may read the next header.
    fn hand_back(&self) {
        let reader = {
            let mut st = locked(&self.state);
            st.handed_off = false;
            st.reader.take()
        };
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Reads the payload of chunk `h` of `req`'s reply into the request.
    fn co_consume(
        &self,
        h: &ReplyHeader,
        req: &mut Request<'_>,
        out: &mut Outcome,
    ) -> Result<(), Broken> {
        let (req_off, req_len) = (req.offset, u64::from(req.len));
        let (flags, ty, length) = match *h {
            ReplyHeader::Simple { error, .. } => return self.co_consume_simple(error, req, out),
            ReplyHeader::Chunk {
                flags, ty, length, ..
            } => (flags, ty, length),
        };
        match (ty, &mut req.data) {
            (REPLY_TYPE_NONE, _) => {
                if length != 0 || flags & REPLY_FLAG_DONE == 0 {
                    return Err(violation("NONE chunk with a payload or without DONE").into());
                }
            }
            (REPLY_TYPE_OFFSET_DATA, Data::In(buf)) => {
                if length < 8 {
                    return Err(violation(format!("data chunk of {length} bytes")).into());
                }
                let mut at = [0u8; 8];
                self.co_read_exact(&mut at)?;
                let data_len = u64::from(length - 8);
                let range = chunk_range(u64::from_be_bytes(at), data_len, req_off, req_len)?;
                out.cover(range.clone())?;
                self.co_read_exact(&mut buf[range])?;
            }
            (REPLY_TYPE_OFFSET_HOLE, Data::In(buf)) => {
                let payload = self.co_read_small(length)?;
                let range = parse_hole_chunk(&payload, req_off, req_len)?;
                out.cover(range.clone())?;
                buf[range].fill(0);
            }
            (REPLY_TYPE_BLOCK_STATUS, Data::Status(status)) => {
                let payload = self.co_read_small(length)?;
                let context = self.info.meta_context.unwrap_or(u32::MAX);
                if status.is_some() {
                    return Err(violation("a second block status chunk").into());
                }
                *status = Some(parse_block_status_chunk(&payload, context, req_len)?);
            }
            (t, _) if t & REPLY_TYPE_ERROR_BIT != 0 => {
                let payload = self.co_read_small(length)?;
                let e = parse_error_chunk(t, &payload, req_off, req_len)?;
                out.error.get_or_insert(e);
            }
            (t, _) => {
                return Err(
                    violation(format!("chunk type {t} in the reply to command {}", req.ty)).into(),
                )
            }
        }
        Ok(())
    }

    fn co_consume_simple(
        &self,
        error: u32,
        req: &mut Request<'_>,
        out: &mut Outcome,
    ) -> Result<(), Broken> {
        if error != 0 {
            out.error = Some(ChunkError {
                error,
                message: String::new(),
            });
            return Ok(());
        }
        match &mut req.data {
            Data::In(buf) => {
                out.cover(0..buf.len())?;
                self.co_read_exact(buf)?;
            }
            Data::Status(_) => {
                return Err(violation("a simple reply to a block status request").into())
            }
            Data::None | Data::Out(_) => {}
        }
        Ok(())
    }

    /// A non-data payload, bounded by [`MAX_SMALL_PAYLOAD`].
    fn co_read_small(&self, length: u32) -> Result<Vec<u8>, Broken> {
        if length > MAX_SMALL_PAYLOAD {
            return Err(violation(format!("chunk payload of {length} bytes")).into());
        }
        let mut v = vec![0u8; length as usize];
        self.co_read_exact(&mut v)?;
        Ok(v)
    }

    // -----------------------------------------------------------------------------------
    // The reader side
    // -----------------------------------------------------------------------------------

    /// The reader coroutine's body: reads reply headers and hands each to its request until
    /// the connection ends. Returns once it is dead.
    pub fn co_read_replies(&self) {
        loop {
            let h = match self.co_read_header() {
                Ok(h) => h,
                Err(e) => return self.kill(&self.read_failure(e)),
            };
            if let Err(e) = self.deliver(h) {
                return self.kill(&e.to_string());
            }
            if !self.co_wait_hand_back() {
                return;
            }
        }
    }

    /// What a failed header read means: nothing to say after our own close, "the server
    /// closed the connection" at EOF, else the error.
    fn read_failure(&self, e: Broken) -> String {
        if let Some(why) = &locked(&self.state).dead {
            return why.clone();
        }
        match e {
            Broken::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "the server closed the connection".into()
            }
            e => e.to_string(),
        }
    }

    fn co_read_header(&self) -> Result<ReplyHeader, Broken> {
        let mut b = [0u8; 16];
        self.co_read_exact(&mut b)?;
        let start = parse_reply_start(&b)?;
        if let ReplyStart::Simple(h) = start {
            return Ok(h);
        }
        let mut len = [0u8; 4];
        self.co_read_exact(&mut len)?;
        Ok(finish_chunk_header(start, &len))
    }

    /// Puts `h` into the slot its cookie names and wakes the owner.
    fn deliver(&self, h: ReplyHeader) -> Result<(), ProtocolError> {
        let cookie = h.cookie();
        let waiter = {
            let mut st = locked(&self.state);
            if st.dead.is_some() {
                return Ok(());
            }
            let idx = (cookie & 0xffff) as usize;
            let slot = st.slots.get_mut(idx);
            let slot = match slot {
                Some(s) if s.in_use && s.seq == cookie >> 16 && !s.done => s,
                _ => {
                    return Err(violation(format!(
                        "reply for cookie {cookie:#x}, which no request in flight has"
                    )))
                }
            };
            slot.done = h.is_final();
            slot.chunk = Some(h);
            let w = slot.waiter.take();
            st.handed_off = true;
            w
        };
        if let Some(w) = waiter {
            w.wake();
        }
        Ok(())
    }

    /// Parks until the chunk's owner has read its payload; false if the connection died.
    fn co_wait_hand_back(&self) -> bool {
        loop {
            {
                let mut st = locked(&self.state);
                if st.dead.is_some() {
                    return false;
                }
                if !st.handed_off {
                    return true;
                }
                st.reader = Some(CoWaker::current());
            }
            co_yield();
        }
    }

    // -----------------------------------------------------------------------------------
    // The socket
    // -----------------------------------------------------------------------------------

    /// Reads exactly `buf.len()` bytes, yielding while the socket is empty.
    fn co_read_exact(&self, buf: &mut [u8]) -> Result<(), Broken> {
        let mut done = 0;
        while done < buf.len() {
            match (&self.stream).read(&mut buf[done..]) {
                Ok(0) => return Err(Broken::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    done += n;
                    if self.reply_timeout.is_some() {
                        locked(&self.state).last_progress = Instant::now();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A socket that cannot be waited for is a broken connection.
                    co_wait_fd(self.stream.as_fd(), FdReady::Readable).map_err(Broken::Io)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Broken::Io(e)),
            }
        }
        Ok(())
    }

    /// Writes `hdr` then `payload`, yielding while the socket is full.
    fn co_write_all(&self, hdr: &[u8], payload: &[u8]) -> io::Result<()> {
        let total = hdr.len() + payload.len();
        let mut done = 0;
        while done < total {
            let r = if done < hdr.len() {
                let bufs = [IoSlice::new(&hdr[done..]), IoSlice::new(payload)];
                (&self.stream).write_vectored(&bufs)
            } else {
                (&self.stream).write(&payload[done - hdr.len()..])
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    co_wait_fd(self.stream.as_fd(), FdReady::Writable)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Starts the reader coroutine of `conn` on this thread's context, running `after` when it
/// ends (the connection is dead then). With a reply timeout, the watchdog runs on the same
/// context for as long as the reader does.
pub fn spawn_reader(conn: Arc<Conn>, after: impl FnOnce(Arc<Conn>) + 'static) {
    // `wake` enters it at once from outside a coroutine, or right after the current one
    // yields from inside one.
    Coroutine::new(move || {
        let watchdog = conn.reply_timeout.map(|t| start_watchdog(&conn, t));
        conn.co_read_replies();
        drop(watchdog); // disarms it
        after(conn);
    })
    .wake();
}

/// Arms the reply watchdog of `conn` on this thread's context: a timer that re-arms itself
/// until the connection dies, and kills it after `timeout` of silence with requests in
/// flight. Dropping the returned timer stops it.
fn start_watchdog(conn: &Arc<Conn>, timeout: Duration) -> Rc<Timer> {
    // The callback re-arms its own timer through a weak handle, so that dropping the
    // returned `Rc` really ends it.
    let me: Rc<OnceCell<Weak<Timer>>> = Rc::default();
    let (c, m) = (Arc::downgrade(conn), me.clone());
    let timer = Rc::new(AioContext::with_current(|ctx| {
        ctx.timer_new(move || {
            let (Some(conn), Some(timer)) = (c.upgrade(), m.get().and_then(Weak::upgrade)) else {
                return;
            };
            if let Some(next) = conn.check_silence(timeout) {
                timer.modify(next);
            }
        })
    }));
    let _ = me.set(Rc::downgrade(&timer));
    timer.modify_after(timeout);
    timer
}

impl Conn {
    /// The watchdog's check: kills the connection if requests are in flight and the server
    /// has said nothing for `timeout`; else returns when to look again (`None`: dead).
    fn check_silence(&self, timeout: Duration) -> Option<Instant> {
        let now = Instant::now();
        let silent_for = {
            let st = locked(&self.state);
            if st.dead.is_some() {
                return None;
            }
            if st.free.len() == MAX_IN_FLIGHT {
                return Some(now + timeout); // nothing in flight: nothing to wait for
            }
            let silent_for = now.saturating_duration_since(st.last_progress);
            if silent_for < timeout {
                return Some(st.last_progress + timeout);
            }
            silent_for
        };
        self.kill(&format!(
            "server stopped answering: nothing for {:.1} s with requests in flight",
            silent_for.as_secs_f64()
        ));
        None
    }
}

/// What a request's chunks said, put together at the end.
#[derive(Default)]
struct Outcome {
    /// The first error chunk (or the simple reply's error).
    error: Option<ChunkError>,
    /// The parts of a read's buffer that data and hole chunks covered: sorted, disjoint,
    /// adjacent ranges merged (so it stays short: one range for an honest reply in order).
    covered: Vec<Range<usize>>,
}

impl Outcome {
    /// Records that a chunk covered `r` (non-empty) of the read's buffer. A chunk over bytes
    /// another chunk already covered is a protocol error: the server may not say two things
    /// about one byte (the NBD spec forbids overlapping chunks in one reply).
    fn cover(&mut self, r: Range<usize>) -> Result<(), ProtocolError> {
        if r.is_empty() {
            return Ok(());
        }
        // The first range that ends at or after `r` starts: the only one that may overlap
        // `r` or touch it from the left.
        let i = self.covered.partition_point(|c| c.end < r.start);
        let overlaps = |c: &Range<usize>| c.start < r.end && r.start < c.end;
        if self.covered.get(i).is_some_and(overlaps)
            || self.covered.get(i + 1).is_some_and(overlaps)
        {
            return Err(violation(format!(
                "chunk over bytes {}..{} of the read, which another chunk covered",
                r.start, r.end
            )));
        }
        // Merge with the neighbours it touches.
        let touches_left = self.covered.get(i).is_some_and(|c| c.end == r.start);
        let touches_right_at = if touches_left { i + 1 } else { i };
        let touches_right = self
            .covered
            .get(touches_right_at)
            .is_some_and(|c| c.start == r.end);
        match (touches_left, touches_right) {
            (true, true) => {
                let right = self.covered.remove(i + 1);
                self.covered[i].end = right.end;
            }
            (true, false) => self.covered[i].end = r.end,
            (false, true) => self.covered[i].start = r.start,
            (false, false) => self.covered.insert(i, r),
        }
        Ok(())
    }

    /// Whether the chunks covered the whole read of `len` bytes.
    fn covers_all(&self, len: usize) -> bool {
        match self.covered.as_slice() {
            [] => len == 0,
            [only] => *only == (0..len),
            _ => false,
        }
    }

    fn finish(self, req: &Request<'_>, name: &str) -> Result<(), Failure> {
        if let Some(e) = self.error {
            let errno = proto::errno_of(e.error);
            log::debug!(
                "nbd {name}: command {} at {}+{}: the server says {} ({})",
                req.ty,
                req.offset,
                req.len,
                io::Error::from_raw_os_error(errno),
                e.message
            );
            return Err(Failure::Failed(BlockError::Io(
                io::Error::from_raw_os_error(errno),
            )));
        }
        match &req.data {
            Data::In(buf) if !self.covers_all(buf.len()) => {
                log::error!(
                    "nbd {name}: the reply to a read of {}+{} covers only {:?} of it",
                    req.offset,
                    req.len,
                    self.covered
                );
                Err(Failure::Failed(eio()))
            }
            Data::Status(None) => {
                log::error!("nbd {name}: a block status reply without an extent");
                Err(Failure::Failed(eio()))
            }
            _ => Ok(()),
        }
    }
}

/// Why a reply could not be read.
#[derive(Debug)]
enum Broken {
    Io(io::Error),
    Protocol(ProtocolError),
}

impl From<ProtocolError> for Broken {
    fn from(e: ProtocolError) -> Self {
        Broken::Protocol(e)
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(
                    f,
                    "the server closed the connection in the middle of a reply"
                )
            }
            Broken::Io(e) => write!(f, "reading a reply failed: {e}"),
            Broken::Protocol(p) => write!(f, "protocol error: {p}"),
        }
    }
}

fn eio() -> BlockError {
    BlockError::Io(io::Error::from_raw_os_error(libc::EIO))
}
