//! The async forms of the `file` driver's operations that may block: `preadv_async`,
//! `pwritev_async`, `flush_async`, `pwrite_zeroes_async`, `pdiscard_async`.
//!
//! QEMU: none (the async counterparts of `raw_co_prw()`, `raw_co_flush_to_disk()`,
//! `raw_co_pwrite_zeroes()` and `raw_co_pdiscard()` of `block/file-posix.c`, whose twin here is
//! `file.rs`).
//!
//! The inline attempts (`RWF_NOWAIT`, memory-backed files) and the bookkeeping (statistics,
//! capability flags, the flush poisoning, the write lane) are `file.rs`'s, shared with the
//! coroutine engine; only the hand-off differs. A thread-pool job or a ring request must own
//! what it touches (a future may be dropped at any `.await`), so it gets a clone of the fd's
//! `Arc` and an owned buffer, and the caller's buffer is copied from or into it — one
//! allocation and one copy per pool or ring request that the coroutine engine (which lends the
//! buffer itself) does not pay. Inline requests (page-cache hits, memory-backed files) cost
//! exactly the same in both engines.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use runtime::executor::uring;

use crate::file::{bump, read_full, retry_eintr, write_full, FileDriver, Inline, PoolWrite};
use crate::sys::{self, AlignedBuf, FallocMode};
use crate::{BlockError, Result};

impl FileDriver {
    fn owned_buf(&self, len: usize) -> Result<AlignedBuf> {
        Ok(AlignedBuf::zeroed(len, self.mem_alignment as usize)?)
    }

    /// Runs `f` with a clone of the fd on the thread pool and awaits it.
    async fn pool<R: Send + 'static>(
        &self,
        f: impl FnOnce(BorrowedFd<'_>) -> R + Send + 'static,
    ) -> R {
        self.pool_in(None, f).await
    }

    /// [`Self::pool`], in `lane` if given.
    async fn pool_in<R: Send + 'static>(
        &self,
        lane: Option<&runtime::Lane>,
        f: impl FnOnce(BorrowedFd<'_>) -> R + Send + 'static,
    ) -> R {
        bump(&self.counters.pool_requests);
        let fd = self.fd.clone();
        runtime::ThreadPool::global()
            .submit_async_in(lane, move || f(fd.as_fd()))
            .await
    }

    /// Reads `own[at..]` from `offset` (zeros past EOF), or writes it, through the thread's
    /// ring; the buffer and how far it is done (all of it, or less if the ring stopped taking
    /// requests: the rest is the caller's).
    async fn ring_owned(
        &self,
        write: bool,
        mut own: AlignedBuf,
        mut at: usize,
        offset: u64,
    ) -> Result<(AlignedBuf, usize)> {
        let start = at;
        while at < own.len() {
            let off = offset + (at - start) as u64;
            let submitted = if write {
                uring::write_owned(self.fd.clone(), own, at, off)
            } else {
                uring::read_owned(self.fd.clone(), own, at, off)
            };
            let op = match submitted {
                Ok(op) => op,
                Err((_, buf)) => return Ok((buf, at)),
            };
            let ((_, buf), res) = op.await;
            own = buf;
            bump(&self.counters.ring_requests);
            match res {
                Ok(0) if write => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(0) => break, // end of file
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // See read_full: after a short O_DIRECT read, EINVAL means the end of the file.
                Err(e)
                    if !write
                        && self.direct
                        && at > start
                        && e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    break
                }
                Err(e) => return Err(e.into()),
            }
        }
        own[at..].fill(0); // only a read stops early without an error
        let len = own.len();
        Ok((own, len))
    }

    /// A request without a buffer (`fdatasync`, `fallocate`) through the ring, `EINTR`
    /// retried; `None` if the ring cannot take it.
    async fn ring_call<O>(
        &self,
        op: impl Fn(Arc<OwnedFd>) -> std::result::Result<O, Arc<OwnedFd>>,
    ) -> Option<io::Result<()>>
    where
        O: std::future::Future<Output = (Arc<OwnedFd>, io::Result<usize>)>,
    {
        if !self.uring {
            return None;
        }
        loop {
            let (_, res) = op(self.fd.clone()).ok()?.await;
            match res {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => {
                    bump(&self.counters.ring_requests);
                    return Some(r.map(drop));
                }
            }
        }
    }

    pub(crate) async fn preadv_async(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let done = match self.read_inline(offset, buf)? {
            Inline::Done => {
                log::trace!(
                    "file: read {} bytes at {offset}: done inline, no await ({})",
                    buf.len(),
                    self.inline_why()
                );
                return Ok(());
            }
            Inline::Rest(n) => n,
        };
        let rest = &mut buf[done..];
        let (off, direct) = (offset + done as u64, self.direct);
        let mut own = self.owned_buf(rest.len())?;
        let n = rest.len();
        let mut at = 0;
        if self.ring_reads() {
            (own, at) = self.ring_owned(false, own, 0, off).await?;
            if at == n {
                rest.copy_from_slice(&own[..n]);
                return Ok(());
            }
        }
        let (own, res) = self
            .pool(move |fd| {
                let r = read_full(fd, &mut own[at..n], off + at as u64, direct);
                (own, r)
            })
            .await;
        res?;
        rest.copy_from_slice(&own[..n]);
        Ok(())
    }

    pub(crate) async fn pwritev_async(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let done = match self.write_inline(offset, buf)? {
            Inline::Done => {
                log::trace!(
                    "file: write {} bytes at {offset}: done inline, no await ({})",
                    buf.len(),
                    self.inline_why()
                );
                return Ok(());
            }
            Inline::Rest(n) => n,
        };
        let rest = &buf[done..];
        let off = offset + done as u64;
        let mut own = self.owned_buf(rest.len())?;
        let n = rest.len();
        own[..n].copy_from_slice(rest);
        let _busy = PoolWrite::enter(&self.pool_writes);
        let mut at = 0;
        if self.ring_writes() {
            (own, at) = self.ring_owned(true, own, 0, off).await?;
            if at == n {
                return Ok(());
            }
        }
        let lane = self.write_lane.as_ref();
        Ok(self
            .pool_in(lane, move |fd| write_full(fd, &own[at..n], off + at as u64))
            .await?)
    }

    pub(crate) async fn flush_async(&self) -> Result<()> {
        if !self.flush_needed()? {
            return Ok(());
        }
        let ring = self.ring_call(|fd| uring::fsync_owned(fd, true)).await;
        let res = match ring {
            Some(res) => res,
            None => self.pool(|fd| retry_eintr(|| sys::fdatasync(fd))).await,
        };
        self.flush_result(res)
    }

    async fn fallocate_async(
        &self,
        flag: &AtomicBool,
        mode: FallocMode,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let ring = self
            .ring_call(|fd| uring::fallocate_owned(fd, mode.bits(), offset, len))
            .await;
        let res = match ring {
            Some(res) => res,
            None => {
                self.pool(move |fd| retry_eintr(|| sys::fallocate(fd, mode, offset, len)))
                    .await
            }
        };
        self.fallocate_result(flag, mode, res)
    }

    pub(crate) async fn pwrite_zeroes_async(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if may_unmap
            && self
                .fallocate_async(&self.has_punch_hole, FallocMode::PunchHole, offset, len)
                .await?
        {
            return Ok(());
        }
        if self
            .fallocate_async(&self.has_zero_range, FallocMode::ZeroRange, offset, len)
            .await?
        {
            return Ok(());
        }
        const CHUNK: u64 = 1 << 20;
        let zeros = self.owned_buf(len.min(CHUNK) as usize)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.pwritev_async(offset + done, &zeros[..n]).await?;
            done += n as u64;
        }
        Ok(())
    }

    pub(crate) async fn pdiscard_async(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if self
            .fallocate_async(&self.has_punch_hole, FallocMode::PunchHole, offset, len)
            .await?
        {
            Ok(())
        } else {
            Err(BlockError::NotSupported("discard (fallocate PUNCH_HOLE)"))
        }
    }
}
