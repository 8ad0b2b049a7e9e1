//! The `null-co` driver: a device of a given size that reads as zeros and forgets writes.
//!
//! QEMU: `block/null.c` (`null-co` with `read-zeroes=on`). Benchmarks use it to measure the
//! transport (FUSE, coroutines, the event loop) without any storage underneath. No method
//! ever waits, so the async engine calls the same methods ([`crate::async_engine`]).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// The `null-co` driver. QEMU: `BDRVNullState`.
pub struct NullDriver {
    /// Only `co_truncate` changes it, under the backend's resize lock; the backend caches the
    /// value (with its own ordering), so Relaxed suffices here.
    size: AtomicU64,
    read_only: bool,
}

impl NullDriver {
    /// A null device of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> NullDriver {
        NullDriver {
            size: AtomicU64::new(size),
            read_only,
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        "null-co"
    }

    fn getlength(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn co_preadv(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn co_pwritev(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        self.check_writable()
    }

    fn co_flush(&self) -> Result<()> {
        Ok(())
    }

    fn co_pwrite_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        self.check_writable()
    }

    fn co_pdiscard(&self, _offset: u64, _len: u64) -> Result<()> {
        self.check_writable()
    }

    fn co_block_status(&self, _offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Zero, len.max(1)))
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}
