//! The `raw` format driver: the child's bytes as they are, optionally a window of them.
//!
//! QEMU: `block/raw-format.c` (`raw_read_options()`, `raw_apply_options()`, `raw_adjust_offset()`,
//! `raw_co_truncate()`, `raw_co_block_status()`).
//!
//! Without options raw passes every request through. With `offset` and/or `size` it exports
//! `[offset, offset+size)` of the child — a partition inside a disk image, say. The window is
//! checked at open (it must lie inside the child, and be aligned to the child's request alignment
//! so that aligned requests stay aligned); requests are shifted by `offset`.
//!
//! Resizing: a window with a fixed `size` cannot be resized ([`BlockError::NotSupported`]); with
//! only an `offset`, truncating to `n` truncates the child to `offset + n`, as QEMU does.

use std::sync::Arc;

use crate::async_io::AsyncPath;
use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// The window of a [`RawDriver`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawOptions {
    /// Where the exported range starts in the child.
    pub offset: u64,
    /// How long it is; `None`: to the end of the child.
    pub size: Option<u64>,
}

/// The `raw` format over any child. QEMU: `BDRVRawState` of `raw-format.c`.
pub struct RawDriver {
    child: Arc<dyn BlockDriver>,
    offset: u64,
    size: Option<u64>,
}

impl RawDriver {
    /// Opens a raw node over `child`; checks that the window lies inside it. QEMU:
    /// `raw_open()` → `raw_apply_options()`.
    pub fn new(child: Arc<dyn BlockDriver>, opts: RawOptions) -> Result<RawDriver> {
        let child_len = child.getlength();
        let align = child.request_alignment().max(1);
        if opts.offset > child_len {
            return Err(BlockError::Invalid(format!(
                "offset ({}) cannot be greater than the size of the file ({child_len})",
                opts.offset
            )));
        }
        if let Some(size) = opts.size {
            let fits = matches!(opts.offset.checked_add(size), Some(end) if end <= child_len);
            if !fits {
                return Err(BlockError::Invalid(format!(
                    "the sum of offset ({}) and size ({size}) must not exceed the size of the \
                     file ({child_len})",
                    opts.offset
                )));
            }
            if size % align != 0 {
                return Err(BlockError::Invalid(format!(
                    "size ({size}) must be a multiple of the request alignment ({align})"
                )));
            }
        }
        if opts.offset % align != 0 {
            return Err(BlockError::Invalid(format!(
                "offset ({}) must be a multiple of the request alignment ({align})",
                opts.offset
            )));
        }
        Ok(RawDriver {
            child,
            offset: opts.offset,
            size: opts.size,
        })
    }

    /// The child node.
    pub fn child(&self) -> &Arc<dyn BlockDriver> {
        &self.child
    }

    /// Whether this node exports only part of its child.
    pub fn is_windowed(&self) -> bool {
        self.offset != 0 || self.size.is_some()
    }

    /// The child offset of `offset`. QEMU: `raw_adjust_offset()`.
    fn child_offset(&self, offset: u64) -> Result<u64> {
        offset
            .checked_add(self.offset)
            .ok_or_else(|| BlockError::Invalid(format!("offset {offset} overflows the window")))
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn getlength(&self) -> u64 {
        match self.size {
            Some(size) => size,
            None => self.child.getlength().saturating_sub(self.offset),
        }
    }

    fn request_alignment(&self) -> u64 {
        self.child.request_alignment()
    }

    fn min_mem_alignment(&self) -> u64 {
        self.child.min_mem_alignment()
    }

    fn is_read_only(&self) -> bool {
        self.child.is_read_only()
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.child.co_preadv(self.child_offset(offset)?, buf)
    }

    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.child.co_pwritev(self.child_offset(offset)?, buf)
    }

    fn co_flush(&self) -> Result<()> {
        self.child.co_flush()
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.child
            .co_pwrite_zeroes(self.child_offset(offset)?, len, may_unmap)
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        self.child.co_pdiscard(self.child_offset(offset)?, len)
    }

    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.child.co_block_status(self.child_offset(offset)?, len)
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        if self.size.is_some() {
            return Err(BlockError::NotSupported(
                "resizing a raw image with a fixed size window",
            ));
        }
        self.child.co_truncate(self.child_offset(size)?)
    }

    fn close(&self) -> Result<()> {
        self.child.close()
    }

    /// The child's path, shifted by the window's offset. Raw adds nothing else to a request;
    /// truncation, which it does check, goes through the coroutine bridge. A check raw makes
    /// on some writes must be declared here with [`AsyncPath::guard_first`] (the probed-image
    /// first-sector guard: `if self.probed { p = p.guard_first(PROBE_SECTOR)? }` before the
    /// shift), or the async engine would skip it.
    fn async_path(&self) -> Option<AsyncPath<'_>> {
        self.child.async_path()?.shifted(self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NullDriver;

    fn null(size: u64) -> Arc<dyn BlockDriver> {
        Arc::new(NullDriver::new(size, false))
    }

    #[test]
    fn window_must_fit() {
        assert!(RawDriver::new(
            null(4096),
            RawOptions {
                offset: 5000,
                size: None
            }
        )
        .is_err());
        assert!(RawDriver::new(
            null(4096),
            RawOptions {
                offset: 1024,
                size: Some(4096)
            }
        )
        .is_err());
        assert!(RawDriver::new(
            null(4096),
            RawOptions {
                offset: 1,
                size: Some(u64::MAX)
            }
        )
        .is_err());
        let raw = RawDriver::new(
            null(4096),
            RawOptions {
                offset: 1024,
                size: Some(2048),
            },
        )
        .expect("a window inside the child");
        assert_eq!(raw.getlength(), 2048);
        assert!(raw.is_windowed());
        assert!(matches!(
            raw.co_truncate(8192),
            Err(BlockError::NotSupported(_))
        ));
    }

    #[test]
    fn offset_only_window_resizes_the_child() {
        let child = null(4096);
        let raw = RawDriver::new(
            child.clone(),
            RawOptions {
                offset: 1024,
                size: None,
            },
        )
        .expect("open");
        assert_eq!(raw.getlength(), 3072);
        raw.co_truncate(10_000).expect("truncate");
        assert_eq!(child.getlength(), 11_024);
        assert_eq!(raw.getlength(), 10_000);
    }
}
