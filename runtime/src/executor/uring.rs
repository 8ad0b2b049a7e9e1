//! io_uring requests of async tasks: [`read_owned`], [`write_owned`], [`fsync_owned`],
//! [`fallocate_owned`] and [`uring_cmd_owned`] submit to the calling thread's ring and return
//! an [`Op`] future.
//!
//! QEMU: none (the async counterpart of `luring_co_submit()` in `block/io_uring.c`, whose twin
//! here is `uring.rs`, the coroutine form, on the same ring).
//!
//! A coroutine lends its own buffer to the kernel: a suspended coroutine is never freed, so the
//! buffer outlives the request. A future may be dropped at any `.await`, so these functions
//! take an owned buffer ([`StableBuf`]) and the fd's `Arc`, and the [`Op`] gives them back with
//! the result. Dropping an `Op` before its completion hands both to the ring, which frees them
//! when the completion comes. As in `uring.rs`, `Err` (the buffer and fd given back) means the
//! request cannot go through a ring — the thread's context waits with epoll, or the submission
//! queue is full — and the caller does the I/O on the thread pool; results are raw.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types};

use crate::aio::AioContext;
use crate::ring::AnySqe;
use crate::uring::{fsync_entry, to_result, UringCmd};

/// [`co_uring_cmd`](crate::uring::co_uring_cmd) for async tasks: the command points into `keep`, which the [`Op`] gives
/// back with the raw result (`Ok(n)` or the errno as `Err`). Dropping the `Op` early leaves
/// `keep` with the ring until the completion (or leaked at thread exit, see [`UringCmd`]).
/// `Err(keep)` when the ring cannot take it.
///
/// # Safety
///
/// `build` may make the command point only at memory owned by `keep` that stays in place when
/// `keep` moves (heap memory).
pub unsafe fn uring_cmd_owned<K: 'static>(
    keep: K,
    build: impl FnOnce(&mut K) -> UringCmd,
) -> Result<Op<K>, K> {
    // SAFETY: forwarded from the caller.
    unsafe { submit_owned(keep, |k| AnySqe::E128(build(k).build())) }
}

/// A buffer whose bytes stay where they are when the value moves (they live on the heap), so
/// an [`Op`] may own it while the kernel fills it.
///
/// # Safety
///
/// `as_mut_ptr()`/`len()` must describe memory owned by the value, valid and unchanged in
/// place until the value is dropped, however the value itself is moved.
pub unsafe trait StableBuf: 'static {
    fn as_mut_ptr(&mut self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: a `Vec`'s elements live in its heap allocation, which moving the `Vec` keeps.
unsafe impl StableBuf for Vec<u8> {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        Vec::as_mut_ptr(self)
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// A request submitted by an async task: resolves to what it owns (buffer and fd) and the raw
/// result. Dropping it early leaves both with the ring until the completion.
#[must_use = "the request runs anyway; drop the Op only to abandon its result"]
pub struct Op<K: 'static> {
    idx: u32,
    keep: Option<K>,
    _not_send: PhantomData<*const ()>,
}

/// Submits an entry built from the owned `keep` (whose memory it may point into).
///
/// # Safety
///
/// The entry may point only at memory owned by `keep` that stays in place when `keep` moves.
unsafe fn submit_owned<K: 'static, E: Into<AnySqe>>(
    mut keep: K,
    entry: impl FnOnce(&mut K) -> E,
) -> Result<Op<K>, K> {
    let e = entry(&mut keep);
    // SAFETY: the entry points into `keep`, which the `Op` (or, once dropped, the ring) owns
    // until the completion.
    let idx =
        AioContext::with_current(|ctx| unsafe { ctx.ring()?.submit(e, Waker::noop().clone()) });
    match idx {
        Some(idx) => Ok(Op {
            idx,
            keep: Some(keep),
            _not_send: PhantomData,
        }),
        None => Err(keep),
    }
}

/// What an owned read or write gives back: the fd and the buffer.
pub type Owned<B> = (Arc<OwnedFd>, B);

/// `pread` into `buf[at..]` (an owned buffer) at file `offset`, for async tasks. `Err` gives
/// fd and buffer back when the ring cannot take the request. Panics if `at > buf.len()`.
pub fn read_owned<B: StableBuf>(
    fd: Arc<OwnedFd>,
    buf: B,
    at: usize,
    offset: u64,
) -> Result<Op<Owned<B>>, Owned<B>> {
    assert!(at <= buf.len(), "read_owned: start {at} past the buffer");
    // SAFETY: the entry points into the buffer owned by `keep` (heap memory, see
    // `StableBuf`), at most to its end, and `keep` holds the fd open.
    unsafe {
        submit_owned((fd, buf), |(fd, buf)| {
            let len = u32::try_from(buf.len() - at).unwrap_or(u32::MAX);
            opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr().add(at), len)
                .offset(offset)
                .build()
        })
    }
}

/// `pwrite` from `buf[at..]` (an owned buffer), for async tasks; see [`read_owned`].
pub fn write_owned<B: StableBuf>(
    fd: Arc<OwnedFd>,
    buf: B,
    at: usize,
    offset: u64,
) -> Result<Op<Owned<B>>, Owned<B>> {
    assert!(at <= buf.len(), "write_owned: start {at} past the buffer");
    // SAFETY: as in `read_owned`.
    unsafe {
        submit_owned((fd, buf), |(fd, buf)| {
            let len = u32::try_from(buf.len() - at).unwrap_or(u32::MAX);
            let ptr = buf.as_mut_ptr().add(at).cast_const();
            opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, len)
                .offset(offset)
                .build()
        })
    }
}

/// `fsync`/`fdatasync` for async tasks.
pub fn fsync_owned(fd: Arc<OwnedFd>, datasync: bool) -> Result<Op<Arc<OwnedFd>>, Arc<OwnedFd>> {
    // SAFETY: the entry points at no memory; `keep` holds the fd open.
    unsafe { submit_owned(fd, |fd| fsync_entry(fd.as_raw_fd(), datasync)) }
}

/// `fallocate` for async tasks.
pub fn fallocate_owned(
    fd: Arc<OwnedFd>,
    mode: i32,
    offset: u64,
    len: u64,
) -> Result<Op<Arc<OwnedFd>>, Arc<OwnedFd>> {
    // SAFETY: the entry points at no memory; `keep` holds the fd open.
    unsafe {
        submit_owned(fd, |fd| {
            opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
                .offset(offset)
                .mode(mode)
                .build()
        })
    }
}

// An `Op` never pins what it keeps (the kernel sees the buffer's heap memory, not the `Op`).
impl<K: 'static> Unpin for Op<K> {}

impl<K: 'static> Future for Op<K> {
    type Output = (K, io::Result<usize>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.keep.is_none() {
            // Its slot may already serve another request: touching it would steal that one's
            // result or waker.
            panic!("io_uring Op polled after it completed");
        }
        let r = AioContext::with_current(|ctx| {
            let ring = ctx.ring()?;
            let r = ring.take_result(this.idx);
            if r.is_none() {
                ring.set_waker(this.idx, cx.waker());
            }
            r
        });
        match r {
            Some(r) => match this.keep.take() {
                Some(k) => {
                    log::trace!(
                        "task: its ring request is done (slot {}, result {r})",
                        this.idx
                    );
                    Poll::Ready((k, to_result(r)))
                }
                None => unreachable!("checked above"),
            },
            None => {
                log::trace!(
                    "task: pending: waits for its ring request (slot {})",
                    this.idx
                );
                Poll::Pending
            }
        }
    }
}

impl<K: 'static> Drop for Op<K> {
    fn drop(&mut self) {
        let mut keep = self.keep.take();
        if keep.is_none() {
            return; // completed and collected
        }
        // Still in flight (or completed and not collected): the ring keeps the memory until
        // the completion. `try_with`: at thread exit the context may be gone already.
        let _ = crate::aio::try_with_current(|ctx| {
            if let (Some(ring), Some(k)) = (ctx.ring(), keep.take()) {
                ring.orphan(self.idx, Box::new(k));
            }
        });
        if let Some(k) = keep {
            log::warn!("io_uring request abandoned without its ring; leaking its buffer");
            std::mem::forget(k);
        }
    }
}
