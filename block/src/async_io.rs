//! The block layer for the async engine: a natively async route to the `file` and `null`
//! drivers (through any number of `raw` nodes), and the coroutine bridge for everything else.
//!
//! QEMU has no counterpart (its block layer is coroutine-only); this mirrors the `co_` side of
//! `block/io.c` for Rust futures so that `--engine async` can be compared with coroutines.
//!
//! ## Why enum dispatch, not `async fn` in the trait
//!
//! [`crate::BlockDriver`] is used as `dyn BlockDriver`; an async method on a trait object must
//! return a boxed future (`Pin<Box<dyn Future>>`) — one allocation per request per layer. The
//! drivers a benchmark cares about are few and known, and `raw` only shifts offsets, so instead
//! each driver says how to reach its data without yielding through a trait object:
//! [`BlockDriver::async_path`] returns an [`AsyncPath`] — a leaf driver ([`AsyncLeaf`]) plus the
//! offset the `raw` windows above it add. The backend `match`es on the leaf and awaits a
//! concrete (unboxed) future. Drivers without a path (qcow2, blkdebug), and requests that need
//! the backend's slow paths (alignment padding with its serialising lock, growth, truncate),
//! are run by the coroutine engine's `co_` code inside a coroutine ([`runtime::co_bridge`]),
//! with owned copies of the buffers.
//!
//! The checks (range, read-only, growable, in-flight count) are the backend's own, shared with
//! the coroutine engine; only the call into the driver differs.
//!
//! [`BlockDriver::async_path`]: crate::BlockDriver::async_path

use crate::{BlockError, BlockStatus, FileDriver, NullDriver, Result};

/// A driver with natively async I/O.
#[derive(Clone, Copy)]
pub enum AsyncLeaf<'a> {
    /// `file`: inline syscalls where they cannot block, the thread pool otherwise.
    File(&'a FileDriver),
    /// `null-co`: never waits.
    Null(&'a NullDriver),
}

/// How to reach a node's data without the coroutine bridge: the leaf, and the offset the
/// `raw` windows on the way add to every request.
#[derive(Clone, Copy)]
pub struct AsyncPath<'a> {
    pub leaf: AsyncLeaf<'a>,
    pub shift: u64,
}

impl<'a> AsyncPath<'a> {
    /// The path of a leaf driver itself.
    pub fn new(leaf: AsyncLeaf<'a>) -> AsyncPath<'a> {
        AsyncPath { leaf, shift: 0 }
    }

    /// The same path seen through a `raw` window starting at `offset`; `None` if the sum
    /// overflows (then the bridge reports the error as `raw` does).
    pub fn shifted(self, offset: u64) -> Option<AsyncPath<'a>> {
        Some(AsyncPath {
            leaf: self.leaf,
            shift: self.shift.checked_add(offset)?,
        })
    }

    fn at(&self, offset: u64) -> Result<u64> {
        offset
            .checked_add(self.shift)
            .ok_or_else(|| BlockError::Invalid(format!("offset {offset} overflows the window")))
    }

    pub async fn preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.at(offset)?;
        match self.leaf {
            AsyncLeaf::File(f) => f.preadv_async(off, buf).await,
            AsyncLeaf::Null(n) => crate::BlockDriver::co_preadv(n, off, buf),
        }
    }

    pub async fn pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let off = self.at(offset)?;
        match self.leaf {
            AsyncLeaf::File(f) => f.pwritev_async(off, buf).await,
            AsyncLeaf::Null(n) => crate::BlockDriver::co_pwritev(n, off, buf),
        }
    }

    pub async fn flush(&self) -> Result<()> {
        match self.leaf {
            AsyncLeaf::File(f) => f.flush_async().await,
            AsyncLeaf::Null(n) => crate::BlockDriver::co_flush(n),
        }
    }

    pub async fn pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let off = self.at(offset)?;
        match self.leaf {
            AsyncLeaf::File(f) => f.pwrite_zeroes_async(off, len, may_unmap).await,
            AsyncLeaf::Null(n) => crate::BlockDriver::co_pwrite_zeroes(n, off, len, may_unmap),
        }
    }

    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        let off = self.at(offset)?;
        match self.leaf {
            AsyncLeaf::File(f) => f.pdiscard_async(off, len).await,
            AsyncLeaf::Null(n) => crate::BlockDriver::co_pdiscard(n, off, len),
        }
    }

    /// Block status never waits in these drivers (`lseek` runs inline in both engines).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let off = self.at(offset)?;
        match self.leaf {
            AsyncLeaf::File(f) => crate::BlockDriver::co_block_status(f, off, len),
            AsyncLeaf::Null(n) => crate::BlockDriver::co_block_status(n, off, len),
        }
    }
}
