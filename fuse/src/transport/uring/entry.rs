//! Ring entries: the memory a FUSE-over-io_uring request arrives in and its reply leaves from,
//! and the two commands that move them (REGISTER, COMMIT_AND_FETCH). The queue that serves
//! them is in `mod.rs`; the kernel facts are in `docs/fuse-uring.md`.
//!
//! - A [`RingEntry`] is a header buffer ([`fuse_uring_req_header`], 288 bytes) and a payload
//!   buffer of at least [`payload_size`] bytes, handed to the kernel as two iovecs by a
//!   REGISTER command (`IORING_OP_URING_CMD` with a 128-byte SQE). The command completes when
//!   a request has been copied into the entry; the answer goes back in the same buffers with
//!   COMMIT_AND_FETCH, which at once waits for the entry's next request.
//! - [`RingEntry::bytes`] turns the completed entry into the bytes
//!   [`crate::protocol::request::parse`] understands; [`RingEntry::write_response`] writes the
//!   export's answer.
//! - [`co_serve_entry`] and [`RingHandler`] serve an entry with a handler of one's own (the
//!   low-level test `fuse/tests/uring_transport.rs` uses them; the export goes through the
//!   queue in `mod.rs`).
//!
//! # Unsafe code
//!
//! Unlike the rest of the crate, whose `unsafe` lives in [`crate::sys`], this module owns the
//! memory it shares with the kernel ([`RingEntry`]: raw header allocation, iovecs) and submits
//! the commands; each block says why it holds.
//!
//! Kernel: `fs/fuse/dev_uring.c`; libfuse: `lib/fuse_uring.c` (`fuse_uring_register_ent()`,
//! `fuse_uring_commit_sqe()`). QEMU: none (its export uses `/dev/fuse` only).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::export::Response;
use crate::protocol::abi::{
    fuse_in_header, fuse_out_header, fuse_uring_cmd_req, fuse_uring_ent_in_out,
    fuse_uring_req_header, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, FUSE_IO_URING_CMD_REGISTER,
    FUSE_MIN_READ_BUFFER, FUSE_OVER_IO_URING, FUSE_URING_IOV_SEGS, FUSE_URING_OP_IN_OUT_SZ,
    FUSE_WRITE,
};
use crate::protocol::reply::Reply;
use crate::protocol::request::{self, ParseError, Request};
use crate::sys::HugePages;
use crate::transport::buf;

/// The kernel parameter that allows FUSE over io_uring.
pub const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
/// The CPUs the kernel may ever run: one FUSE ring queue each.
pub const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// Why the ring transport cannot start or went wrong.
#[derive(Debug)]
pub enum UringError {
    /// The kernel's INIT did not offer `FUSE_OVER_IO_URING` (no `FUSE_INIT_EXT`, the
    /// `enable_uring` parameter off, or a kernel before 6.14).
    NotOffered,
    /// This thread has no io_uring of 128-byte SQEs (`runtime::ring::set_ring_sqe128(true)`
    /// before creating the context), is not in a coroutine, or the ring is full.
    NoRing,
    /// The kernel refused a command with this errno (`EAGAIN`: REGISTER before the INIT
    /// reply; `EINVAL`: bad queue id, header or payload buffer too small, or a 64-byte SQE;
    /// `EOPNOTSUPP`: `enable_uring` off and not negotiated).
    Kernel {
        /// `FUSE_IO_URING_CMD_*`.
        cmd_op: u32,
        /// Kernel queue of the entry.
        qid: u16,
        /// Positive errno.
        errno: i32,
    },
    /// A completed entry does not hold a well-formed request.
    BadRequest(String),
    /// A reply does not fit the entry's payload buffer.
    ReplyTooLong {
        /// Bytes of reply body.
        len: usize,
        /// Payload buffer size.
        capacity: usize,
    },
    /// Reading `/sys` or allocating buffers failed.
    Io(io::Error),
}

impl fmt::Display for UringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UringError::NotOffered => write!(
                f,
                "the kernel does not offer FUSE over io_uring (needs Linux 6.14+ and \
                 {ENABLE_PARAM} = 1)"
            ),
            UringError::NoRing => write!(
                f,
                "no io_uring with 128-byte SQEs on this thread (or not in a coroutine)"
            ),
            UringError::Kernel { cmd_op, qid, errno } => write!(
                f,
                "fuse io_uring command {} on queue {qid} refused: {}",
                cmd_name(*cmd_op),
                io::Error::from_raw_os_error(*errno)
            ),
            UringError::BadRequest(why) => write!(f, "malformed ring request: {why}"),
            UringError::ReplyTooLong { len, capacity } => {
                write!(
                    f,
                    "reply of {len} bytes exceeds the {capacity}-byte payload buffer"
                )
            }
            UringError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UringError {}

impl From<io::Error> for UringError {
    fn from(e: io::Error) -> Self {
        UringError::Io(e)
    }
}

fn cmd_name(cmd_op: u32) -> &'static str {
    match cmd_op {
        FUSE_IO_URING_CMD_REGISTER => "REGISTER",
        FUSE_IO_URING_CMD_COMMIT_AND_FETCH => "COMMIT_AND_FETCH",
        _ => "?",
    }
}

/// Whether the `enable_uring` parameter is on; `None` if the kernel has none (no
/// `CONFIG_FUSE_IO_URING`, or fuse not loaded).
pub fn kernel_enabled() -> Option<bool> {
    let s = std::fs::read_to_string(ENABLE_PARAM).ok()?;
    Some(matches!(s.trim(), "Y" | "y" | "1"))
}

/// `Ok` if the kernel's INIT flags (64-bit: `flags | flags2 << 32`) offer FUSE over io_uring.
/// The reply must then grant [`FUSE_OVER_IO_URING`] too.
pub fn check_offered(kernel_init_flags: u64) -> Result<(), UringError> {
    if kernel_init_flags & FUSE_OVER_IO_URING != 0 {
        Ok(())
    } else {
        Err(UringError::NotOffered)
    }
}

/// How many CPUs a CPU list such as `0-3,8-11` names (the kernel sizes its queue array with
/// `num_possible_cpus()`, a count). `None` if the text is not a CPU list.
pub fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let a = part.parse::<usize>().ok()?;
                (a, a)
            }
        };
        n += b.checked_sub(a)? + 1;
    }
    Some(n)
}

/// Number of kernel ring queues: the possible CPUs of this machine.
pub fn possible_cpus() -> Result<usize, UringError> {
    let s = std::fs::read_to_string(POSSIBLE_CPUS)?;
    parse_cpu_list(&s).ok_or_else(|| {
        UringError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{POSSIBLE_CPUS}: not a CPU list: {s:?}"),
        ))
    })
}

/// Smallest payload buffer the kernel accepts in a REGISTER: its `max_payload_sz`, the
/// largest of `FUSE_MIN_READ_BUFFER`, `max_write` and `max_pages` pages (the negotiated
/// values; `max_pages` is 32 without `FUSE_MAX_PAGES`).
pub fn payload_size(max_write: u32, max_pages: u16, page_size: usize) -> usize {
    FUSE_MIN_READ_BUFFER
        .max(max_write as usize)
        .max(usize::from(max_pages) * page_size)
}

/// One ring entry: the buffers the kernel copies a request into and reads the reply from.
///
/// The header and iovecs live in allocations of their own whose addresses the kernel keeps
/// from REGISTER on; the payload is a [`HugePages`] mapping. Dropped while a command is in
/// flight (which only an abandoned entry can be), it leaks them instead of freeing memory the
/// kernel may still write.
pub struct RingEntry {
    qid: u16,
    header: NonNull<fuse_uring_req_header>,
    payload: Option<HugePages>,
    iov: NonNull<[libc::iovec; 2]>,
    /// A request's header, fixed argument and payload in one piece, for `request::parse`.
    scratch: Vec<u8>,
    /// Whether a command of this entry is in flight.
    in_flight: bool,
    /// Whether a request is in the buffers, not yet answered.
    has_request: bool,
}

impl RingEntry {
    /// An entry for kernel queue `qid` with a payload buffer of `payload_len` bytes (see
    /// [`payload_size`]).
    pub fn new(qid: u16, payload_len: usize) -> Result<RingEntry, UringError> {
        let mut payload = HugePages::new(payload_len)?;
        let header = NonNull::from(Box::leak(Box::new(fuse_uring_req_header::new_zeroed())));
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr().cast(),
                iov_len: size_of::<fuse_uring_req_header>(),
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            },
        ];
        let iov = NonNull::from(Box::leak(Box::new(iov)));
        Ok(RingEntry {
            qid,
            header,
            payload: Some(payload),
            iov,
            scratch: Vec::with_capacity(4096),
            in_flight: false,
            has_request: false,
        })
    }

    /// The kernel queue this entry belongs to.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The payload buffer's size.
    pub fn payload_capacity(&self) -> usize {
        self.payload.as_ref().map_or(0, |p| p.len())
    }

    fn header(&self) -> &fuse_uring_req_header {
        // SAFETY: `header` is a live allocation owned by `self`; the kernel writes it only
        // while a command is in flight, and `&self` methods run only when none is (the
        // command's coroutine holds `&mut self` across the wait).
        unsafe { self.header.as_ref() }
    }

    fn header_mut(&mut self) -> &mut fuse_uring_req_header {
        // SAFETY: as in `header`, and `&mut self` makes this the only borrow.
        unsafe { self.header.as_mut() }
    }

    /// Submits command `cmd_op` for this entry and yields until the kernel completes it (for
    /// REGISTER and COMMIT_AND_FETCH: when the entry holds the next request).
    /// `Ok(false)`: the session is over (`ENOTCONN`, `ECONNABORTED`, `ECANCELED`: unmount,
    /// abort, or the ring closing).
    /// The command `cmd_op` for this entry.
    fn command(&self, fd: BorrowedFd<'_>, cmd_op: u32, commit_id: u64) -> runtime::uring::UringCmd {
        let req = fuse_uring_cmd_req {
            commit_id,
            qid: self.qid,
            ..Default::default()
        };
        let mut cmd = [0u8; 80];
        cmd[..size_of::<fuse_uring_cmd_req>()].copy_from_slice(req.as_bytes());
        runtime::uring::UringCmd {
            fd: fd.as_raw_fd(),
            cmd_op,
            cmd,
            // The kernel reads the iovecs only in REGISTER; COMMIT_AND_FETCH ignores both.
            addr: self.iov.as_ptr() as u64,
            len: FUSE_URING_IOV_SEGS,
        }
    }

    /// What a command's result `res` (a CQE's: `-errno` or 0) means.
    fn command_done(&mut self, cmd_op: u32, res: i32) -> Result<bool, UringError> {
        match -res {
            0 => {
                self.has_request = true;
                Ok(true)
            }
            libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED => Ok(false),
            errno => Err(UringError::Kernel {
                cmd_op,
                qid: self.qid,
                errno,
            }),
        }
    }

    /// Submits command `cmd_op` for this entry and yields until the kernel completes it (for
    /// REGISTER and COMMIT_AND_FETCH: when the entry holds the next request).
    /// `Ok(false)`: the session is over (`ENOTCONN`, `ECONNABORTED`, `ECANCELED`: unmount,
    /// abort, or the ring closing).
    fn co_command(
        &mut self,
        fd: BorrowedFd<'_>,
        cmd_op: u32,
        commit_id: u64,
    ) -> Result<bool, UringError> {
        let sqe = self.command(fd, cmd_op, commit_id);
        self.has_request = false;
        self.in_flight = true;
        // SAFETY: the command points at `iov`, which points at `header` and `payload`; all
        // three are owned by `self`, which the caller lends for the whole wait (we return only
        // after the completion), and are never freed while `in_flight` (see `Drop`).
        let res = unsafe { runtime::uring::co_uring_cmd(&sqe) };
        self.in_flight = false;
        match res {
            Some(res) => self.command_done(cmd_op, res),
            None => Err(UringError::NoRing),
        }
    }

    /// [`RingEntry::co_command`] for async tasks: the command's future instead of a yield.
    async fn command_async(
        &mut self,
        fd: BorrowedFd<'_>,
        cmd_op: u32,
        commit_id: u64,
    ) -> Result<bool, UringError> {
        let sqe = self.command(fd, cmd_op, commit_id);
        self.has_request = false;
        self.in_flight = true;
        // SAFETY: the command points at `iov`, `header` and `payload`, heap memory owned by
        // `self` that does not move with it. The task owning this entry is polled to the end
        // (the executor never cancels it); if it is dropped anyway (its thread exiting), the
        // entry's `Drop` sees `in_flight` and leaks all three instead of freeing memory the
        // kernel may still write.
        let op = unsafe { runtime::executor::uring::uring_cmd_owned((), |_| sqe) };
        let Ok(op) = op else {
            self.in_flight = false;
            return Err(UringError::NoRing);
        };
        let ((), res) = op.await;
        self.in_flight = false;
        let res = res.map_or_else(|e| -e.raw_os_error().unwrap_or(libc::EIO), |n| n as i32);
        self.command_done(cmd_op, res)
    }

    /// Registers the entry (async engine); see [`RingEntry::co_register`].
    pub async fn register_async(&mut self, fd: BorrowedFd<'_>) -> Result<bool, UringError> {
        self.command_async(fd, FUSE_IO_URING_CMD_REGISTER, 0).await
    }

    /// Commits the reply and waits for the next request (async engine); see
    /// [`RingEntry::co_commit_and_fetch`].
    pub async fn commit_and_fetch_async(&mut self, fd: BorrowedFd<'_>) -> Result<bool, UringError> {
        let commit_id = self.header().ring_ent_in_out.commit_id;
        self.command_async(fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id)
            .await
    }

    /// Registers the entry on its queue and waits for its first request. `Ok(false)`: the
    /// session ended before one came.
    pub fn co_register(&mut self, fd: BorrowedFd<'_>) -> Result<bool, UringError> {
        self.co_command(fd, FUSE_IO_URING_CMD_REGISTER, 0)
    }

    /// Hands the reply written by [`RingEntry::write_reply`] to the kernel and waits for the
    /// next request. `Ok(false)`: the session is over.
    pub fn co_commit_and_fetch(&mut self, fd: BorrowedFd<'_>) -> Result<bool, UringError> {
        let commit_id = self.header().ring_ent_in_out.commit_id;
        self.co_command(fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id)
    }

    /// The `fuse_in_header` of the request in the entry.
    pub fn in_header(&self) -> Option<fuse_in_header> {
        if !self.has_request {
            return None;
        }
        fuse_in_header::read_from_prefix(&self.header().in_out)
            .ok()
            .map(|(h, _)| h)
    }

    /// The request in the entry as [`request::parse`] sees it: `fuse_in_header`, the fixed
    /// argument (`op_in`) and the payload, in one piece, except that a WRITE's data stays in
    /// the payload buffer (parse's second argument), uncopied.
    ///
    /// The kernel copies the fixed argument (its `in_args[0]`, possibly empty) to `op_in`
    /// and the rest to the payload buffer (`payload_sz` bytes); `in_header.len` still counts
    /// all of it, so the fixed argument's size is `len - 40 - payload_sz`.
    pub fn bytes(&mut self) -> Result<(&[u8], &[u8]), UringError> {
        let (payload_sz, write) = self.gather()?;
        let payload: &[u8] = match &self.payload {
            Some(p) if write => &p[..payload_sz],
            _ => &[],
        };
        Ok((&self.scratch, payload))
    }

    /// [`RingEntry::bytes`], and the payload buffer for the reply when the request does not
    /// need it any more (every request but a WRITE: its payload was copied into the request
    /// bytes), so that a READ can be read straight into it ([`Response::InPlace`]).
    #[allow(clippy::type_complexity)]
    pub fn bytes_and_out(&mut self) -> Result<(&[u8], &[u8], Option<&mut [u8]>), UringError> {
        let (payload_sz, write) = self.gather()?;
        match self.payload.as_mut() {
            Some(p) if write => Ok((&self.scratch, &p[..payload_sz], None)),
            Some(p) => Ok((&self.scratch, &[], Some(&mut p[..]))),
            None => Ok((&self.scratch, &[], None)),
        }
    }

    /// Puts the request's header, fixed argument and (but for a WRITE) payload into
    /// `scratch`; returns the payload size and whether it is a WRITE (whose data stays in the
    /// payload buffer).
    fn gather(&mut self) -> Result<(usize, bool), UringError> {
        let h = self
            .in_header()
            .ok_or_else(|| UringError::BadRequest("no request in the entry".into()))?;
        let payload_sz = self.header().ring_ent_in_out.payload_sz as usize;
        let op_len = (h.len as usize)
            .checked_sub(size_of::<fuse_in_header>() + payload_sz)
            .filter(|&n| n <= FUSE_URING_OP_IN_OUT_SZ);
        let Some(op_len) = op_len else {
            return Err(UringError::BadRequest(format!(
                "in_header.len {} does not cover a {payload_sz}-byte payload",
                h.len
            )));
        };
        if payload_sz > self.payload_capacity() {
            return Err(UringError::BadRequest(format!(
                "payload_sz {payload_sz} exceeds the buffer"
            )));
        }
        let hdr_len = size_of::<fuse_in_header>();
        // SAFETY: see `header`; the raw read keeps the borrow of `scratch` below disjoint.
        let hdr = unsafe { self.header.as_ref() };
        self.scratch.clear();
        self.scratch.extend_from_slice(&hdr.in_out[..hdr_len]);
        self.scratch.extend_from_slice(&hdr.op_in[..op_len]);
        let write = h.opcode == FUSE_WRITE;
        if !write {
            if let Some(p) = &self.payload {
                self.scratch.extend_from_slice(&p[..payload_sz]);
            }
        }
        Ok((payload_sz, write))
    }

    /// [`RingEntry::bytes`], parsed.
    pub fn request(&mut self, minor: u32) -> Result<Request<'_>, UringError> {
        let (head, data) = self.bytes()?;
        request::parse(head, data, minor)
            .map_err(|e: ParseError| UringError::BadRequest(e.to_string()))
    }

    /// Writes the export's answer to request `unique` into the entry (see
    /// [`RingEntry::write_reply`]); a READ's buffer goes back to the pool. `Response::None` —
    /// a request that takes no reply, which the kernel never sends over the ring, or one that
    /// halted the session — is answered EIO: the kernel waits for every entry's commit.
    pub fn write_response(&mut self, unique: u64, resp: Response) -> Result<(), UringError> {
        let r = match &resp {
            Response::None => self.write_reply(&Reply::err(unique, libc::EIO)),
            Response::Err(errno) => self.write_reply(&Reply::err(unique, *errno)),
            Response::Bytes(b) => self.write_reply(&Reply::ok(unique, &[b])),
            Response::Data(data, len) => self.write_reply(&Reply::ok(unique, &[&data[..*len]])),
            Response::InPlace(len) => self.write_in_place(unique, *len),
        };
        if let Response::Data(data, _) = resp {
            buf::give_back(data);
        }
        r
    }

    /// A success reply whose body, `len` bytes, is already in the payload buffer (a READ read
    /// straight into it).
    fn write_in_place(&mut self, unique: u64, len: usize) -> Result<(), UringError> {
        let capacity = self.payload_capacity();
        if len > capacity {
            return Err(UringError::ReplyTooLong { len, capacity });
        }
        let out = fuse_out_header {
            len: (size_of::<fuse_out_header>() + len) as u32,
            error: 0,
            unique,
        };
        self.write_out_header(&out, len);
        Ok(())
    }

    fn write_out_header(&mut self, out: &fuse_out_header, body: usize) {
        let hdr = self.header_mut();
        hdr.in_out[..size_of::<fuse_out_header>()].copy_from_slice(out.as_bytes());
        let commit_id = hdr.ring_ent_in_out.commit_id;
        hdr.ring_ent_in_out = fuse_uring_ent_in_out {
            commit_id,
            payload_sz: body as u32,
            ..Default::default()
        };
    }

    /// Writes `reply` into the entry: `fuse_out_header` into the header buffer, the body into
    /// the payload buffer, its length into `payload_sz`. The next
    /// [`RingEntry::co_commit_and_fetch`] sends it.
    pub fn write_reply(&mut self, reply: &Reply<'_>) -> Result<(), UringError> {
        let slices = reply.io_slices();
        let body: usize = slices[1..].iter().map(|s| s.len()).sum();
        let capacity = self.payload_capacity();
        if body > capacity {
            return Err(UringError::ReplyTooLong {
                len: body,
                capacity,
            });
        }
        if let Some(p) = self.payload.as_mut() {
            let mut at = 0;
            for s in &slices[1..] {
                p[at..at + s.len()].copy_from_slice(s);
                at += s.len();
            }
        }
        let out: fuse_out_header = *reply.header();
        self.write_out_header(&out, body);
        Ok(())
    }
}

impl Drop for RingEntry {
    fn drop(&mut self) {
        if self.in_flight {
            log::warn!(
                "fuse ring entry of queue {} dropped with a command in flight; leaking its buffers",
                self.qid
            );
            std::mem::forget(self.payload.take());
            return;
        }
        // SAFETY: both were made by `Box::leak` in `new`, are freed only here, and no command
        // is in flight, so the kernel holds no pointer it will use (a later command would
        // need this entry).
        unsafe {
            drop(Box::from_raw(self.header.as_ptr()));
            drop(Box::from_raw(self.iov.as_ptr()));
        }
    }
}

/// Answers requests of one ring entry.
pub trait RingHandler {
    /// The reply to `req` (called in the entry's coroutine: it may yield). The reply may
    /// borrow the handler (its read buffer), not the request.
    fn handle<'h>(&'h mut self, req: &Request<'_>) -> Reply<'h>;
}

/// Serves one entry until the session ends: REGISTER, then for each request parse, handle,
/// write the reply and COMMIT_AND_FETCH. Returns the number of requests answered once the
/// kernel ends the session (unmount, abort, the ring closing). A request that does not parse
/// is answered `EIO` (the kernel waits for every request's commit).
///
/// Runs in a coroutine on a thread whose AioContext ring has 128-byte SQEs.
pub fn co_serve_entry<H: RingHandler>(
    fd: BorrowedFd<'_>,
    entry: &mut RingEntry,
    minor: u32,
    handler: &mut H,
) -> Result<u64, UringError> {
    if !entry.co_register(fd)? {
        return Ok(0);
    }
    let mut served = 0u64;
    loop {
        let unique = entry.in_header().map_or(0, |h| h.unique);
        let written = match entry.request(minor) {
            Ok(req) => {
                let reply = handler.handle(&req);
                entry.write_reply(&reply)
            }
            Err(e) => {
                log::warn!("fuse ring queue {}: {e}; answering EIO", entry.qid());
                entry.write_reply(&Reply::err(unique, libc::EIO))
            }
        };
        if let Err(e) = written {
            log::warn!("fuse ring queue {}: {e}; answering EIO", entry.qid());
            entry.write_reply(&Reply::err(unique, libc::EIO))?;
        }
        served += 1;
        if !entry.co_commit_and_fetch(fd)? {
            return Ok(served);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::abi::*;
    use crate::protocol::request::Operation;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(parse_cpu_list("0,2,4-5"), Some(4));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert!(possible_cpus().unwrap() >= 1);
    }

    #[test]
    fn payload_size_is_the_kernels_max_payload_sz() {
        assert_eq!(payload_size(4096, 1, 4096), 8192);
        assert_eq!(payload_size(1 << 20, 256, 4096), 1 << 20);
        assert_eq!(payload_size(1 << 17, 32, 4096), 1 << 17);
        assert_eq!(payload_size(4096, 32, 4096), 1 << 17);
    }

    /// Fills the entry as the kernel's `fuse_uring_copy_to_ring` would.
    fn kernel_fills(e: &mut RingEntry, h: fuse_in_header, op_in: &[u8], payload: &[u8]) {
        let hdr = e.header_mut();
        hdr.in_out[..40].copy_from_slice(h.as_bytes());
        hdr.op_in[..op_in.len()].copy_from_slice(op_in);
        hdr.ring_ent_in_out = fuse_uring_ent_in_out {
            commit_id: h.unique,
            payload_sz: payload.len() as u32,
            ..Default::default()
        };
        if let Some(p) = e.payload.as_mut() {
            p[..payload.len()].copy_from_slice(payload);
        }
        e.has_request = true;
    }

    #[test]
    fn write_read_and_lookup_reassemble_for_the_parser() {
        let mut e = RingEntry::new(1, 8192).unwrap();
        let w = fuse_write_in {
            offset: 4096,
            size: 5,
            ..Default::default()
        };
        let h = fuse_in_header {
            len: 40 + 40 + 5,
            opcode: FUSE_WRITE,
            unique: 77,
            nodeid: 1,
            ..Default::default()
        };
        kernel_fills(&mut e, h, w.as_bytes(), b"hello");
        let req = e.request(45).unwrap();
        assert_eq!(req.unique(), 77);
        match req.op {
            Operation::Write { arg, data } => {
                assert_eq!((arg.offset, arg.size), (4096, 5));
                assert_eq!(data, b"hello");
            }
            ref op => panic!("{op:?}"),
        }

        // LOOKUP: empty fixed argument, the name in the payload.
        let h = fuse_in_header {
            len: 40 + 4,
            opcode: FUSE_LOOKUP,
            unique: 78,
            nodeid: 1,
            ..Default::default()
        };
        kernel_fills(&mut e, h, &[], b"abc\0");
        let req = e.request(45).unwrap();
        assert!(matches!(req.op, Operation::Lookup { name } if name.to_bytes() == b"abc"));

        // A length that does not cover the payload is refused, not parsed.
        let h = fuse_in_header {
            len: 40,
            opcode: FUSE_GETATTR,
            unique: 79,
            ..Default::default()
        };
        kernel_fills(&mut e, h, &[], b"xx");
        assert!(matches!(e.request(45), Err(UringError::BadRequest(_))));
    }

    #[test]
    fn reply_lands_in_header_and_payload() {
        let mut e = RingEntry::new(0, 8192).unwrap();
        let h = fuse_in_header {
            len: 40,
            opcode: FUSE_GETATTR,
            unique: 5,
            ..Default::default()
        };
        kernel_fills(&mut e, h, &[], &[]);
        e.write_reply(&Reply::ok(5, &[b"abc", b"de"])).unwrap();
        let hdr = e.header();
        let (out, _) = fuse_out_header::read_from_prefix(&hdr.in_out).unwrap();
        assert_eq!((out.len, out.error, out.unique), (16 + 5, 0, 5));
        assert_eq!(hdr.ring_ent_in_out.payload_sz, 5);
        assert_eq!(hdr.ring_ent_in_out.commit_id, 5, "commit id kept");
        assert_eq!(&e.payload.as_ref().unwrap()[..5], b"abcde");

        e.write_reply(&Reply::err(5, libc::ENOENT)).unwrap();
        let (out, _) = fuse_out_header::read_from_prefix(&e.header().in_out).unwrap();
        assert_eq!(out.error, -libc::ENOENT);
        assert_eq!(e.header().ring_ent_in_out.payload_sz, 0);

        let big = vec![0u8; 8193];
        assert!(matches!(
            e.write_reply(&Reply::ok(5, &[&big])),
            Err(UringError::ReplyTooLong { len: 8193, .. })
        ));
    }

    #[test]
    fn a_read_is_answered_in_the_payload_buffer() {
        let mut e = RingEntry::new(0, 8192).unwrap();
        let r = fuse_read_in {
            offset: 0,
            size: 100,
            ..Default::default()
        };
        let h = fuse_in_header {
            len: (40 + size_of::<fuse_read_in>()) as u32,
            opcode: FUSE_READ,
            unique: 9,
            ..Default::default()
        };
        kernel_fills(&mut e, h, r.as_bytes(), &[]);
        let (head, data, out) = e.bytes_and_out().unwrap();
        assert_eq!((head.len(), data.len()), (h.len as usize, 0));
        let out = out.expect("a READ lends the payload buffer");
        out[..100].fill(0x5a);
        e.write_response(9, Response::InPlace(100)).unwrap();
        let (o, _) = fuse_out_header::read_from_prefix(&e.header().in_out).unwrap();
        assert_eq!((o.len, o.error, o.unique), (16 + 100, 0, 9));
        assert_eq!(e.header().ring_ent_in_out.payload_sz, 100);
        assert!(e.payload.as_ref().unwrap()[..100]
            .iter()
            .all(|&b| b == 0x5a));

        // A WRITE's payload is its data: not lent.
        let w = fuse_write_in {
            size: 3,
            ..Default::default()
        };
        let h = fuse_in_header {
            len: 40 + 40 + 3,
            opcode: FUSE_WRITE,
            unique: 10,
            ..Default::default()
        };
        kernel_fills(&mut e, h, w.as_bytes(), b"abc");
        let (_, data, out) = e.bytes_and_out().unwrap();
        assert_eq!(data, b"abc");
        assert!(out.is_none());
    }

    #[test]
    fn init_offer() {
        assert!(check_offered(FUSE_OVER_IO_URING | FUSE_INIT_EXT).is_ok());
        assert!(matches!(
            check_offered(FUSE_INIT_EXT),
            Err(UringError::NotOffered)
        ));
    }
}
