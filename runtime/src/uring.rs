//! I/O on the calling thread's io_uring, for coroutines: yield until the completion.
//!
//! QEMU: `block/io_uring.c` (`luring_co_submit()`: fill an SQE, yield, be entered from the
//! completion) on top of `aio_add_sqe()` (QEMU 10.2).
//!
//! A coroutine calls [`co_read`], [`co_write`], [`co_fsync`] or [`co_fallocate`]: the SQE goes
//! on its context's submission queue ([`crate::ring`]), the coroutine yields, and the loop's
//! next `io_uring_enter` submits it together with everything else queued in that round. When
//! the completion is reaped, in `poll()` on the same thread, the coroutine is entered directly
//! with the result. The buffer is the coroutine's own, borrowed: a suspended coroutine is never
//! freed, so it outlives the request.
//!
//! An async task cannot lend a buffer that way (a future may be dropped at any `.await`): its
//! forms, which own their buffer and fd, are the async engine's (`executor/uring.rs`,
//! [`crate::executor::uring`]).
//!
//! [`co_uring_cmd`] (and, for tasks, `executor::uring::uring_cmd_owned`) submit an `IORING_OP_URING_CMD` with the 80-byte
//! command area ([`UringCmd`]), a driver-defined command such as FUSE over io_uring's
//! REGISTER. Such a command may stay in flight for as long as the driver likes (a FUSE entry
//! waits for the next request); see [`UringCmd`] for what happens to it at thread exit. They
//! need a ring of 128-byte SQEs ([`crate::ring::set_ring_sqe128`]); [`sqe128_available`] says
//! whether this thread has one.
//!
//! Every function returns `None` when the request cannot go through
//! a ring — the thread's context waits with epoll, the call is not in a coroutine, or the
//! submission queue is full and the kernel takes nothing — and the caller then does the I/O as
//! before, on the thread pool. Results are raw: a short read is the caller's to continue.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::{opcode, squeue, types};

use crate::aio::AioContext;
use crate::coroutine::{co_yield, Coroutine};
use crate::ring::AnySqe;

/// Whether I/O submitted from this thread goes through its context's io_uring.
pub fn available() -> bool {
    AioContext::with_current(|ctx| ctx.has_io_uring())
}

/// A completion's result as an `io::Result`: negative values are errnos.
pub(crate) fn to_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Submits `entry` and yields until it completes; the raw CQE result. `None` if there is no
/// ring, no running coroutine, or no room.
///
/// # Safety
///
/// Every pointer in `entry` must stay valid until this returns (it returns only after the
/// completion, so borrowing from the calling coroutine's frame is enough).
pub unsafe fn co_submit(entry: squeue::Entry) -> Option<i32> {
    // SAFETY: forwarded from the caller.
    unsafe { co_submit_any(entry.into(), "sqe") }
}

/// [`co_submit`] for a 128-byte SQE; `None` also when this thread's ring takes 64-byte SQEs.
///
/// # Safety
///
/// As for [`co_submit`].
pub unsafe fn co_submit128(entry: squeue::Entry128) -> Option<i32> {
    // SAFETY: forwarded from the caller.
    unsafe { co_submit_any(entry.into(), "sqe") }
}

/// [`co_submit`] with the operation's name for the trace (`-vv`): the coroutine's yield and
/// its wake-up by the completion are the two `log::trace!` lines here.
///
/// # Safety
///
/// As for [`co_submit`].
unsafe fn co_submit_any(entry: AnySqe, what: &'static str) -> Option<i32> {
    let co = Coroutine::current()?;
    // SAFETY: forwarded from the caller; we do not return before the completion.
    let idx = AioContext::with_current(|ctx| unsafe {
        ctx.ring()?.submit(entry, co.waker().into_waker())
    })?;
    log::trace!("{co}: yields: {what} queued on the ring (slot {idx})");
    loop {
        co_yield();
        let r = AioContext::with_current(|ctx| ctx.ring().and_then(|r| r.take_result(idx)));
        if let Some(r) = r {
            log::trace!("{co}: woken by the CQE of its {what} (slot {idx}, result {r})");
            return Some(r);
        }
        // Woken by someone else who held our waker (a spurious wake): the completion will
        // wake us again; only then does the slot hold a result.
    }
}

/// `pread` through the ring: bytes read (0 at end of file).
pub fn co_read(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Option<io::Result<usize>> {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let entry = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
        .offset(offset)
        .build();
    // SAFETY: `buf` and `fd` are borrowed for the whole call, which outlasts the request.
    unsafe { co_submit_any(entry.into(), "read") }.map(to_result)
}

/// `pwrite` through the ring: bytes written.
pub fn co_write(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Option<io::Result<usize>> {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let entry = opcode::Write::new(types::Fd(fd.as_raw_fd()), buf.as_ptr(), len)
        .offset(offset)
        .build();
    // SAFETY: as in `co_read`.
    unsafe { co_submit_any(entry.into(), "write") }.map(to_result)
}

pub(crate) fn fsync_entry(fd: i32, datasync: bool) -> squeue::Entry {
    let flags = if datasync {
        types::FsyncFlags::DATASYNC
    } else {
        types::FsyncFlags::empty()
    };
    opcode::Fsync::new(types::Fd(fd)).flags(flags).build()
}

/// `fsync` (or `fdatasync`) through the ring.
pub fn co_fsync(fd: BorrowedFd<'_>, datasync: bool) -> Option<io::Result<()>> {
    let entry = fsync_entry(fd.as_raw_fd(), datasync);
    // SAFETY: the entry points at no memory; `fd` is borrowed for the call.
    unsafe { co_submit_any(entry.into(), "fsync") }.map(|r| to_result(r).map(drop))
}

/// `fallocate(fd, mode, offset, len)` through the ring.
pub fn co_fallocate(
    fd: BorrowedFd<'_>,
    mode: i32,
    offset: u64,
    len: u64,
) -> Option<io::Result<()>> {
    let entry = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
        .offset(offset)
        .mode(mode)
        .build();
    // SAFETY: the entry points at no memory; `fd` is borrowed for the call.
    unsafe { co_submit_any(entry.into(), "fallocate") }.map(|r| to_result(r).map(drop))
}

/// Whether this thread's ring takes 128-byte SQEs, as [`co_uring_cmd`] needs.
pub fn sqe128_available() -> bool {
    AioContext::with_current(|ctx| ctx.ring().is_some_and(|r| r.is_sqe128()))
}

/// An `IORING_OP_URING_CMD` with the 80-byte command area of a 128-byte SQE: `cmd_op` and
/// `cmd` are the driver's (for FUSE: `FUSE_IO_URING_CMD_*` and `struct fuse_uring_cmd_req`),
/// `addr` and `len` go into the SQE's `addr` and `len` fields (FUSE: an iovec array and its
/// length, 2).
///
/// The io-uring crate's `opcode::UringCmd80` (0.7) has no `len` field and leaves it zero;
/// [`UringCmd::build`] sets it in the built SQE.
///
/// **In flight at thread exit.** A command the driver keeps (a FUSE entry waiting for a
/// request) is still in flight when its thread's ring is dropped. The ring then leaks the
/// memory the command points at (the coroutine frame or the buffer of a task's
/// [`Op`](crate::executor::uring::Op)) rather than free
/// it, and closing the ring makes the kernel cancel the command (`IO_URING_F_CANCEL`; FUSE
/// completes it with `-ENOTCONN`, and never writes to the entry's buffers after that without a
/// new command). Prefer ending such commands the driver's way first (FUSE: unmount), then
/// leave the thread.
#[derive(Clone, Copy, Debug)]
pub struct UringCmd {
    pub fd: RawFd,
    pub cmd_op: u32,
    pub cmd: [u8; 80],
    pub addr: u64,
    pub len: u32,
}

/// Offset of the `len` field in an SQE (`struct io_uring_sqe`, include/uapi/linux/io_uring.h).
const SQE_LEN_OFFSET: usize = 24;

impl UringCmd {
    /// The SQE: the crate's `UringCmd80` with `len` filled in.
    pub fn build(&self) -> squeue::Entry128 {
        let e = opcode::UringCmd80::new(types::Fd(self.fd), self.cmd_op)
            .cmd(self.cmd)
            .addr(Some(self.addr))
            .build();
        if self.len == 0 {
            return e;
        }
        // SAFETY: `Entry128` is `#[repr(C)]` over the kernel's 128-byte SQE (64-byte
        // `io_uring_sqe` and 64 bytes of command), made of integers only, so it has no padding
        // and every bit pattern is a valid value; the crate asserts its size is 128.
        let mut bytes: [u8; 128] = unsafe { std::mem::transmute(e) };
        bytes[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&self.len.to_ne_bytes());
        // SAFETY: as above, back again.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
    }
}

/// Submits `cmd` from the current coroutine and yields until it completes: the raw CQE
/// result (negative errno). `None` if there is no ring of 128-byte SQEs, no running coroutine,
/// or no room.
///
/// # Safety
///
/// Whatever `cmd` points at (through `addr`, and what the driver reaches from there) must stay
/// valid until the completion; the caller's frame is enough, as in [`co_submit`].
pub unsafe fn co_uring_cmd(cmd: &UringCmd) -> Option<i32> {
    // SAFETY: forwarded from the caller.
    unsafe { co_submit_any(cmd.build().into(), "uring_cmd") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(e: squeue::Entry128) -> [u8; 128] {
        // SAFETY: see `UringCmd::build`: a 128-byte plain-integer `repr(C)` value.
        unsafe { std::mem::transmute(e) }
    }

    #[test]
    fn uring_cmd_sqe_carries_len_addr_op_and_the_80_byte_area() {
        let mut cmd = [0u8; 80];
        for (i, b) in cmd.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        let c = UringCmd {
            fd: 7,
            cmd_op: 0x1234_5678,
            cmd,
            addr: 0x1122_3344_5566_7788,
            len: 2,
        };
        let b = bytes(c.build().user_data(0xabcd));
        assert_eq!(b[0], opcode::UringCmd80::CODE, "opcode");
        assert_eq!(&b[4..8], &7i32.to_ne_bytes(), "fd");
        assert_eq!(&b[8..12], &0x1234_5678u32.to_ne_bytes(), "cmd_op");
        assert_eq!(&b[16..24], &0x1122_3344_5566_7788u64.to_ne_bytes(), "addr");
        assert_eq!(&b[24..28], &2u32.to_ne_bytes(), "len");
        assert_eq!(&b[32..40], &0xabcdu64.to_ne_bytes(), "user_data");
        assert_eq!(&b[48..128], &cmd[..], "the 80-byte command area");
        // The crate alone leaves `len` at zero, which is why `build` patches it.
        let plain = opcode::UringCmd80::new(types::Fd(7), 1).build();
        assert_eq!(&bytes(plain)[24..28], &[0; 4]);
    }
}
