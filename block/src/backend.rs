//! `BlockBackend`: the handle the export holds — size, permissions, range checks, request
//! alignment, in-flight counting and drain — on top of a driver stack.
//!
//! QEMU: `block/block-backend.c` (`blk_co_preadv()`, `blk_co_pwritev()`, `blk_check_byte_request()`,
//! `blk_inc_in_flight()`, `blk_drain()`) and the generic request code of `block/io.c`
//! (`bdrv_co_preadv_part()`, `bdrv_padding_rmw_read()`, `bdrv_make_request_serialising()`,
//! `bdrv_co_pwrite_zeroes()` head/tail splitting, `bdrv_co_pdiscard()` alignment).
//!
//! ## A request
//!
//! 1. count it in flight (every `co_` method, errors included, until it returns);
//! 2. check permissions ([`BlockError::ReadOnly`]) and the range: a request past the end is the
//!    caller's error ([`BlockError::OutOfRange`]) — the FUSE export clamps at EOF, or grows the
//!    image first (`Export::co_grow_to` owns the growth rules) — except on a backend that a
//!    format driver holds on its file, where a write past the end extends the file
//!    ([`BackendOptions::write_beyond_eof`]);
//! 3. if the driver needs alignment (O_DIRECT), pad: an unaligned read goes through an aligned
//!    bounce buffer, an unaligned write becomes read-modify-write of the edge blocks;
//! 4. call the driver.
//!
//! ## Discard and detect-zeroes
//!
//! The node options QEMU calls `discard` and `detect-zeroes` ([`Discard`], [`DetectZeroes`])
//! are applied here, once for both engines: with `discard=ignore` a discard succeeds without
//! reaching the driver and a write-zeroes loses `may_unmap` (the range still reads as zeros,
//! it just stays allocated); with `detect-zeroes` on, a write whose buffer is all zeros
//! becomes a write-zeroes (with `may_unmap` for `unmap`, which the discard option then masks).
//!
//! ## Serialising requests
//!
//! A read-modify-write reads a whole block, patches a few bytes and writes the block back. If
//! another write to the same block landed in between, the write-back would undo it. QEMU marks
//! such requests *serialising* and makes overlapping requests wait for them. We use one
//! [`runtime::CoRwLock`]: an unaligned write (or truncate) takes it exclusively, every aligned
//! write, write-zeroes and discard takes it shared. Reads never take it: they write nothing
//! back. This is coarser than QEMU — an unaligned write waits for *all* writes in flight, not
//! only the overlapping ones — but obviously correct, and costs nothing unless the driver has an
//! alignment (with alignment 1 the lock is not touched at all).
//!
//! When the image size is not a multiple of the alignment, the padded write of the last block
//! extends the file; the backend truncates it back to its size (QEMU rounds such images up).
//!
//! ## Two engines
//!
//! Every `co_` method has an async form (`pread_async`, …) for `--engine async`, defined with
//! the rest of the async engine in [`crate::async_engine`] (`async_engine/backend.rs`). Both run
//! the same checks (the pure helpers here: `check_range`, `write_range`, `block_status_len`, …,
//! `pub(crate)` for that reason) and count the request in flight the same way; the async forms
//! then reach the driver natively or, for anything slow or unusual, run the `co_` method itself
//! in a coroutine. The padding, serialising and growth logic exists once, here.
//!
//! ## In flight and drain
//!
//! `in_flight` counts requests inside the backend. [`BlockBackend::drain`] polls the caller's
//! event loop until it is zero (`AIO_WAIT_WHILE`); whoever brings it to zero calls
//! [`runtime::kick`] so a drain waiting on another thread re-checks. Drain does not stop new
//! requests from arriving: the export stops reading `/dev/fuse` first (QEMU's
//! `bdrv_drained_begin()` quiesces the parents the same way).
//!
//! ## Calling context
//!
//! `co_` methods are meant for coroutines. Outside one they still work as long as they need not
//! wait for a lock (an uncontended `CoMutex`/`CoRwLock` does not yield) — this is how
//! [`crate::open_image`] probes and how [`BlockBackend::close`] flushes at shutdown; the file
//! driver then runs its syscalls on the calling thread.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use runtime::{AioContext, CoMutex, CoReadGuard, CoRwLock, InFlight, InFlightGuard};

use crate::sys::AlignedBuf;
use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// What a discard request does, and whether write-zeroes may deallocate. QEMU: the
/// `discard` option of a block node (`BDRV_O_UNMAP`). The library's default is `Unmap`, as
/// `qemu-img` and `qemu-io` open images; the `coro-fuse` command line defaults to `Ignore`,
/// QEMU's default for `-blockdev` and `qemu-storage-daemon`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Discard {
    /// Discards succeed and do nothing; write-zeroes zero the range but never deallocate
    /// (`BDRV_REQ_MAY_UNMAP` is dropped).
    Ignore,
    /// Discards are passed down (deallocating where the driver can); write-zeroes with
    /// `may_unmap` may deallocate.
    #[default]
    Unmap,
}

/// Whether writes of all-zero buffers become write-zeroes requests. QEMU: the
/// `detect-zeroes` option (`BlockdevDetectZeroesOptions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as they are (QEMU's default).
    #[default]
    Off,
    /// An all-zero write becomes a write-zeroes without `may_unmap`.
    On,
    /// An all-zero write becomes a write-zeroes with `may_unmap`, which deallocates only with
    /// [`Discard::Unmap`] (with [`Discard::Ignore`] it behaves as [`DetectZeroes::On`]).
    Unmap,
}

/// Whether `buf` is all zeros (QEMU: `buffer_is_zero()`): the first and last bytes first, then
/// 16-byte words, which the compiler vectorises.
fn buffer_is_zero(buf: &[u8]) -> bool {
    if buf.first().is_some_and(|&b| b != 0) || buf.last().is_some_and(|&b| b != 0) {
        return false;
    }
    let mut words = buf.chunks_exact(16);
    let words_zero = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0);
    words_zero && words.remainder().iter().all(|&b| b == 0)
}

/// Options of a [`BlockBackend`]. The default passes discards down ([`Discard::Unmap`]), as a
/// format driver's handle on its file needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// Refuse every write, write-zeroes, discard and truncate with [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// A write or write-zeroes that ends past the end first extends the node to exactly that
    /// end, as `pwrite` extends a file; otherwise it is [`BlockError::OutOfRange`]. For a format
    /// driver's handle on its file (qcow2 puts new clusters at the end of the file), not for
    /// an export: growing the virtual disk has rules of its own (the format's size
    /// granularity, one lock with truncate), and they are the export's (`Export::co_grow_to`).
    /// QEMU: `blk_set_allow_write_beyond_eof()`.
    pub write_beyond_eof: bool,
    /// QEMU `discard=`: applied to [`BlockBackend::co_pdiscard`] and the `may_unmap` of
    /// [`BlockBackend::co_pwrite_zeroes`] (and their async forms).
    pub discard: Discard,
    /// QEMU `detect-zeroes=`: applied to [`BlockBackend::co_pwrite`] (and its async form).
    pub detect_zeroes: DetectZeroes,
}

/// The export's handle on an image. `Send + Sync`: share it as `Arc<BlockBackend>`.
///
/// QEMU: `BlockBackend`.
pub struct BlockBackend {
    pub(crate) driver: Arc<dyn BlockDriver>,
    read_only: bool,
    write_beyond_eof: bool,
    pub(crate) discard: Discard,
    detect_zeroes: DetectZeroes,
    /// Offset/length alignment the driver needs (≥ 1).
    pub(crate) align: u64,
    /// Buffer address alignment the driver needs (a power of two ≥ 1).
    pub(crate) mem_align: u64,
    /// Cached `driver.getlength()`, refreshed after every size change. Written with Release and
    /// read with Acquire: a thread that sees a new size also sees the driver state that the
    /// resize wrote before it (the null driver's size, a raw window's bookkeeping).
    size: AtomicU64,
    /// Requests inside the backend (the ordering is documented at [`runtime::InFlight`]).
    in_flight: InFlight,
    /// Serialising requests; see the module documentation.
    serialise: CoRwLock<()>,
    /// Serialises size changes (truncate, a write beyond EOF), so that the driver's size and
    /// the cached one change together.
    resize: CoMutex<()>,
    closed: AtomicBool,
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn align_up(x: u64, a: u64) -> Result<u64> {
    match x.checked_add(a - 1) {
        Some(v) => Ok(align_down(v, a)),
        None => Err(BlockError::Invalid(format!(
            "offset {x} overflows when aligned to {a}"
        ))),
    }
}

impl BlockBackend {
    /// A backend over `driver`. Fails with [`BlockError::ReadOnly`] if a writable backend is
    /// asked of a read-only driver. QEMU: `blk_new()` + `blk_insert_bs()`.
    pub fn new(driver: Arc<dyn BlockDriver>, opts: BackendOptions) -> Result<BlockBackend> {
        if !opts.read_only && driver.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        let align = driver.request_alignment().max(1);
        let mem_align = driver.min_mem_alignment().max(1).next_power_of_two();
        let size = driver.getlength();
        Ok(BlockBackend {
            driver,
            read_only: opts.read_only,
            write_beyond_eof: opts.write_beyond_eof,
            discard: opts.discard,
            detect_zeroes: opts.detect_zeroes,
            align,
            mem_align,
            size: AtomicU64::new(size),
            in_flight: InFlight::new(),
            serialise: CoRwLock::new(()),
            resize: CoMutex::new(()),
            closed: AtomicBool::new(false),
        })
    }

    /// The top driver of the stack.
    pub fn driver(&self) -> &Arc<dyn BlockDriver> {
        &self.driver
    }

    /// The top driver's format name ("raw", "null-co", …).
    pub fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The granularity of the size: every size the image can have and keep across a close and
    /// reopen is a multiple of it (512 for qcow2, 1 for a raw file). Whoever grows the image
    /// rounds up to it. QEMU: `BDRV_SECTOR_SIZE`, the unit of `bs->total_sectors`.
    pub fn size_granularity(&self) -> u64 {
        self.driver.size_granularity().max(1)
    }

    /// The alignment the driver needs; the backend pads requests to it. QEMU:
    /// `bs->bl.request_alignment`.
    pub fn request_alignment(&self) -> u64 {
        self.align
    }

    /// The size in bytes (cached; cheap from any thread). QEMU: `blk_getlength()`.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Requests currently inside the backend. QEMU: `BlockBackend::in_flight`.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Counts a request in until the guard drops. QEMU: `blk_inc_in_flight()`.
    pub(crate) fn enter(&self) -> InFlightGuard<'_> {
        self.in_flight.enter()
    }

    /// `Some(may_unmap)` if this write is to become a write-zeroes (detect-zeroes is on and
    /// the buffer is all zeros). QEMU: the `detect_zeroes` check in `bdrv_aligned_pwritev()`.
    pub(crate) fn detected_zeroes(&self, buf: &[u8]) -> Option<bool> {
        if self.detect_zeroes == DetectZeroes::Off || buf.is_empty() || !buffer_is_zero(buf) {
            return None;
        }
        Some(self.detect_zeroes == DetectZeroes::Unmap)
    }

    /// `may_unmap` as the discard option allows it. QEMU: `bdrv_co_pwrite_zeroes()` drops
    /// `BDRV_REQ_MAY_UNMAP` without `BDRV_O_UNMAP`.
    pub(crate) fn allow_unmap(&self, may_unmap: bool) -> bool {
        may_unmap && self.discard == Discard::Unmap
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    /// QEMU: `blk_check_byte_request()`.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    /// The range check for writes: past the end is an error, or extends the node
    /// ([`BackendOptions::write_beyond_eof`]).
    fn check_write_range(&self, offset: u64, len: u64) -> Result<()> {
        match self.write_range(offset, len)? {
            Some(end) => self.co_grow(end),
            None => Ok(()),
        }
    }

    /// The pure part of the write range check, shared by both engines: `Some(end)` if the
    /// image must first grow to `end`.
    pub(crate) fn write_range(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(None),
            Some(end) if self.write_beyond_eof => Ok(Some(end)),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    #[cold]
    fn co_grow(&self, end: u64) -> Result<()> {
        let _resize = self.resize.co_lock();
        if end > self.size() {
            self.truncate_locked(end)?;
        }
        Ok(())
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        self.align == 1 || (offset.is_multiple_of(self.align) && len.is_multiple_of(self.align))
    }

    fn is_mem_aligned(&self, ptr: *const u8) -> bool {
        // `mem_align` is a power of two (see `new`).
        (ptr as usize as u64) & (self.mem_align - 1) == 0
    }

    fn bounce(&self, len: u64) -> Result<AlignedBuf> {
        let len = usize::try_from(len)
            .map_err(|_| BlockError::Invalid(format!("a {len}-byte request is too large")))?;
        Ok(AlignedBuf::zeroed(len, self.mem_align as usize)?)
    }

    /// A shared hold on the serialising lock, when the driver has an alignment.
    fn serialise_shared(&self) -> Option<CoReadGuard<'_, ()>> {
        (self.align > 1).then(|| self.serialise.co_read())
    }

    /// Reads `buf.len()` bytes at `offset`. QEMU: `blk_co_pread()`.
    pub fn co_pread(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _req = self.enter();
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.is_aligned(offset, len) && self.is_mem_aligned(buf.as_ptr()) {
            return self.driver.co_preadv(offset, buf);
        }
        self.co_pread_bounced(offset, buf)
    }

    /// Reads the aligned blocks around the request into a bounce buffer and copies out the
    /// middle. QEMU: `bdrv_co_preadv_part()` with `bdrv_pad_request()`.
    #[cold]
    fn co_pread_bounced(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = align_down(offset, self.align);
        let end = align_up(offset + buf.len() as u64, self.align)?;
        let mut bounce = self.bounce(end - start)?;
        self.driver.co_preadv(start, &mut bounce)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes `buf` at `offset`. QEMU: `blk_co_pwrite()`.
    pub fn co_pwrite(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if let Some(may_unmap) = self.detected_zeroes(buf) {
            return self.co_pwrite_zeroes(offset, buf.len() as u64, may_unmap);
        }
        let _req = self.enter();
        self.check_writable()?;
        self.check_write_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.pwrite_checked(offset, buf)
    }

    /// A write that passed the checks: straight through, via a bounce copy, or as RMW.
    fn pwrite_checked(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        if !self.is_aligned(offset, len) {
            return self.co_pwrite_rmw(offset, buf);
        }
        let _shared = self.serialise_shared();
        if self.is_mem_aligned(buf.as_ptr()) {
            return self.driver.co_pwritev(offset, buf);
        }
        let mut bounce = self.bounce(len)?;
        bounce.copy_from_slice(buf);
        self.driver.co_pwritev(offset, &bounce)
    }

    /// Read-modify-write of the edge blocks, as a serialising request. QEMU:
    /// `bdrv_co_pwritev_part()` with `bdrv_padding_rmw_read()` and
    /// `bdrv_make_request_serialising()`.
    #[cold]
    fn co_pwrite_rmw(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let _exclusive = self.serialise.co_write();
        let a = self.align;
        let end = offset + buf.len() as u64;
        let start = align_down(offset, a);
        let padded_end = align_up(end, a)?;
        let mut bounce = self.bounce(padded_end - start)?;
        let block = a as usize;
        let head = offset != start;
        if head {
            self.driver.co_preadv(start, &mut bounce[..block])?;
        }
        // The tail block, unless it is the head block we just read.
        if end != padded_end && !(head && padded_end - start == a) {
            let n = bounce.len();
            self.driver
                .co_preadv(padded_end - a, &mut bounce[n - block..])?;
        }
        let skip = (offset - start) as usize;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.driver.co_pwritev(start, &bounce)?;

        // The padding went past our end (size not a multiple of the alignment) and the driver
        // grew: cut it back, so the file keeps its size.
        let size = self.size();
        if padded_end > size && self.driver.getlength() > size {
            self.driver.co_truncate(size)?;
        }
        Ok(())
    }

    /// Makes completed writes durable. QEMU: `blk_co_flush()`.
    pub fn co_flush(&self) -> Result<()> {
        let _req = self.enter();
        self.driver.co_flush()
    }

    /// Makes `[offset, offset+len)` read as zeros; `may_unmap` allows deallocating (punching a
    /// hole). Unaligned head and tail become explicit zero writes. QEMU:
    /// `blk_co_pwrite_zeroes()`, `bdrv_co_do_pwrite_zeroes()`.
    pub fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let may_unmap = self.allow_unmap(may_unmap);
        let _req = self.enter();
        self.check_writable()?;
        self.check_write_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let a = self.align;
        if a == 1 {
            return self.driver.co_pwrite_zeroes(offset, len, may_unmap);
        }
        let end = offset + len;
        let mid_start = align_up(offset, a)?.min(end);
        let mid_end = align_down(end, a).max(mid_start);
        if offset < mid_start {
            self.pwrite_checked(offset, &vec![0; (mid_start - offset) as usize])?;
        }
        if mid_start < mid_end {
            let _shared = self.serialise.co_read();
            self.driver
                .co_pwrite_zeroes(mid_start, mid_end - mid_start, may_unmap)?;
        }
        if mid_end < end {
            self.pwrite_checked(mid_end, &vec![0; (end - mid_end) as usize])?;
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)`; afterwards the range has unspecified contents. With an
    /// alignment, only the aligned middle is discarded (discard is advisory). QEMU:
    /// `blk_co_pdiscard()`, `bdrv_co_pdiscard()`.
    pub fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        let _req = self.enter();
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.discard == Discard::Ignore {
            return Ok(());
        }
        let start = align_up(offset, self.align)?;
        let end = align_down(offset + len, self.align);
        if start >= end {
            return Ok(());
        }
        let _shared = self.serialise_shared();
        self.driver.co_pdiscard(start, end - start)
    }

    /// The status of the range starting at `offset` (which must be inside the image) and how
    /// many bytes share it (1 ..= `len` clamped at EOF), looking through the backing chain:
    /// never [`BlockStatus::Unallocated`]. QEMU: `bdrv_co_block_status_above(bs, NULL, …)`.
    pub fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let _req = self.enter();
        let len = self.block_status_len(offset, len)?;
        let (status, n) = crate::chain::co_block_status_above(&*self.driver, offset, len)?;
        Ok((status, n.clamp(1, len)))
    }

    /// The checks of a block-status query (shared by both engines): the length clamped at EOF.
    pub(crate) fn block_status_len(&self, offset: u64, len: u64) -> Result<u64> {
        let size = self.size();
        if offset >= size {
            return Err(BlockError::OutOfRange { offset, len, size });
        }
        let len = len.min(size - offset);
        if len == 0 {
            return Err(BlockError::Invalid("block status of an empty range".into()));
        }
        Ok(len)
    }

    /// Changes the size; growing makes the new range read as zeros. Waits for serialising
    /// requests. QEMU: `blk_co_truncate()`.
    pub fn co_truncate(&self, size: u64) -> Result<()> {
        let _req = self.enter();
        self.check_writable()?;
        let _resize = self.resize.co_lock();
        self.truncate_locked(size)
    }

    /// Truncates with `resize` held, and refreshes the cached size.
    fn truncate_locked(&self, size: u64) -> Result<()> {
        let _exclusive = (self.align > 1).then(|| self.serialise.co_write());
        let res = self.driver.co_truncate(size);
        // Refresh even on error: a failed truncate may still have changed something.
        self.size.store(self.driver.getlength(), Ordering::Release);
        res
    }

    /// Polls `ctx` until no request is in flight. Call it from the main loop, not from a
    /// coroutine. QEMU: `blk_drain()` / `AIO_WAIT_WHILE(ctx, blk->in_flight > 0)`.
    pub fn drain(&self, ctx: &AioContext) {
        self.in_flight.drain(ctx);
    }

    /// Flushes and closes the driver stack, once (later calls do nothing). Drain first; closing
    /// with requests in flight is logged. QEMU: `blk_unref()` → `bdrv_close()`.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let n = self.in_flight();
        if n > 0 {
            log::warn!("closing a block backend with {n} request(s) in flight; drain() first");
        }
        self.driver.close()
    }
}

impl fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockBackend")
            .field("format", &self.driver.format_name())
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .field("write_beyond_eof", &self.write_beyond_eof)
            .field("discard", &self.discard)
            .field("detect_zeroes", &self.detect_zeroes)
            .field("align", &self.align)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// `BlockBackend` is shared by all queue threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BlockBackend>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(1000, 512), 512);
        assert_eq!(align_up(1000, 512).ok(), Some(1024));
        assert_eq!(align_up(1024, 512).ok(), Some(1024));
        assert_eq!(align_up(7, 1).ok(), Some(7));
        assert!(align_up(u64::MAX, 512).is_err());
    }
}
