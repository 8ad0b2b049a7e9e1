//! The block layer's async engine: the `*_async` forms of [`BlockBackend`]'s requests
//! (`backend.rs`) and of the `file` driver's blocking operations (`file.rs`), and here the
//! natively async route to the `file` and `null` drivers through any number of `raw` windows
//! ([`AsyncPath`], [`AsyncLeaf`]); everything else runs through the coroutine bridge.
//!
//! QEMU has no counterpart (its block layer is coroutine-only). This mirrors, for Rust futures,
//! the `co_` request path of `block/block-backend.c` and `block/io.c` (`backend.rs`) and of
//! `block/file-posix.c` (`file.rs`), so that `--engine async` can be compared with coroutines.
//! The coroutine engine's side is the rest of the crate; nothing there names this module
//! except to point here.
//!
//! ## Why enum dispatch, not `async fn` in the trait
//!
//! [`BlockDriver`] is used as `dyn BlockDriver`; an async method on a trait object must return a
//! boxed future (`Pin<Box<dyn Future>>`) — one allocation per request per layer. The drivers a
//! benchmark cares about are few and known, and `raw` only shifts offsets, so instead this
//! module walks the stack once per request ([`AsyncPath::of`]): through nodes that describe
//! themselves as a [`Window`] onto one child (raw), down to a leaf whose type it recognises
//! ([`AsyncLeaf::of`]: `FileDriver` or `NullDriver`, by `Any` downcast). The result is a leaf
//! plus the offset the windows add; the backend `match`es on the leaf and awaits a concrete
//! (unboxed) future. The list of natively async drivers is this enum's, not the trait's: the
//! trait stays engine-neutral, and a new leaf is one variant and one `match` arm per method
//! here.
//!
//! The error-injection filter (blkdebug) is looked through as well: [`AsyncPath`] remembers it
//! and awaits its rules ([`BlkdebugDriver::check_async`]) before the leaf's I/O, so a request
//! held at its gate is a future, as the memory measurements need (`docs/comparison.md`).
//!
//! Drivers without a path (qcow2, blklogwrites), and requests that need the backend's
//! slow paths (alignment padding with its serialising lock, growth, truncate), are run by the
//! coroutine engine's `co_` code inside a coroutine ([`runtime::co_bridge`]), with owned copies
//! of the buffers. The checks (range, read-only, growable, in-flight count) are the backend's
//! own, shared with the coroutine engine; only the call into the driver differs.
//!
//! | file | coroutine twin | owns |
//! |---|---|---|
//! | `mod.rs` | `BlockDriver` dispatch (`dyn`) | [`AsyncLeaf`], [`AsyncPath`]: finding the native route, and the per-leaf `match` |
//! | `backend.rs` | `backend.rs` | `BlockBackend::pread_async` & co.: the checks, then native or bridged |
//! | `file.rs` | `file.rs` | `FileDriver`'s async forms: inline, then the ring or the pool with an owned buffer |
//!
//! [`BlockBackend`]: crate::BlockBackend
//! [`BlockDriver`]: crate::BlockDriver
//! [`Window`]: crate::Window

mod backend;
mod file;

use std::any::Any;

use crate::{
    BlkdebugDriver, BlkdebugOp, BlockDriver, BlockError, BlockStatus, FileDriver, NullDriver,
    Result,
};

/// A driver with natively async I/O.
#[derive(Clone, Copy)]
pub enum AsyncLeaf<'a> {
    /// `file`: inline syscalls where they cannot block, the thread pool otherwise.
    File(&'a FileDriver),
    /// `null-co`: completes inline, or waits on its thread's loop ([`crate::NullLatency`]).
    Null(&'a NullDriver),
}

impl<'a> AsyncLeaf<'a> {
    /// The leaf `node` is, if this engine drives its type natively.
    pub fn of(node: &'a dyn BlockDriver) -> Option<AsyncLeaf<'a>> {
        let node: &'a dyn Any = node;
        if let Some(file) = node.downcast_ref::<FileDriver>() {
            return Some(AsyncLeaf::File(file));
        }
        node.downcast_ref::<NullDriver>().map(AsyncLeaf::Null)
    }
}

/// How to reach a node's data without the coroutine bridge: the leaf, the offset the `raw`
/// windows on the way add to every request, and a range of the leaf that a node on the way
/// guards — changes touching it must run that node's own checks, so they take the bridge.
#[derive(Clone, Copy)]
pub struct AsyncPath<'a> {
    pub leaf: AsyncLeaf<'a>,
    pub shift: u64,
    /// Leaf bytes `[start, end)` whose writes, write-zeroes and discards go through the
    /// bridge (a node above checks them; e.g. the first sector of a probed raw image).
    pub guard: Option<(u64, u64)>,
    /// An error-injection filter on the way, and the shift below it: its rules are checked
    /// ([`BlkdebugDriver::check_async`], in its own coordinates) before the leaf's I/O.
    pub filter: Option<(&'a BlkdebugDriver, u64)>,
}

impl<'a> AsyncPath<'a> {
    /// The natively async route to `node`'s data: `node` itself if it is a leaf this engine
    /// drives ([`AsyncLeaf::of`]), else through its [`Window`](crate::Window) (a `raw` node's
    /// shift and guard) to its child's route. `None` sends the async engine's requests through
    /// the coroutine bridge (qcow2, blkdebug, …), or an overflowing window (the bridge then
    /// reports the error as the node does).
    pub fn of(node: &'a dyn BlockDriver) -> Option<AsyncPath<'a>> {
        if let Some(leaf) = AsyncLeaf::of(node) {
            return Some(AsyncPath::new(leaf));
        }
        let any: &'a dyn Any = node;
        if let Some(dbg) = any.downcast_ref::<BlkdebugDriver>() {
            let path = AsyncPath::of(&**dbg.child())?;
            if path.filter.is_some() {
                return None; // one filter per path; more take the bridge
            }
            return Some(AsyncPath {
                filter: Some((dbg, path.shift)),
                ..path
            });
        }
        let window = node.window()?;
        let mut path = AsyncPath::of(window.child)?;
        if window.guard > 0 {
            path = path.guard_first(window.guard)?;
        }
        path.shifted(window.offset)
    }

    /// The path of a leaf driver itself.
    pub fn new(leaf: AsyncLeaf<'a>) -> AsyncPath<'a> {
        AsyncPath {
            leaf,
            shift: 0,
            guard: None,
            filter: None,
        }
    }

    /// The same path seen through a `raw` window starting at `offset`; `None` if the sum
    /// overflows (then the bridge reports the error as `raw` does).
    pub fn shifted(self, offset: u64) -> Option<AsyncPath<'a>> {
        Some(AsyncPath {
            shift: self.shift.checked_add(offset)?,
            ..self
        })
    }

    /// The same path, with the first `len` bytes *of this node* guarded: for a window whose
    /// node checks changes there (a probed raw image's first sector, [`crate::Window::guard`]),
    /// [`AsyncPath::of`] calls this on the child's path, so only those changes pay for the
    /// bridge. `None` if the range overflows.
    pub fn guard_first(self, len: u64) -> Option<AsyncPath<'a>> {
        let (start, end) = (self.shift, self.shift.checked_add(len)?);
        let guard = match self.guard {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        };
        Some(AsyncPath {
            guard: Some(guard),
            ..self
        })
    }

    /// Whether a change of `[offset, offset+len)` (node coordinates) touches the guarded
    /// range, or cannot be placed at all (overflow): then it must take the bridge.
    pub fn touches_guard(&self, offset: u64, len: u64) -> bool {
        let Some((start, end)) = self.guard else {
            return false;
        };
        match offset.checked_add(self.shift) {
            Some(leaf) => leaf < end && leaf.saturating_add(len.max(1)) > start,
            None => true,
        }
    }

    /// Runs the filter's rules, if there is one, for a request at `offset` (node coordinates).
    async fn filter(&self, op: BlkdebugOp, offset: u64, len: u64) -> Result<()> {
        let Some((dbg, below)) = self.filter else {
            return Ok(());
        };
        // The filter sees the offset the windows above it add: the total minus those below.
        let at = offset.saturating_add(self.shift - below);
        dbg.check_async(op, at, len).await
    }

    fn at(&self, offset: u64) -> Result<u64> {
        offset
            .checked_add(self.shift)
            .ok_or_else(|| BlockError::Invalid(format!("offset {offset} overflows the window")))
    }

    pub async fn preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.at(offset)?;
        self.filter(BlkdebugOp::Read, offset, buf.len() as u64)
            .await?;
        match self.leaf {
            AsyncLeaf::File(f) => f.preadv_async(off, buf).await,
            AsyncLeaf::Null(n) => n.preadv_async(off, buf).await,
        }
    }

    pub async fn pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let off = self.at(offset)?;
        self.filter(BlkdebugOp::Write, offset, buf.len() as u64)
            .await?;
        match self.leaf {
            AsyncLeaf::File(f) => f.pwritev_async(off, buf).await,
            AsyncLeaf::Null(n) => n.pwritev_async(off, buf).await,
        }
    }

    pub async fn flush(&self) -> Result<()> {
        self.filter(BlkdebugOp::Flush, 0, u64::MAX).await?;
        match self.leaf {
            AsyncLeaf::File(f) => f.flush_async().await,
            AsyncLeaf::Null(n) => n.flush_async().await,
        }
    }

    pub async fn pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let off = self.at(offset)?;
        self.filter(BlkdebugOp::Write, offset, len).await?;
        match self.leaf {
            AsyncLeaf::File(f) => f.pwrite_zeroes_async(off, len, may_unmap).await,
            AsyncLeaf::Null(n) => n.pwrite_zeroes_async(off, len, may_unmap).await,
        }
    }

    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        let off = self.at(offset)?;
        self.filter(BlkdebugOp::Write, offset, len).await?;
        match self.leaf {
            AsyncLeaf::File(f) => f.pdiscard_async(off, len).await,
            AsyncLeaf::Null(n) => n.pdiscard_async(off, len).await,
        }
    }

    /// Block status never waits in these drivers (`lseek` runs inline in both engines); a
    /// filter's `any` rules may hold or fail it.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let off = self.at(offset)?;
        self.filter(BlkdebugOp::Any, offset, len).await?;
        match self.leaf {
            AsyncLeaf::File(f) => BlockDriver::co_block_status(f, off, len),
            AsyncLeaf::Null(n) => BlockDriver::co_block_status(n, off, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> NullDriver {
        NullDriver::new(1 << 20, false)
    }

    #[test]
    fn of_looks_through_raw_windows_to_a_known_leaf() {
        use crate::{BlkdebugDriver, RawDriver, RawOptions};
        use std::sync::Arc;

        let leaf: Arc<dyn BlockDriver> = Arc::new(null());
        assert!(matches!(AsyncPath::of(&*leaf), Some(p) if p.shift == 0 && p.guard.is_none()));
        let window = |child: Arc<dyn BlockDriver>, offset| {
            let opts = RawOptions { offset, size: None };
            RawDriver::new(child, opts).expect("raw window")
        };
        // raw (probed, at 4096) over raw (at 1024) over null.
        let inner: Arc<dyn BlockDriver> = Arc::new(window(leaf.clone(), 1024));
        let outer = window(inner, 4096).mark_probed();
        let p = AsyncPath::of(&outer).expect("a native path");
        assert!(matches!(p.leaf, AsyncLeaf::Null(_)));
        assert_eq!(p.shift, 5120);
        // The probed node guards its child's first 512 bytes: leaf bytes 1024..1536.
        assert_eq!(p.guard, Some((1024, 1536)));
        // The error-injection filter is driven natively, its offsets in its own coordinates.
        let dbg: Arc<dyn BlockDriver> =
            Arc::new(BlkdebugDriver::new(Arc::new(window(leaf.clone(), 512))));
        let over_dbg = window(dbg.clone(), 4096);
        let p = AsyncPath::of(&over_dbg).expect("a native path through blkdebug");
        assert_eq!(p.shift, 4608);
        assert!(matches!(p.filter, Some((_, 512))));
        // Two filters on one path: the bridge.
        let twice = BlkdebugDriver::new(dbg);
        assert!(AsyncPath::of(&twice).is_none());
        // A node that is neither a known leaf, a filter nor a window: the bridge.
        let other = crate::blklogwrites::BlklogwritesDriver::new(leaf);
        assert!(AsyncPath::of(&other).is_none());
    }

    #[test]
    fn shifts_add_up_and_overflow_is_refused() {
        let n = null();
        let p = AsyncPath::new(AsyncLeaf::Null(&n));
        let p = p.shifted(1000).and_then(|p| p.shifted(24)).expect("shift");
        assert_eq!(p.shift, 1024);
        assert_eq!(p.at(10).ok(), Some(1034));
        assert!(p.at(u64::MAX).is_err());
        assert!(p.shifted(u64::MAX).is_none());
    }

    #[test]
    fn a_guard_is_in_leaf_coordinates_and_survives_later_shifts() {
        let n = null();
        // A raw node over a window starting at 4096 of the leaf guards its child's first
        // 512 bytes, i.e. leaf bytes 4096..4608; a raw window above shifts by 1024 more.
        let p = AsyncPath::new(AsyncLeaf::Null(&n))
            .shifted(4096)
            .and_then(|p| p.guard_first(512))
            .and_then(|p| p.shifted(1024))
            .expect("path");
        assert_eq!(p.guard, Some((4096, 4608)));
        // Node offsets are relative to the top: leaf = offset + 5120.
        assert!(!p.touches_guard(0, 1)); // leaf 5120: past the guard
        let unguarded = AsyncPath::new(AsyncLeaf::Null(&n))
            .shifted(1024)
            .expect("path");
        assert!(!unguarded.touches_guard(0, 1 << 20));
        let q = AsyncPath::new(AsyncLeaf::Null(&n))
            .guard_first(512)
            .expect("guard");
        assert!(q.touches_guard(0, 1));
        assert!(q.touches_guard(511, 100));
        assert!(q.touches_guard(100, 0)); // an empty change at 100 still counts as touching
        assert!(!q.touches_guard(512, 4096));
        assert!(p.touches_guard(u64::MAX, 1)); // cannot be placed: bridge
    }
}
