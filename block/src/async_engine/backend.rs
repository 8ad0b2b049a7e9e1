//! The async forms of [`BlockBackend`]'s requests: `pread_async`, `pwrite_async`,
//! `flush_async`, `pwrite_zeroes_async`, `pdiscard_async`, `block_status_async`,
//! `truncate_async`.
//!
//! QEMU: none (the async counterparts of `blk_co_preadv()` & co. of `block/block-backend.c`,
//! whose twin here is `backend.rs`). The checks, in-flight accounting and option handling
//! (discard, detect-zeroes) are `backend.rs`'s own helpers, called the same way as by the
//! `co_` methods; padding, the serialising lock, growth and truncation are not repeated here:
//! such requests run the `co_` method through the bridge.

use std::sync::Arc;

use crate::backend::{BlockBackend, Discard};
use crate::{BlockStatus, Result};

use super::AsyncPath;

/// The async engine's forms: the same checks and in-flight accounting as the `co_` methods,
/// then either the natively async driver path or — for drivers without one, an alignment,
/// growth or truncation — the `co_` method itself run in a coroutine through
/// [`runtime::co_bridge`], with owned copies of the caller's buffers. They take
/// `self: &Arc<Self>` because the bridge's coroutine must own a reference.
impl BlockBackend {
    /// The native route, when the request needs none of the slow paths.
    fn native(&self) -> Option<AsyncPath<'_>> {
        if self.align > 1 || self.mem_align > 1 {
            return None; // padding, bouncing, the serialising lock: the coroutine code does them
        }
        AsyncPath::of(&*self.driver)
    }

    /// Runs `f(backend)` in a coroutine and awaits it.
    async fn bridged<R: 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&BlockBackend) -> R + 'static,
    ) -> R {
        let me = self.clone();
        runtime::co_bridge(move || f(&me)).await
    }

    /// Reads `buf.len()` bytes at `offset`. The async form of [`BlockBackend::co_pread`].
    pub async fn pread_async(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(path) = self.native() else {
            let len = buf.len();
            let (own, res) = self
                .bridged(move |b| {
                    let mut own = vec![0; len];
                    let r = b.co_pread(offset, &mut own);
                    (own, r)
                })
                .await;
            res?;
            buf.copy_from_slice(&own);
            return Ok(());
        };
        let _req = self.enter();
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        path.preadv(offset, buf).await
    }

    /// Writes `buf` at `offset`. The async form of [`BlockBackend::co_pwrite`].
    pub async fn pwrite_async(self: &Arc<Self>, offset: u64, buf: &[u8]) -> Result<()> {
        if let Some(may_unmap) = self.detected_zeroes(buf) {
            return self
                .pwrite_zeroes_async(offset, buf.len() as u64, may_unmap)
                .await;
        }
        let len = buf.len() as u64;
        if let Some(path) = self.native().filter(|p| !p.touches_guard(offset, len)) {
            let req = self.enter();
            self.check_writable()?;
            if self.write_range(offset, buf.len() as u64)?.is_none() {
                if buf.is_empty() {
                    return Ok(());
                }
                return path.pwritev(offset, buf).await;
            }
            drop(req); // growth: the bridge counts the request itself
        }
        let data = buf.to_vec();
        self.bridged(move |b| b.co_pwrite(offset, &data)).await
    }

    /// The async form of [`BlockBackend::co_flush`].
    pub async fn flush_async(self: &Arc<Self>) -> Result<()> {
        let Some(path) = self.native() else {
            return self.bridged(|b| b.co_flush()).await;
        };
        let _req = self.enter();
        path.flush().await
    }

    /// The async form of [`BlockBackend::co_pwrite_zeroes`].
    pub async fn pwrite_zeroes_async(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<()> {
        let may_unmap = self.allow_unmap(may_unmap);
        if let Some(path) = self.native().filter(|p| !p.touches_guard(offset, len)) {
            let req = self.enter();
            self.check_writable()?;
            if self.write_range(offset, len)?.is_none() {
                if len == 0 {
                    return Ok(());
                }
                return path.pwrite_zeroes(offset, len, may_unmap).await;
            }
            drop(req);
        }
        self.bridged(move |b| b.co_pwrite_zeroes(offset, len, may_unmap))
            .await
    }

    /// The async form of [`BlockBackend::co_pdiscard`].
    pub async fn pdiscard_async(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        if self.discard == Discard::Ignore {
            let _req = self.enter();
            self.check_writable()?;
            return self.check_range(offset, len);
        }
        let Some(path) = self.native().filter(|p| !p.touches_guard(offset, len)) else {
            return self.bridged(move |b| b.co_pdiscard(offset, len)).await;
        };
        let _req = self.enter();
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        path.pdiscard(offset, len).await
    }

    /// The async form of [`BlockBackend::co_block_status`].
    pub async fn block_status_async(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        let Some(path) = self.native() else {
            return self.bridged(move |b| b.co_block_status(offset, len)).await;
        };
        let _req = self.enter();
        let len = self.block_status_len(offset, len)?;
        let (status, n) = path.block_status(offset, len).await?;
        Ok((status, n.clamp(1, len)))
    }

    /// The async form of [`BlockBackend::co_truncate`]; always through the bridge (a cold
    /// path that needs the resize lock and, with an alignment, the serialising lock).
    pub async fn truncate_async(self: &Arc<Self>, size: u64) -> Result<()> {
        self.bridged(move |b| b.co_truncate(size)).await
    }

    /// Whether requests of the async engine reach the driver natively (else the bridge).
    pub fn is_natively_async(&self) -> bool {
        self.native().is_some()
    }
}
