//! The block layer: a `BlockBackend` on top of a stack of `BlockDriver` nodes.
//!
//! QEMU: `block/block-backend.c` (the `blk_*` API), `include/block/block_int-common.h`
//! (`BlockDriver`), `block/io.c` (request alignment, in-flight tracking, drain).
//!
//! ```text
//!   export (fuse)  ──>  BlockBackend   size, permissions, in-flight count, drain, alignment
//!                           │
//!                           ▼
//!                     format driver    raw (offset/size window) | qcow2 | null
//!                           │
//!                           ▼
//!                    protocol driver   file (preadv/pwritev on the thread pool)
//! ```
//!
//! Every `co_` method may yield: call it from a coroutine. Drivers are `Send + Sync` because one
//! image is shared by all queue threads; state that needs a lock across a yield uses
//! `runtime::CoMutex`.

use std::fmt;
use std::io;

/// One error type for the block layer; the export maps it to an errno once.
#[derive(Debug)]
pub enum BlockError {
    /// An I/O error from the backing file (or injected by the debug filter).
    Io(io::Error),
    /// The node or backend was opened read-only.
    ReadOnly,
    /// The request lies (partly) beyond the end of the node.
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The driver cannot do this (e.g. discard on a driver without it).
    NotSupported(&'static str),
    /// The image's metadata is inconsistent.
    Corrupt(String),
    /// Invalid arguments from the caller.
    Invalid(String),
}

impl BlockError {
    /// The errno a client should see.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            BlockError::ReadOnly => libc::EROFS,
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::NotSupported(_) => libc::EOPNOTSUPP,
            BlockError::Corrupt(_) => libc::EIO,
            BlockError::Invalid(_) => libc::EINVAL,
        }
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::Io(e) => write!(f, "i/o error: {e}"),
            BlockError::ReadOnly => write!(f, "read-only"),
            BlockError::OutOfRange { offset, len, size } => {
                write!(f, "request {offset}+{len} beyond the end ({size} bytes)")
            }
            BlockError::NotSupported(what) => write!(f, "not supported: {what}"),
            BlockError::Corrupt(why) => write!(f, "image is corrupt: {why}"),
            BlockError::Invalid(why) => write!(f, "invalid request: {why}"),
        }
    }
}

impl std::error::Error for BlockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BlockError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for BlockError {
    fn from(e: io::Error) -> Self {
        BlockError::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, BlockError>;

/// What a range of a node holds. QEMU: `BDRV_BLOCK_DATA`, `BDRV_BLOCK_ZERO`, unallocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatus {
    /// Allocated data (may also read as zeros).
    Data,
    /// Reads as zeros (a hole or a zero cluster).
    Zero,
    /// Not allocated in this node (reads from the backing file, or zeros without one).
    Unallocated,
}

/// A block driver: a format (raw, qcow2, null) or protocol (file) node.
///
/// QEMU: `BlockDriver` in `include/block/block_int-common.h`. All offsets are bytes; requests
/// reach a driver already aligned to [`BlockDriver::request_alignment`] and inside
/// [`BlockDriver::getlength`] (the backend checks), except `co_truncate`.
pub trait BlockDriver: Send + Sync {
    /// The driver's name as `qemu-img info` would print it ("raw", "qcow2", "null", "file").
    fn format_name(&self) -> &'static str;

    /// Current size in bytes. QEMU: `bdrv_getlength()`.
    fn getlength(&self) -> u64;

    /// Required alignment of offsets and lengths (1 unless O_DIRECT or a format needs more).
    fn request_alignment(&self) -> u64 {
        1
    }

    /// Whether writes are possible at all.
    fn is_read_only(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`. QEMU: `bdrv_co_preadv`.
    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf` at `offset`. QEMU: `bdrv_co_pwritev`.
    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Makes completed writes durable. QEMU: `bdrv_co_flush`.
    fn co_flush(&self) -> Result<()>;

    /// Makes `[offset, offset+len)` read as zeros; with `may_unmap`, it may deallocate.
    /// QEMU: `bdrv_co_pwrite_zeroes` (`BDRV_REQ_MAY_UNMAP`).
    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;

    /// Hints that `[offset, offset+len)` is unused; contents become unspecified (usually zero).
    /// QEMU: `bdrv_co_pdiscard`.
    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()>;

    /// The status of the range starting at `offset`, and how many bytes (≥ 1, ≤ `len`) share it.
    /// QEMU: `bdrv_co_block_status`.
    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)>;

    /// Changes the size; growing makes the new range read as zeros. QEMU: `bdrv_co_truncate`.
    fn co_truncate(&self, size: u64) -> Result<()>;

    /// Flushes and releases resources before the process exits. QEMU: `bdrv_close`.
    fn close(&self) -> Result<()> {
        Ok(())
    }
}
