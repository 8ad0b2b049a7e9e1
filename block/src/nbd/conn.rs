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

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use runtime::{co_wait_fd, co_yield, CoMutex, CoWaker, Coroutine, FdReady};

use super::handshake::ExportInfo;
use super::proto::{self, *};
use super::uri::Stream;
use crate::BlockError;

/// Requests one connection has in flight at most (QEMU: `MAX_NBD_REQUESTS`, 16). More wait
/// for a free slot.
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
}

/// A connected, negotiated NBD connection.
pub struct Conn {
    stream: Stream,
    pub info: ExportInfo,
    /// For log lines: the URI.
    name: Arc<str>,
    send: CoMutex<()>,
    state: Mutex<State>,
}

fn locked(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // No section below panics halfway; a poisoned lock still holds consistent state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    /// Wraps a negotiated `stream` (switched to non-blocking here). Start its reader with
    /// [`Conn::co_read_replies`] in a coroutine.
    pub fn new(stream: Stream, info: ExportInfo, name: Arc<str>) -> io::Result<Conn> {
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
            }),
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
                self.co_read_exact(&mut buf[range])?;
                out.covered += data_len;
            }
            (REPLY_TYPE_OFFSET_HOLE, Data::In(buf)) => {
                let payload = self.co_read_small(length)?;
                let range = parse_hole_chunk(&payload, req_off, req_len)?;
                out.covered += range.len() as u64;
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
                self.co_read_exact(buf)?;
                out.covered = buf.len() as u64;
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
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    co_wait_fd(self.stream.as_fd(), FdReady::Readable)
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
                    co_wait_fd(self.stream.as_fd(), FdReady::Writable)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Starts the reader coroutine of `conn` on this thread's context, running `after` when it
/// ends (the connection is dead then).
pub fn spawn_reader(conn: Arc<Conn>, after: impl FnOnce(Arc<Conn>) + 'static) {
    // `wake` enters it at once from outside a coroutine, or right after the current one
    // yields from inside one.
    Coroutine::new(move || {
        conn.co_read_replies();
        after(conn);
    })
    .wake();
}

/// What a request's chunks said, put together at the end.
#[derive(Default)]
struct Outcome {
    /// The first error chunk (or the simple reply's error).
    error: Option<ChunkError>,
    /// Bytes of a read covered by data and hole chunks.
    covered: u64,
}

impl Outcome {
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
            Data::In(_) if self.covered != u64::from(req.len) => {
                log::error!(
                    "nbd {name}: the reply to a read of {}+{} covers {} bytes",
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
